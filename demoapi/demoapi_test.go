package demoapi_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/bridge"
	"github.com/ferry-id/ferry/bridge/memdir"
	"github.com/ferry-id/ferry/bridge/signing"
	"github.com/ferry-id/ferry/demoapi"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

const (
	tenantID  = "72f988bf-86f1-41af-91ab-2d7cd011db47"
	otherTID  = "00000000-86f1-41af-91ab-2d7cd011db47"
	readerCID = "0f0e0d0c-0b0a-4909-8807-060504030201"
	readerOID = "a1b2c3d4-0000-4000-8000-000000000001"
	plainCID  = "0f0e0d0c-0b0a-4909-8807-060504030202"
	plainOID  = "a1b2c3d4-0000-4000-8000-000000000002"
	apiAppID  = "11111111-2222-4333-8444-555555555555"
	apiObjID  = "66666666-7777-4888-9999-000000000000"
	apiURI    = "api://demo"
	otherURI  = "api://other"
	roleID    = "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee"
	localIss  = "https://oidc.example.org"
	readerSub = "spiffe://example.org/web"
	plainSub  = "spiffe://example.org/batch"
	svidKID   = "svid-key-1"
	exchange  = "api://AzureADTokenExchange"
)

var (
	keysOnce sync.Once
	svidKey  *ecdsa.PrivateKey
	bridgeK  *signing.Key
	// spare is published in the JWKS; its private half signs forged tokens.
	spare     *signing.Key
	sparePriv *rsa.PrivateKey
	stranger  *rsa.PrivateKey // in no JWKS
)

func loadKeys(t *testing.T) {
	keysOnce.Do(func() {
		var err error
		svidKey, _ = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if bridgeK, err = signing.Generate("replica-1", time.Now().Add(-time.Hour), 0); err != nil {
			panic(err)
		}
		dir, err := os.MkdirTemp("", "demoapi-key-")
		if err != nil {
			panic(err)
		}
		defer os.RemoveAll(dir)
		path := filepath.Join(dir, "spare.pem")
		if spare, err = signing.LoadOrCreate(path, "replica-2", time.Now().Add(-time.Hour)); err != nil {
			panic(err)
		}
		data, _ := os.ReadFile(path)
		block, _ := pem.Decode(data)
		k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
		if err != nil {
			panic(err)
		}
		sparePriv = k.(*rsa.PrivateKey)
		stranger, _ = rsa.GenerateKey(rand.Reader, 2048)
	})
}

// fixture is a real bridge over TLS, with a directory holding an API
// (api://demo, role reader), an identity granted the role and one not, and
// a second resource.
type fixture struct {
	srv     *httptest.Server
	dir     *memdir.Dir
	bridge  *bridge.Bridge
	jwks    atomic.Int32 // JWKS requests served
	meta    atomic.Int32 // metadata requests served
	down    atomic.Bool  // answer 503 to everything
	now     atomic.Int64 // unix seconds of the test clock
	baseURL string
}

func (f *fixture) clock() time.Time { return time.Unix(f.now.Load(), 0) }
func (f *fixture) advance(d time.Duration) {
	f.now.Add(int64(d / time.Second))
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	loadKeys(t)
	f := &fixture{}
	f.now.Store(time.Now().Unix())
	d := &memdir.Dir{}
	d.PutTenant(&ferrypb.Tenant{Id: tenantID, Name: "default"})
	d.PutIdentity(&ferrypb.Identity{ObjectId: readerOID, ClientId: readerCID, TenantId: tenantID, Name: "web-id", Kind: "user-assigned"})
	d.PutIdentity(&ferrypb.Identity{ObjectId: plainOID, ClientId: plainCID, TenantId: tenantID, Name: "batch-id", Kind: "user-assigned"})
	d.SetFederatedCredentials(readerOID, &ferrypb.FederatedCredential{IdentityObjectId: readerOID, Name: "web", Issuer: localIss, Subject: readerSub, Audiences: []string{exchange}})
	d.SetFederatedCredentials(plainOID, &ferrypb.FederatedCredential{IdentityObjectId: plainOID, Name: "batch", Issuer: localIss, Subject: plainSub, Audiences: []string{exchange}})
	d.PutResource(&ferrypb.Resource{ObjectId: apiObjID, AppId: apiAppID, Name: "demo", TenantId: tenantID,
		IdentifierUris: []string{apiURI}, AppRoles: []*ferrypb.AppRole{{Id: roleID, Value: "reader"}}})
	d.PutResource(&ferrypb.Resource{ObjectId: "66666666-7777-4888-9999-000000000001", AppId: "11111111-2222-4333-8444-555555555556",
		Name: "other", TenantId: tenantID, IdentifierUris: []string{otherURI}})
	d.AddRoleAssignment(&ferrypb.RoleAssignment{Id: "ra1", ResourceObjectId: apiObjID, AppRoleId: roleID, PrincipalObjectId: readerOID})
	spki, err := x509.MarshalPKIXPublicKey(&svidKey.PublicKey)
	require.NoError(t, err)
	d.PutLocalIssuer(localIss, bridge.LocalIssuer{TrustDomain: "example.org", Authorities: []*ferrypb.JWTAuthority{{KeyId: svidKID, PublicKey: spki}}})
	d.SetSigningKeys(bridgeK.Public(), spare.Public())
	f.dir = d

	var h atomic.Pointer[http.Handler]
	f.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if f.down.Load() {
			http.Error(w, "down", http.StatusServiceUnavailable)
			return
		}
		switch {
		case strings.HasSuffix(r.URL.Path, "/keys"):
			f.jwks.Add(1)
		case strings.HasSuffix(r.URL.Path, "/openid-configuration"):
			f.meta.Add(1)
		}
		(*h.Load()).ServeHTTP(w, r)
	}))
	f.srv.StartTLS()
	t.Cleanup(f.srv.Close)
	f.baseURL = f.srv.URL
	b, err := bridge.New(bridge.Config{Directory: d, Key: bridgeK, BaseURL: f.baseURL, Clock: f.clock})
	require.NoError(t, err)
	f.bridge = b
	handler := b.Handler()
	h.Store(&handler)
	return f
}

func (f *fixture) api(t *testing.T, mutate ...func(*demoapi.Config)) *demoapi.API {
	t.Helper()
	cfg := demoapi.Config{
		Authority:  f.baseURL,
		Tenant:     tenantID,
		Audiences:  []string{apiURI, apiAppID},
		Role:       "reader",
		HTTPClient: f.srv.Client(),
		Clock:      f.clock,
	}
	for _, m := range mutate {
		m(&cfg)
	}
	a, err := demoapi.New(cfg)
	require.NoError(t, err)
	return a
}

// svid is a JWT-SVID assertion for sub.
func (f *fixture) svid(t *testing.T, sub string) string {
	t.Helper()
	now := f.clock()
	tok := jwt.NewWithClaims(jwt.SigningMethodES256, jwt.MapClaims{
		"iss": localIss, "sub": sub, "aud": []string{exchange},
		"iat": now.Unix(), "exp": now.Add(5 * time.Minute).Unix(),
	})
	tok.Header["kid"] = svidKID
	s, err := tok.SignedString(svidKey)
	require.NoError(t, err)
	return s
}

// token gets an access token from the bridge: v2 (scope) or v1 (resource).
func (f *fixture) token(t *testing.T, v1 bool, clientID, sub, resource string) string {
	t.Helper()
	form := url.Values{
		"grant_type":            {"client_credentials"},
		"client_id":             {clientID},
		"client_assertion_type": {bridge.AssertionTypeJWTBearer},
		"client_assertion":      {f.svid(t, sub)},
	}
	path := "/" + tenantID + "/oauth2/v2.0/token"
	if v1 {
		path = "/" + tenantID + "/oauth2/token"
		form.Set("resource", resource)
	} else {
		form.Set("scope", resource+"/.default")
	}
	resp, err := f.srv.Client().PostForm(f.baseURL+path, form)
	require.NoError(t, err)
	defer resp.Body.Close()
	var body struct {
		AccessToken string `json:"access_token"`
		Error       string `json:"error_description"`
	}
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&body))
	require.Equal(t, http.StatusOK, resp.StatusCode, body.Error)
	return body.AccessToken
}

// forge signs claims with key (kid in the header) using method.
func forge(t *testing.T, method jwt.SigningMethod, key any, kid string, claims jwt.MapClaims) string {
	t.Helper()
	tok := jwt.NewWithClaims(method, claims)
	if kid != "" {
		tok.Header["kid"] = kid
	}
	s, err := tok.SignedString(key)
	require.NoError(t, err)
	return s
}

// claimsOf decodes a token's payload without verifying it.
func claimsOf(t *testing.T, raw string) jwt.MapClaims {
	t.Helper()
	c := jwt.MapClaims{}
	_, _, err := jwt.NewParser().ParseUnverified(raw, c)
	require.NoError(t, err)
	return c
}

type answer struct {
	status int
	www    string
	body   map[string]any
}

func call(t *testing.T, a *demoapi.API, headers ...string) answer {
	t.Helper()
	req := httptest.NewRequest(http.MethodGet, "/whoami", nil)
	for _, h := range headers {
		req.Header.Add("Authorization", h)
	}
	rec := httptest.NewRecorder()
	a.ServeHTTP(rec, req)
	ans := answer{status: rec.Code, www: rec.Header().Get("WWW-Authenticate")}
	require.Equal(t, "application/json; charset=utf-8", rec.Header().Get("Content-Type"))
	require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &ans.body), rec.Body.String())
	return ans
}

func requireRefused(t *testing.T, ans answer, status int, code, descPart string) {
	t.Helper()
	require.Equal(t, status, ans.status, "%v", ans.body)
	require.Equal(t, code, ans.body["error"], "%v", ans.body)
	desc, _ := ans.body["error_description"].(string)
	require.Contains(t, desc, descPart)
	require.True(t, strings.HasPrefix(ans.www, `Bearer error="`+code+`", error_description="`), ans.www)
	require.Contains(t, ans.www, descPart)
	require.NotContains(t, ans.body, "oid")
}

func TestV2TokenFromTheBridge(t *testing.T) {
	f := newFixture(t)
	a := f.api(t)
	tok := f.token(t, false, readerCID, readerSub, apiURI)
	require.Equal(t, apiAppID, claimsOf(t, tok)["aud"], "v2 tokens name the API by app ID")
	ans := call(t, a, "Bearer "+tok)
	require.Equal(t, http.StatusOK, ans.status, "%v", ans.body)
	require.Empty(t, ans.www)
	require.Equal(t, readerOID, ans.body["oid"])
	require.Equal(t, readerCID, ans.body["appid"], "azp of a v2 token")
	require.Equal(t, tenantID, ans.body["tid"])
	require.Equal(t, []any{"reader"}, ans.body["roles"])
	require.Equal(t, "2.0", ans.body["ver"])
	require.Equal(t, apiAppID, ans.body["aud"])

	// The scheme is case-insensitive (RFC 7235).
	require.Equal(t, http.StatusOK, call(t, a, "bearer "+tok).status)
	// Metadata and keys were fetched once and are cached.
	for range 5 {
		require.Equal(t, http.StatusOK, call(t, a, "Bearer "+tok).status)
	}
	require.Equal(t, int32(1), f.jwks.Load())
	require.Equal(t, int32(3), f.meta.Load(), "v2 and v1 tenant metadata, then the issuer's own (the key cache's)")
}

func TestV1TokenFromTheBridge(t *testing.T) {
	f := newFixture(t)
	tok := f.token(t, true, readerCID, readerSub, apiURI)
	c := claimsOf(t, tok)
	require.Equal(t, apiURI, c["aud"], "v1 tokens carry the identifier URI as requested")
	require.Equal(t, f.baseURL+"/"+tenantID+"/", c["iss"])

	ans := call(t, f.api(t), "Bearer "+tok)
	require.Equal(t, http.StatusOK, ans.status, "%v", ans.body)
	require.Equal(t, readerCID, ans.body["appid"], "appid of a v1 token")
	require.Equal(t, "1.0", ans.body["ver"])
	require.Equal(t, apiURI, ans.body["aud"])
}

func TestNoRoleIsForbidden(t *testing.T) {
	f := newFixture(t)
	tok := f.token(t, false, plainCID, plainSub, apiURI)
	ans := call(t, f.api(t), "Bearer "+tok)
	requireRefused(t, ans, http.StatusForbidden, "insufficient_scope", "app role 'reader'")

	// Without a required role, the same token is welcome.
	ans = call(t, f.api(t, func(c *demoapi.Config) { c.Role = "" }), "Bearer "+tok)
	require.Equal(t, http.StatusOK, ans.status)
	require.Equal(t, plainOID, ans.body["oid"])
	require.Equal(t, []any{}, ans.body["roles"])
}

func TestMissingOrMalformedCredentials(t *testing.T) {
	f := newFixture(t)
	a := f.api(t)
	// No token: a bare challenge, no error code (RFC 6750 §3.1).
	for _, h := range [][]string{nil, {"Basic dXNlcjpwYXNz"}, {"Bearertoken"}} {
		ans := call(t, a, h...)
		require.Equal(t, http.StatusUnauthorized, ans.status, "%v", h)
		require.Equal(t, "Bearer", ans.www, "%v", h)
		require.Equal(t, "unauthorized", ans.body["error"])
	}
	tok := f.token(t, false, readerCID, readerSub, apiURI)
	requireRefused(t, call(t, a, "Bearer "+tok, "Bearer "+tok), http.StatusBadRequest, "invalid_request", "More than one")
	requireRefused(t, call(t, a, "Bearer    "), http.StatusBadRequest, "invalid_request", "empty")
	requireRefused(t, call(t, a, "Bearer not-a-jwt"), http.StatusUnauthorized, "invalid_token", "malformed")
	requireRefused(t, call(t, a, "Bearer "+strings.Repeat("a", demoapi.MaxTokenBytes+1)), http.StatusUnauthorized, "invalid_token", "exceeds")
	require.Zero(t, f.jwks.Load(), "nothing fetched for requests refused before validation")
}

func TestWrongAudience(t *testing.T) {
	f := newFixture(t)
	a := f.api(t)
	// A token for another resource, from the same bridge, by the same identity.
	for _, v1 := range []bool{false, true} {
		tok := f.token(t, v1, readerCID, readerSub, otherURI)
		ans := call(t, a, "Bearer "+tok)
		requireRefused(t, ans, http.StatusUnauthorized, "invalid_token", "audience")
	}
	// An API that lists only its identifier URI refuses v2 tokens (aud is
	// the app ID) and accepts v1 tokens requested by that URI.
	uriOnly := f.api(t, func(c *demoapi.Config) { c.Audiences = []string{apiURI} })
	requireRefused(t, call(t, uriOnly, "Bearer "+f.token(t, false, readerCID, readerSub, apiURI)),
		http.StatusUnauthorized, "invalid_token", "The audience '"+apiAppID+"' is not accepted")
	require.Equal(t, http.StatusOK, call(t, uriOnly, "Bearer "+f.token(t, true, readerCID, readerSub, apiURI)).status)
	// aud compares exactly.
	upper := forge(t, jwt.SigningMethodRS256, sparePriv, spare.KID(), f.claims(func(c jwt.MapClaims) { c["aud"] = "API://demo" }))
	requireRefused(t, call(t, a, "Bearer "+upper), http.StatusUnauthorized, "invalid_token", "audience")
	noAud := forge(t, jwt.SigningMethodRS256, sparePriv, spare.KID(), f.claims(func(c jwt.MapClaims) { delete(c, "aud") }))
	requireRefused(t, call(t, a, "Bearer "+noAud), http.StatusUnauthorized, "invalid_token", "no audience")
}

// claims are valid v2 claims for the reader identity, as the bridge issues them.
func (f *fixture) claims(mutate ...func(jwt.MapClaims)) jwt.MapClaims {
	now := f.clock()
	c := jwt.MapClaims{
		"aud": apiAppID, "iss": f.baseURL + "/" + tenantID + "/v2.0",
		"iat": now.Add(-5 * time.Minute).Unix(), "nbf": now.Add(-5 * time.Minute).Unix(), "exp": now.Add(time.Hour).Unix(),
		"azp": readerCID, "oid": readerOID, "sub": readerOID, "tid": tenantID, "roles": []string{"reader"}, "ver": "2.0",
	}
	for _, m := range mutate {
		m(c)
	}
	return c
}

func TestForgedTokensAndClaims(t *testing.T) {
	f := newFixture(t)
	a := f.api(t)
	rs := jwt.SigningMethodRS256
	// The spare key is in the JWKS: a token it signs with valid claims passes,
	// which makes every refusal below about the one thing changed.
	require.Equal(t, http.StatusOK, call(t, a, "Bearer "+forge(t, rs, sparePriv, spare.KID(), f.claims())).status)

	iss2 := f.baseURL + "/" + tenantID + "/v2.0"
	for _, tc := range []struct {
		name, token, desc string
	}{
		{"other issuer", forge(t, rs, sparePriv, spare.KID(), f.claims(func(c jwt.MapClaims) { c["iss"] = "https://login.microsoftonline.com/" + tenantID + "/v2.0" })), "issuer"},
		{"issuer differs in case", forge(t, rs, sparePriv, spare.KID(), f.claims(func(c jwt.MapClaims) { c["iss"] = strings.ToUpper(iss2[:8]) + iss2[8:] })), "issuer"},
		{"issuer with trailing slash", forge(t, rs, sparePriv, spare.KID(), f.claims(func(c jwt.MapClaims) { c["iss"] = iss2 + "/" })), "issuer"},
		{"no issuer", forge(t, rs, sparePriv, spare.KID(), f.claims(func(c jwt.MapClaims) { delete(c, "iss") })), "issuer"},
		{"other tenant", forge(t, rs, sparePriv, spare.KID(), f.claims(func(c jwt.MapClaims) { c["tid"] = otherTID })), "tenant"},
		{"no tenant", forge(t, rs, sparePriv, spare.KID(), f.claims(func(c jwt.MapClaims) { delete(c, "tid") })), "tenant"},
		{"no oid", forge(t, rs, sparePriv, spare.KID(), f.claims(func(c jwt.MapClaims) { delete(c, "oid") })), "oid"},
		{"expired beyond the skew", forge(t, rs, sparePriv, spare.KID(), f.claims(func(c jwt.MapClaims) { c["exp"] = f.clock().Add(-61 * time.Second).Unix() })), "expired"},
		{"no expiry", forge(t, rs, sparePriv, spare.KID(), f.claims(func(c jwt.MapClaims) { delete(c, "exp") })), "no expiry"},
		{"not valid yet", forge(t, rs, sparePriv, spare.KID(), f.claims(func(c jwt.MapClaims) { c["nbf"] = f.clock().Add(2 * time.Minute).Unix() })), "not valid yet"},
		{"issued in the future", forge(t, rs, sparePriv, spare.KID(), f.claims(func(c jwt.MapClaims) { c["iat"] = f.clock().Add(2 * time.Minute).Unix() })), "future"},
		{"roles not a list", forge(t, rs, sparePriv, spare.KID(), f.claims(func(c jwt.MapClaims) { c["roles"] = "reader" })), "malformed"},
		{"signed by a key in no JWKS, known kid", forge(t, rs, stranger, spare.KID(), f.claims()), "signature"},
		{"signed by a key in no JWKS, unknown kid", forge(t, rs, stranger, "stranger", f.claims()), "signing key 'stranger'"},
		{"no kid", forge(t, rs, sparePriv, "", f.claims()), "no kid"},
		{"RS384", forge(t, jwt.SigningMethodRS384, sparePriv, spare.KID(), f.claims()), "RS384"},
		{"PS256", forge(t, jwt.SigningMethodPS256, sparePriv, spare.KID(), f.claims()), "PS256"},
		{"HS256 keyed with the public key", forge(t, jwt.SigningMethodHS256, x509.MarshalPKCS1PublicKey(&sparePriv.PublicKey), spare.KID(), f.claims()), "HS256"},
		{"alg none", forge(t, jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType, spare.KID(), f.claims()), "none"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			requireRefused(t, call(t, a, "Bearer "+tc.token), http.StatusUnauthorized, "invalid_token", tc.desc)
		})
	}

	// A token altered after signing.
	good := f.token(t, false, readerCID, readerSub, apiURI)
	parts := strings.Split(good, ".")
	other := strings.Split(f.token(t, false, plainCID, plainSub, apiURI), ".")
	requireRefused(t, call(t, a, "Bearer "+parts[0]+"."+other[1]+"."+parts[2]), http.StatusUnauthorized, "invalid_token", "signature")
}

func TestExpiryWithSkew(t *testing.T) {
	f := newFixture(t)
	a := f.api(t)
	tok := f.token(t, false, readerCID, readerSub, apiURI)
	exp := int64(claimsOf(t, tok)["exp"].(float64))
	f.now.Store(exp + 30) // within the 60 s of skew
	require.Equal(t, http.StatusOK, call(t, a, "Bearer "+tok).status)
	f.now.Store(exp + 61)
	requireRefused(t, call(t, a, "Bearer "+tok), http.StatusUnauthorized, "invalid_token", "expired")
}

// An unknown kid makes the API fetch the JWKS again, but not more than once
// per MinRefresh: a key the bridge starts signing with is found, and a stream
// of tokens with made-up kids cannot make it hammer the issuer.
func TestUnknownKidRefetchIsRateLimited(t *testing.T) {
	f := newFixture(t)
	a := f.api(t, func(c *demoapi.Config) { c.MinRefresh = time.Minute })
	tok := f.token(t, false, readerCID, readerSub, apiURI)
	require.Equal(t, http.StatusOK, call(t, a, "Bearer "+tok).status)
	require.Equal(t, int32(1), f.jwks.Load())

	// The bridge rotates to a key the API has not seen: its tokens are
	// refused until MinRefresh has passed since the last fetch, then accepted.
	next, err := signing.Generate("replica-1", f.clock().Add(-time.Minute), 0)
	require.NoError(t, err)
	f.dir.SetSigningKeys(bridgeK.Public(), spare.Public(), next.Public())
	f.bridge.SetKey(next)
	rotated := f.token(t, false, readerCID, readerSub, apiURI)
	for range 5 {
		requireRefused(t, call(t, a, "Bearer "+rotated), http.StatusUnauthorized, "invalid_token", "signing key '"+next.KID()+"'")
		requireRefused(t, call(t, a, "Bearer "+forge(t, jwt.SigningMethodRS256, stranger, "made-up", f.claims())), http.StatusUnauthorized, "invalid_token", "made-up")
	}
	require.Equal(t, int32(1), f.jwks.Load(), "no refetch within MinRefresh")
	require.Equal(t, http.StatusOK, call(t, a, "Bearer "+tok).status, "known keys still work")

	f.advance(61 * time.Second)
	ans := call(t, a, "Bearer "+rotated)
	require.Equal(t, http.StatusOK, ans.status, "%v", ans.body)
	require.Equal(t, int32(2), f.jwks.Load())
	for range 5 {
		requireRefused(t, call(t, a, "Bearer "+forge(t, jwt.SigningMethodRS256, stranger, "made-up", f.claims())), http.StatusUnauthorized, "invalid_token", "made-up")
	}
	require.Equal(t, int32(2), f.jwks.Load())
}

func TestAuthorityUnavailable(t *testing.T) {
	f := newFixture(t)
	f.down.Store(true)
	a := f.api(t, func(c *demoapi.Config) { c.RetryAfterError = time.Minute })
	require.Error(t, a.Prefetch(context.Background()))
	tok := forge(t, jwt.SigningMethodRS256, sparePriv, spare.KID(), f.claims())
	req := httptest.NewRequest(http.MethodGet, "/", nil)
	req.Header.Set("Authorization", "Bearer "+tok)
	rec := httptest.NewRecorder()
	a.ServeHTTP(rec, req)
	require.Equal(t, http.StatusServiceUnavailable, rec.Code)
	require.Equal(t, "5", rec.Header().Get("Retry-After"))
	metaBefore := f.meta.Load()
	// Failures are retried at most once per RetryAfterError.
	a.ServeHTTP(httptest.NewRecorder(), req)
	require.Equal(t, metaBefore, f.meta.Load())

	f.down.Store(false)
	f.advance(61 * time.Second)
	rec = httptest.NewRecorder()
	a.ServeHTTP(rec, req)
	require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
}

func TestConfig(t *testing.T) {
	for _, cfg := range []demoapi.Config{
		{Authority: "http://bridge", Tenant: tenantID, Audiences: []string{apiURI}},
		{Authority: "https://", Tenant: tenantID, Audiences: []string{apiURI}},
		{Authority: "https://bridge", Audiences: []string{apiURI}},
		{Authority: "https://bridge", Tenant: "a/b", Audiences: []string{apiURI}},
		{Authority: "https://bridge", Tenant: tenantID},
		{Authority: "https://bridge", Tenant: tenantID, Audiences: []string{""}},
	} {
		_, err := demoapi.New(cfg)
		require.Error(t, err, "%+v", cfg)
	}
	a, err := demoapi.New(demoapi.Config{Authority: "https://bridge:8443/", Tenant: tenantID, Audiences: []string{apiURI}})
	require.NoError(t, err)
	require.Equal(t, "https://bridge:8443/"+tenantID+"/v2.0/.well-known/openid-configuration", a.MetadataURL())
}

// A description quoting hostile token content stays a valid quoted-string.
func TestChallengeQuoting(t *testing.T) {
	f := newFixture(t)
	tok := forge(t, jwt.SigningMethodRS256, sparePriv, spare.KID(), f.claims(func(c jwt.MapClaims) { c["aud"] = "a\"b\\c\r\nSet-Cookie: x=1 é" }))
	ans := call(t, f.api(t), "Bearer "+tok)
	require.Equal(t, http.StatusUnauthorized, ans.status)
	require.Equal(t, `Bearer error="invalid_token", error_description="The audience 'a'b'c??Set-Cookie: x=1 ??' is not accepted"`, ans.www)
}
