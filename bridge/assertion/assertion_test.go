package assertion_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/bridge/assertion"
)

var (
	now     = time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	ecKey   *ecdsa.PrivateKey
	rsaKey  *rsa.PrivateKey
	smallRS *rsa.PrivateKey
	once    sync.Once
)

func keys(t testing.TB) {
	once.Do(func() {
		ecKey, _ = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		rsaKey, _ = rsa.GenerateKey(rand.Reader, 2048)
		smallRS, _ = rsa.GenerateKey(rand.Reader, 1024)
	})
}

func mint(t testing.TB, m jwt.SigningMethod, key any, mut func(jwt.MapClaims, map[string]any)) string {
	t.Helper()
	c := jwt.MapClaims{"iss": "https://iss", "sub": "s", "aud": "a", "exp": now.Add(time.Minute).Unix(), "iat": now.Unix(), "jti": "j"}
	tok := jwt.NewWithClaims(m, c)
	tok.Header["kid"] = "k"
	if mut != nil {
		mut(c, tok.Header)
	}
	s, err := tok.SignedString(key)
	require.NoError(t, err)
	return s
}

func TestParseAndVerify(t *testing.T) {
	keys(t)
	for _, tc := range []struct {
		m   jwt.SigningMethod
		key any
		pub any
	}{
		{jwt.SigningMethodES256, ecKey, &ecKey.PublicKey},
		{jwt.SigningMethodRS256, rsaKey, &rsaKey.PublicKey},
		{jwt.SigningMethodPS512, rsaKey, &rsaKey.PublicKey},
	} {
		raw := mint(t, tc.m, tc.key, nil)
		tok, err := assertion.Parse(raw, 0)
		require.NoError(t, err)
		require.Equal(t, tc.m.Alg(), tok.Alg)
		require.Equal(t, "k", tok.Kid)
		require.Equal(t, "https://iss", tok.Issuer)
		require.Equal(t, "s", tok.Subject)
		require.Equal(t, []string{"a"}, tok.Audiences)
		require.Equal(t, "j", tok.ID)
		require.Equal(t, now.Add(time.Minute), tok.Expiry)
		require.NoError(t, tok.VerifySignature(assertion.Key{Public: tc.pub}))
		require.NoError(t, tok.VerifySignature(assertion.Key{Public: tc.pub, Alg: tc.m.Alg()}))
		require.Equal(t, assertion.BadSignature, assertion.ReasonOf(tok.VerifySignature(assertion.Key{Public: tc.pub, Alg: "RS384"})))
		require.NoError(t, tok.CheckTime(now, time.Minute))
	}
}

func TestVerifyKeyMismatch(t *testing.T) {
	keys(t)
	tok, err := assertion.Parse(mint(t, jwt.SigningMethodRS256, smallRS, nil), 0)
	require.NoError(t, err)
	err = tok.VerifySignature(assertion.Key{Public: &smallRS.PublicKey})
	require.Equal(t, assertion.BadSignature, assertion.ReasonOf(err))
	require.ErrorContains(t, err, "too small")

	tok, err = assertion.Parse(mint(t, jwt.SigningMethodES256, ecKey, nil), 0)
	require.NoError(t, err)
	require.Equal(t, assertion.BadSignature, assertion.ReasonOf(tok.VerifySignature(assertion.Key{Public: &rsaKey.PublicKey})))
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	require.Equal(t, assertion.BadSignature, assertion.ReasonOf(tok.VerifySignature(assertion.Key{Public: &p384.PublicKey})))
	require.Equal(t, assertion.BadSignature, assertion.ReasonOf(tok.VerifySignature(assertion.Key{Public: []byte("secret")})))
}

func TestParseRejects(t *testing.T) {
	keys(t)
	b64 := base64.RawURLEncoding.EncodeToString
	payload := b64([]byte(`{"iss":"i","sub":"s","aud":"a","exp":1900000000}`))
	hdr := func(h string) string { return b64([]byte(h)) + "." + payload + ".c2ln" }
	tests := map[string]string{
		"empty":             "",
		"two parts":         "a.b",
		"dots":              strings.Repeat(".", 1<<12),
		"too large":         strings.Repeat("a", assertion.DefaultMaxSize+1),
		"alg none":          hdr(`{"alg":"none","kid":"k"}`),
		"alg HS256":         hdr(`{"alg":"HS256","kid":"k"}`),
		"alg lower":         hdr(`{"alg":"rs256","kid":"k"}`),
		"alg missing":       hdr(`{"kid":"k"}`),
		"alg number":        hdr(`{"alg":256,"kid":"k"}`),
		"kid missing":       hdr(`{"alg":"RS256"}`),
		"kid empty":         hdr(`{"alg":"RS256","kid":""}`),
		"jku":               hdr(`{"alg":"RS256","kid":"k","jku":"https://x"}`),
		"x5u":               hdr(`{"alg":"RS256","kid":"k","x5u":"https://x"}`),
		"x5c":               hdr(`{"alg":"RS256","kid":"k","x5c":["MII"]}`),
		"jwk":               hdr(`{"alg":"RS256","kid":"k","jwk":{}}`),
		"jku null":          hdr(`{"alg":"RS256","kid":"k","jku":null}`),
		"crit":              hdr(`{"alg":"RS256","kid":"k","crit":["b64"]}`),
		"typ":               hdr(`{"alg":"RS256","kid":"k","typ":"at+jwt"}`),
		"header array":      hdr(`[]`),
		"header trailing":   hdr(`{"alg":"RS256","kid":"k"}x`),
		"header two values": hdr(`{"alg":"RS256","kid":"k"}{}`),
		"padded header":     b64([]byte(`{"alg":"RS256","kid":"k"}`)) + "=." + payload + ".c2ln",
		"std base64 sig":    hdr(`{"alg":"RS256","kid":"k"}`)[:len(hdr(`{"alg":"RS256","kid":"k"}`))-4] + "c2+/",
		"empty sig":         b64([]byte(`{"alg":"RS256","kid":"k"}`)) + "." + payload + ".",
		"kid twice":         hdr(`{"alg":"RS256","kid":"a","kid":"k"}`),
	}
	claims := map[string]string{
		"payload null":      `null`,
		"no iss":            `{"sub":"s","aud":"a","exp":1900000000}`,
		"empty sub":         `{"iss":"i","sub":"","aud":"a","exp":1900000000}`,
		"sub number":        `{"iss":"i","sub":1,"aud":"a","exp":1900000000}`,
		"no aud":            `{"iss":"i","sub":"s","exp":1900000000}`,
		"aud object":        `{"iss":"i","sub":"s","aud":{},"exp":1900000000}`,
		"aud mixed":         `{"iss":"i","sub":"s","aud":["a",1],"exp":1900000000}`,
		"no exp":            `{"iss":"i","sub":"s","aud":"a"}`,
		"exp string":        `{"iss":"i","sub":"s","aud":"a","exp":"1900000000"}`,
		"exp negative":      `{"iss":"i","sub":"s","aud":"a","exp":-1}`,
		"exp huge":          `{"iss":"i","sub":"s","aud":"a","exp":1e300}`,
		"nbf string":        `{"iss":"i","sub":"s","aud":"a","exp":1900000000,"nbf":"x"}`,
		"jti number":        `{"iss":"i","sub":"s","aud":"a","exp":1900000000,"jti":5}`,
		"payload not json":  `hello`,
		"payload two value": `{"iss":"i","sub":"s","aud":"a","exp":1900000000}{}`,
		"sub twice":         `{"iss":"i","sub":"s","aud":"a","exp":1900000000,"sub":"t"}`,
		"escaped sub twice": `{"iss":"i","sub":"s","aud":"a","exp":1900000000,"s\u0075b":"t"}`,
	}
	for name, c := range claims {
		tests[name] = b64([]byte(`{"alg":"RS256","kid":"k"}`)) + "." + b64([]byte(c)) + ".c2ln"
	}
	for name, raw := range tests {
		t.Run(name, func(t *testing.T) {
			_, err := assertion.Parse(raw, 0)
			require.Equal(t, assertion.Malformed, assertion.ReasonOf(err), "%v", err)
			require.True(t, strings.HasPrefix(err.Error(), "assertion: "))
		})
	}
	// The size limit is configurable.
	raw := mint(t, jwt.SigningMethodES256, ecKey, nil)
	_, err := assertion.Parse(raw, len(raw)-1)
	require.Equal(t, assertion.Malformed, assertion.ReasonOf(err))
	_, err = assertion.Parse(raw, len(raw))
	require.NoError(t, err)
}

func TestCheckTime(t *testing.T) {
	keys(t)
	parse := func(mut func(jwt.MapClaims)) *assertion.Token {
		tok, err := assertion.Parse(mint(t, jwt.SigningMethodES256, ecKey, func(c jwt.MapClaims, _ map[string]any) { mut(c) }), 0)
		require.NoError(t, err)
		return tok
	}
	l := 30 * time.Second
	exp := parse(func(c jwt.MapClaims) { c["exp"] = now.Unix() })
	require.NoError(t, exp.CheckTime(now.Add(l-time.Second), l))
	require.Equal(t, assertion.TimeRange, assertion.ReasonOf(exp.CheckTime(now.Add(l), l)))
	err := exp.CheckTime(now.Add(l+time.Second), l)
	require.ErrorContains(t, err, "assertion valid from 1970-01-01T00:00:00.0000000Z")

	nbf := parse(func(c jwt.MapClaims) { c["nbf"] = now.Unix() })
	require.NoError(t, nbf.CheckTime(now.Add(-l), l))
	require.Equal(t, assertion.TimeRange, assertion.ReasonOf(nbf.CheckTime(now.Add(-l-time.Second), l)))

	iat := parse(func(c jwt.MapClaims) { c["iat"] = now.Unix() })
	require.NoError(t, iat.CheckTime(now.Add(-l), l))
	require.Equal(t, assertion.TimeRange, assertion.ReasonOf(iat.CheckTime(now.Add(-l-time.Second), l)))

	frac := parse(func(c jwt.MapClaims) { c["exp"] = float64(now.Unix()) + 0.5 })
	require.Equal(t, now.Add(500*time.Millisecond), frac.Expiry)
}

func FuzzParse(f *testing.F) {
	keys(f)
	good := mint(f, jwt.SigningMethodES256, ecKey, nil)
	f.Add(good)
	f.Add("e30.e30.e30")
	f.Add(strings.Repeat(".", 100))
	f.Fuzz(func(t *testing.T, raw string) {
		tok, err := assertion.Parse(raw, 0)
		if err != nil {
			if assertion.ReasonOf(err) != assertion.Malformed {
				t.Fatalf("parse error without reason: %v", err)
			}
			return
		}
		if tok.Expiry.IsZero() || tok.Kid == "" || !assertion.AllowedAlg(tok.Alg) || len(tok.Audiences) == 0 {
			t.Fatalf("accepted incomplete token %q", raw)
		}
		// Only the genuine header and payload verify under the key (ECDSA
		// signatures themselves are malleable, so the signature may differ).
		signed := func(s string) string { return s[:strings.LastIndexByte(s, '.')] }
		if tok.VerifySignature(assertion.Key{Public: &ecKey.PublicKey}) == nil && signed(raw) != signed(good) {
			t.Fatalf("forged token verified: %q", raw)
		}
	})
}
