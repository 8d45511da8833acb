package bridge_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"log/slog"
	"math/big"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/bridge"
	"github.com/ferry-id/ferry/bridge/memdir"
	"github.com/ferry-id/ferry/bridge/signing"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

const (
	tenantID   = "72f988bf-86f1-41af-91ab-2d7cd011db47"
	clientID   = "0f0e0d0c-0b0a-4909-8807-060504030201"
	objectID   = "a1b2c3d4-0000-4000-8000-000000000001"
	resAppID   = "11111111-2222-4333-8444-555555555555"
	resObjID   = "66666666-7777-4888-9999-000000000000"
	resURI     = "api://orders"
	roleID     = "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee"
	localIss   = "https://oidc.example.org"
	spiffeID   = "spiffe://example.org/ns/web/sa/frontend"
	localKID   = "svid-key-1"
	baseURL    = "https://bridge.test:8443"
	exchangeAz = "api://AzureADTokenExchange"
)

var (
	t0 = time.Date(2030, 6, 1, 12, 0, 0, 0, time.UTC)

	// Keys are generated once: RSA generation is slow under -race.
	keysOnce   sync.Once
	bridgeKey  *signing.Key
	otherKey   *signing.Key
	svidKey    *ecdsa.PrivateKey
	rsaIssKey1 *rsa.PrivateKey
	rsaIssKey2 *rsa.PrivateKey
)

func loadKeys(t testing.TB) {
	keysOnce.Do(func() {
		var err error
		bridgeKey, err = signing.Generate("replica-1", t0.Add(-time.Hour), 0)
		if err != nil {
			panic(err)
		}
		otherKey, err = signing.Generate("replica-2", t0.Add(-time.Hour), 0)
		if err != nil {
			panic(err)
		}
		svidKey, _ = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		rsaIssKey1, _ = rsa.GenerateKey(rand.Reader, 2048)
		rsaIssKey2, _ = rsa.GenerateKey(rand.Reader, 2048)
	})
}

// clock is a settable test clock.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

type fixture struct {
	dir    *memdir.Dir
	clock  *clock
	bridge *bridge.Bridge
	h      http.Handler
}

type testLogWriter struct{ t testing.TB }

func (w testLogWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

func newFixture(t testing.TB, mutate ...func(*bridge.Config)) *fixture {
	t.Helper()
	loadKeys(t)
	d := &memdir.Dir{}
	d.PutTenant(&ferrypb.Tenant{Id: tenantID, Name: "contoso"})
	d.PutIdentity(&ferrypb.Identity{ObjectId: objectID, ClientId: clientID, TenantId: tenantID, Name: "web", Kind: "user-assigned",
		ResourceId: "/subscriptions/" + tenantID + "/resourceGroups/ferry/providers/Microsoft.ManagedIdentity/userAssignedIdentities/web"})
	d.SetFederatedCredentials(objectID, &ferrypb.FederatedCredential{
		IdentityObjectId: objectID,
		Name:             "web-frontend",
		Issuer:           localIss,
		Subject:          spiffeID,
		Audiences:        []string{exchangeAz},
	})
	d.PutResource(&ferrypb.Resource{
		ObjectId: resObjID, AppId: resAppID, Name: "orders", TenantId: tenantID,
		IdentifierUris: []string{resURI},
		AppRoles: []*ferrypb.AppRole{
			{Id: roleID, Value: "Orders.Read"},
			{Id: "bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb", Value: "Orders.Write"},
		},
	})
	d.AddRoleAssignment(&ferrypb.RoleAssignment{Id: "ra1", ResourceObjectId: resObjID, AppRoleId: roleID, PrincipalObjectId: objectID})
	spki, err := x509.MarshalPKIXPublicKey(&svidKey.PublicKey)
	require.NoError(t, err)
	d.PutLocalIssuer(localIss, bridge.LocalIssuer{
		TrustDomain: "example.org",
		Authorities: []*ferrypb.JWTAuthority{{KeyId: localKID, PublicKey: spki}},
	})
	d.SetSigningKeys(bridgeKey.Public(), otherKey.Public())

	c := &clock{now: t0}
	cfg := bridge.Config{
		Directory:     d,
		Key:           bridgeKey,
		BaseURL:       baseURL,
		Clock:         c.Now,
		Logger:        slog.New(slog.NewTextHandler(testLogWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug})),
		TokenLifetime: func() time.Duration { return 75 * time.Minute },
	}
	switch t.(type) {
	case *testing.B, *testing.F:
		cfg.Logger = nil // benchmarks and fuzzing run quiet
	}
	for _, m := range mutate {
		m(&cfg)
	}
	b, err := bridge.New(cfg)
	require.NoError(t, err)
	return &fixture{dir: d, clock: c, bridge: b, h: b.Handler()}
}

// svid mints an ES256 assertion signed by the local trust domain's key.
func svid(t testing.TB, mutate ...func(jwt.MapClaims, map[string]any)) string {
	t.Helper()
	claims := jwt.MapClaims{
		"iss": localIss,
		"sub": spiffeID,
		"aud": []string{exchangeAz},
		"iat": t0.Add(-time.Minute).Unix(),
		"exp": t0.Add(4 * time.Minute).Unix(),
	}
	tok := jwt.NewWithClaims(jwt.SigningMethodES256, claims)
	tok.Header["kid"] = localKID
	tok.Header["typ"] = "JWT"
	for _, m := range mutate {
		m(claims, tok.Header)
	}
	s, err := tok.SignedString(svidKey)
	require.NoError(t, err)
	return s
}

func v2Form(assertion string) url.Values {
	return url.Values{
		"grant_type":            {"client_credentials"},
		"client_id":             {clientID},
		"client_assertion_type": {"urn:ietf:params:oauth:client-assertion-type:jwt-bearer"},
		"client_assertion":      {assertion},
		"client_info":           {"1"},
		"scope":                 {resURI + "/.default openid offline_access profile"},
	}
}

func v1Form(assertion string) url.Values {
	f := v2Form(assertion)
	f.Del("scope")
	f.Set("resource", resURI)
	return f
}

type response struct {
	status int
	header http.Header
	raw    []byte
	body   map[string]any
}

func (f *fixture) do(t testing.TB, req *http.Request) response {
	t.Helper()
	rec := httptest.NewRecorder()
	f.h.ServeHTTP(rec, req)
	res := response{status: rec.Code, header: rec.Header(), raw: rec.Body.Bytes()}
	dec := json.NewDecoder(rec.Body)
	dec.UseNumber()
	require.NoError(t, dec.Decode(&res.body), "body %q", res.raw)
	return res
}

func (f *fixture) post(t testing.TB, path string, form url.Values) response {
	t.Helper()
	req := httptest.NewRequest(http.MethodPost, path, strings.NewReader(form.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded; charset=utf-8")
	return f.do(t, req)
}

func (f *fixture) get(t testing.TB, path string) response {
	t.Helper()
	return f.do(t, httptest.NewRequest(http.MethodGet, path, nil))
}

const (
	v2Token = "/" + tenantID + "/oauth2/v2.0/token"
	v1Token = "/" + tenantID + "/oauth2/token"
)

// requireError checks Entra's error shape, status, error and AADSTS code.
func requireError(t testing.TB, res response, status int, kind string, code int) {
	t.Helper()
	require.Equal(t, status, res.status, "body: %s", res.raw)
	require.Equal(t, kind, res.body["error"], "body: %s", res.raw)
	require.Equal(t, []any{json.Number(itoa(code))}, res.body["error_codes"], "body: %s", res.raw)
	desc, _ := res.body["error_description"].(string)
	require.True(t, strings.HasPrefix(desc, "AADSTS"+itoa(code)+": "), desc)
	for _, k := range []string{"timestamp", "trace_id", "correlation_id"} {
		v, _ := res.body[k].(string)
		require.NotEmpty(t, v, k)
	}
	require.Contains(t, desc, "Trace ID: "+res.body["trace_id"].(string))
	require.Contains(t, desc, "Correlation ID: "+res.body["correlation_id"].(string))
	require.Contains(t, desc, "Timestamp: "+res.body["timestamp"].(string))
	require.Equal(t, baseURL+"/error?code="+itoa(code), res.body["error_uri"])
	require.Equal(t, "application/json; charset=utf-8", res.header.Get("Content-Type"))
	require.NotContains(t, string(res.raw), "access_token")
}

func itoa(n int) string { return big.NewInt(int64(n)).String() }

// jwksKey returns the RSA key with kid from a served JWKS.
func jwksKey(t testing.TB, f *fixture, path, kid string) *rsa.PublicKey {
	t.Helper()
	res := f.get(t, path)
	require.Equal(t, http.StatusOK, res.status)
	var set signing.JWKS
	require.NoError(t, json.Unmarshal(res.raw, &set))
	for _, k := range set.Keys {
		if k.Kid != kid {
			continue
		}
		require.Equal(t, "RSA", k.Kty)
		require.Equal(t, "sig", k.Use)
		require.Equal(t, kid, k.X5t)
		require.Len(t, k.X5c, 1)
		n, err := base64.RawURLEncoding.DecodeString(k.N)
		require.NoError(t, err)
		e, err := base64.RawURLEncoding.DecodeString(k.E)
		require.NoError(t, err)
		return &rsa.PublicKey{N: new(big.Int).SetBytes(n), E: int(new(big.Int).SetBytes(e).Int64())}
	}
	t.Fatalf("kid %q not in JWKS %s", kid, res.raw)
	return nil
}
