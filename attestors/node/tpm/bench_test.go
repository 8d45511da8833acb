package tpm_test

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"log/slog"
	"testing"

	"github.com/ferry-id/ferry/test/swtpm"
)

// BenchmarkServerAttest measures the server half alone: the agent's part
// (an AK made on swtpm, the credential activated by it) runs with the timer
// stopped. Run with -benchtime 20x: swtpm makes an RSA key per attestation.
func BenchmarkServerAttest(b *testing.B) {
	slog.SetDefault(slog.New(slog.DiscardHandler))
	sw := swtpm.Start(b)
	s := newServer(b, sw)
	a := newAgent(b, sw)
	ctx := context.Background()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		p, err := a.Payload(ctx)
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		_, err = s.Attest(ctx, p, func(ctx context.Context, c []byte) ([]byte, error) {
			b.StopTimer()
			defer b.StartTimer()
			return a.Respond(ctx, c)
		})
		if err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "attestations/s")
}

// BenchmarkCeiling is the crypto the server must do: the EK certificate's
// chain (two RSA-2048 signatures), the AK creation signature, and one
// RSA-OAEP encryption of the seed to the EK.
func BenchmarkCeiling(b *testing.B) {
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		b.Fatal(err)
	}
	digest := sha256.Sum256([]byte("attestation"))
	sig, _ := rsa.SignPKCS1v15(nil, k, crypto.SHA256, digest[:])
	seed := make([]byte, 32)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for j := 0; j < 3; j++ {
			if err := rsa.VerifyPKCS1v15(&k.PublicKey, crypto.SHA256, digest[:], sig); err != nil {
				b.Fatal(err)
			}
		}
		if _, err := rsa.EncryptOAEP(sha256.New(), rand.Reader, &k.PublicKey, seed, []byte("IDENTITY\x00")); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "attestations/s")
}
