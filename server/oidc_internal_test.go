package server

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func writePair(t *testing.T, certFile, keyFile, cn string, at time.Time) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: cn}, DNSNames: []string{cn},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	require.NoError(t, err)
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600))
	require.NoError(t, os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600))
	require.NoError(t, os.Chtimes(certFile, at, at))
	require.NoError(t, os.Chtimes(keyFile, at, at))
}

func TestFileCertReloads(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "c.pem"), filepath.Join(dir, "k.pem")

	_, err := (&fileCert{certFile: certFile, keyFile: keyFile}).get(nil)
	require.Error(t, err, "no files, nothing served")

	fc := &fileCert{certFile: certFile, keyFile: keyFile}
	base := time.Now().Add(-time.Hour)
	writePair(t, certFile, keyFile, "one.example.org", base)
	c, err := fc.get(nil)
	require.NoError(t, err)
	require.Equal(t, "one.example.org", c.Leaf.Subject.CommonName)

	writePair(t, certFile, keyFile, "two.example.org", base.Add(time.Minute))
	c, err = fc.get(nil)
	require.NoError(t, err)
	require.Equal(t, "two.example.org", c.Leaf.Subject.CommonName, "a renewed pair is picked up")

	// A half-written renewal or a missing file keeps the last good pair.
	require.NoError(t, os.WriteFile(certFile, []byte("partial"), 0o600))
	c, err = fc.get(nil)
	require.NoError(t, err)
	require.Equal(t, "two.example.org", c.Leaf.Subject.CommonName)
	require.NoError(t, os.Remove(keyFile))
	c, err = fc.get(nil)
	require.NoError(t, err)
	require.Equal(t, "two.example.org", c.Leaf.Subject.CommonName)
}
