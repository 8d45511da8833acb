package ca_test

import (
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"log/slog"
	"math/big"
	"net/url"
	"testing"
	"time"

	"github.com/ferry-id/ferry/server/ca"
)

func quietEnv(b *testing.B, mod func(*ca.Config)) *env {
	return newReadyEnv(b, func(c *ca.Config) {
		c.Logger = slog.New(slog.DiscardHandler)
		if mod != nil {
			mod(c)
		}
	})
}

// BenchmarkSignX509SVID signs with an EC P-256 CA for an EC P-256 workload
// key. "publickey" is the signing path alone (as for agents); "csr" adds
// parsing and verifying the workload's CSR.
func BenchmarkSignX509SVID(b *testing.B) {
	e := quietEnv(b, nil)
	key := ecKey(b)
	id := wid("/bench")
	b.Run("publickey", func(b *testing.B) {
		agentID := wid("/spire/agent/bench")
		for b.Loop() {
			if _, err := e.ca.SignAgentX509SVID(key.Public(), agentID, 0); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("csr", func(b *testing.B) {
		csr := makeCSR(b, key)
		for b.Loop() {
			if _, err := e.ca.SignWorkloadX509SVID(csr, id, nil, 0); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("batch-csr", func(b *testing.B) {
		reqs := make([]ca.X509SVIDRequest, 64)
		for i := range reqs {
			reqs[i] = ca.X509SVIDRequest{CSR: makeCSR(b, key), SPIFFEID: id}
		}
		for b.Loop() {
			for _, r := range e.ca.SignWorkloadX509SVIDs(b.Context(), reqs) {
				if r.Err != nil {
					b.Fatal(r.Err)
				}
			}
		}
		b.ReportMetric(float64(b.N*len(reqs))/b.Elapsed().Seconds(), "svids/s")
	})
}

// BenchmarkRawCreateCertificate is x509.CreateCertificate alone with the
// same profile and key types: the ceiling for BenchmarkSignX509SVID.
func BenchmarkRawCreateCertificate(b *testing.B) {
	caKey, key := ecKey(b), ecKey(b)
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{Organization: []string{"ferry"}, CommonName: "ferry CA"},
		NotBefore: now, NotAfter: now.Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign, SubjectKeyId: []byte{1, 2, 3, 4},
	}
	der, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	if err != nil {
		b.Fatal(err)
	}
	caCert, err := x509.ParseCertificate(der)
	if err != nil {
		b.Fatal(err)
	}
	u, _ := url.Parse("spiffe://example.org/bench")
	for b.Loop() {
		serial := make([]byte, 16)
		_, _ = rand.Read(serial)
		tmpl := &x509.Certificate{
			SerialNumber: new(big.Int).SetBytes(serial), Subject: pkix.Name{Organization: []string{"ferry"}},
			URIs: []*url.URL{u}, NotBefore: now.Add(-10 * time.Second), NotAfter: now.Add(time.Hour),
			KeyUsage:              x509.KeyUsageDigitalSignature,
			ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
			BasicConstraintsValid: true,
		}
		if _, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, key.Public(), caKey); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkMintJWTSVID(b *testing.B) {
	for _, alg := range []ca.JWTAlgorithm{ca.ES256, ca.RS256} {
		b.Run(string(alg), func(b *testing.B) {
			e := quietEnv(b, func(c *ca.Config) {
				c.JWTAlgorithm = alg
				c.JWTIssuer = "https://oidc.example.org"
			})
			id := wid("/bench")
			aud := []string{"api://AzureADTokenExchange"}
			for b.Loop() {
				if _, err := e.ca.MintJWTSVID(id, aud, 0, nil); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
