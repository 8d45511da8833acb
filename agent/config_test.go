package agent_test

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/crypto/ssh"

	"github.com/ferry-id/ferry/agent"
	"github.com/ferry-id/ferry/agent/workloadapi"
)

// TestSampleConfig keeps conf/agent.conf parseable.
func TestSampleConfig(t *testing.T) {
	// The sample names a bundle file in /etc; parse a copy that points at a
	// real one.
	data, err := os.ReadFile("../conf/agent.conf")
	require.NoError(t, err)
	dir := t.TempDir()
	bundle := filepath.Join(dir, "bundle.pem")
	require.NoError(t, os.WriteFile(bundle, testBundlePEM(t), 0o644))
	conf := filepath.Join(dir, "agent.conf")
	require.NoError(t, os.WriteFile(conf, []byte(strings.ReplaceAll(string(data), "/etc/ferry/bundle.pem", bundle)), 0o600))

	fc, err := agent.LoadConfig(conf, "0123456789abcdef0123456789")
	require.NoError(t, err)
	require.Equal(t, "example.org", fc.TrustDomain.String())
	require.Equal(t, []string{"127.0.0.1:8081"}, fc.Servers)
	require.Equal(t, "/run/ferry/agent/public/api.sock", fc.SocketPath)
	require.True(t, fc.Systemd)
	require.Len(t, fc.TrustBundle, 1)
	require.Equal(t, "join_token", fc.NodeAttestor.Name())
	// The sample spells out every Workload API limit at its default.
	require.Equal(t, workloadapi.DefaultLimits(), fc.WorkloadAPILimits)
}

// TestSampleIMDSBlock parses the sample's commented imds block as written,
// but for the CA file, and a group that exists here for himds.
func TestSampleIMDSBlock(t *testing.T) {
	data, err := os.ReadFile("../conf/agent.conf")
	require.NoError(t, err)
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca.pem")
	require.NoError(t, os.WriteFile(ca, testBundlePEM(t), 0o644))
	var block []string
	in := false
	for line := range strings.Lines(string(data)) {
		l := strings.TrimSpace(line)
		if l == "# imds {" {
			in = true
		}
		if in {
			block = append(block, strings.TrimPrefix(l, "#"))
		}
		if in && l == "# }" {
			break
		}
	}
	require.NotEmpty(t, block)
	text := strings.Join(block, "\n")
	text = strings.ReplaceAll(text, "/etc/ferry/bridge-ca.pem", ca)
	text = strings.ReplaceAll(text, `"himds"`, `"root"`)
	p := filepath.Join(dir, "a.conf")
	require.NoError(t, os.WriteFile(p, []byte(`agent { trust_domain = "example.org" data_dir = "d" server_addresses = ["x:1"]
`+text+"\n}\n"), 0o600))
	fc, err := agent.LoadConfig(p, "")
	require.NoError(t, err)
	require.Equal(t, []uint32{0}, fc.IMDS.AllowedGroups)
	require.Equal(t, "https://bridge.example.org", fc.IMDS.Authority)
}

func TestConfigErrors(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "a.conf")
	require.NoError(t, os.WriteFile(p, []byte(`agent { trust_domain = "example.org" data_dir = "d" server_addresses = ["x:1"] sockt = "s" }`), 0o600))
	_, err := agent.LoadConfig(p, "")
	require.ErrorContains(t, err, "unknown setting(s): agent.sockt")

	// The setting that chose between two gRPC servers is gone; a config
	// that still names it is told so, whatever the value.
	for _, v := range []string{"ferry", "grpc-go", "netty"} {
		require.NoError(t, os.WriteFile(p, []byte(`agent { trust_domain = "example.org" data_dir = "d" server_addresses = ["x:1"] workload_api_grpc_server = "`+v+`" }`), 0o600))
		_, err = agent.LoadConfig(p, "")
		require.ErrorContains(t, err, "workload_api_grpc_server was removed")
	}

	for block, want := range map[string]string{
		`workload_api { max_conections = 1 }`:                                "unknown setting(s): agent.workload_api.max_conections",
		`workload_api { max_connections = -1 }`:                              "max_connections must not be negative",
		`workload_api { max_connections = 10 max_connections_per_uid = 11 }`: "max_connections_per_uid (11) is above max_connections (10)",
		`workload_api { max_calls = 10 max_calls_per_uid = 11 }`:             "max_calls_per_uid (11) is above max_calls (10)",
		`workload_api { idle_timeout = "soon" }`:                             `idle_timeout "soon"`,
		`workload_api { idle_timeout = "-1s" }`:                              `idle_timeout "-1s"`,
		`workload_api { handshake_timeout = "0s" }`:                          `handshake_timeout "0s"`,
		`workload_api { max_header_list_bytes = 100 }`:                       "max_header_list_bytes (100) is below",
		`workload_api { max_request_bytes = 100 }`:                           "max_request_bytes (100) is below",
	} {
		require.NoError(t, os.WriteFile(p, []byte(`agent { trust_domain = "example.org" data_dir = "d" server_addresses = ["x:1"] `+block+` }`), 0o600))
		_, err = agent.LoadConfig(p, "")
		require.ErrorContains(t, err, want, block)
	}

	require.NoError(t, os.WriteFile(p, []byte(`agent { trust_domain = "example.org" data_dir = "d" }`), 0o600))
	_, err = agent.LoadConfig(p, "")
	require.ErrorContains(t, err, "server_addresses")
}

func testBundlePEM(t *testing.T) []byte {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	require.NoError(t, err)
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

func TestIMDSConfig(t *testing.T) {
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca.pem")
	require.NoError(t, os.WriteFile(ca, testBundlePEM(t), 0o644))
	p := filepath.Join(dir, "a.conf")
	load := func(imds string) (agent.FileConfig, error) {
		t.Helper()
		text := `agent { trust_domain = "example.org" data_dir = "d" server_addresses = ["x:1"] ` + imds + ` }`
		require.NoError(t, os.WriteFile(p, []byte(text), 0o600))
		return agent.LoadConfig(p, "")
	}

	fc, err := load(``)
	require.NoError(t, err)
	require.Nil(t, fc.IMDS, "no imds block, no endpoint")

	fc, err = load(`imds { authority = "https://login.example.org" authority_ca_file = "ca.pem" }`)
	require.NoError(t, err)
	require.Equal(t, &agent.IMDSConfig{
		ArcAddr:         "127.0.0.1:40342",
		VMAddr:          "169.254.169.254:80",
		TokenDir:        "/var/opt/azcmagent/tokens",
		Authority:       "https://login.example.org",
		AuthorityCAFile: ca,
		AgentIdentities: true,
	}, fc.IMDS)

	fc, err = load(`imds {
		authority = "https://login.example.org/x" tenant_id = "t1"
		arc_addr = "" vm = true vm_addr = "127.0.0.1:8080" add_loopback_address = true token_dir = "tok"
		agent_identities = false
	}`)
	require.NoError(t, err)
	require.Equal(t, &agent.IMDSConfig{
		VM: true, VMAddr: "127.0.0.1:8080", AddLoopbackAddress: true,
		TokenDir: filepath.Join(dir, "tok"), Authority: "https://login.example.org/x", TenantID: "t1",
	}, fc.IMDS)

	fc, err = load(`imds { authority = "https://a" allowed_groups = ["root", "4242"] }`)
	require.NoError(t, err)
	require.Equal(t, []uint32{0, 4242}, fc.IMDS.AllowedGroups)

	for _, tc := range []struct{ block, err string }{
		{`imds { }`, "authority"},
		{`imds { authority = "http://login.example.org" }`, "https URL"},
		{`imds { authority = "https://a" arc_addr = "" }`, "nothing to serve"},
		{`imds { authority = "https://a" arc_addr = "localhost" }`, "arc_addr"},
		{`imds { authority = "https://a" vm = true vm_addr = "169.254.169.254" }`, "vm_addr"},
		{`imds { authority = "https://a" authority_ca_file = "missing.pem" }`, "authority_ca_file"},
		{`imds { authority = "https://a" arcaddr = "x" }`, "agent.imds.arcaddr"},
		{`imds { authority = "https://a" allowed_groups = [] }`, "allowed_groups is empty"},
		{`imds { authority = "https://a" identity_cache_ttl = "forever" }`, `identity_cache_ttl "forever"`},
		{`imds { authority = "https://a" allowed_groups = ["no-such-group-ferry"] }`, "no-such-group-ferry"},
	} {
		_, err := load(tc.block)
		require.ErrorContains(t, err, tc.err, tc.block)
	}
}

// TestDefaultSocketPath: with no socket_path, the Workload API goes to
// public/api.sock in systemd's RuntimeDirectory= when the agent runs as a unit,
// else under /run/ferry/agent; never under /tmp.
func TestDefaultSocketPath(t *testing.T) {
	p := filepath.Join(t.TempDir(), "a.conf")
	require.NoError(t, os.WriteFile(p, []byte(`agent { trust_domain = "example.org" data_dir = "d" server_addresses = ["x:1"] }`), 0o600))
	t.Setenv("RUNTIME_DIRECTORY", "")
	fc, err := agent.LoadConfig(p, "")
	require.NoError(t, err)
	require.Equal(t, "/run/ferry/agent/public/api.sock", fc.SocketPath)
	t.Setenv("RUNTIME_DIRECTORY", "/run/ferry/agent-b")
	fc, err = agent.LoadConfig(p, "")
	require.NoError(t, err)
	require.Equal(t, "/run/ferry/agent-b/public/api.sock", fc.SocketPath)
}

// TestNodeAttestorBlocks parses the sample's cloud attestor blocks and
// refuses two attestors at once.
func TestNodeAttestorBlocks(t *testing.T) {
	data, err := os.ReadFile("../conf/agent.conf")
	require.NoError(t, err)
	dir := t.TempDir()
	// Files the tpm and sshpop blocks name.
	device := filepath.Join(dir, "tpmrm0")
	require.NoError(t, os.WriteFile(device, nil, 0o600))
	_, hostKey, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	_, caKey, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	host, err := ssh.NewSignerFromKey(hostKey)
	require.NoError(t, err)
	ca, err := ssh.NewSignerFromKey(caKey)
	require.NoError(t, err)
	cert := &ssh.Certificate{Key: host.PublicKey(), CertType: ssh.HostCert, ValidPrincipals: []string{"h"}, ValidBefore: ssh.CertTimeInfinity}
	require.NoError(t, cert.SignCert(rand.Reader, ca))
	block, err := ssh.MarshalPrivateKey(hostKey, "")
	require.NoError(t, err)
	keyPath, certPath := filepath.Join(dir, "host_key"), filepath.Join(dir, "host_key-cert.pub")
	require.NoError(t, os.WriteFile(keyPath, pem.EncodeToMemory(block), 0o600))
	require.NoError(t, os.WriteFile(certPath, ssh.MarshalAuthorizedKey(cert), 0o644))
	paths := strings.NewReplacer("/dev/tpmrm0", device, "/etc/ssh/ssh_host_ed25519_key-cert.pub", certPath, "/etc/ssh/ssh_host_ed25519_key", keyPath)
	for _, name := range []string{"azure_imds", "aws_iid", "gcp_iit", "azure_msi", "tpm", "sshpop"} {
		var lines []string
		in := false
		for line := range strings.Lines(string(data)) {
			l := strings.TrimSpace(line)
			if l == "# "+name+" {" {
				in = true
			}
			if in {
				lines = append(lines, strings.TrimPrefix(l, "#"))
			}
			if in && l == "# }" {
				break
			}
		}
		require.NotEmpty(t, lines, name)
		text := paths.Replace(strings.Join(lines, "\n"))
		p := filepath.Join(dir, "a.conf")
		write := func(extra string) {
			require.NoError(t, os.WriteFile(p, []byte(`agent { trust_domain = "example.org" data_dir = "d" server_addresses = ["x:1"]
`+text+"\n"+extra+"\n}\n"), 0o600))
		}
		write("")
		fc, err := agent.LoadConfig(p, "")
		require.NoError(t, err, name)
		require.Equal(t, name, fc.NodeAttestor.Name())
		write(`join_token = "0123456789abcdef0123"`)
		_, err = agent.LoadConfig(p, "")
		require.ErrorContains(t, err, "choose one node attestor", name)
	}
}
