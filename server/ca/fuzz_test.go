package ca_test

import (
	"crypto"
	"crypto/x509"
	"errors"
	"log/slog"
	"testing"

	"github.com/ferry-id/ferry/server/ca"
)

// FuzzSignCSR feeds arbitrary bytes to the workload signing path: it must
// never panic, must refuse with ErrInvalidCSR, or must issue an SVID that
// carries the caller's SPIFFE ID and the CSR's own key, whatever the CSR
// claimed.
func FuzzSignCSR(f *testing.F) {
	e := newReadyEnv(f, func(c *ca.Config) { c.Logger = slog.New(slog.DiscardHandler) })
	f.Add(makeCSR(f, ecKey(f)))
	f.Add(makeCSR(f, rsaKey(f, 2048)))
	f.Add(makeCSR(f, rsaKey(f, 1024)))
	f.Add([]byte{0x30, 0x82, 0x01, 0x00})
	f.Add([]byte("-----BEGIN CERTIFICATE REQUEST-----"))
	id := wid("/fuzz")
	f.Fuzz(func(t *testing.T, csr []byte) {
		chain, err := e.ca.SignWorkloadX509SVID(csr, id, []string{"fuzz.example.org"}, 0)
		if err != nil {
			if !errors.Is(err, ca.ErrInvalidCSR) {
				t.Fatalf("error outside ErrInvalidCSR: %v", err)
			}
			return
		}
		req, perr := x509.ParseCertificateRequest(csr)
		if perr != nil {
			t.Fatalf("signed a CSR Go cannot parse: %v", perr)
		}
		leaf := chain[0]
		if len(leaf.URIs) != 1 || leaf.URIs[0].String() != id.String() {
			t.Fatalf("URI SANs %v, want exactly %s", leaf.URIs, id)
		}
		if leaf.IsCA || len(leaf.DNSNames) != 1 || leaf.DNSNames[0] != "fuzz.example.org" {
			t.Fatalf("profile broken: IsCA=%t DNS=%v", leaf.IsCA, leaf.DNSNames)
		}
		if !leaf.PublicKey.(interface{ Equal(crypto.PublicKey) bool }).Equal(req.PublicKey) {
			t.Fatal("leaf key differs from the CSR key")
		}
	})
}
