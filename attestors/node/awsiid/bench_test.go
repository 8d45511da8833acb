package awsiid_test

import (
	"context"
	"crypto"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"log/slog"
	"testing"

	"github.com/ferry-id/ferry/attestors/node/awsiid"
	aws "github.com/ferry-id/ferry/test/metadata/aws"
)

// BenchmarkServerAttest measures the server half on one signed document
// (with allow_reattestation, so the same document is admitted each time).
func BenchmarkServerAttest(b *testing.B) {
	slog.SetDefault(slog.New(slog.DiscardHandler))
	signer := aws.NewSigner(b, "eu-west-1")
	doc := instance().Document()
	p := payload(doc, aws.Sign(b, signer, doc))
	s := newServerB(b, signer)
	ctx := context.Background()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := s.Attest(ctx, p, nil); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "attestations/s")
}

// BenchmarkCeiling is the crypto the server must do: one RSA-2048 signature.
func BenchmarkCeiling(b *testing.B) {
	signer := aws.NewSigner(b, "eu-west-1")
	digest := sha256.Sum256([]byte(instance().Document()))
	sig, _ := rsa.SignPKCS1v15(nil, signer.Key, crypto.SHA256, digest[:])
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := rsa.VerifyPKCS1v15(&signer.Key.PublicKey, crypto.SHA256, digest[:], sig); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "attestations/s")
}

func newServerB(b *testing.B, signer *aws.Signer) *awsiid.Server {
	s, err := awsiid.NewServer(awsiid.ServerConfig{TrustDomain: td, RegionCertificates: map[string]*x509.Certificate{"eu-west-1": signer.Cert},
		AccountIDs: []string{"123456789012"}, AllowReattestation: true})
	if err != nil {
		b.Fatal(err)
	}
	return s
}
