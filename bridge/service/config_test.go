package service_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/bridge/service"
)

// TestSampleConfig keeps conf/bridge.conf parseable.
func TestSampleConfig(t *testing.T) {
	fc, err := service.LoadConfig("../../conf/bridge.conf")
	require.NoError(t, err)
	require.Equal(t, "127.0.0.1:8443", fc.ListenAddr)
	require.Equal(t, "https://127.0.0.1:8443", fc.BaseURL)
	require.Equal(t, "/var/lib/ferry/bridge", fc.DataDir)
	require.Equal(t, []string{"/run/ferry/server/admin.sock"}, fc.ServerSockets)
	require.False(t, fc.InsecureSocket)
}

func TestConfigServers(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "b.conf")
	load := func(servers string) (service.FileConfig, error) {
		t.Helper()
		require.NoError(t, os.WriteFile(p, []byte(`bridge { listen_addr = "x:1" data_dir = "d" `+servers+` }`), 0o600))
		return service.LoadConfig(p)
	}
	fc, err := load(`server_sockets = ["s1/admin.sock", "/abs/admin.sock"]`)
	require.NoError(t, err)
	require.Equal(t, []string{filepath.Join(dir, "s1/admin.sock"), "/abs/admin.sock"}, fc.ServerSockets)
	require.Empty(t, fc.ServerAddresses)
	fc, err = load(`server_address = "10.0.0.1:8082" server_addresses = ["10.0.0.2:8082", "10.0.0.3:8082"]`)
	require.NoError(t, err)
	require.Equal(t, []string{"10.0.0.1:8082", "10.0.0.2:8082", "10.0.0.3:8082"}, fc.ServerAddresses)
	require.Empty(t, fc.ServerSockets)
	require.Equal(t, "unix:///run/ferry/agent/public/api.sock", fc.WorkloadAPI)
	fc, err = load(`server_socket = "/run/s.sock" insecure_socket = true`)
	require.NoError(t, err)
	require.True(t, fc.InsecureSocket)
	_, err = load(`server_socket = "a.sock" server_addresses = ["10.0.0.2:8082"]`)
	require.ErrorContains(t, err, "do not go together")
}

func TestConfigErrors(t *testing.T) {
	p := filepath.Join(t.TempDir(), "b.conf")
	require.NoError(t, os.WriteFile(p, []byte(`bridge { listen_addr = "x:1" data_dir = "d" tls_cert_file = "c" }`), 0o600))
	_, err := service.LoadConfig(p)
	require.ErrorContains(t, err, "go together")
	require.NoError(t, os.WriteFile(p, []byte(`bridge { listen_adr = "x:1" }`), 0o600))
	_, err = service.LoadConfig(p)
	require.ErrorContains(t, err, "unknown setting(s): bridge.listen_adr")
}
