package server_test

import (
	"context"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server"
	"github.com/ferry-id/ferry/server/cluster"
)

// startNode runs a server node in a temp dir; bootstrap makes it a one-node
// cluster, otherwise it belongs to none and never catches up. It returns the
// server, its admin connection and its health address.
func startNode(t *testing.T, bootstrap bool) (*server.Server, *grpc.ClientConn, string) {
	t.Helper()
	dir := t.TempDir()
	ca, err := cluster.CreateCA(cluster.CAOptions{Dir: filepath.Join(dir, "tls")})
	require.NoError(t, err)
	node, err := cluster.CreateNodeCert(cluster.CertOptions{Dir: filepath.Join(dir, "tls", "n1"), NodeID: "n1", CACertFile: ca.CertFile, CAKeyFile: ca.KeyFile})
	require.NoError(t, err)
	// Every listener on port 0; Listen records where each ended up.
	var mu sync.Mutex
	bound := map[string]string{}
	listen := func(network, addr string) (net.Listener, error) {
		ln, err := net.Listen(network, "127.0.0.1:0")
		if err == nil {
			mu.Lock()
			bound[addr] = ln.Addr().String()
			mu.Unlock()
		}
		return ln, err
	}
	srv, err := server.New(server.Config{
		NodeID: "n1", TrustDomain: spiffeid.RequireTrustDomainFromString("example.org"),
		DataDir: filepath.Join(dir, "data"), AdminSocket: filepath.Join(dir, "admin.sock"),
		HealthAddr: "health", AgentAddr: "agent", Listen: listen,
		Cluster: server.ClusterConfig{BindAddr: "cluster", Bootstrap: bootstrap, TLS: node},
	})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx) }()
	t.Cleanup(func() { cancel(); require.NoError(t, <-done) })
	select {
	case <-srv.Ready():
	case err := <-done:
		t.Fatal(err)
	}
	conn, err := grpc.NewClient("unix://"+filepath.Join(dir, "admin.sock"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	mu.Lock()
	defer mu.Unlock()
	return srv, conn, bound["health"]
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	require.NoError(t, err)
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

// A node that has not caught up with the cluster's log (here: one in no
// cluster, which never does) is not ready, and its admin services wait, but
// for those that manage membership, which must answer for the node to join.
func TestNotCaughtUpServesNoState(t *testing.T) {
	srv, conn, health := startNode(t, false)
	code, body := get(t, "http://"+health+"/ready")
	require.Equal(t, http.StatusServiceUnavailable, code)
	require.Contains(t, body, "catching up")
	code, _ = get(t, "http://"+health+"/live")
	require.Equal(t, http.StatusOK, code)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	members, err := ferrypb.NewAdminClient(conn).ClusterList(ctx, &ferrypb.ClusterListRequest{})
	require.NoError(t, err, "membership is served before catching up")
	require.Len(t, members.Members, 0)

	// A read of the state waits for as long as its caller lets it.
	short, cancelShort := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancelShort()
	_, err = ferrypb.NewDirectoryClient(conn).ListTenants(short, &ferrypb.ListTenantsRequest{})
	require.Contains(t, []codes.Code{codes.Unavailable, codes.DeadlineExceeded}, status.Code(err), "%v", err)
	select {
	case <-srv.CaughtUp():
		t.Fatal("a node in no cluster caught up")
	default:
	}
}

// A bootstrapped node catches up (its empty log), is ready, and serves.
func TestCaughtUpServes(t *testing.T) {
	srv, conn, health := startNode(t, true)
	select {
	case <-srv.CaughtUp():
	case <-time.After(30 * time.Second):
		t.Fatal("a one-node cluster did not catch up in 30 s")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := ferrypb.NewDirectoryClient(conn).ListTenants(ctx, &ferrypb.ListTenantsRequest{})
	require.NoError(t, err)
	// Ready also waits for the CA's first authorities, published through
	// the log after catching up.
	select {
	case <-srv.Serving():
	case <-time.After(30 * time.Second):
		t.Fatal("a one-node cluster was not serving in 30 s")
	}
	code, _ := get(t, "http://"+health+"/ready")
	require.Equal(t, http.StatusOK, code)
}
