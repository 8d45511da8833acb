package e2e

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/test/testcluster"
)

// TestClusterRestartKeepsState restarts a 3-node cluster whole. Right after
// the restart every node answers with the state as it was: the admin API
// waits until the node has caught up with the log (before, a restarted node
// answered from its last snapshot, here an empty one: no tenant, no
// identity, and a "create if missing" made a second tenant). A create that
// names no tenant, sent to each node at once, lands in the one tenant there
// is; /ready answers 200 only once the node has caught up.
func TestClusterRestartKeepsState(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a 3-node cluster")
	}
	c := testcluster.New(t, testcluster.Options{Nodes: 3, LogLevel: "info"})
	n := c.Nodes[0]
	cli := func(node *testcluster.Node, args ...string) string {
		t.Helper()
		out, err := node.CLI(args...)
		require.NoError(t, err, "ferry %s: %s", strings.Join(args, " "), out)
		return out
	}
	cli(n, "identity", "create", "--name", "web-id")
	cli(n, "identity", "federated-credential", "create", "--identity-name", "web-id", "--name", "web",
		"--issuer", "https://oidc.example.org", "--subject", "spiffe://example.org/web")
	cli(n, "resource", "create", "--name", "orders", "--identifier-uri", "api://orders", "--app-role", "Orders.Read")
	cli(n, "role", "assign", "--identity-name", "web-id", "--resource", "api://orders", "--role", "Orders.Read")
	cli(n, "entry", "create", "--spiffe-id", "spiffe://example.org/web", "--parent-id", "spiffe://example.org/agent/a", "--selector", "unix:uid:1000")
	// Every node has applied what the leader has.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	list, err := c.WaitLeader(30*time.Second, nil).Admin().ClusterList(ctx, &ferrypb.ClusterListRequest{})
	require.NoError(t, err)
	c.WaitApplied(list.AppliedIndex, 30*time.Second)
	want := directoryState(t, n.Socket)
	require.Len(t, filter(want, "tenant "), 1)
	require.Len(t, filter(want, "identity "), 1)
	for _, node := range c.Nodes[1:] {
		requireSameState(t, want, directoryState(t, node.Socket), "before the restart, "+node.ID)
	}

	for _, node := range c.Nodes {
		node.Stop()
	}
	for _, node := range c.Nodes {
		node.Start()
	}
	for _, node := range c.Nodes {
		requireSameState(t, want, directoryState(t, node.Socket), "after the restart, "+node.ID)
	}
	// Creates that need "the" tenant, on every node at once.
	errc := make(chan error, len(c.Nodes))
	for i, node := range c.Nodes {
		go func() {
			out, err := node.CLI("identity", "create", "--name", fmt.Sprintf("after-%d", i))
			if err != nil {
				err = fmt.Errorf("%s: %v: %s", node.ID, err, out)
			}
			errc <- err
		}()
	}
	for range c.Nodes {
		require.NoError(t, <-errc)
	}
	// Each create was acknowledged by the node it was sent to; n reads
	// locally, so it first applies what the leader has.
	ctx2, cancel2 := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel2()
	list, err = c.WaitLeader(30*time.Second, nil).Admin().ClusterList(ctx2, &ferrypb.ClusterListRequest{})
	require.NoError(t, err)
	c.WaitApplied(list.AppliedIndex, 30*time.Second)
	got := directoryState(t, n.Socket)
	require.Equal(t, filter(want, "tenant "), filter(got, "tenant "), "still one tenant")
	require.Len(t, filter(got, "identity "), 1+len(c.Nodes))
	for _, node := range c.Nodes {
		require.Equal(t, http.StatusOK, readyStatus(t, node), node.ID)
	}
}

func readyStatus(t *testing.T, n *testcluster.Node) int {
	t.Helper()
	resp, err := http.Get("http://" + n.HealthAddr + "/ready")
	require.NoError(t, err)
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	return resp.StatusCode
}
