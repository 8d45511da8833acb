package bridge_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"math/big"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// BenchmarkExchange is one full v2 token exchange through the handler: form
// parsing, ES256 JWT-SVID verification, FIC matching, RS256 access token signing
// and the JSON response.
func BenchmarkExchange(b *testing.B) {
	f := newFixture(b)
	body := v2Form(svid(b)).Encode()
	b.ReportAllocs()
	for b.Loop() {
		req := httptest.NewRequest(http.MethodPost, v2Token, strings.NewReader(body))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		rec := httptest.NewRecorder()
		f.h.ServeHTTP(rec, req)
		if rec.Code != http.StatusOK {
			b.Fatalf("status %d: %s", rec.Code, rec.Body.Bytes())
		}
	}
}

// BenchmarkExchangeVsCeiling interleaves one exchange and one ceiling
// operation per iteration, so that both see the same machine load, and
// reports each one's time and the exchange rate as a percentage of the
// ceiling rate.
func BenchmarkExchangeVsCeiling(b *testing.B) {
	f := newFixture(b)
	body := v2Form(svid(b)).Encode()
	ceiling := newCeiling(b)
	var tx, tc time.Duration
	for b.Loop() {
		start := time.Now()
		req := httptest.NewRequest(http.MethodPost, v2Token, strings.NewReader(body))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		rec := httptest.NewRecorder()
		f.h.ServeHTTP(rec, req)
		if rec.Code != http.StatusOK {
			b.Fatalf("status %d", rec.Code)
		}
		mid := time.Now()
		ceiling()
		tx += mid.Sub(start)
		tc += time.Since(mid)
	}
	n := float64(b.N)
	b.ReportMetric(float64(tx.Nanoseconds())/n, "exchange-ns/op")
	b.ReportMetric(float64(tc.Nanoseconds())/n, "ceiling-ns/op")
	b.ReportMetric(100*float64(tc)/float64(tx), "%-of-ceiling")
}

// newCeiling returns one ES256 verification plus one RS256 signature.
func newCeiling(b *testing.B) func() {
	loadKeys(b)
	tok := svid(b)
	i := strings.LastIndexByte(tok, '.')
	input, sigB64 := tok[:i], tok[i+1:]
	sig, err := base64.RawURLEncoding.DecodeString(sigB64)
	if err != nil {
		b.Fatal(err)
	}
	r, s := new(big.Int).SetBytes(sig[:32]), new(big.Int).SetBytes(sig[32:])
	signInput := []byte(strings.Repeat("x", 700)) // about the size of an access token's header and claims
	return func() {
		h := sha256.Sum256([]byte(input))
		if !ecdsa.Verify(&svidKey.PublicKey, h[:], r, s) {
			b.Fatal("verify failed")
		}
		d := sha256.Sum256(signInput)
		if _, err := rsa.SignPKCS1v15(rand.Reader, rsaIssKey1, crypto.SHA256, d[:]); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkCryptoCeiling is the cryptography an exchange cannot avoid: one
// ES256 verification and one RS256 (2048-bit) signature.
func BenchmarkCryptoCeiling(b *testing.B) {
	ceiling := newCeiling(b)
	b.ReportAllocs()
	for b.Loop() {
		ceiling()
	}
}
