package testcluster

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// Agent is one `ferry agent run` process attested to the cluster.
type Agent struct {
	c      *Cluster
	Name   string
	Dir    string
	Config string
	// Socket is the Workload API socket, in a directory every user may
	// traverse (access is governed by attestation, not file modes).
	Socket string
	// ID is the agent's SPIFFE ID.
	ID string
	// Bin, when set, is the binary Start runs instead of the cluster's.
	Bin string

	uid  uint32
	mu   sync.Mutex
	cmd  *exec.Cmd
	done <-chan struct{}
}

// SocketAddr is the Workload API address as SPIFFE_ENDPOINT_SOCKET takes it.
func (a *Agent) SocketAddr() string { return "unix://" + a.Socket }

// StartAgent creates a join token, writes an agent config that lists every
// server, and starts the agent.
func (c *Cluster) StartAgent(name string) *Agent {
	c.t.Helper()
	return c.StartAgentWith(name, "")
}

// StartAgentWith is StartAgent with extra lines inserted verbatim in the
// agent block (e.g. an imds block).
func (c *Cluster) StartAgentWith(name, extraConfig string) *Agent {
	c.t.Helper()
	return c.StartAgentOpts(name, AgentOptions{Extra: extraConfig})
}

// AgentOptions shape an agent process.
type AgentOptions struct {
	// Extra lines are inserted verbatim in the agent block.
	Extra string
	// UID, when not 0, runs the agent as that uid (and gid), as a service
	// user would: its data and socket directories are made its own, the
	// agent creates what is inside them.
	UID uint32
	// SocketPath and DataDir, when set, replace the agent's own
	// directories (for tests of where an agent agrees to run).
	SocketPath, DataDir string
}

// StartAgentOpts is StartAgent shaped by opts.
func (c *Cluster) StartAgentOpts(name string, opts AgentOptions) *Agent {
	c.t.Helper()
	a := c.PrepareAgent(name, opts)
	a.Start()
	return a
}

// PrepareAgent creates a join token and writes the agent's config, without
// starting it (Start, or Command for a test that watches the process itself).
func (c *Cluster) PrepareAgent(name string, opts AgentOptions) *Agent {
	c.t.Helper()
	leader := c.WaitLeader(30*time.Second, nil)
	id := fmt.Sprintf("spiffe://%s/spire/agent/%s", c.Opts.TrustDomain, name)
	out, err := leader.CLI("token", "generate", "--spiffe-id", id, "--ttl", "10m", "--output", "json")
	if err != nil {
		c.t.Fatalf("token generate: %v %s", err, out)
	}
	token := between(out, `"token": "`, `"`)
	opts.Extra = fmt.Sprintf("  join_token        = %q\n%s", token, opts.Extra)
	a := c.writeAgent(name, opts)
	a.ID = id
	return a
}

// StartAgentToken starts an agent that attests with token (one made by the
// caller, as an operator would), whose agent ID is id.
func (c *Cluster) StartAgentToken(name, id, token string) *Agent {
	c.t.Helper()
	a := c.writeAgent(name, AgentOptions{Extra: fmt.Sprintf("  join_token        = %q\n", token)})
	a.ID = id
	a.Start()
	return a
}

// NewAgentAttested writes the config of an agent that attests with
// attestorConfig (lines inserted verbatim in the agent block, e.g. an
// azure_imds block) instead of a join token, and returns it unstarted. Its ID
// is whatever the attestor proves: a.ID is empty until the caller sets it.
func (c *Cluster) NewAgentAttested(name, attestorConfig string) *Agent {
	c.t.Helper()
	return c.writeAgent(name, AgentOptions{Extra: attestorConfig})
}

// writeAgent writes an agent config listing every server, with opts.Extra
// in the agent block, and the trust bundle it starts from.
func (c *Cluster) writeAgent(name string, opts AgentOptions) *Agent {
	c.t.Helper()
	leader := c.WaitLeader(30*time.Second, nil)
	var bundle string
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, err := leader.CLI("bundle", "show")
		if err == nil && strings.Contains(out, "BEGIN CERTIFICATE") {
			bundle = out
			break
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("no trust bundle published: %v %s", err, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
	dir := filepath.Join(c.Dir, "agent-"+name)
	if opts.UID != 0 {
		// The cluster's dir is root's alone: the service user's lives in
		// a directory it can reach.
		dir = filepath.Join(PublicDir(c.t, "ferry-agent-"), "agent-"+name)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		c.t.Fatal(err)
	}
	sockDir := PublicDir(c.t, "ferry-agent-sock-")
	if opts.UID != 0 {
		for _, d := range []string{dir, sockDir} {
			if err := os.Chown(d, int(opts.UID), int(opts.UID)); err != nil {
				c.t.Fatal(err)
			}
		}
	}
	a := &Agent{c: c, Name: name, Dir: dir, Config: filepath.Join(dir, "agent.conf"), Socket: filepath.Join(sockDir, "public", "api.sock"), uid: opts.UID}
	if opts.SocketPath != "" {
		a.Socket = opts.SocketPath
	}
	dataDir := "data"
	if opts.DataDir != "" {
		dataDir = opts.DataDir
	}
	if err := os.WriteFile(filepath.Join(dir, "bundle.pem"), []byte(bundle), 0o644); err != nil {
		c.t.Fatal(err)
	}
	var servers []string
	for _, n := range c.Nodes {
		servers = append(servers, fmt.Sprintf("%q", n.AgentAddr))
	}
	conf := fmt.Sprintf(`agent {
  trust_domain      = %q
  server_addresses  = [%s]
  trust_bundle_file = "bundle.pem"
  data_dir          = %q
  socket_path       = %q
  log_level         = %q
%s
}
`, c.Opts.TrustDomain, strings.Join(servers, ", "), dataDir, a.Socket, c.Opts.AgentLogLevel, opts.Extra)
	if err := os.WriteFile(a.Config, []byte(conf), 0o600); err != nil {
		c.t.Fatal(err)
	}
	if opts.UID != 0 {
		if err := os.Chown(a.Config, int(opts.UID), int(opts.UID)); err != nil {
			c.t.Fatal(err)
		}
	}
	c.t.Cleanup(a.Stop)
	return a
}

func between(s, start, end string) string {
	i := strings.Index(s, start)
	if i < 0 {
		return ""
	}
	s = s[i+len(start):]
	if j := strings.Index(s, end); j >= 0 {
		return s[:j]
	}
	return s
}

// RunToExit runs the agent process, which must exit (a refused attestation,
// say) within timeout, and returns its output.
func (a *Agent) RunToExit(timeout time.Duration) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, a.c.Bin, "agent", "run", "--config", a.Config).CombinedOutput()
	if ctx.Err() != nil {
		a.c.t.Fatalf("agent %s still running after %s:\n%s", a.Name, timeout, out)
	}
	return string(out), err
}

// WipeData deletes the agent's data dir (its SVID, key and bundle), as a
// reinstalled machine would; the agent must be stopped.
func (a *Agent) WipeData() {
	if err := os.RemoveAll(filepath.Join(a.Dir, "data")); err != nil {
		a.c.t.Fatal(err)
	}
}

// Start starts (or restarts) the agent process and waits for its socket.
func (a *Agent) Start() {
	done := a.Spawn()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if conn, err := net.Dial("unix", a.Socket); err == nil {
			conn.Close()
			return
		}
		select {
		case <-done:
			a.c.t.Fatalf("agent %s exited:\n%s", a.Name, a.LogTail(40))
		case <-time.After(20 * time.Millisecond):
		}
	}
	a.c.t.Fatalf("agent %s: socket not ready:\n%s", a.Name, a.LogTail(40))
}

// Spawn starts the agent process without waiting for anything; the returned
// channel is closed when it exits.
func (a *Agent) Spawn() <-chan struct{} {
	a.mu.Lock()
	defer a.mu.Unlock()
	cmd := a.Command()
	done, err := StartLogged(cmd, filepath.Join(a.Dir, "agent.log"))
	if err != nil {
		a.c.t.Fatal(err)
	}
	a.cmd, a.done = cmd, done
	return done
}

// Command is `ferry agent run` for this agent, as the agent's uid, not
// started.
func (a *Agent) Command() *exec.Cmd {
	bin := a.c.Bin
	if a.Bin != "" {
		bin = a.Bin
	}
	cmd := exec.Command(bin, "agent", "run", "--config", a.Config)
	if a.uid != 0 {
		cmd.Dir = "/"
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: a.uid, Gid: a.uid}}
	}
	return cmd
}

// PID is the agent process's ID, or 0 when it is not running.
func (a *Agent) PID() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cmd == nil {
		return 0
	}
	return a.cmd.Process.Pid
}

// Stop ends the agent process.
func (a *Agent) Stop() {
	a.mu.Lock()
	cmd, done := a.cmd, a.done
	a.cmd = nil
	a.mu.Unlock()
	if cmd == nil {
		return
	}
	StopProcess(cmd, done, syscall.SIGTERM, 10*time.Second)
	if a.c.t.Failed() {
		a.c.t.Logf("==== agent %s\n%s", a.Name, a.LogTail(60))
	}
}

// LogTail returns the last lines of the agent's log.
func (a *Agent) LogTail(lines int) string {
	data, _ := os.ReadFile(filepath.Join(a.Dir, "agent.log"))
	all := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(all) > lines {
		all = all[len(all)-lines:]
	}
	return strings.Join(all, "\n")
}

// WaitX509SVID waits until the agent serves this test process an X509-SVID
// for id (its entry reaches the agent through the server's stream), as a
// go-spiffe workload asks for it.
func (a *Agent) WaitX509SVID(id string) {
	a.c.t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	var last error
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		svids, err := workloadapi.FetchX509SVIDs(ctx, workloadapi.WithAddr(a.SocketAddr()))
		cancel()
		for _, s := range svids {
			if s.ID.String() == id {
				return
			}
		}
		last = err
		time.Sleep(100 * time.Millisecond)
	}
	a.c.t.Fatalf("agent %s does not serve %s (last error: %v):\n%s", a.Name, id, last, a.LogTail(40))
}
