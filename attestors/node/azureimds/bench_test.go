package azureimds_test

import (
	"context"
	"crypto"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/json"
	"log/slog"
	"testing"
	"time"

	"github.com/ferry-id/ferry/attestors/node/azureimds"
	azure "github.com/ferry-id/ferry/test/metadata/azure"
)

// BenchmarkServerAttest measures the server half alone (the agent's part,
// fetching a signed document for the nonce, runs with the timer stopped).
// Compare with BenchmarkCeiling, the signature checks it cannot avoid.
func BenchmarkServerAttest(b *testing.B) {
	slog.SetDefault(slog.New(slog.DiscardHandler))
	pki := azure.NewPKI(b, "metadata.azure.com")
	s, err := azureimds.NewServer(azureimds.ServerConfig{TrustDomain: td, Roots: []*x509.Certificate{pki.Root.Cert},
		Intermediates: []*x509.Certificate{pki.Intermediate.Cert}, Tenants: map[string][]string{tenant: {sub}}})
	if err != nil {
		b.Fatal(err)
	}
	now := time.Now()
	ctx := context.Background()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		_, err := s.Attest(ctx, []byte("{}"), func(_ context.Context, c []byte) ([]byte, error) {
			b.StopTimer()
			defer b.StartTimer()
			var ch struct{ Nonce string }
			_ = json.Unmarshal(c, &ch)
			return docJSON(pki.Sign(b, azureimds.Content{Nonce: ch.Nonce, SubscriptionID: sub, VMID: vmID,
				TimeStamp: azureimds.TimeStamp{CreatedOn: azure.Time(now), ExpiresOn: azure.Time(now.Add(time.Hour))}})), nil
		})
		if err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "attestations/s")
}

// BenchmarkCeiling is the crypto the server must do per attestation: two
// RSA-2048 chain signatures (signer, intermediate) and the document's.
func BenchmarkCeiling(b *testing.B) {
	pki := azure.NewPKI(b, "metadata.azure.com")
	digest := sha256.Sum256([]byte("document"))
	sig, _ := rsa.SignPKCS1v15(nil, pki.Signer.Key, crypto.SHA256, digest[:])
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := pki.Signer.Cert.CheckSignatureFrom(pki.Intermediate.Cert); err != nil {
			b.Fatal(err)
		}
		if err := pki.Intermediate.Cert.CheckSignatureFrom(pki.Root.Cert); err != nil {
			b.Fatal(err)
		}
		if err := rsa.VerifyPKCS1v15(&pki.Signer.Key.PublicKey, crypto.SHA256, digest[:], sig); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "attestations/s")
}
