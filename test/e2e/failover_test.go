package e2e

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/test/testcluster"
)

// established counts ESTABLISHED TCP connections whose local end is addr
// (host:port), from /proc/net/tcp and tcp6. Only agents dial a server's agent
// port, so on a server's agent address this counts connected agents.
func established(t *testing.T, addr string) int {
	t.Helper()
	_, portStr, err := net.SplitHostPort(addr)
	require.NoError(t, err)
	port, err := strconv.Atoi(portStr)
	require.NoError(t, err)
	want := fmt.Sprintf(":%04X", port)
	n := 0
	for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		fh, err := os.Open(f)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(fh)
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			// sl local_address rem_address st ...; st 01 is ESTABLISHED.
			if len(fields) > 3 && strings.HasSuffix(fields[1], want) && fields[3] == "01" {
				n++
			}
		}
		fh.Close()
	}
	return n
}

// connectedServer waits until exactly one running server holds the agent's
// connection, other than not, and returns it.
func connectedServer(t *testing.T, c *testcluster.Cluster, not *testcluster.Node) *testcluster.Node {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		var found []*testcluster.Node
		for _, n := range c.Nodes {
			if n != not && n.Running() && established(t, n.AgentAddr) > 0 {
				found = append(found, n)
			}
		}
		if len(found) == 1 {
			return found[0]
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatal("the agent holds no connection to a running server")
	return nil
}

// createEntry creates an entry through the running nodes, starting at start,
// retrying the same request ID on the next node until one acknowledges it.
func createEntry(t *testing.T, c *testcluster.Cluster, start int, e *ferrypb.Entry) {
	t.Helper()
	req := &ferrypb.BatchCreateEntryRequest{Entries: []*ferrypb.Entry{e}, RequestId: "req-" + e.Id}
	deadline := time.Now().Add(60 * time.Second)
	var last error
	for attempt := 0; time.Now().Before(deadline); attempt++ {
		n := c.Nodes[(start+attempt)%len(c.Nodes)]
		if !n.Running() {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		resp, err := n.Admin().BatchCreateEntry(ctx, req)
		cancel()
		if err == nil {
			code := codes.Code(resp.Results[0].GetCode())
			require.True(t, code == codes.OK || code == codes.AlreadyExists, "create %s: %s %s", e.Id, code, resp.Results[0].GetMessage())
			return
		}
		last = err
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("create %s: no node acknowledged it: %v", e.Id, last)
}

func workloadEntry(agentID, name string) *ferrypb.Entry {
	return &ferrypb.Entry{
		Id:        name,
		SpiffeId:  "spiffe://example.org/" + name,
		ParentId:  agentID,
		Selectors: []*ferrypb.Selector{{Type: "unix", Value: fmt.Sprintf("uid:%d", os.Getuid())}},
	}
}

// TestAgentFailover: a three-server cluster and one agent listing all three.
// The server the agent is connected to (the bootstrap node, normally also the
// leader) is killed; an entry created through another node still reaches a
// watching workload, and the workload is served SVIDs throughout.
func TestAgentFailover(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a three-server cluster and an agent")
	}
	c := testcluster.New(t, testcluster.Options{Nodes: 3})
	a := c.StartAgent("node1")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	createEntry(t, c, 0, workloadEntry(a.ID, "before"))
	w := newWatcher()
	client, err := workloadapi.New(ctx, workloadapi.WithAddr(a.SocketAddr()))
	require.NoError(t, err)
	defer client.Close()
	go func() { _ = client.WatchX509Context(ctx, w) }()
	w.waitFor(t, func(ids []string) bool { return has(ids, "spiffe://example.org/before") })

	// A second workload polls FetchX509SVID, with a fresh client each time,
	// for the whole test: every call must succeed.
	var calls, failures atomic.Int64
	var firstErr atomic.Value
	pollCtx, stopPoll := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for pollCtx.Err() == nil {
			cctx, cc := context.WithTimeout(pollCtx, 5*time.Second)
			_, err := workloadapi.FetchX509SVID(cctx, workloadapi.WithAddr(a.SocketAddr()))
			cc()
			if pollCtx.Err() != nil {
				return
			}
			calls.Add(1)
			if err != nil {
				failures.Add(1)
				firstErr.CompareAndSwap(nil, time.Now().Format("15:04:05.000")+" "+err.Error())
			}
			time.Sleep(20 * time.Millisecond)
		}
	}()

	victim := connectedServer(t, c, nil)
	leader := c.WaitLeader(30*time.Second, nil)
	t.Logf("agent connected to %s; leader %s", victim.ID, leader.ID)
	killed := time.Now()
	victim.Kill()

	// The agent moves to a surviving server.
	moved := connectedServer(t, c, victim)
	t.Logf("agent reconnected to %s %s after the kill", moved.ID, time.Since(killed).Round(time.Millisecond))

	// An entry created through another node reaches the watching workload.
	start := 0
	for i, n := range c.Nodes {
		if n != victim {
			start = i
			break
		}
	}
	createEntry(t, c, start, workloadEntry(a.ID, "after"))
	created := time.Now()
	at := w.waitFor(t, func(ids []string) bool {
		return has(ids, "spiffe://example.org/after") && has(ids, "spiffe://example.org/before")
	})
	t.Logf("entry created %s after the kill; SVID pushed %s later", created.Sub(killed).Round(time.Millisecond), at.Sub(created).Round(time.Millisecond))

	// The new SVID is fetchable too, not only pushed.
	x, err := client.FetchX509Context(ctx)
	require.NoError(t, err)
	var ids []string
	for _, s := range x.SVIDs {
		ids = append(ids, s.ID.String())
	}
	require.Contains(t, ids, "spiffe://example.org/after")

	time.Sleep(200 * time.Millisecond) // a few more polls after the change
	stopPoll()
	wg.Wait()
	require.Greater(t, calls.Load(), int64(10), "the poller made too few calls to prove anything")
	require.Zero(t, failures.Load(), "%d of %d fetches failed during failover; first: %v", failures.Load(), calls.Load(), firstErr.Load())
	t.Logf("%d FetchX509SVID calls during failover, none failed", calls.Load())
}
