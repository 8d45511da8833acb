package docs_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha1"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"regexp"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/test/testcluster"
)

// TestAgentsGuide follows docs/agents.md: one agent joins with a join token,
// another with an x509pop node certificate from a CA the server trusts, and
// each serves a workload the SVID of an entry parented on the agent's ID.
func TestAgentsGuide(t *testing.T) {
	if testing.Short() {
		t.Skip("starts real server and agent processes")
	}
	dir := t.TempDir()
	caPEM, leafPEM, keyPEM, fingerprint := nodeCertificate(t, "node-2")
	caFile := filepath.Join(dir, "node-ca.pem")
	require.NoError(t, os.WriteFile(caFile, caPEM, 0o644))
	c := testcluster.New(t, testcluster.Options{Nodes: 1, LogLevel: "info", ExtraServerConfig: fmt.Sprintf(`  x509pop {
    ca_bundle_file = %q
  }
`, caFile)})
	srv := c.Nodes[0]
	uid := fmt.Sprint(os.Getuid())

	// By join token (testcluster writes the token into the config).
	byToken := c.StartAgent("node1")
	out, err := srv.CLI("entry", "create", "--spiffe-id", "spiffe://example.org/web", "--parent-id", byToken.ID, "--selector", "unix:uid:"+uid)
	require.NoError(t, err, out)
	byToken.WaitX509SVID("spiffe://example.org/web")

	// By x509pop: the agent's ID follows from its certificate.
	byCert := c.PrepareAgent("node2", testcluster.AgentOptions{})
	require.NoError(t, os.WriteFile(filepath.Join(byCert.Dir, "node.pem"), leafPEM, 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(byCert.Dir, "node-key.pem"), keyPEM, 0o600))
	conf, err := os.ReadFile(byCert.Config)
	require.NoError(t, err)
	conf = regexp.MustCompile(`(?m)^\s*join_token\s*=.*$`).ReplaceAll(conf, []byte(`  x509pop {
    cert_file = "node.pem"
    key_file  = "node-key.pem"
  }`))
	require.NoError(t, os.WriteFile(byCert.Config, conf, 0o600))
	byCert.ID = "spiffe://example.org/spire/agent/x509pop/" + fingerprint
	t.Cleanup(byCert.Stop)
	byCert.Start()
	out, err = srv.CLI("agent", "list")
	require.NoError(t, err, out)
	require.Contains(t, out, byCert.ID)
	out, err = srv.CLI("entry", "create", "--spiffe-id", "spiffe://example.org/db", "--parent-id", byCert.ID, "--selector", "unix:uid:"+uid)
	require.NoError(t, err, out)
	byCert.WaitX509SVID("spiffe://example.org/db")
}

// nodeCertificate makes a node CA and a node certificate (CN cn), as an
// organisation's PKI would, and returns the PEMs and the leaf's SHA-1.
func nodeCertificate(t *testing.T, cn string) (caPEM, leafPEM, keyPEM []byte, fingerprint string) {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	now := time.Now()
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "node CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	require.NoError(t, err)
	ca, err := x509.ParseCertificate(caDER)
	require.NoError(t, err)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	leafTmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: cn},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour), KeyUsage: x509.KeyUsageDigitalSignature}
	leafDER, err := x509.CreateCertificate(rand.Reader, leafTmpl, ca, key.Public(), caKey)
	require.NoError(t, err)
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	require.NoError(t, err)
	sum := sha1.Sum(leafDER)
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}),
		pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leafDER}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}),
		hex.EncodeToString(sum[:])
}
