package e2e

import (
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

	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/internal/testcluster"
)

// TestBridgeKeyRotation runs a real bridge process with short-lived signing
// keys and watches its JWKS: a new key is listed before it can sign, and a
// replaced key disappears only after it has stopped signing for a while.
func TestBridgeKeyRotation(t *testing.T) {
	if testing.Short() {
		t.Skip("starts real server and bridge processes")
	}
	c := testcluster.New(t, testcluster.Options{Nodes: 1})
	dir := t.TempDir()
	addr := testcluster.FreeAddr(t)
	conf := filepath.Join(dir, "bridge.conf")
	require.NoError(t, os.WriteFile(conf, []byte(fmt.Sprintf(`bridge {
  listen_addr      = %q
  data_dir         = "data"
  server_socket    = %q
  name             = "b1"
  key_lifetime     = "12s"
  key_retire_after = "2s"
  log_level        = "debug"
}
`, addr, c.Nodes[0].Socket)), 0o600))
	logf, err := os.Create(filepath.Join(dir, "bridge.log"))
	require.NoError(t, err)
	cmd := exec.Command(c.Bin, "bridge", "run", "--config", conf)
	cmd.Stdout, cmd.Stderr = logf, logf
	require.NoError(t, cmd.Start())
	defer func() {
		_ = cmd.Process.Signal(os.Interrupt)
		_ = cmd.Wait()
		if t.Failed() {
			out, _ := os.ReadFile(filepath.Join(dir, "bridge.log"))
			t.Logf("bridge log:\n%s", out)
		}
	}()

	var client *http.Client
	require.Eventually(t, func() bool {
		pem, err := os.ReadFile(filepath.Join(dir, "data", "tls-ca.pem"))
		if err != nil {
			return false
		}
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(pem)
		client = &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
		_, err = jwksKids(client, addr)
		return err == nil
	}, 20*time.Second, 50*time.Millisecond)

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
