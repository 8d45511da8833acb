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
	require.Equal(t, "/tmp/ferry/server/admin.sock", fc.ServerSocket)
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
