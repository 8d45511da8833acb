package bridge_test

import (
	"context"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/bridge"
	"github.com/ferry-id/ferry/bridge/discovery"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

const extSubject = "repo:contoso/app:ref:refs/heads/main"

// oidcServer is an external OIDC issuer: discovery document and JWKS over TLS.
type oidcServer struct {
	srv    *httptest.Server
	issuer string

	mu          sync.Mutex
	keys        []map[string]any
	discovery   func(w http.ResponseWriter) bool // optional override; true = handled
	jwksHandler func(w http.ResponseWriter) bool
	requests    map[string]int
}

func newOIDCServer(t *testing.T) *oidcServer {
	o := &oidcServer{requests: map[string]int{}}
	o.srv = httptest.NewTLSServer(http.HandlerFunc(o.serve))
	t.Cleanup(o.srv.Close)
	o.issuer = o.srv.URL + "/tenant-x"
	return o
}

func (o *oidcServer) serve(w http.ResponseWriter, r *http.Request) {
	o.mu.Lock()
	o.requests[r.URL.Path]++
	disc, jwksH, keys := o.discovery, o.jwksHandler, o.keys
	o.mu.Unlock()
	switch r.URL.Path {
	case "/tenant-x/.well-known/openid-configuration":
		if disc != nil && disc(w) {
			return
		}
		_ = json.NewEncoder(w).Encode(map[string]any{"issuer": o.issuer, "jwks_uri": o.srv.URL + "/tenant-x/jwks"})
	case "/tenant-x/jwks":
		if jwksH != nil && jwksH(w) {
			return
		}
		_ = json.NewEncoder(w).Encode(map[string]any{"keys": keys})
	default:
		http.NotFound(w, r)
	}
}

func (o *oidcServer) setKeys(keys ...map[string]any) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.keys = keys
}

func (o *oidcServer) fetches() (discovery, jwks int) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.requests["/tenant-x/.well-known/openid-configuration"], o.requests["/tenant-x/jwks"]
}

func rsaJWK(kid string, k *rsa.PublicKey) map[string]any {
	return map[string]any{
		"kty": "RSA", "use": "sig", "kid": kid, "alg": "RS256",
		"n": base64.RawURLEncoding.EncodeToString(k.N.Bytes()),
		"e": base64.RawURLEncoding.EncodeToString(big.NewInt(int64(k.E)).Bytes()),
	}
}

func (f *fixture) extToken(t *testing.T, iss, kid string, key *rsa.PrivateKey, mut ...func(jwt.MapClaims, map[string]any)) string {
	t.Helper()
	now := f.clock.Now()
	claims := jwt.MapClaims{"iss": iss, "sub": extSubject, "aud": exchangeAz, "iat": now.Unix(), "exp": now.Add(10 * time.Minute).Unix(), "jti": "j1"}
	tok := jwt.NewWithClaims(jwt.SigningMethodRS256, claims)
	tok.Header["kid"] = kid
	for _, m := range mut {
		m(claims, tok.Header)
	}
	s, err := tok.SignedString(key)
	require.NoError(t, err)
	return s
}

func newExternalFixture(t *testing.T, mutate ...func(*bridge.Config)) (*fixture, *oidcServer) {
	loadKeys(t)
	o := newOIDCServer(t)
	o.setKeys(rsaJWK("k1", &rsaIssKey1.PublicKey))
	f := newFixture(t, append([]func(*bridge.Config){func(c *bridge.Config) { c.HTTPClient = o.srv.Client() }}, mutate...)...)
	f.dir.SetFederatedCredentials(objectID, &ferrypb.FederatedCredential{
		IdentityObjectId: objectID, Name: "github-main", Issuer: o.issuer, Subject: extSubject, Audiences: []string{exchangeAz},
	})
	return f, o
}

func TestExternalIssuerRotationAndRefreshLimit(t *testing.T) {
	f, o := newExternalFixture(t)

	res := f.post(t, v2Token, v2Form(f.extToken(t, o.issuer, "k1", rsaIssKey1)))
	require.Equal(t, 200, res.status, "%s", res.raw)
	d, j := o.fetches()
	require.Equal(t, [2]int{1, 1}, [2]int{d, j})

	// Cached: no new fetch.
	f.clock.Advance(time.Minute)
	require.Equal(t, 200, f.post(t, v2Token, v2Form(f.extToken(t, o.issuer, "k1", rsaIssKey1))).status)
	d, j = o.fetches()
	require.Equal(t, [2]int{1, 1}, [2]int{d, j})

	// The issuer rotates to k2. Within 5 minutes of the last fetch an unknown
	// kid does not trigger a fetch, however many tokens carry it.
	o.setKeys(rsaJWK("k2", &rsaIssKey2.PublicKey))
	for range 3 {
		requireError(t, f.post(t, v2Token, v2Form(f.extToken(t, o.issuer, "k2", rsaIssKey2))), 401, "invalid_client", bridge.CodeUnknownSigningKey)
	}
	f.clock.Advance(3*time.Minute + 59*time.Second)
	requireError(t, f.post(t, v2Token, v2Form(f.extToken(t, o.issuer, "k2", rsaIssKey2))), 401, "invalid_client", bridge.CodeUnknownSigningKey)
	d, j = o.fetches()
	require.Equal(t, [2]int{1, 1}, [2]int{d, j})

	// Five minutes after the last fetch, the unknown kid refreshes the keys.
	f.clock.Advance(time.Second)
	res = f.post(t, v2Token, v2Form(f.extToken(t, o.issuer, "k2", rsaIssKey2)))
	require.Equal(t, 200, res.status, "%s", res.raw)
	d, j = o.fetches()
	require.Equal(t, [2]int{2, 2}, [2]int{d, j})

	// k1 is gone from the issuer's JWKS, and random kids cannot force fetches.
	for i := range 5 {
		requireError(t, f.post(t, v2Token, v2Form(f.extToken(t, o.issuer, fmt.Sprint("r", i), rsaIssKey1))), 401, "invalid_client", bridge.CodeUnknownSigningKey)
	}
	requireError(t, f.post(t, v2Token, v2Form(f.extToken(t, o.issuer, "k1", rsaIssKey1))), 401, "invalid_client", bridge.CodeUnknownSigningKey)
	d, j = o.fetches()
	require.Equal(t, [2]int{2, 2}, [2]int{d, j})

	// A token signed by the wrong key under a known kid fails signature checks.
	requireError(t, f.post(t, v2Token, v2Form(f.extToken(t, o.issuer, "k2", rsaIssKey1))), 401, "invalid_client", bridge.CodeBadSignature)
}

func TestExternalIssuerFirst100Keys(t *testing.T) {
	f, o := newExternalFixture(t)
	keys := make([]map[string]any, 0, 150)
	for i := range 150 {
		pub := &rsaIssKey2.PublicKey
		if i == 99 || i == 120 {
			pub = &rsaIssKey1.PublicKey
		}
		keys = append(keys, rsaJWK(fmt.Sprint("k", i), pub))
	}
	o.setKeys(keys...)
	require.Equal(t, 200, f.post(t, v2Token, v2Form(f.extToken(t, o.issuer, "k99", rsaIssKey1))).status)
	requireError(t, f.post(t, v2Token, v2Form(f.extToken(t, o.issuer, "k120", rsaIssKey1))), 401, "invalid_client", bridge.CodeUnknownSigningKey)
}

func TestExternalIssuerFailures(t *testing.T) {
	tests := []struct {
		name      string
		discovery func(o *oidcServer) func(http.ResponseWriter) bool
		jwks      func(o *oidcServer) func(http.ResponseWriter) bool
	}{
		{"discovery 500", func(*oidcServer) func(http.ResponseWriter) bool {
			return func(w http.ResponseWriter) bool { w.WriteHeader(500); return true }
		}, nil},
		{"discovery not json", func(*oidcServer) func(http.ResponseWriter) bool {
			return func(w http.ResponseWriter) bool { _, _ = io.WriteString(w, "<html>"); return true }
		}, nil},
		{"issuer mismatch", func(o *oidcServer) func(http.ResponseWriter) bool {
			return func(w http.ResponseWriter) bool {
				_ = json.NewEncoder(w).Encode(map[string]any{"issuer": o.issuer + "/", "jwks_uri": o.srv.URL + "/tenant-x/jwks"})
				return true
			}
		}, nil},
		{"http jwks_uri", func(o *oidcServer) func(http.ResponseWriter) bool {
			return func(w http.ResponseWriter) bool {
				_ = json.NewEncoder(w).Encode(map[string]any{"issuer": o.issuer, "jwks_uri": strings.Replace(o.srv.URL, "https", "http", 1) + "/tenant-x/jwks"})
				return true
			}
		}, nil},
		{"jwks too large", nil, func(*oidcServer) func(http.ResponseWriter) bool {
			return func(w http.ResponseWriter) bool {
				_, _ = io.WriteString(w, `{"keys":[],"pad":"`+strings.Repeat("a", 2<<20)+`"}`)
				return true
			}
		}},
		{"jwks 404", nil, func(*oidcServer) func(http.ResponseWriter) bool {
			return func(w http.ResponseWriter) bool { w.WriteHeader(404); return true }
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, o := newExternalFixture(t)
			o.mu.Lock()
			if tt.discovery != nil {
				o.discovery = tt.discovery(o)
			}
			if tt.jwks != nil {
				o.jwksHandler = tt.jwks(o)
			}
			o.mu.Unlock()
			tok := f.extToken(t, o.issuer, "k1", rsaIssKey1)
			requireError(t, f.post(t, v2Token, v2Form(tok)), 400, "invalid_request", bridge.CodeIssuerMetadata)
			d1, _ := o.fetches()
			// A failing issuer is retried at most every 30 s.
			requireError(t, f.post(t, v2Token, v2Form(tok)), 400, "invalid_request", bridge.CodeIssuerMetadata)
			d2, _ := o.fetches()
			require.Equal(t, d1, d2)
			// Once healthy, the next attempt after the back-off succeeds.
			o.mu.Lock()
			o.discovery, o.jwksHandler = nil, nil
			o.mu.Unlock()
			f.clock.Advance(30 * time.Second)
			require.Equal(t, 200, f.post(t, v2Token, v2Form(f.extToken(t, o.issuer, "k1", rsaIssKey1))).status)
		})
	}
}

func TestExternalIssuerFetchTimeout(t *testing.T) {
	release := make(chan struct{})
	f, o := newExternalFixture(t, func(c *bridge.Config) {
		c.Discovery = discovery.Config{FetchTimeout: 200 * time.Millisecond}
	})
	defer close(release)
	o.mu.Lock()
	o.discovery = func(http.ResponseWriter) bool { <-release; return true }
	o.mu.Unlock()
	// The issuer never answers while the request is in flight (on a loaded
	// machine the fetch may not even reach it within the timeout): the
	// request can return only because the bridge gave up on the fetch.
	requireError(t, f.post(t, v2Token, v2Form(f.extToken(t, o.issuer, "k1", rsaIssKey1))), 400, "invalid_request", bridge.CodeIssuerMetadata)
}

// Nothing named by a token is ever fetched: not jku/x5u headers, and not an
// issuer that no credential names.
func TestTokenNamedURLsNeverFetched(t *testing.T) {
	var hits atomic.Int64
	attacker := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		_ = json.NewEncoder(w).Encode(map[string]any{"issuer": "x", "jwks_uri": "https://x", "keys": []any{}})
	}))
	defer attacker.Close()

	f, o := newExternalFixture(t, func(c *bridge.Config) { c.HTTPClient = nil })
	// Both the legitimate external issuer and the attacker trust this client.
	pool := x509.NewCertPool()
	pool.AddCert(o.srv.Certificate())
	pool.AddCert(attacker.Certificate())
	b, err := bridge.New(bridge.Config{
		Directory: f.dir, Key: bridgeKey, BaseURL: baseURL, Clock: f.clock.Now,
		HTTPClient: &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}},
	})
	require.NoError(t, err)
	f.h = b.Handler()

	withHeader := func(k, v string) func(jwt.MapClaims, map[string]any) {
		return func(_ jwt.MapClaims, h map[string]any) { h[k] = v }
	}
	for _, h := range []string{"jku", "x5u"} {
		requireError(t, f.post(t, v2Token, v2Form(svid(t, withHeader(h, attacker.URL+"/keys")))), 400, "invalid_request", bridge.CodeInvalidJWT)
		requireError(t, f.post(t, v2Token, v2Form(f.extToken(t, o.issuer, "k1", rsaIssKey1, withHeader(h, attacker.URL+"/keys")))), 400, "invalid_request", bridge.CodeInvalidJWT)
	}
	requireError(t, f.post(t, v2Token, v2Form(f.extToken(t, attacker.URL, "k1", rsaIssKey1))), 401, "invalid_client", bridge.CodeNoFICIssuer)
	require.Zero(t, hits.Load())
	// The legitimate issuer still works through the same client.
	require.Equal(t, 200, f.post(t, v2Token, v2Form(f.extToken(t, o.issuer, "k1", rsaIssKey1))).status)
	require.Zero(t, hits.Load())
}

func TestRunServesHTTPS(t *testing.T) {
	f := newFixture(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	srv := httptest.NewUnstartedServer(nil) // only for its loopback certificate
	srv.StartTLS()
	cert := srv.TLS.Certificates[0]
	pool := x509.NewCertPool()
	pool.AddCert(srv.Certificate())
	srv.Close()

	b, err := bridge.New(bridge.Config{
		Directory: f.dir, Key: bridgeKey, Clock: f.clock.Now,
		Listener: ln, TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}},
	})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- b.Run(ctx) }()

	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	resp, err := client.Get("https://" + ln.Addr().String() + "/" + tenantID + "/v2.0/.well-known/openid-configuration?")
	require.NoError(t, err)
	var md map[string]any
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&md))
	resp.Body.Close()
	require.Equal(t, "https://"+ln.Addr().String()+"/"+tenantID+"/v2.0", md["issuer"])

	client.CloseIdleConnections()
	cancel()
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after cancel")
	}
}
