package demoapi_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"testing"
)

// BenchmarkValidate is the cost of checking one bridge-issued token once the
// tenant metadata and keys are cached (signature, claims, role).
func BenchmarkValidate(b *testing.B) {
	f := newFixture(b)
	a := f.api(b)
	tok := f.token(b, false, readerCID, readerSub, apiURI)
	if _, e := a.Validate(context.Background(), tok); e != nil {
		b.Fatal(e)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		if _, e := a.Validate(context.Background(), tok); e != nil {
			b.Fatal(e)
		}
	}
}

// BenchmarkServeHTTP adds the HTTP handling and the JSON answer.
func BenchmarkServeHTTP(b *testing.B) {
	f := newFixture(b)
	a := f.api(b)
	req := httptest.NewRequest(http.MethodGet, "/", nil)
	req.Header.Set("Authorization", "Bearer "+f.token(b, false, readerCID, readerSub, apiURI))
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		rec := httptest.NewRecorder()
		a.ServeHTTP(rec, req)
		if rec.Code != http.StatusOK {
			b.Fatal(rec.Code, rec.Body.String())
		}
	}
}
