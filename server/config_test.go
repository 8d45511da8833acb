package server_test

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

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
	require.Equal(t, "/run/ferry/server/admin.sock", cfg.AdminSocket)
	require.Equal(t, "127.0.0.1:8301", cfg.Cluster.BindAddr)
	require.True(t, cfg.Cluster.Bootstrap)
	require.Equal(t, "wal", cfg.Cluster.LogStore)
	require.EqualValues(t, 8192, cfg.Cluster.SnapshotThreshold)
}

func TestConfigErrors(t *testing.T) {
	t.Setenv("RUNTIME_DIRECTORY", "")
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

	cfg, err := server.LoadConfig(write(fmt.Sprintf(minimalServer, "")))
	require.NoError(t, err)
	require.Equal(t, filepath.Join(dir, "data"), cfg.DataDir, "relative to the config file")
	require.Equal(t, "/run/ferry/server/admin.sock", cfg.AdminSocket, "never under /tmp")
	require.Equal(t, filepath.Join(dir, "tls", "ca.pem"), cfg.Cluster.TLS.CAFile)
}

func TestOIDCConfig(t *testing.T) {
	dir := t.TempDir()
	write := func(oidc, ca string) string {
		p := filepath.Join(dir, "s.conf")
		body := `server {
  node_id = "a"
  trust_domain = "example.org"
  data_dir = "data"
  ` + ca + `
  ` + oidc + `
  cluster {
    bind_addr = "127.0.0.1:1"
    ca_file = "tls/ca.pem"
    cert_file = "tls/n.pem"
    key_file = "tls/n-key.pem"
  }
}`
		require.NoError(t, os.WriteFile(p, []byte(body), 0o600))
		return p
	}

	cfg, err := server.LoadConfig(write(`oidc {
    addr = "127.0.0.1:8443"
    issuer = "https://oidc.example.org"
    cert_file = "oidc.pem"
    key_file = "/etc/ferry/oidc-key.pem"
  }`, ""))
	require.NoError(t, err)
	require.Equal(t, server.OIDCConfig{Addr: "127.0.0.1:8443", Issuer: "https://oidc.example.org",
		CertFile: filepath.Join(dir, "oidc.pem"), KeyFile: "/etc/ferry/oidc-key.pem"}, cfg.OIDC)
	require.Equal(t, "https://oidc.example.org", cfg.CA.JWTIssuer, "the OIDC issuer becomes the JWT-SVID issuer")

	cfg, err = server.LoadConfig(write(`oidc {
    addr = "127.0.0.1:8443"
    issuer = "https://oidc.example.org/td"
  }`, `ca { jwt_issuer = "https://other.example.org" }`))
	require.NoError(t, err)
	require.Equal(t, "https://other.example.org", cfg.CA.JWTIssuer, "an explicit ca.jwt_issuer wins")
	require.Empty(t, cfg.OIDC.CertFile)

	cfg, err = server.LoadConfig(write("", ""))
	require.NoError(t, err)
	require.Equal(t, server.OIDCConfig{}, cfg.OIDC)
	require.Empty(t, cfg.CA.JWTIssuer)

	for _, tc := range []struct{ block, want string }{
		{`oidc { addr = "127.0.0.1:8443" }`, "oidc.issuer is required"},
		{`oidc { addr = "127.0.0.1:8443" issuer = "http://oidc.example.org" }`, "not an https URL"},
		{`oidc { addr = "127.0.0.1:8443" issuer = "https://oidc.example.org?x=1" }`, "query"},
		{`oidc { addr = "127.0.0.1:8443" issuer = "https://oidc.example.org" cert_file = "c.pem" }`, "go together"},
		{`oidc { addr = "127.0.0.1:8443" issuer = "https://oidc.example.org" port = 1 }`, "unknown setting(s): server.oidc.port"},
	} {
		_, err := server.LoadConfig(write(tc.block, ""))
		require.ErrorContains(t, err, tc.want, tc.block)
	}
}

func TestFederationConfig(t *testing.T) {
	dir := t.TempDir()
	write := func(block string) string {
		p := filepath.Join(dir, "s.conf")
		body := `server {
  node_id = "a"
  trust_domain = "example.org"
  data_dir = "data"
  ` + block + `
  cluster {
    bind_addr = "127.0.0.1:1"
    ca_file = "tls/ca.pem"
    cert_file = "tls/n.pem"
    key_file = "tls/n-key.pem"
  }
}`
		require.NoError(t, os.WriteFile(p, []byte(body), 0o600))
		return p
	}

	cfg, err := server.LoadConfig(write(`federation {
    bundle_endpoint {
      addr = "0.0.0.0:8443"
      profile = "https_web"
      cert_file = "web.pem"
      key_file = "/etc/ferry/web-key.pem"
      refresh_hint = "2m"
    }
    web_pki_ca_file = "roots.pem"
  }`))
	require.NoError(t, err)
	require.Equal(t, server.FederationConfig{
		BundleEndpoint: &server.BundleEndpointConfig{Addr: "0.0.0.0:8443", Profile: "https_web", CertFile: filepath.Join(dir, "web.pem"),
			KeyFile: "/etc/ferry/web-key.pem", RefreshHint: 2 * time.Minute},
		WebPKICAFile: filepath.Join(dir, "roots.pem"),
	}, cfg.Federation)

	cfg, err = server.LoadConfig(write(`federation { bundle_endpoint { addr = "127.0.0.1:8443" } }`))
	require.NoError(t, err)
	require.Equal(t, "https_spiffe", cfg.Federation.BundleEndpoint.Profile, "the default profile")

	cfg, err = server.LoadConfig(write(""))
	require.NoError(t, err)
	require.Nil(t, cfg.Federation.BundleEndpoint)

	for _, tc := range []struct{ block, want string }{
		{`federation { bundle_endpoint { profile = "https_spiffe" } }`, "bundle_endpoint.addr is required"},
		{`federation { bundle_endpoint { addr = ":8443" profile = "https_web" } }`, "needs cert_file and key_file"},
		{`federation { bundle_endpoint { addr = ":8443" cert_file = "c.pem" key_file = "k.pem" } }`, "for the https_web profile"},
		{`federation { bundle_endpoint { addr = ":8443" profile = "acme" } }`, "want https_spiffe or https_web"},
		{`federation { bundle_endpoint { addr = ":8443" refresh_hint = "soon" } }`, "refresh_hint"},
		{`federation { bundle_endpoint { addr = ":8443" refresh_hint = "48h" } }`, "less than 24h"},
		{`federation { bundle_endpoint { addr = ":8443" port = 1 } }`, "unknown setting(s): server.federation.bundle_endpoint.port"},
	} {
		_, err := server.LoadConfig(write(tc.block))
		require.ErrorContains(t, err, tc.want, tc.block)
	}
}

// minimalServer is the least a server.conf holds, with %s for more settings.
const minimalServer = `server {
  node_id = "a"
  trust_domain = "example.org"
  data_dir = "data"
  %s
  cluster {
    bind_addr = "127.0.0.1:1"
    ca_file = "tls/ca.pem"
    cert_file = "tls/n.pem"
    key_file = "tls/n-key.pem"
  }
}`

// TestAdminSocketInRuntimeDirectory: under systemd, the admin socket goes to
// the unit's RuntimeDirectory= unless the config names one.
func TestAdminSocketInRuntimeDirectory(t *testing.T) {
	t.Setenv("RUNTIME_DIRECTORY", "/run/ferry/server-2")
	p := filepath.Join(t.TempDir(), "s.conf")
	require.NoError(t, os.WriteFile(p, []byte(fmt.Sprintf(minimalServer, "")), 0o600))
	cfg, err := server.LoadConfig(p)
	require.NoError(t, err)
	require.Equal(t, "/run/ferry/server-2/admin.sock", cfg.AdminSocket)
	require.NoError(t, os.WriteFile(p, []byte(fmt.Sprintf(minimalServer, `admin_socket = "/srv/admin.sock"`)), 0o600))
	cfg, err = server.LoadConfig(p)
	require.NoError(t, err)
	require.Equal(t, "/srv/admin.sock", cfg.AdminSocket, "the config wins")
}
