package azuremsi_test

import (
	"context"
	"encoding/json"
	"log/slog"
	"testing"

	"github.com/ferry-id/ferry/attestors/node/azuremsi"
)

// BenchmarkServerAttest measures the server half on one token, the tenant's
// keys cached. Its crypto ceiling is gcp_iit's: one RS256 signature
// (go test -bench Ceiling ./attestors/node/gcpiit/).
func BenchmarkServerAttest(b *testing.B) {
	slog.SetDefault(slog.New(slog.DiscardHandler))
	iss := tenantAuthority(b)
	p, _ := json.Marshal(map[string]string{"token": mint(b, iss, nil)})
	s := newServer(b, iss, func(c *azuremsi.ServerConfig) { c.AllowReattestation = true })
	ctx := context.Background()
	if _, err := s.Attest(ctx, p, nil); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := s.Attest(ctx, p, nil); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "attestations/s")
}
