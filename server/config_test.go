package server_test

import (
	"crypto/ed25519"
	"crypto/rand"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/crypto/ssh"

	"github.com/ferry-id/ferry/server"
	"github.com/ferry-id/ferry/test/metadata/testpki"
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
	require.Equal(t, 1, cfg.Cluster.RaftMultiplier)
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

	withCluster := func(extra string) string {
		return write(strings.Replace(fmt.Sprintf(minimalServer, ""), `key_file = "tls/n-key.pem"`, `key_file = "tls/n-key.pem"`+"\n    "+extra, 1))
	}
	for _, bad := range []string{"raft_multiplier = 11", "raft_multiplier = -1"} {
		_, err = server.LoadConfig(withCluster(bad))
		require.ErrorContains(t, err, "cluster.raft_multiplier", bad)
		require.ErrorContains(t, err, "want 1 to 10", bad)
	}
	cfg, err = server.LoadConfig(withCluster("raft_multiplier = 3"))
	require.NoError(t, err)
	require.Equal(t, 3, cfg.Cluster.RaftMultiplier)
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

// sampleBlock returns the commented block `# name {` … `# }` of a sample
// config, uncommented.
func sampleBlock(t *testing.T, path, name string) string {
	t.Helper()
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	var block []string
	in := false
	for line := range strings.Lines(string(data)) {
		l := strings.TrimSpace(line)
		if l == "# "+name+" {" {
			in = true
		}
		if in {
			block = append(block, strings.TrimPrefix(l, "#"))
		}
		if in && l == "# }" {
			break
		}
	}
	require.NotEmpty(t, block, name)
	return strings.Join(block, "\n")
}

// TestNodeAttestorConfig parses the sample's node attestor blocks, with real
// files for their paths, and checks their refusals.
func TestNodeAttestorConfig(t *testing.T) {
	dir := t.TempDir()
	root := testpki.NewRoot(t, "root")
	inter := root.Intermediate(t, "inter")
	files := map[string]string{
		"/etc/ferry/azure-roots.pem":                    testpki.WritePEM(t, dir, "roots.pem", root.Cert),
		"/etc/ferry/azure-intermediates.pem":            testpki.WritePEM(t, dir, "inter.pem", inter.Cert),
		"/etc/ferry/aws/us-east-1-rsa2048.pem":          testpki.WritePEM(t, dir, "aws.pem", root.Cert),
		"/etc/ferry/tpm-manufacturer-roots.pem":         testpki.WritePEM(t, dir, "tpm-roots.pem", root.Cert),
		"/etc/ferry/tpm-manufacturer-intermediates.pem": testpki.WritePEM(t, dir, "tpm-inter.pem", inter.Cert),
	}
	load := func(block string) (server.Config, error) {
		for from, to := range files {
			block = strings.ReplaceAll(block, from, to)
		}
		p := filepath.Join(dir, "s.conf")
		require.NoError(t, os.WriteFile(p, []byte(`server {
  node_id = "a"
  trust_domain = "example.org"
  data_dir = "data"
  cluster {
    bind_addr = "127.0.0.1:1"
    ca_file = "ca.pem"
    cert_file = "n.pem"
    key_file = "n-key.pem"
  }
`+block+"\n}\n"), 0o600))
		return server.LoadConfig(p)
	}
	az := sampleBlock(t, "../conf/server.conf", "azure_imds")
	cfg, err := load(az)
	require.NoError(t, err)
	require.Len(t, cfg.NodeAttestors, 1)
	at, err := cfg.NodeAttestors[0](slog.New(slog.DiscardHandler))
	require.NoError(t, err)
	require.Equal(t, "azure_imds", at.Name())

	for name, c := range map[string]struct{ from, to, want string }{
		"no roots":       {`ca_bundle_file     = "` + files["/etc/ferry/azure-roots.pem"] + `"`, "", "ca_bundle_file is required"},
		"missing roots":  {files["/etc/ferry/azure-roots.pem"], "/nonexistent.pem", "ca_bundle_file"},
		"bad age":        {`"5m"`, `"soon"`, "max_document_age"},
		"no tenants":     {`"72f988bf-86f1-41af-91ab-2d7cd011db47" = ["8d10da13-8125-4ba9-a717-bf7490507b3d"]`, "", "at least one tenant"},
		"tenant no subs": {`["8d10da13-8125-4ba9-a717-bf7490507b3d"]`, `[]`, "lists no subscription"},
		"unknown key":    {`max_document_age`, `max_age`, "unknown setting(s): server.azure_imds.max_age"},
	} {
		block := strings.ReplaceAll(az, "/etc/ferry/azure-roots.pem", files["/etc/ferry/azure-roots.pem"])
		require.Contains(t, block, c.from, name)
		_, err := load(strings.Replace(block, c.from, c.to, 1))
		require.ErrorContains(t, err, c.want, name)
	}

	aw := sampleBlock(t, "../conf/server.conf", "aws_iid")
	cfg, err = load(aw)
	require.NoError(t, err)
	require.Len(t, cfg.NodeAttestors, 1)
	at, err = cfg.NodeAttestors[0](slog.New(slog.DiscardHandler))
	require.NoError(t, err)
	require.Equal(t, "aws_iid", at.Name())
	for name, c := range map[string]struct{ from, to, want string }{
		"no accounts":  {`["123456789012"]`, `[]`, "at least one account ID"},
		"bad account":  {`["123456789012"]`, `["1234"]`, "not a 12-digit account ID"},
		"missing cert": {files["/etc/ferry/aws/us-east-1-rsa2048.pem"], "/nonexistent.pem", "region_certificates us-east-1"},
		"bad region":   {`"us-east-1" =`, `"Virginia" =`, "not an AWS region"},
	} {
		block := strings.ReplaceAll(aw, "/etc/ferry/aws/us-east-1-rsa2048.pem", files["/etc/ferry/aws/us-east-1-rsa2048.pem"])
		require.Contains(t, block, c.from, name)
		_, err := load(strings.Replace(block, c.from, c.to, 1))
		require.ErrorContains(t, err, c.want, name)
	}

	gb := sampleBlock(t, "../conf/server.conf", "gcp_iit")
	cfg, err = load(gb)
	require.NoError(t, err)
	require.Len(t, cfg.NodeAttestors, 1)
	at, err = cfg.NodeAttestors[0](slog.New(slog.DiscardHandler))
	require.NoError(t, err)
	require.Equal(t, "gcp_iit", at.Name())
	for name, c := range map[string]struct{ from, to, want string }{
		"no projects": {`["my-project"]`, `[]`, "at least one project ID"},
		"bad project": {`["my-project"]`, `["My Project"]`, "not a GCP project ID"},
		"missing ca":  {`jwks_url`, `jwks_ca_file = "/nonexistent.pem"` + "\n  jwks_url", "jwks_ca_file"},
	} {
		require.Contains(t, gb, c.from, name)
		_, err := load(strings.Replace(gb, c.from, c.to, 1))
		require.ErrorContains(t, err, c.want, name)
	}

	mb := sampleBlock(t, "../conf/server.conf", "azure_msi")
	cfg, err = load(mb)
	require.NoError(t, err)
	require.Len(t, cfg.NodeAttestors, 1)
	at, err = cfg.NodeAttestors[0](slog.New(slog.DiscardHandler))
	require.NoError(t, err)
	require.Equal(t, "azure_msi", at.Name())
	for name, c := range map[string]struct{ from, to, want string }{
		"no tenants":  {`["72f988bf-86f1-41af-91ab-2d7cd011db47"]`, `[]`, "at least one tenant"},
		"no audience": {`"api://ferry-node-attestation"`, `""`, "audience is required"},
		"http issuer": {`"https://sts.windows.net/{tenant}/"`, `"http://sts.windows.net/{tenant}/"`, "must be an https URL"},
		"missing ca":  {`allow_reattestation`, `ca_file = "/nonexistent.pem"` + "\n  allow_reattestation", "ca_file"},
	} {
		require.Contains(t, mb, c.from, name)
		_, err := load(strings.Replace(mb, c.from, c.to, 1))
		require.ErrorContains(t, err, c.want, name)
	}

	tb := sampleBlock(t, "../conf/server.conf", "tpm")
	cfg, err = load(tb)
	require.NoError(t, err)
	require.Len(t, cfg.NodeAttestors, 1)
	at, err = cfg.NodeAttestors[0](slog.New(slog.DiscardHandler))
	require.NoError(t, err)
	require.Equal(t, "tpm", at.Name())
	_, err = load(strings.Replace(tb, `"/etc/ferry/tpm-manufacturer-roots.pem"`, `""`, 1))
	require.ErrorContains(t, err, "manufacturer_ca_file is required")
	_, err = load(strings.Replace(tb, `"/etc/ferry/tpm-manufacturer-roots.pem"`, `"/nonexistent.pem"`, 1))
	require.ErrorContains(t, err, "manufacturer_ca_file")

	_, caKey, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	caPub, err := ssh.NewPublicKey(caKey.Public())
	require.NoError(t, err)
	caFile := filepath.Join(dir, "ssh-ca.pub")
	require.NoError(t, os.WriteFile(caFile, append([]byte("# host CA\n@cert-authority *.example.org "), ssh.MarshalAuthorizedKey(caPub)...), 0o644))
	files["/etc/ferry/ssh-host-ca.pub"] = caFile
	sb := sampleBlock(t, "../conf/server.conf", "sshpop")
	cfg, err = load(sb)
	require.NoError(t, err)
	require.Len(t, cfg.NodeAttestors, 1)
	at, err = cfg.NodeAttestors[0](slog.New(slog.DiscardHandler))
	require.NoError(t, err)
	require.Equal(t, "sshpop", at.Name())
	require.NoError(t, os.WriteFile(caFile, []byte("not a key\n"), 0o644))
	_, err = load(sb)
	require.ErrorContains(t, err, "ssh-ca.pub line 1")
}
