// Package testpki builds the certificate hierarchies that the cloud metadata
// stand-ins sign with: a root, an intermediate and RSA leaves, in memory, the
// shape each platform's own PKI has. Tests configure the ferry server to
// trust these roots as it would trust the platform's.
package testpki

import (
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"
)

// CA is a certificate with its key.
type CA struct {
	Cert *x509.Certificate
	Key  *rsa.PrivateKey
}

var serial atomic.Int64

func init() { serial.Store(time.Now().UnixNano()) }

func rsaKey(t testing.TB) *rsa.PrivateKey {
	t.Helper()
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// NewRoot returns a self-signed root CA valid from an hour ago for a day.
func NewRoot(t testing.TB, cn string) *CA {
	t.Helper()
	key := rsaKey(t)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial.Add(1)), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	return &CA{Cert: create(t, tmpl, tmpl, key.Public(), key), Key: key}
}

// Intermediate issues a CA certificate under ca.
func (ca *CA) Intermediate(t testing.TB, cn string) *CA {
	t.Helper()
	key := rsaKey(t)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial.Add(1)), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	return &CA{Cert: create(t, tmpl, ca.Cert, key.Public(), ca.Key), Key: key}
}

// Leaf issues an end-entity certificate for cn under ca; cn is also its
// DNS name, or its IP address when it is one.
func (ca *CA) Leaf(t testing.TB, cn string) *CA {
	t.Helper()
	key := rsaKey(t)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial.Add(1)), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	if ip := net.ParseIP(cn); ip != nil {
		tmpl.IPAddresses = []net.IP{ip}
	} else {
		tmpl.DNSNames = []string{cn}
	}
	return &CA{Cert: create(t, tmpl, ca.Cert, key.Public(), ca.Key), Key: key}
}

func create(t testing.TB, tmpl, parent *x509.Certificate, pub crypto.PublicKey, key crypto.Signer) *x509.Certificate {
	t.Helper()
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, key)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// PEM encodes certificates.
func PEM(certs ...*x509.Certificate) []byte {
	var out []byte
	for _, c := range certs {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return out
}

// WritePEM writes certs to dir/name (0644) and returns the path.
func WritePEM(t testing.TB, dir, name string, certs ...*x509.Certificate) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, PEM(certs...), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}
