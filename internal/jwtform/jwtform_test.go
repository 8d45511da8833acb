package jwtform_test

import (
	"encoding/base64"
	"encoding/json"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/internal/jwtform"
)

var b64 = base64.RawURLEncoding.EncodeToString

func tok(h, c string) string { return b64([]byte(h)) + "." + b64([]byte(c)) + ".c2ln" }

func TestCheck(t *testing.T) {
	const claims = `{"sub":"spiffe://example.org/x","exp":1900000000}`
	require.NoError(t, jwtform.Check(tok(`{"alg":"ES256","kid":"k"}`, claims), 1<<10))
	require.NoError(t, jwtform.Check(tok(`{"alg":"ES256","kid":"k","nested":{"a":1,"a":2}}`, claims), 1<<10), "only top-level members are checked")
	bad := map[string]string{
		"too large":       tok(`{"alg":"ES256","kid":"`+strings.Repeat("k", 1<<10)+`"}`, claims),
		"dots":            strings.Repeat(".", 100),
		"two parts":       "a.b",
		"padded header":   b64([]byte(`{"alg":"ES256"}`)) + "=." + b64([]byte(claims)) + ".c2ln",
		"header not JSON": tok(`hello`, claims),
		"jku":             tok(`{"alg":"ES256","jku":"https://x"}`, claims),
		"x5u":             tok(`{"alg":"ES256","x5u":"https://x"}`, claims),
		"x5c":             tok(`{"alg":"ES256","x5c":[]}`, claims),
		"jwk":             tok(`{"alg":"ES256","jwk":{}}`, claims),
		"jwk null":        tok(`{"alg":"ES256","jwk":null}`, claims),
		"crit":            tok(`{"alg":"ES256","crit":["b64"]}`, claims),
		"header twice":    tok(`{"alg":"none","alg":"ES256"}`, claims),
		"claim twice":     tok(`{"alg":"ES256"}`, `{"sub":"a","sub":"b"}`),
		"escaped twice":   tok(`{"alg":"ES256"}`, `{"sub":"a","s\u0075b":"b"}`),
		"payload base64":  b64([]byte(`{"alg":"ES256"}`)) + ".a+b.c2ln",
	}
	for name, raw := range bad {
		require.Error(t, jwtform.Check(raw, 1<<10), name)
	}
}

// FuzzCheck: Check never panics, and what it passes has three parts, a JSON
// object header without key-naming members, and no repeated member.
func FuzzCheck(f *testing.F) {
	f.Add(tok(`{"alg":"ES256","kid":"k"}`, `{"sub":"s"}`))
	f.Add(tok(`{"alg":"ES256","kid":"k","kid":"k"}`, `{"sub":"s"}`))
	f.Add(tok(`{"alg":"ES256","jku":"x"}`, `{"sub":"s","sub":"t"}`))
	f.Add("..")
	f.Fuzz(func(t *testing.T, raw string) {
		if err := jwtform.Check(raw, 1<<16); err != nil {
			return
		}
		parts := strings.Split(raw, ".")
		if len(parts) != 3 {
			t.Fatalf("passed %d parts", len(parts))
		}
		h, err := base64.RawURLEncoding.DecodeString(parts[0])
		if err != nil {
			t.Fatalf("passed a header that is not base64url: %v", err)
		}
		var hdr map[string]any
		if err := json.Unmarshal(h, &hdr); err != nil {
			t.Fatalf("passed a header that is not a JSON object: %v", err)
		}
		for _, m := range []string{"jku", "x5u", "x5c", "jwk", "crit"} {
			if _, ok := hdr[m]; ok {
				t.Fatalf("passed a header with %s: %s", m, h)
			}
		}
	})
}
