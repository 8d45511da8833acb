// Package testcluster starts real `ferry server` processes on loopback for
// end-to-end, chaos and benchmark suites: a real binary, real data dirs, real
// mutual TLS between nodes, real unix admin sockets.
package testcluster

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/test/freeport"
)

var (
	buildOnce sync.Once
	buildPath string
	buildErr  error
)

// Binary builds cmd/ferry once per test process and returns its path.
func Binary(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "ferry-bin-")
		if err != nil {
			buildErr = err
			return
		}
		// Tests run the binary as other users too.
		_ = os.Chmod(dir, 0o755)
		buildPath = filepath.Join(dir, "ferry")
		cmd := exec.Command("go", "build", "-o", buildPath, "github.com/ferry-id/ferry/cmd/ferry")
		out, err := cmd.CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return buildPath
}

// Options shape a cluster.
type Options struct {
	Nodes             int    // default 3
	TrustDomain       string // default example.org
	LogStore          string // "" = the server's default
	SnapshotThreshold int
	TrailingLogs      int
	SnapshotInterval  string
	RaftMultiplier    int    // cluster.raft_multiplier; 0 = the server's default
	LogLevel          string // default debug
	AgentLogLevel     string // agents' log_level; default debug
	// AdminTCP also serves the admin services over mutual TLS (admin_addr).
	AdminTCP bool
	// ExtraServerConfig is inserted verbatim in every node's server block
	// (e.g. an oidc block).
	ExtraServerConfig string
	// AdvertiseAddr, when set, names each node's advertised cluster address
	// (e.g. a fault-injecting proxy in front of bindAddr).
	AdvertiseAddr func(nodeID, bindAddr string) string
	// Binary, when set, is the ferry binary every process starts from
	// (another release, for upgrade tests) instead of one built from this
	// tree. Node.Bin and Agent.Bin override it per process.
	Binary string
	// PublicAdminSocket puts each node's admin socket in a directory of its
	// own that every user may traverse, so tests can try it as other users
	// (the socket's own mode is then all that keeps them out).
	PublicAdminSocket bool
}

// Cluster is a set of server processes sharing one cluster CA.
type Cluster struct {
	t     testing.TB
	Dir   string
	Bin   string
	Opts  Options
	Nodes []*Node
}

// Node is one server process.
type Node struct {
	c           *Cluster
	ID          string
	Dir         string
	Config      string
	Socket      string
	ClusterAddr string
	HealthAddr  string
	AgentAddr   string
	AdminAddr   string // set when Options.AdminTCP
	// Bin, when set, is the binary Start runs instead of the cluster's.
	Bin string

	mu   sync.Mutex
	cmd  *exec.Cmd
	done <-chan struct{}
	conn *grpc.ClientConn
}

// New writes TLS material and configs for a cluster and starts it: node 0
// bootstraps, the others join it through retry_join. It returns once every node
// is a member.
func New(t testing.TB, opts Options) *Cluster {
	t.Helper()
	if opts.Nodes == 0 {
		opts.Nodes = 3
	}
	if opts.LogLevel == "" {
		opts.LogLevel = "debug"
	}
	if opts.AgentLogLevel == "" {
		opts.AgentLogLevel = "debug"
	}
	if opts.TrustDomain == "" {
		opts.TrustDomain = "example.org"
	}
	bin := opts.Binary
	if bin == "" {
		bin = Binary(t)
	}
	c := &Cluster{t: t, Dir: t.TempDir(), Bin: bin, Opts: opts}
	c.run("cluster", "tls", "ca", "create", "--dir", filepath.Join(c.Dir, "tls"))
	for i := 0; i < opts.Nodes; i++ {
		c.Nodes = append(c.Nodes, c.addNode(fmt.Sprintf("s%d", i+1), i == 0))
	}
	t.Cleanup(c.cleanup)
	for _, n := range c.Nodes {
		n.Start()
	}
	c.WaitMembers(opts.Nodes, 60*time.Second)
	return c
}

// AddNode writes the config of one more node, not started and joining nobody.
// With foreignCA its certificate comes from a CA the cluster does not trust.
func (c *Cluster) AddNode(id string, foreignCA bool) *Node {
	c.t.Helper()
	caDir := filepath.Join(c.Dir, "tls")
	if foreignCA {
		caDir = filepath.Join(c.Dir, "foreign-tls")
		if _, err := os.Stat(filepath.Join(caDir, "ca.pem")); err != nil {
			c.run("cluster", "tls", "ca", "create", "--dir", caDir)
		}
	}
	n := c.writeNode(id, false, caDir, "")
	c.Nodes = append(c.Nodes, n)
	return n
}

func (c *Cluster) addNode(id string, bootstrap bool) *Node {
	var joinAddr string
	if !bootstrap {
		joinAddr = c.Nodes[0].ClusterAddr
	}
	return c.writeNode(id, bootstrap, filepath.Join(c.Dir, "tls"), joinAddr)
}

func (c *Cluster) writeNode(id string, bootstrap bool, caDir, joinAddr string) *Node {
	dir := filepath.Join(c.Dir, id)
	n := &Node{
		c:           c,
		ID:          id,
		Dir:         dir,
		Config:      filepath.Join(dir, "server.conf"),
		Socket:      filepath.Join(dir, "admin.sock"),
		ClusterAddr: FreeAddr(c.t),
		HealthAddr:  FreeAddr(c.t),
		AgentAddr:   FreeAddr(c.t),
	}
	if c.Opts.PublicAdminSocket {
		n.Socket = filepath.Join(PublicDir(c.t, "ferry-admin-sock-"), "admin.sock")
	}
	tlsDir := filepath.Join(dir, "tls")
	c.run("cluster", "tls", "cert", "create", "--node", id, "--dir", tlsDir,
		"--ca", filepath.Join(caDir, "ca.pem"), "--ca-key", filepath.Join(caDir, "ca-key.pem"))
	var adminAddr string
	if c.Opts.AdminTCP {
		n.AdminAddr = FreeAddr(c.t)
		adminAddr = fmt.Sprintf("admin_addr = %q", n.AdminAddr)
	}
	var join string
	if joinAddr != "" {
		join = fmt.Sprintf("retry_join = [%q]", joinAddr)
	}
	var extra strings.Builder
	if c.Opts.LogStore != "" {
		fmt.Fprintf(&extra, "    log_store = %q\n", c.Opts.LogStore)
	}
	if c.Opts.SnapshotThreshold > 0 {
		fmt.Fprintf(&extra, "    snapshot_threshold = %d\n", c.Opts.SnapshotThreshold)
	}
	if c.Opts.TrailingLogs > 0 {
		fmt.Fprintf(&extra, "    trailing_logs = %d\n", c.Opts.TrailingLogs)
	}
	if c.Opts.SnapshotInterval != "" {
		fmt.Fprintf(&extra, "    snapshot_interval = %q\n", c.Opts.SnapshotInterval)
	}
	if c.Opts.RaftMultiplier > 0 {
		fmt.Fprintf(&extra, "    raft_multiplier = %d\n", c.Opts.RaftMultiplier)
	}
	if c.Opts.AdvertiseAddr != nil {
		fmt.Fprintf(&extra, "    advertise_addr = %q\n", c.Opts.AdvertiseAddr(id, n.ClusterAddr))
	}
	conf := fmt.Sprintf(`server {
  node_id      = %q
  trust_domain = %q
  data_dir     = "data"
  admin_socket = %q
  health_addr  = %q
  agent_addr   = %q
  profiling    = true
  %s
  log_level    = %q
%s
  cluster {
    bind_addr = %q
    bootstrap = %t
    %s
    ca_file   = %q
    cert_file = "tls/node.pem"
    key_file  = "tls/node-key.pem"
%s  }
}
`, id, c.Opts.TrustDomain, n.Socket, n.HealthAddr, n.AgentAddr, adminAddr, c.Opts.LogLevel, c.Opts.ExtraServerConfig, n.ClusterAddr, bootstrap, join, filepath.Join(caDir, "ca.pem"), extra.String())
	if err := os.WriteFile(n.Config, []byte(conf), 0o600); err != nil {
		c.t.Fatal(err)
	}
	return n
}

// PublicDir makes a directory under the system temp dir that every user may
// traverse (0755), removed when the test ends.
func PublicDir(t testing.TB, prefix string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// run runs the ferry binary and fails the test on error.
func (c *Cluster) run(args ...string) string {
	c.t.Helper()
	out, err := exec.Command(c.Bin, args...).CombinedOutput()
	if err != nil {
		c.t.Fatalf("ferry %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// CLI runs `ferry ARGS` with FERRY_ADMIN_SOCKET set to the node's admin socket,
// as an operator's shell would, and returns its output and error.
func (n *Node) CLI(args ...string) (string, error) {
	cmd := exec.Command(n.c.Bin, args...)
	cmd.Env = append(os.Environ(), "FERRY_ADMIN_SOCKET="+n.Socket)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// Start starts the node's process (again, after Kill or Stop).
func (n *Node) Start() {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.cmd != nil {
		n.c.t.Fatalf("node %s already running", n.ID)
	}
	bin := n.c.Bin
	if n.Bin != "" {
		bin = n.Bin
	}
	cmd := exec.Command(bin, "server", "run", "--config", n.Config)
	cmd.Env = append(os.Environ(), "FERRY_ADMIN_SOCKET=")
	done, err := StartLogged(cmd, filepath.Join(n.Dir, "server.log"))
	if err != nil {
		n.c.t.Fatal(err)
	}
	n.cmd, n.done = cmd, done
	n.waitSocket(30 * time.Second)
}

func (n *Node) waitSocket(timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if c, err := net.Dial("unix", n.Socket); err == nil {
			c.Close()
			return
		}
		select {
		case <-n.done:
			n.c.t.Fatalf("node %s exited at start:\n%s", n.ID, n.LogTail(40))
		case <-time.After(10 * time.Millisecond):
		}
	}
	n.c.t.Fatalf("node %s: admin socket not ready after %s:\n%s", n.ID, timeout, n.LogTail(40))
}

// Kill sends SIGKILL and waits for the process to be gone.
func (n *Node) Kill() { n.signal(syscall.SIGKILL) }

// Stop sends SIGTERM and waits for a clean exit.
func (n *Node) Stop() { n.signal(syscall.SIGTERM) }

func (n *Node) signal(sig syscall.Signal) {
	n.mu.Lock()
	cmd, done := n.cmd, n.done
	n.cmd = nil
	if n.conn != nil {
		n.conn.Close()
		n.conn = nil
	}
	n.mu.Unlock()
	if cmd == nil {
		return
	}
	StopProcess(cmd, done, sig, 20*time.Second)
}

// Running reports whether the node's process is up.
func (n *Node) Running() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.cmd != nil
}

// PID returns the node's process ID, 0 when it is not running.
func (n *Node) PID() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.cmd == nil {
		return 0
	}
	return n.cmd.Process.Pid
}

// Admin returns an admin API client for the node (one connection, reused).
func (n *Node) Admin() ferrypb.AdminClient {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.conn == nil {
		conn, err := grpc.NewClient("unix://"+n.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			n.c.t.Fatal(err)
		}
		n.conn = conn
	}
	return ferrypb.NewAdminClient(n.conn)
}

// LogTail returns the last lines of the node's log.
func (n *Node) LogTail(lines int) string {
	data, _ := os.ReadFile(filepath.Join(n.Dir, "server.log"))
	all := bytes.Split(bytes.TrimRight(data, "\n"), []byte("\n"))
	if len(all) > lines {
		all = all[len(all)-lines:]
	}
	return string(bytes.Join(all, []byte("\n")))
}

// Leader returns the node that a running member reports as leader, or nil.
func (c *Cluster) Leader(ctx context.Context) *Node {
	for _, n := range c.Nodes {
		if !n.Running() {
			continue
		}
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		resp, err := n.Admin().ClusterList(cctx, &ferrypb.ClusterListRequest{})
		cancel()
		if err != nil {
			continue
		}
		for _, m := range resp.Members {
			if m.Leader {
				for _, ln := range c.Nodes {
					if ln.ID == m.Id && ln.Running() {
						return ln
					}
				}
			}
		}
	}
	return nil
}

// WaitLeader waits for a running leader other than `not` (nil: any).
func (c *Cluster) WaitLeader(timeout time.Duration, not *Node) *Node {
	c.t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if l := c.Leader(context.Background()); l != nil && l != not {
			return l
		}
		time.Sleep(50 * time.Millisecond)
	}
	c.t.Fatalf("no leader after %s", timeout)
	return nil
}

// WaitMembers waits until the leader's configuration has want members.
func (c *Cluster) WaitMembers(want int, timeout time.Duration) {
	c.t.Helper()
	deadline := time.Now().Add(timeout)
	var last string
	for time.Now().Before(deadline) {
		if l := c.Leader(context.Background()); l != nil {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			resp, err := l.Admin().ClusterList(ctx, &ferrypb.ClusterListRequest{})
			cancel()
			if err == nil && len(resp.Members) == want {
				return
			}
			last = fmt.Sprint(resp, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	c.t.Fatalf("cluster did not reach %d members in %s (last: %s)\n%s", want, timeout, last, c.Logs(20))
}

// WaitApplied waits until every running node has applied at least index.
func (c *Cluster) WaitApplied(index uint64, timeout time.Duration) {
	c.t.Helper()
	deadline := time.Now().Add(timeout)
	for _, n := range c.Nodes {
		if !n.Running() {
			continue
		}
		for {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			resp, err := n.Admin().ClusterList(ctx, &ferrypb.ClusterListRequest{})
			cancel()
			if err == nil && resp.AppliedIndex >= index {
				break
			}
			if time.Now().After(deadline) {
				c.t.Fatalf("node %s has not applied index %d after %s (%v, %v)", n.ID, index, timeout, resp, err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
}

// Logs returns the tail of every node's log, for failure messages.
func (c *Cluster) Logs(lines int) string {
	var b strings.Builder
	for _, n := range c.Nodes {
		fmt.Fprintf(&b, "==== %s\n%s\n", n.ID, n.LogTail(lines))
	}
	return b.String()
}

func (c *Cluster) cleanup() {
	for _, n := range c.Nodes {
		n.Stop()
	}
	if c.t.Failed() {
		c.t.Log(c.Logs(60))
	}
}

// FreeAddr returns a loopback address whose port is reserved for this test
// binary (see freeport): free now, never handed out twice, and not taken by
// another process while a stopped node that owns it is down.
func FreeAddr(t testing.TB) string {
	t.Helper()
	return freeport.Addr(t)
}
