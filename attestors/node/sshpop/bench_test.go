package sshpop_test

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"log/slog"
	"testing"

	"github.com/ferry-id/ferry/attestors/node"
)

// BenchmarkServerAttest measures a whole exchange in process: the server
// half's certificate check and signature verification, and the agent's
// signature (ed25519, cheap enough to leave in).
func BenchmarkServerAttest(b *testing.B) {
	slog.SetDefault(slog.New(slog.DiscardHandler))
	ca, _ := signer(b)
	s := newServer(b, ca)
	a := newAgent(b, hostFiles(b, ca, nil))
	ctx := context.Background()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := node.Exchange(ctx, a, s); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "attestations/s")
}

// BenchmarkCeiling is the crypto of one exchange: two ed25519 verifications
// (the CA's over the certificate, the host key's over the nonces) and one
// signature.
func BenchmarkCeiling(b *testing.B) {
	pub, priv, _ := ed25519.GenerateKey(rand.Reader)
	msg := make([]byte, 300)
	sig := ed25519.Sign(priv, msg)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		_ = ed25519.Sign(priv, msg[:32])
		if !ed25519.Verify(pub, msg, sig) || !ed25519.Verify(pub, msg, sig) {
			b.Fatal("verify")
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "attestations/s")
}
