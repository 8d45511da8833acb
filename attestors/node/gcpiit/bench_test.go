package gcpiit_test

import (
	"context"
	"crypto"
	"crypto/rsa"
	"crypto/sha256"
	"log/slog"
	"testing"
	"time"

	"github.com/ferry-id/ferry/attestors/node/gcpiit"
	gcp "github.com/ferry-id/ferry/test/metadata/gcp"
)

// BenchmarkServerAttest measures the server half on one token, keys cached.
func BenchmarkServerAttest(b *testing.B) {
	slog.SetDefault(slog.New(slog.DiscardHandler))
	g := gcp.NewGoogle(b)
	tok, err := g.Sign(gcp.Claims(instance(), gcpiit.DefaultAudience, time.Now()))
	if err != nil {
		b.Fatal(err)
	}
	s, err := gcpiit.NewServer(gcpiit.ServerConfig{TrustDomain: td, ProjectIDs: []string{"ferry-prod"}, JWKSURL: g.JWKSURL(), HTTPClient: client(g.CA), AllowReattestation: true})
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	if _, err := s.Attest(ctx, []byte(tok), nil); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := s.Attest(ctx, []byte(tok), nil); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "attestations/s")
}

// BenchmarkCeiling is the crypto the server must do: one RS256 signature.
func BenchmarkCeiling(b *testing.B) {
	k, err := rsa.GenerateKey(nil, 2048)
	if err != nil {
		b.Fatal(err)
	}
	digest := sha256.Sum256([]byte("header.claims"))
	sig, _ := rsa.SignPKCS1v15(nil, k, crypto.SHA256, digest[:])
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := rsa.VerifyPKCS1v15(&k.PublicKey, crypto.SHA256, digest[:], sig); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "attestations/s")
}
