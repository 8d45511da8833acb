package upgrade_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/test/testcluster"
)

// TestRollingUpgrade starts the previous release as a 3-node cluster with two
// agents and a bridge, and upgrades it the way docs/upgrade.md says (servers
// one at a time, followers first; then bridges; then agents) while a writer
// creates entries through every node and each agent's workload keeps an
// X509-SVID. Along the way a new agent attests to an old server in the mixed
// cluster, an old agent is served a new entry by the new servers, and a
// token is exchanged at the bridge before and after. At the end every
// acknowledged write is on every node, the nodes hold one state, no
// workload ever held an expired SVID, and a snapshot saved by the old
// release restores in the new one.
func TestRollingUpgrade(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the previous release and runs a cluster")
	}
	old := previousRelease(t)
	cur := testcluster.Binary(t)
	// JWT-SVIDs name the trust domain's issuer; the bridge knows it as the
	// trust domain's and checks them against the bundle.
	const jwtIss = "https://oidc.example.org"
	c := testcluster.New(t, testcluster.Options{Nodes: 3, Binary: old.bin, LogLevel: "info", ExtraServerConfig: fmt.Sprintf(`  ca {
    jwt_issuer = %q
  }
`, jwtIss)})
	leader := c.WaitLeader(time.Minute, nil)
	cli := func(n *testcluster.Node, args ...string) string {
		t.Helper()
		out, err := n.CLI(args...)
		require.NoError(t, err, "ferry %s:\n%s", strings.Join(args, " "), out)
		return out
	}

	// Two agents of the previous release, each with a workload entry for
	// this test's uid.
	uid := fmt.Sprint(os.Getuid())
	agents := []*testcluster.Agent{c.StartAgent("node1"), c.StartAgent("node2")}
	for _, a := range agents {
		cli(leader, "entry", "create", "--spiffe-id", "spiffe://example.org/wl/"+a.Name, "--parent-id", a.ID, "--selector", "unix:uid:"+uid)
	}
	watchers := make([]*svidWatch, len(agents))
	for i, a := range agents {
		watchers[i] = watchSVID(t, a, "spiffe://example.org/wl/"+a.Name)
	}

	// The bridge of the previous release, following every server, and an
	// identity the workload of node1 may use.
	var tenant struct {
		ID string `json:"id"`
	}
	require.NoError(t, json.Unmarshal([]byte(cli(leader, "tenant", "create", "--name", "default", "--output", "json")), &tenant))
	var ident struct {
		ClientID string `json:"client_id"`
	}
	require.NoError(t, json.Unmarshal([]byte(cli(leader, "identity", "create", "--name", "wl-id", "--output", "json")), &ident))
	cli(leader, "identity", "federated-credential", "create", "--identity-name", "wl-id", "--name", "wl-fic", "--issuer", jwtIss, "--subject", "spiffe://example.org/wl/node1")
	cli(leader, "resource", "create", "--name", "demo", "--identifier-uri", "api://demo", "--app-role", "reader")
	cli(leader, "role", "assign", "--identity-name", "wl-id", "--resource", "api://demo", "--role", "reader")
	br := startBridge(t, c, old.bin)
	exchange := func(stage string) {
		t.Helper()
		require.Eventually(t, func() bool {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			svid, err := workloadapi.FetchJWTSVID(ctx, jwtParams(), workloadapi.WithAddr(agents[0].SocketAddr()))
			if err != nil {
				t.Logf("%s: JWT-SVID: %v", stage, err)
				return false
			}
			status, body := br.token(tenant.ID, ident.ClientID, svid.Marshal())
			if status != http.StatusOK {
				t.Logf("%s: token: %d %s", stage, status, body)
			}
			return status == http.StatusOK && strings.Contains(body, "access_token")
		}, 2*time.Minute, 200*time.Millisecond, "%s: a workload trades its JWT-SVID for an access token", stage)
	}
	exchange("previous release")

	// A snapshot of the previous release's state.
	snap := filepath.Join(t.TempDir(), "old.snap")
	cli(leader, "cluster", "snapshot", "save", snap)
	cli(leader, "entry", "create", "--entry-id", "after-snapshot", "--spiffe-id", "spiffe://example.org/after", "--parent-id", agents[0].ID, "--selector", "unix:uid:4242")

	// Writes through every node, all along.
	w := startWriter(t, c)

	// Servers, one at a time, followers first.
	order := []*testcluster.Node{}
	for _, n := range c.Nodes {
		if n != leader {
			order = append(order, n)
		}
	}
	order = append(order, leader)
	for i, n := range order {
		t.Logf("upgrading server %s", n.ID)
		n.Stop()
		n.Bin = cur
		n.Start()
		waitServing(t, c, n)
		w.waitProgress(t)
		if i == 0 {
			// Mixed cluster: a new agent attests to an old server only.
			var oldNode *testcluster.Node
			for _, m := range c.Nodes {
				if m.Bin == "" {
					oldNode = m
					break
				}
			}
			a := c.PrepareAgent("node3", testcluster.AgentOptions{})
			a.Bin = cur
			conf, err := os.ReadFile(a.Config)
			require.NoError(t, err)
			onlyOld := replaceServers(string(conf), oldNode.AgentAddr)
			require.NoError(t, os.WriteFile(a.Config, []byte(onlyOld), 0o600))
			t.Cleanup(a.Stop)
			a.Start()
			cli(oldNode, "entry", "create", "--spiffe-id", "spiffe://example.org/wl/node3", "--parent-id", a.ID, "--selector", "unix:uid:"+uid)
			a.WaitX509SVID("spiffe://example.org/wl/node3")
			t.Logf("a new agent was attested by old server %s and serves an SVID", oldNode.ID)
		}
	}

	// New servers, old agents: a new entry reaches an old agent.
	cli(c.WaitLeader(time.Minute, nil), "entry", "create", "--spiffe-id", "spiffe://example.org/wl/late", "--parent-id", agents[1].ID, "--selector", "unix:uid:"+uid)
	agents[1].WaitX509SVID("spiffe://example.org/wl/late")
	exchange("new servers, old bridge and agents")

	// The bridge, then the agents.
	br.restart(t, cur)
	exchange("new bridge")
	for _, a := range agents {
		a.Stop()
		a.Bin = cur
		a.Start()
		a.WaitX509SVID("spiffe://example.org/wl/" + a.Name)
	}
	exchange("everything upgraded")

	acked := w.stop(t)
	for _, wt := range watchers {
		wt.stop(t)
	}

	// Every acknowledged write is on every node, and the nodes agree.
	ctx := context.Background()
	for _, n := range c.Nodes {
		for _, id := range acked {
			_, err := n.Admin().GetEntry(ctx, &ferrypb.GetEntryRequest{Id: id, Consistency: ferrypb.ReadConsistency_READ_LINEARIZABLE})
			require.NoError(t, err, "acknowledged entry %s on %s", id, n.ID)
		}
	}
	t.Logf("%d acknowledged writes during the upgrade, all on every node", len(acked))
	require.Eventually(t, func() bool {
		var first *ferrypb.StateHashResponse
		for _, n := range c.Nodes {
			h, err := n.Admin().StateHash(ctx, &ferrypb.StateHashRequest{})
			if err != nil {
				return false
			}
			if first == nil {
				first = h
				continue
			}
			if h.AppliedIndex != first.AppliedIndex || string(h.Sha256) != string(first.Sha256) {
				return false
			}
		}
		return true
	}, time.Minute, 100*time.Millisecond, "one state on every node")

	// The previous release's snapshot restores in the new release.
	leader = c.WaitLeader(time.Minute, nil)
	cli(leader, "cluster", "snapshot", "restore", snap)
	out := cli(leader, "entry", "list", "--consistent")
	require.Contains(t, out, "spiffe://example.org/wl/node1")
	require.NotContains(t, out, "spiffe://example.org/after", "the restored state is the snapshot's")
}

func jwtParams() jwtsvid.Params {
	return jwtsvid.Params{Audience: "api://AzureADTokenExchange"}
}

// replaceServers points an agent config at one server.
func replaceServers(conf, addr string) string {
	i := strings.Index(conf, "server_addresses")
	j := strings.Index(conf[i:], "\n")
	return conf[:i] + fmt.Sprintf("server_addresses  = [%q]", addr) + conf[i+j:]
}

// waitServing waits until n is a voter of a cluster with a leader, and has
// applied what the leader had committed when it came back.
func waitServing(t *testing.T, c *testcluster.Cluster, n *testcluster.Node) {
	t.Helper()
	var index uint64
	require.Eventually(t, func() bool {
		l := c.Leader(context.Background())
		if l == nil {
			return false
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		resp, err := l.Admin().ClusterList(ctx, &ferrypb.ClusterListRequest{})
		if err != nil || len(resp.Members) != 3 {
			return false
		}
		index = resp.CommitIndex
		return true
	}, 2*time.Minute, 100*time.Millisecond, "a leader and 3 members after %s restarted", n.ID)
	c.WaitApplied(index, 2*time.Minute)
}

// svidWatch is a workload holding an X509-SVID from one agent through
// go-spiffe's X509Source, as a long-running service does, and checking every
// 100 ms that what it holds is valid.
type svidWatch struct {
	src     *workloadapi.X509Source
	cancel  context.CancelFunc
	done    chan struct{}
	checks  atomic.Int64
	expired atomic.Value // string: the first problem
}

func watchSVID(t *testing.T, a *testcluster.Agent, id string) *svidWatch {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	a.WaitX509SVID(id)
	src, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(workloadapi.WithAddr(a.SocketAddr())))
	require.NoError(t, err)
	w := &svidWatch{src: src, cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(w.done)
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			svid, err := src.GetX509SVID()
			now := time.Now()
			switch {
			case err != nil:
				w.expired.CompareAndSwap(nil, fmt.Sprintf("%s: no SVID: %v", a.Name, err))
			case now.After(svid.Certificates[0].NotAfter) || now.Before(svid.Certificates[0].NotBefore):
				w.expired.CompareAndSwap(nil, fmt.Sprintf("%s: SVID outside its validity at %s", a.Name, now))
			default:
				w.checks.Add(1)
			}
		}
	}()
	return w
}

func (w *svidWatch) stop(t *testing.T) {
	t.Helper()
	w.cancel()
	<-w.done
	w.src.Close()
	if p, _ := w.expired.Load().(string); p != "" {
		t.Error(p)
	}
	require.Positive(t, w.checks.Load())
}

// writer creates entries through the nodes in turn, each with a request ID,
// and records those acknowledged.
type writer struct {
	mu     sync.Mutex
	acked  []string
	cancel context.CancelFunc
	done   chan struct{}
}

func startWriter(t *testing.T, c *testcluster.Cluster) *writer {
	ctx, cancel := context.WithCancel(context.Background())
	w := &writer{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(w.done)
		for i := 0; ctx.Err() == nil; i++ {
			n := c.Nodes[i%len(c.Nodes)]
			if !n.Running() {
				continue
			}
			id := fmt.Sprintf("upgrade-%06d", i)
			e := &ferrypb.Entry{Id: id, SpiffeId: "spiffe://example.org/upgrade/" + id, ParentId: "spiffe://example.org/spire/agent/nobody",
				Selectors: []*ferrypb.Selector{{Type: "unix", Value: "uid:7"}}}
			cctx, ccancel := context.WithTimeout(ctx, 5*time.Second)
			resp, err := n.Admin().BatchCreateEntry(cctx, &ferrypb.BatchCreateEntryRequest{Entries: []*ferrypb.Entry{e}, RequestId: "req-" + id})
			ccancel()
			if err == nil && len(resp.Results) == 1 && resp.Results[0].GetCode() == 0 {
				w.mu.Lock()
				w.acked = append(w.acked, id)
				w.mu.Unlock()
			}
		}
	}()
	t.Cleanup(func() { cancel(); <-w.done })
	return w
}

// waitProgress waits for the writer to be acknowledged again.
func (w *writer) waitProgress(t *testing.T) {
	t.Helper()
	w.mu.Lock()
	n := len(w.acked)
	w.mu.Unlock()
	require.Eventually(t, func() bool {
		w.mu.Lock()
		defer w.mu.Unlock()
		return len(w.acked) > n+5
	}, 2*time.Minute, 50*time.Millisecond, "writes are acknowledged again")
}

func (w *writer) stop(t *testing.T) []string {
	w.cancel()
	<-w.done
	w.mu.Lock()
	defer w.mu.Unlock()
	require.NotEmpty(t, w.acked)
	return w.acked
}

// bridge is a `ferry bridge run` process following every server's socket.
type bridge struct {
	dir, conf, addr string
	cmd             *exec.Cmd
	done            chan struct{}
	client          *http.Client
}

func startBridge(t *testing.T, c *testcluster.Cluster, bin string) *bridge {
	t.Helper()
	b := &bridge{dir: t.TempDir(), addr: testcluster.FreeAddr(t)}
	var socks []string
	for _, n := range c.Nodes {
		socks = append(socks, fmt.Sprintf("%q", n.Socket))
	}
	b.conf = filepath.Join(b.dir, "bridge.conf")
	require.NoError(t, os.WriteFile(b.conf, []byte(fmt.Sprintf(`bridge {
  listen_addr    = %q
  data_dir       = "data"
  server_sockets = [%s]
  key_lifetime   = "1h"
}
`, b.addr, strings.Join(socks, ", "))), 0o600))
	b.start(t, bin)
	t.Cleanup(func() { b.stopProcess() })
	return b
}

func (b *bridge) start(t *testing.T, bin string) {
	t.Helper()
	logf, err := os.OpenFile(filepath.Join(b.dir, "bridge.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	require.NoError(t, err)
	b.cmd = exec.Command(bin, "bridge", "run", "--config", b.conf)
	b.cmd.Stdout, b.cmd.Stderr = logf, logf
	require.NoError(t, b.cmd.Start())
	b.done = make(chan struct{})
	go func(cmd *exec.Cmd, done chan struct{}) { _ = cmd.Wait(); logf.Close(); close(done) }(b.cmd, b.done)
	require.Eventually(t, func() bool {
		pem, err := os.ReadFile(filepath.Join(b.dir, "data", "tls-ca.pem"))
		if err != nil {
			return false
		}
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(pem)
		b.client = &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
		resp, err := b.client.Get("https://" + b.addr + "/common/discovery/v2.0/keys")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}, 2*time.Minute, 100*time.Millisecond, "the bridge serves")
}

// stopProcess stops the bridge as its unit would: SIGTERM, then SIGKILL
// after TimeoutStopSec (30 s).
func (b *bridge) stopProcess() {
	if b.cmd == nil {
		return
	}
	_ = b.cmd.Process.Signal(syscall.SIGTERM)
	timer := time.NewTimer(30 * time.Second)
	defer timer.Stop()
	select {
	case <-b.done:
	case <-timer.C:
		_ = b.cmd.Process.Kill()
		<-b.done
	}
}

func (b *bridge) restart(t *testing.T, bin string) {
	t.Helper()
	b.stopProcess()
	b.start(t, bin)
}

func (b *bridge) token(tenant, clientID, assertion string) (int, string) {
	form := url.Values{
		"grant_type":            {"client_credentials"},
		"client_id":             {clientID},
		"client_assertion_type": {"urn:ietf:params:oauth:client-assertion-type:jwt-bearer"},
		"client_assertion":      {assertion},
		"scope":                 {"api://demo/.default"},
	}
	resp, err := b.client.PostForm("https://"+b.addr+"/"+tenant+"/oauth2/v2.0/token", form)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}
