package e2e

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/test/testcluster"
)

// TestBridgeKeyRotation runs a real bridge process with short-lived signing
// keys and watches its JWKS: a new key is listed before it can sign, and a
// replaced key disappears only after it has stopped signing for a while.
func TestBridgeKeyRotation(t *testing.T) {
	if testing.Short() {
		t.Skip("starts real server and bridge processes")
	}
	c := testcluster.New(t, testcluster.Options{Nodes: 1})
	addr, client := runBridge(t, c.Bin, fmt.Sprintf(`  server_socket    = %q
  name             = "b1"
  key_lifetime     = "12s"
  key_retire_after = "2s"
  log_level        = "debug"
`, c.Nodes[0].Socket), 0)

	// Record every distinct key set the JWKS shows for a while.
	var seen [][]string
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		kids, err := jwksKids(client, addr)
		require.NoError(t, err)
		if len(seen) == 0 || !slices.Equal(seen[len(seen)-1], kids) {
			seen = append(seen, kids)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("JWKS key sets over time: %v", seen)
	require.Len(t, seen[0], 1, "one key at first")
	first := seen[0][0]
	// The first key is joined by a second (published before it signs), and
	// later withdrawn while the second stays.
	var joined, withdrawn bool
	for _, kids := range seen[1:] {
		if slices.Contains(kids, first) && len(kids) == 2 {
			joined = true
		}
		if joined && !slices.Contains(kids, first) && len(kids) >= 1 {
			withdrawn = true
		}
	}
	require.True(t, joined, "the next key was published next to the first: %v", seen)
	require.True(t, withdrawn, "the first key was retired: %v", seen)
}

// runBridge starts `ferry bridge run` with the bridge block body (listen_addr
// and data_dir "data" are added) and waits until its JWKS lists want keys
// (any number when want is 0). It returns the listen address and an HTTPS
// client trusting the bridge's generated CA; the bridge stops with the test.
func runBridge(t *testing.T, bin, body string, want int) (string, *http.Client) {
	t.Helper()
	dir := t.TempDir()
	addr := testcluster.FreeAddr(t)
	conf := filepath.Join(dir, "bridge.conf")
	require.NoError(t, os.WriteFile(conf, []byte(fmt.Sprintf("bridge {\n  listen_addr = %q\n  data_dir    = \"data\"\n%s}\n", addr, body)), 0o600))
	logf, err := os.Create(filepath.Join(dir, "bridge.log"))
	require.NoError(t, err)
	cmd := exec.Command(bin, "bridge", "run", "--config", conf)
	cmd.Stdout, cmd.Stderr = logf, logf
	require.NoError(t, cmd.Start())
	t.Cleanup(func() {
		_ = cmd.Process.Signal(os.Interrupt)
		_ = cmd.Wait()
		logf.Close()
		if t.Failed() {
			out, _ := os.ReadFile(filepath.Join(dir, "bridge.log"))
			t.Logf("bridge log:\n%s", out)
		}
	})
	var client *http.Client
	require.Eventually(t, func() bool {
		pem, err := os.ReadFile(filepath.Join(dir, "data", "tls-ca.pem"))
		if err != nil {
			return false
		}
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(pem)
		client = &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
		kids, err := jwksKids(client, addr)
		return err == nil && (want == 0 || len(kids) == want)
	}, 30*time.Second, 50*time.Millisecond, "the bridge follows the directory and publishes its key")
	return addr, client
}

func jwksKids(c *http.Client, addr string) ([]string, error) {
	resp, err := c.Get("https://" + addr + "/common/discovery/v2.0/keys")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("status %d", resp.StatusCode)
	}
	var jwks struct {
		Keys []struct {
			Kid string `json:"kid"`
		} `json:"keys"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&jwks); err != nil {
		return nil, err
	}
	var out []string
	for _, k := range jwks.Keys {
		out = append(out, k.Kid)
	}
	slices.Sort(out)
	return out, nil
}

// TestBridgeRemoteReplica runs a bridge that reaches the server over mutual TLS
// with an admin X509-SVID from its agent, as a replica on another machine would;
// a workload without an admin entry is refused there.
func TestBridgeRemoteReplica(t *testing.T) {
	if testing.Short() {
		t.Skip("starts real server, agent and bridge processes")
	}
	c := testcluster.New(t, testcluster.Options{Nodes: 1, AdminTCP: true})
	a := c.StartAgent("bnode")
	srv := c.Nodes[0]
	for _, args := range [][]string{
		{"entry", "create", "--spiffe-id", "spiffe://example.org/bridge", "--parent-id", a.ID, "--selector", fmt.Sprintf("unix:uid:%d", os.Getuid()), "--admin"},
		{"entry", "create", "--spiffe-id", "spiffe://example.org/plain", "--parent-id", a.ID, "--selector", fmt.Sprintf("unix:uid:%d", os.Getuid())},
	} {
		out, err := srv.CLI(args...)
		require.NoError(t, err, out)
	}

	// Plain and admin identities against the admin listener.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	x, err := workloadapi.FetchX509Context(ctx, workloadapi.WithAddr(a.SocketAddr()))
	require.NoError(t, err)
	require.Len(t, x.SVIDs, 2)
	serverID := spiffeid.RequireFromString("spiffe://example.org/spire/server")
	for _, svid := range x.SVIDs {
		conn, err := grpc.NewClient(srv.AdminAddr, grpc.WithTransportCredentials(
			credentials.NewTLS(tlsconfig.MTLSClientConfig(svid, x.Bundles, tlsconfig.AuthorizeID(serverID)))))
		require.NoError(t, err)
		_, err = ferrypb.NewDirectoryClient(conn).ListTenants(ctx, &ferrypb.ListTenantsRequest{})
		conn.Close()
		if svid.ID.Path() == "/bridge" {
			require.NoError(t, err)
		} else {
			require.Equal(t, codes.PermissionDenied, status.Code(err), "%v", err)
		}
	}
	// No client certificate at all: the handshake fails.
	conn, err := grpc.NewClient(srv.AdminAddr, grpc.WithTransportCredentials(
		credentials.NewTLS(tlsconfig.TLSClientConfig(x.Bundles, tlsconfig.AuthorizeID(serverID)))))
	require.NoError(t, err)
	_, err = ferrypb.NewDirectoryClient(conn).ListTenants(ctx, &ferrypb.ListTenantsRequest{})
	conn.Close()
	require.Error(t, err)

	// The remote replica follows the directory and publishes its key.
	runBridge(t, c.Bin, fmt.Sprintf(`  server_address      = %q
  workload_api_socket = %q
  log_level           = "debug"
`, srv.AdminAddr, a.SocketAddr()), 1)
}

// TestBridgeFollowsAnyServer runs a bridge given every server's admin socket
// of a 3-node cluster and kills the servers one at a time: the replica goes on
// following the directory through those alive, so a tenant created while any
// one server is down is served by the bridge soon after.
func TestBridgeFollowsAnyServer(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a 3-node cluster and a bridge")
	}
	c := testcluster.New(t, testcluster.Options{Nodes: 3})
	c.WaitLeader(30*time.Second, nil)
	addr, client := runBridge(t, c.Bin, fmt.Sprintf(`  server_sockets = [%q, %q, %q]
  name           = "any"
  log_level      = "debug"
`, c.Nodes[0].Socket, c.Nodes[1].Socket, c.Nodes[2].Socket), 1)
	discovery := func(tenant string) int {
		resp, err := client.Get("https://" + addr + "/" + tenant + "/v2.0/.well-known/openid-configuration")
		if err != nil {
			return 0
		}
		resp.Body.Close()
		return resp.StatusCode
	}

	for i, down := range c.Nodes {
		down.Kill()
		var up *testcluster.Node
		for _, n := range c.Nodes {
			if n != down {
				up = n
				break
			}
		}
		tenant := fmt.Sprintf("00000000-0000-4000-8000-%012d", i+1)
		require.Equal(t, http.StatusBadRequest, discovery(tenant), "an unknown tenant")
		out, err := up.CLI("tenant", "create", "--name", fmt.Sprintf("t%d", i+1), "--tenant-id", tenant)
		require.NoError(t, err, out)
		begin := time.Now()
		require.Eventually(t, func() bool { return discovery(tenant) == http.StatusOK }, 30*time.Second, 50*time.Millisecond,
			"the bridge serves tenant %s, created while %s is down", tenant, down.ID)
		t.Logf("%s down: the bridge served the new tenant %s after it was created", down.ID, time.Since(begin).Round(time.Millisecond))
		down.Start()
	}
}
