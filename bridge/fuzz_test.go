package bridge_test

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"

	"github.com/golang-jwt/jwt/v5"
)

// FuzzTokenRequest throws arbitrary bodies at both token endpoints. Every
// response must be a well-formed Entra success or error, never a 5xx; a
// success must carry an access token signed by this replica.
func FuzzTokenRequest(f *testing.F) {
	fx := newFixture(f)
	valid := svid(f)
	f.Add(v2Form(valid).Encode(), "application/x-www-form-urlencoded", false)
	f.Add(v1Form(valid).Encode(), "application/x-www-form-urlencoded; charset=utf-8", true)
	f.Add(v2Form("a.b.c").Encode(), "application/x-www-form-urlencoded", false)
	f.Add(v2Form(unsigned(`{"alg":"none"}`, claimsJSON())).Encode(), "application/x-www-form-urlencoded", false)
	f.Add("grant_type=client_credentials&scope=%2F.default", "application/x-www-form-urlencoded", false)
	f.Add("", "", true)
	f.Add(strings.Repeat("&", 100), "application/x-www-form-urlencoded", false)
	f.Fuzz(func(t *testing.T, body, ctype string, v1 bool) {
		path := v2Token
		if v1 {
			path = v1Token
		}
		req := httptest.NewRequest(http.MethodPost, path, strings.NewReader(body))
		req.Header.Set("Content-Type", ctype)
		rec := httptest.NewRecorder()
		fx.h.ServeHTTP(rec, req)
		if rec.Code >= 500 {
			t.Fatalf("status %d for body %q: %s", rec.Code, body, rec.Body.Bytes())
		}
		var out map[string]any
		dec := json.NewDecoder(bytes.NewReader(rec.Body.Bytes()))
		if err := dec.Decode(&out); err != nil {
			t.Fatalf("response is not JSON: %v: %q", err, rec.Body.Bytes())
		}
		if rec.Code == http.StatusOK {
			tok, _ := out["access_token"].(string)
			_, err := jwt.Parse(tok, func(*jwt.Token) (any, error) { return bridgeKey.PublicKey(), nil },
				jwt.WithValidMethods([]string{"RS256"}), jwt.WithTimeFunc(fx.clock.Now))
			if err != nil {
				t.Fatalf("200 without a valid access token: %v", err)
			}
			// Only a request carrying the genuine assertion can succeed.
			form, err := url.ParseQuery(body)
			if err != nil || form.Get("client_assertion") != valid {
				t.Fatalf("200 for a request without the valid assertion: %q", body)
			}
			return
		}
		if _, ok := out["error"].(string); !ok || out["error_codes"] == nil || rec.Code < 400 {
			t.Fatalf("status %d with a non-Entra body: %s", rec.Code, rec.Body.Bytes())
		}
	})
}
