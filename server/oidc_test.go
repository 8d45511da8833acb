package server_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"math/big"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server"
)

type jwk struct {
	Kty, Use, Kid, Alg, Crv, X, Y, N, E string
}

func (k jwk) publicKey(t *testing.T) crypto.PublicKey {
	t.Helper()
	dec := func(s string) *big.Int {
		b, err := base64.RawURLEncoding.DecodeString(s)
		require.NoError(t, err)
		return new(big.Int).SetBytes(b)
	}
	switch k.Kty {
	case "RSA":
		return &rsa.PublicKey{N: dec(k.N), E: int(dec(k.E).Int64())}
	case "EC":
		curve := map[string]elliptic.Curve{"P-256": elliptic.P256(), "P-384": elliptic.P384(), "P-521": elliptic.P521()}[k.Crv]
		require.NotNil(t, curve, k.Crv)
		size := (curve.Params().BitSize + 7) / 8
		for _, c := range []string{k.X, k.Y} {
			b, err := base64.RawURLEncoding.DecodeString(c)
			require.NoError(t, err)
			require.Len(t, b, size, "EC coordinates are padded to the curve size")
		}
		raw := append([]byte{4}, append(dec(k.X).FillBytes(make([]byte, size)), dec(k.Y).FillBytes(make([]byte, size))...)...)
		pub, err := ecdsa.ParseUncompressedPublicKey(curve, raw)
		require.NoError(t, err)
		return pub
	}
	t.Fatalf("unexpected kty %q", k.Kty)
	return nil
}

type oidcEnv struct {
	t      testing.TB
	h      http.Handler
	bundle atomic.Pointer[ferrypb.Bundle]
	keys   map[string]crypto.Signer
}

func newOIDCEnv(t testing.TB, issuer string) *oidcEnv {
	e := &oidcEnv{t: t, keys: map[string]crypto.Signer{}}
	h, err := server.NewOIDCHandler(server.OIDCHandlerConfig{
		Issuer: issuer, TrustDomain: spiffeid.RequireTrustDomainFromString("example.org"),
		Bundle: func() *ferrypb.Bundle { return e.bundle.Load() },
	})
	require.NoError(t, err)
	e.h = h
	return e
}

// addKey publishes a new JWT authority in a new bundle revision.
func (e *oidcEnv) addKey(kid string, key crypto.Signer) {
	der, err := x509.MarshalPKIXPublicKey(key.Public())
	require.NoError(e.t, err)
	b := &ferrypb.Bundle{TrustDomain: "example.org", Revision: 1}
	if old := e.bundle.Load(); old != nil {
		b.JwtAuthorities = append(b.JwtAuthorities, old.JwtAuthorities...)
		b.Revision = old.Revision + 1
	}
	b.JwtAuthorities = append(b.JwtAuthorities, &ferrypb.JWTAuthority{KeyId: kid, PublicKey: der, ExpiresAt: time.Now().Add(time.Hour).Unix()})
	e.bundle.Store(b)
	e.keys[kid] = key
}

func (e *oidcEnv) get(path string, v any) *httptest.ResponseRecorder {
	e.t.Helper()
	rec := httptest.NewRecorder()
	e.h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
	if v != nil {
		require.Equal(e.t, http.StatusOK, rec.Code, rec.Body.String())
		require.Equal(e.t, "application/json", rec.Header().Get("Content-Type"))
		require.NoError(e.t, json.Unmarshal(rec.Body.Bytes(), v))
	}
	return rec
}

type discovery struct {
	Issuer        string   `json:"issuer"`
	JWKSURI       string   `json:"jwks_uri"`
	Algs          []string `json:"id_token_signing_alg_values_supported"`
	ResponseTypes []string `json:"response_types_supported"`
	SubjectTypes  []string `json:"subject_types_supported"`
}

func TestOIDCDiscovery(t *testing.T) {
	e := newOIDCEnv(t, "https://oidc.example.org")

	// No bundle yet: empty, well-formed documents.
	var d discovery
	e.get("/.well-known/openid-configuration", &d)
	require.Equal(t, "https://oidc.example.org", d.Issuer)
	require.Equal(t, "https://oidc.example.org/keys", d.JWKSURI)
	require.Equal(t, []string{}, d.Algs)
	require.Equal(t, []string{"id_token"}, d.ResponseTypes)
	require.Equal(t, []string{"public"}, d.SubjectTypes)
	var set struct{ Keys []jwk }
	e.get("/keys", &set)
	require.NotNil(t, set.Keys)
	require.Empty(t, set.Keys)

	p256, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	e.addKey("kid-es256", p256)
	e.get("/.well-known/openid-configuration", &d)
	require.Equal(t, []string{"ES256"}, d.Algs, "a new bundle revision shows at once")

	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	require.NoError(t, err)
	e.addKey("kid-rs256", rsaKey)
	p384, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	require.NoError(t, err)
	e.addKey("kid-es384", p384)
	p521, err := ecdsa.GenerateKey(elliptic.P521(), rand.Reader)
	require.NoError(t, err)
	e.addKey("kid-es512", p521)

	e.get("/.well-known/openid-configuration", &d)
	require.Equal(t, []string{"ES256", "ES384", "ES512", "RS256"}, d.Algs)

	rec := e.get("/keys", &set)
	require.Contains(t, rec.Header().Get("Cache-Control"), "max-age=")
	require.Len(t, set.Keys, 4)
	wantAlg := map[string]string{"kid-es256": "ES256", "kid-rs256": "RS256", "kid-es384": "ES384", "kid-es512": "ES512"}
	for _, k := range set.Keys {
		require.Equal(t, "sig", k.Use)
		require.Equal(t, wantAlg[k.Kid], k.Alg, k.Kid)
		signer := e.keys[k.Kid]
		require.NotNil(t, signer, k.Kid)
		require.True(t, signer.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(k.publicKey(t)), "key %s round-trips", k.Kid)

		// A JWT signed by the authority verifies with the published key.
		tok := jwt.NewWithClaims(jwt.GetSigningMethod(k.Alg), jwt.MapClaims{"sub": "spiffe://example.org/w", "exp": time.Now().Add(time.Minute).Unix()})
		tok.Header["kid"] = k.Kid
		signed, err := tok.SignedString(signer)
		require.NoError(t, err)
		_, err = jwt.Parse(signed, func(tk *jwt.Token) (any, error) { return k.publicKey(t), nil },
			jwt.WithValidMethods([]string{k.Alg}))
		require.NoError(t, err, k.Kid)
	}

	// Only GET, only the two documents.
	rec = httptest.NewRecorder()
	e.h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/keys", nil))
	require.Equal(t, http.StatusMethodNotAllowed, rec.Code)
	require.Equal(t, http.StatusNotFound, e.get("/other", nil).Code)
}

func TestOIDCIssuerWithPath(t *testing.T) {
	e := newOIDCEnv(t, "https://oidc.example.org/trust/example")
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	e.addKey("k1", key)

	var d discovery
	e.get("/trust/example/.well-known/openid-configuration", &d)
	require.Equal(t, "https://oidc.example.org/trust/example", d.Issuer)
	require.Equal(t, "https://oidc.example.org/trust/example/keys", d.JWKSURI)
	var set struct{ Keys []jwk }
	e.get("/trust/example/keys", &set)
	require.Len(t, set.Keys, 1)
	require.Equal(t, http.StatusNotFound, e.get("/.well-known/openid-configuration", nil).Code)
}

func TestOIDCHandlerConfig(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("example.org")
	src := func() *ferrypb.Bundle { return nil }
	for _, iss := range []string{"", "http://oidc.example.org", "https://", "https://oidc.example.org#x"} {
		_, err := server.NewOIDCHandler(server.OIDCHandlerConfig{Issuer: iss, TrustDomain: td, Bundle: src})
		require.Error(t, err, iss)
	}
	_, err := server.NewOIDCHandler(server.OIDCHandlerConfig{Issuer: "https://oidc.example.org", TrustDomain: td})
	require.ErrorContains(t, err, "server: ")
}

// BenchmarkOIDCKeys serves the JWKS of a bundle with four keys (cached per
// bundle revision).
func BenchmarkOIDCKeys(b *testing.B) {
	e := newOIDCEnv(b, "https://oidc.example.org")
	for i := range 4 {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			b.Fatal(err)
		}
		e.addKey("k"+string(rune('a'+i)), key)
	}
	req := httptest.NewRequest(http.MethodGet, "/keys", nil)
	b.ReportAllocs()
	for b.Loop() {
		rec := httptest.NewRecorder()
		e.h.ServeHTTP(rec, req)
		if rec.Code != http.StatusOK {
			b.Fatal(rec.Code)
		}
	}
}
