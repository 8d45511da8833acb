package ca_test

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/server/ca"
)

type testCA struct {
	cert *x509.Certificate
	key  crypto.Signer
}

// makeTestCA creates a CA certificate signed by parent, or self-signed.
func makeTestCA(t *testing.T, name string, parent *testCA, notAfter time.Time) *testCA {
	t.Helper()
	key := ecKey(t)
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(time.Now().UnixNano()),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             t0.Add(-time.Hour),
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	pc, pk := tmpl, crypto.Signer(key)
	if parent != nil {
		pc, pk = parent.cert, parent.key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, pc, key.Public(), pk)
	require.NoError(t, err)
	cert, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	return &testCA{cert: cert, key: key}
}

func writePEM(t *testing.T, dir, name string, certs ...*x509.Certificate) string {
	t.Helper()
	var out []byte
	for _, c := range certs {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	p := filepath.Join(dir, name)
	require.NoError(t, os.WriteFile(p, out, 0o600))
	return p
}

func writeKeyPEM(t *testing.T, dir string, key crypto.Signer) string {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(key)
	require.NoError(t, err)
	p := filepath.Join(dir, "upstream.key")
	require.NoError(t, os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600))
	return p
}

func TestUpstreamCA(t *testing.T) {
	dir := t.TempDir()
	root := makeTestCA(t, "root", nil, t0.Add(365*24*time.Hour))
	inter := makeTestCA(t, "upstream intermediate", root, t0.Add(30*24*time.Hour))

	cases := []struct {
		name      string
		up        ca.UpstreamConfig
		wantChain int // leaf + intermediates
		signer    *testCA
	}{
		{"root only", ca.UpstreamConfig{
			CertFile: writePEM(t, dir, "root.pem", root.cert),
			KeyFile:  writeKeyPEM(t, t.TempDir(), root.key),
		}, 2, root},
		{"intermediate with bundle file", ca.UpstreamConfig{
			CertFile:   writePEM(t, dir, "inter.pem", inter.cert),
			KeyFile:    writeKeyPEM(t, t.TempDir(), inter.key),
			BundleFile: writePEM(t, dir, "bundle.pem", root.cert),
		}, 3, inter},
		{"intermediate and root in cert file", ca.UpstreamConfig{
			CertFile: writePEM(t, dir, "chain.pem", inter.cert, root.cert),
			KeyFile:  writeKeyPEM(t, t.TempDir(), inter.key),
		}, 3, inter},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			up := tc.up
			e := newReadyEnv(t, func(c *ca.Config) { c.Upstream = &up })

			// The bundle holds the upstream root and nothing else X.509.
			published, _ := e.pub.hasX509(root.cert)
			assert.True(t, published)
			x, _ := e.pub.counts()
			assert.Equal(t, 1, x)
			b := e.ca.Bundle()
			require.Len(t, b.X509Authorities, 1)
			assert.Equal(t, root.cert.Raw, b.X509Authorities[0].Certificate)

			a := e.active(t, ca.KindX509)
			assert.True(t, a.Upstream)
			assert.True(t, a.Certificate.IsCA)
			require.NoError(t, a.Certificate.CheckSignatureFrom(tc.signer.cert))

			key := ecKey(t)
			chain, err := e.ca.SignWorkloadX509SVID(makeCSR(t, key), wid("/web"), nil, 0)
			require.NoError(t, err)
			require.Len(t, chain, tc.wantChain)
			assert.Equal(t, a.Certificate.Raw, chain[1].Raw)
			if tc.wantChain == 3 {
				assert.Equal(t, inter.cert.Raw, chain[2].Raw)
			}
			bundle, err := ca.ToX509Bundle(e.pub.bundle())
			require.NoError(t, err)
			id, paths, err := x509svid.Verify(chain, bundle, x509svid.WithTime(e.clock.Now()))
			require.NoError(t, err)
			assert.Equal(t, wid("/web"), id)
			assert.Equal(t, root.cert.Raw, paths[0][len(paths[0])-1].Raw, "chain ends at the upstream root")

			// Local intermediates are not in the bundle: taint and revoke
			// belong to the upstream.
			p, err := e.ca.Prepare(context.Background(), ca.KindX509)
			require.NoError(t, err)
			_, err = e.ca.Activate(context.Background(), ca.KindX509, p.ID)
			require.NoError(t, err)
			_, err = e.ca.Taint(context.Background(), ca.KindX509, a.ID)
			require.ErrorIs(t, err, ca.ErrUpstreamManaged)
			_, err = e.ca.Revoke(context.Background(), ca.KindX509, a.ID)
			require.ErrorIs(t, err, ca.ErrUpstreamManaged)

			// After a restart the intermediate is reused, not re-keyed.
			e.reopen(t)
			require.NoError(t, e.ca.Rotate(context.Background()))
			assert.Equal(t, p.ID, e.active(t, ca.KindX509).ID)
		})
	}
}

func TestUpstreamCapsCALifetime(t *testing.T) {
	root := makeTestCA(t, "short root", nil, t0.Add(10*time.Hour))
	dir := t.TempDir()
	e := newReadyEnv(t, func(c *ca.Config) {
		c.Upstream = &ca.UpstreamConfig{CertFile: writePEM(t, dir, "r.pem", root.cert), KeyFile: writeKeyPEM(t, dir, root.key)}
	})
	a := e.active(t, ca.KindX509)
	assert.Equal(t, root.cert.NotAfter, a.NotAfter)
	assert.Equal(t, root.cert.NotAfter, a.Certificate.NotAfter)
}

func TestUpstreamConfigErrors(t *testing.T) {
	dir := t.TempDir()
	root := makeTestCA(t, "root", nil, t0.Add(24*time.Hour))
	other := makeTestCA(t, "other root", nil, t0.Add(24*time.Hour))
	inter := makeTestCA(t, "inter", root, t0.Add(24*time.Hour))
	cases := map[string]ca.UpstreamConfig{
		"key mismatch": {CertFile: writePEM(t, dir, "a.pem", root.cert), KeyFile: writeKeyPEM(t, t.TempDir(), other.key)},
		"no root":      {CertFile: writePEM(t, dir, "b.pem", inter.cert), KeyFile: writeKeyPEM(t, t.TempDir(), inter.key)},
		"wrong bundle": {
			CertFile: writePEM(t, dir, "c.pem", inter.cert), KeyFile: writeKeyPEM(t, t.TempDir(), inter.key),
			BundleFile: writePEM(t, dir, "d.pem", other.cert),
		},
		"missing file": {CertFile: filepath.Join(dir, "nope.pem"), KeyFile: writeKeyPEM(t, t.TempDir(), root.key)},
	}
	for name, up := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := ca.New(ca.Config{
				TrustDomain: td, DataDir: t.TempDir(), Publisher: newPublisher(), Upstream: &up,
				Clock: func() time.Time { return t0 },
			})
			require.Error(t, err)
		})
	}
}

func TestSwitchingToUpstreamRetiresSelfSignedCA(t *testing.T) {
	e := newReadyEnv(t, nil)
	selfSigned := e.active(t, ca.KindX509)
	root := makeTestCA(t, "root", nil, t0.Add(365*24*time.Hour))
	dir := t.TempDir()
	e.cfg.Upstream = &ca.UpstreamConfig{CertFile: writePEM(t, dir, "r.pem", root.cert), KeyFile: writeKeyPEM(t, dir, root.key)}
	e.reopen(t)
	require.NoError(t, e.ca.Rotate(context.Background()))
	a := e.active(t, ca.KindX509)
	assert.True(t, a.Upstream)
	assert.Equal(t, []string{selfSigned.ID}, ids(e.withStatus(ca.KindX509, ca.StatusOld)))
	// The old self-signed CA stays in the bundle until it expires.
	published, _ := e.pub.hasX509(selfSigned.Certificate)
	assert.True(t, published)
}
