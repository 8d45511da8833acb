package server_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/server"
)

// TestSampleConfig keeps conf/server.conf parseable: docs that cannot rot.
func TestSampleConfig(t *testing.T) {
	cfg, err := server.LoadConfig("../conf/server.conf")
	require.NoError(t, err)
	require.Equal(t, "server-1", cfg.NodeID)
	require.Equal(t, "example.org", cfg.TrustDomain.String())
	require.Equal(t, "/var/lib/ferry/server", cfg.DataDir)
	require.Equal(t, "127.0.0.1:8301", cfg.Cluster.BindAddr)
	require.True(t, cfg.Cluster.Bootstrap)
	require.Equal(t, "wal", cfg.Cluster.LogStore)
	require.EqualValues(t, 8192, cfg.Cluster.SnapshotThreshold)
}

func TestConfigErrors(t *testing.T) {
	dir := t.TempDir()
	write := func(body string) string {
		p := filepath.Join(dir, "s.conf")
		require.NoError(t, os.WriteFile(p, []byte(body), 0o600))
		return p
	}
	_, err := server.LoadConfig(write(`server { node_id = "a" trust_domain = "example.org" data_dir = "d" colour = "red" }`))
	require.ErrorContains(t, err, "unknown setting(s): server.colour")

	_, err = server.LoadConfig(write(`server { node_id = "a" trust_domain = "Not A Domain" data_dir = "d" }`))
	require.ErrorContains(t, err, "trust_domain")

	_, err = server.LoadConfig(write(`server { node_id = "a" trust_domain = "example.org" data_dir = "d" cluster { bind_addr = "127.0.0.1:1" } }`))
	require.ErrorContains(t, err, "ferry cluster tls ca create")

	cfg, err := server.LoadConfig(write(`server {
  node_id = "a"
  trust_domain = "example.org"
  data_dir = "data"
  cluster {
    bind_addr = "127.0.0.1:1"
    ca_file = "tls/ca.pem"
    cert_file = "tls/n.pem"
    key_file = "tls/n-key.pem"
  }
}`))
	require.NoError(t, err)
	require.Equal(t, filepath.Join(dir, "data"), cfg.DataDir, "relative to the config file")
	require.Equal(t, filepath.Join(dir, "data", "admin.sock"), cfg.AdminSocket)
	require.Equal(t, filepath.Join(dir, "tls", "ca.pem"), cfg.Cluster.TLS.CAFile)
}
