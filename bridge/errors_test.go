package bridge_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/bridge"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

func b64(s string) string { return base64.RawURLEncoding.EncodeToString([]byte(s)) }

// unsigned builds a compact JWT with the given header and payload JSON and a
// junk signature.
func unsigned(header, payload string) string {
	return b64(header) + "." + b64(payload) + "." + b64("sig")
}

// claimsJSON is a valid payload for the local issuer at t0.
func claimsJSON() string {
	return `{"iss":"` + localIss + `","sub":"` + spiffeID + `","aud":"` + exchangeAz + `","exp":` + itoa(int(t0.Add(time.Minute).Unix())) + `}`
}

func TestTokenRequestErrors(t *testing.T) {
	f := newFixture(t)
	good := svid(t)
	withForm := func(mut func(url.Values)) func() *http.Request {
		return func() *http.Request {
			form := v2Form(good)
			mut(form)
			req := httptest.NewRequest(http.MethodPost, v2Token, strings.NewReader(form.Encode()))
			req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
			return req
		}
	}
	raw := func(method, path, ctype, body string) func() *http.Request {
		return func() *http.Request {
			req := httptest.NewRequest(method, path, strings.NewReader(body))
			if ctype != "" {
				req.Header.Set("Content-Type", ctype)
			}
			return req
		}
	}
	tests := []struct {
		name   string
		req    func() *http.Request
		status int
		kind   string
		code   int
	}{
		{"GET token endpoint", raw(http.MethodGet, v2Token, "", ""), 400, "invalid_request", bridge.CodeMethodNotAllowed},
		{"unknown tenant", raw(http.MethodPost, "/00000000-0000-0000-0000-000000000000/oauth2/v2.0/token", "application/x-www-form-urlencoded", v2Form(good).Encode()), 400, "invalid_tenant", bridge.CodeUnknownTenant},
		{"json body", raw(http.MethodPost, v2Token, "application/json", `{"grant_type":"client_credentials"}`), 400, "invalid_request", bridge.CodeMissingParameter},
		{"no content type", raw(http.MethodPost, v2Token, "", v2Form(good).Encode()), 400, "invalid_request", bridge.CodeMissingParameter},
		{"body too large", raw(http.MethodPost, v2Token, "application/x-www-form-urlencoded", v2Form(good).Encode()+"&pad="+strings.Repeat("a", 70<<10)), 413, "invalid_request", bridge.CodeInvalidRequest},
		{"bad form encoding", raw(http.MethodPost, v2Token, "application/x-www-form-urlencoded", "grant_type=%zz"), 400, "invalid_request", bridge.CodeInvalidRequest},
		{"duplicate parameter", raw(http.MethodPost, v2Token, "application/x-www-form-urlencoded", v2Form(good).Encode()+"&client_assertion=x"), 400, "invalid_request", bridge.CodeInvalidRequest},
		{"missing grant_type", withForm(func(v url.Values) { v.Del("grant_type") }), 400, "invalid_request", bridge.CodeMissingParameter},
		{"password grant", withForm(func(v url.Values) { v.Set("grant_type", "password") }), 400, "unsupported_grant_type", bridge.CodeUnsupportedGrantType},
		{"missing client_id", withForm(func(v url.Values) { v.Del("client_id") }), 400, "invalid_request", bridge.CodeMissingParameter},
		{"missing scope", withForm(func(v url.Values) { v.Del("scope") }), 400, "invalid_request", bridge.CodeMissingParameter},
		{"scope without .default", withForm(func(v url.Values) { v.Set("scope", resURI+"/read") }), 400, "invalid_scope", bridge.CodeScopeNotDefault},
		{"only oidc scopes", withForm(func(v url.Values) { v.Set("scope", "openid offline_access profile") }), 400, "invalid_scope", bridge.CodeScopeNotDefault},
		{"two resources", withForm(func(v url.Values) { v.Set("scope", resURI+"/.default api://x/.default") }), 400, "invalid_scope", bridge.CodeInvalidScope},
		{"bare /.default", withForm(func(v url.Values) { v.Set("scope", "/.default") }), 400, "invalid_scope", bridge.CodeInvalidScope},
		{"unknown resource", withForm(func(v url.Values) { v.Set("scope", "api://nope/.default") }), 400, "invalid_resource", bridge.CodeUnknownResource},
		{"client secret", withForm(func(v url.Values) { v.Set("client_secret", "s3cret") }), 401, "invalid_client", bridge.CodeMissingClientAssertion},
		{"missing assertion", withForm(func(v url.Values) { v.Del("client_assertion") }), 401, "invalid_client", bridge.CodeMissingClientAssertion},
		{"missing assertion type", withForm(func(v url.Values) { v.Del("client_assertion_type") }), 400, "invalid_request", bridge.CodeMissingParameter},
		{"wrong assertion type", withForm(func(v url.Values) {
			v.Set("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:saml2-bearer")
		}), 400, "invalid_request", bridge.CodeInvalidRequest},
		{"unknown client", withForm(func(v url.Values) { v.Set("client_id", "99999999-9999-4999-8999-999999999999") }), 400, "unauthorized_client", bridge.CodeUnknownClient},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			requireError(t, f.do(t, tt.req()), tt.status, tt.kind, tt.code)
		})
	}

	t.Run("v1 missing resource", func(t *testing.T) {
		form := v1Form(good)
		form.Del("resource")
		requireError(t, f.post(t, v1Token, form), 400, "invalid_request", bridge.CodeMissingParameter)
	})
	t.Run("v1 unknown resource", func(t *testing.T) {
		form := v1Form(good)
		form.Set("resource", "api://nope")
		requireError(t, f.post(t, v1Token, form), 400, "invalid_resource", bridge.CodeUnknownResource)
	})
	t.Run("correlation id echoed", func(t *testing.T) {
		req := withForm(func(v url.Values) { v.Del("grant_type") })()
		req.Header.Set("client-request-id", "0a1b2c3d-0000-4000-8000-aabbccddeeff")
		req.Header.Set("return-client-request-id", "true")
		res := f.do(t, req)
		require.Equal(t, "0a1b2c3d-0000-4000-8000-aabbccddeeff", res.body["correlation_id"])
		require.Equal(t, "0a1b2c3d-0000-4000-8000-aabbccddeeff", res.header.Get("client-request-id"))
	})
}

func TestAssertionErrors(t *testing.T) {
	f := newFixture(t)
	otherEC, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	p384, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	require.NoError(t, err)

	sign := func(m jwt.SigningMethod, key any, mut func(jwt.MapClaims, map[string]any)) string {
		claims := jwt.MapClaims{"iss": localIss, "sub": spiffeID, "aud": exchangeAz, "exp": t0.Add(time.Minute).Unix()}
		tok := jwt.NewWithClaims(m, claims)
		tok.Header["kid"] = localKID
		if mut != nil {
			mut(claims, tok.Header)
		}
		s, err := tok.SignedString(key)
		require.NoError(t, err)
		return s
	}
	claimsMut := func(k string, v any) func(jwt.MapClaims, map[string]any) {
		return func(c jwt.MapClaims, _ map[string]any) {
			if v == nil {
				delete(c, k)
			} else {
				c[k] = v
			}
		}
	}
	hdr := `{"alg":"ES256","kid":"` + localKID + `"}`
	tests := []struct {
		name      string
		assertion string
		status    int
		kind      string
		code      int
	}{
		{"not a jwt", "hello", 400, "invalid_request", bridge.CodeInvalidJWT},
		{"four parts", good(t) + ".x", 400, "invalid_request", bridge.CodeInvalidJWT},
		{"many dots", strings.Repeat(".", 5000), 400, "invalid_request", bridge.CodeInvalidJWT},
		{"oversized", b64(hdr) + "." + strings.Repeat("A", 20<<10) + ".sig", 400, "invalid_request", bridge.CodeInvalidJWT},
		{"alg none", unsigned(`{"alg":"none","kid":"`+localKID+`"}`, claimsJSON()), 400, "invalid_request", bridge.CodeInvalidJWT},
		{"alg None", unsigned(`{"alg":"None","kid":"`+localKID+`"}`, claimsJSON()), 400, "invalid_request", bridge.CodeInvalidJWT},
		{"alg NONE unsigned", b64(`{"alg":"NONE","kid":"`+localKID+`"}`) + "." + b64(claimsJSON()) + ".", 400, "invalid_request", bridge.CodeInvalidJWT},
		{"alg HS256", sign(jwt.SigningMethodHS256, []byte("secret"), nil), 400, "invalid_request", bridge.CodeInvalidJWT},
		{"alg EdDSA", unsigned(`{"alg":"EdDSA","kid":"`+localKID+`"}`, claimsJSON()), 400, "invalid_request", bridge.CodeInvalidJWT},
		{"jku header", sign(jwt.SigningMethodES256, svidKey, func(_ jwt.MapClaims, h map[string]any) { h["jku"] = "https://127.0.0.1/jwks" }), 400, "invalid_request", bridge.CodeInvalidJWT},
		{"x5u header", sign(jwt.SigningMethodES256, svidKey, func(_ jwt.MapClaims, h map[string]any) { h["x5u"] = "https://127.0.0.1/cert" }), 400, "invalid_request", bridge.CodeInvalidJWT},
		{"x5c header", sign(jwt.SigningMethodES256, svidKey, func(_ jwt.MapClaims, h map[string]any) { h["x5c"] = []string{"MIIB"} }), 400, "invalid_request", bridge.CodeInvalidJWT},
		{"jwk header", sign(jwt.SigningMethodES256, svidKey, func(_ jwt.MapClaims, h map[string]any) { h["jwk"] = map[string]any{"kty": "EC"} }), 400, "invalid_request", bridge.CodeInvalidJWT},
		{"crit header", sign(jwt.SigningMethodES256, svidKey, func(_ jwt.MapClaims, h map[string]any) { h["crit"] = []string{"exp"} }), 400, "invalid_request", bridge.CodeInvalidJWT},
		{"no kid", sign(jwt.SigningMethodES256, svidKey, func(_ jwt.MapClaims, h map[string]any) { delete(h, "kid") }), 400, "invalid_request", bridge.CodeInvalidJWT},
		{"typ at+jwt", sign(jwt.SigningMethodES256, svidKey, func(_ jwt.MapClaims, h map[string]any) { h["typ"] = "at+jwt" }), 400, "invalid_request", bridge.CodeInvalidJWT},
		{"missing exp", sign(jwt.SigningMethodES256, svidKey, claimsMut("exp", nil)), 400, "invalid_request", bridge.CodeInvalidJWT},
		{"string exp", sign(jwt.SigningMethodES256, svidKey, claimsMut("exp", "soon")), 400, "invalid_request", bridge.CodeInvalidJWT},
		{"missing sub", sign(jwt.SigningMethodES256, svidKey, claimsMut("sub", nil)), 400, "invalid_request", bridge.CodeInvalidJWT},
		{"missing aud", sign(jwt.SigningMethodES256, svidKey, claimsMut("aud", nil)), 400, "invalid_request", bridge.CodeInvalidJWT},
		{"numeric aud", sign(jwt.SigningMethodES256, svidKey, claimsMut("aud", 7)), 400, "invalid_request", bridge.CodeInvalidJWT},
		{"padded base64", b64(hdr) + "=." + b64(claimsJSON()) + ".c2ln", 400, "invalid_request", bridge.CodeInvalidJWT},
		{"unknown issuer", sign(jwt.SigningMethodES256, svidKey, claimsMut("iss", "https://evil.example.org")), 401, "invalid_client", bridge.CodeNoFICIssuer},
		{"issuer case", sign(jwt.SigningMethodES256, svidKey, claimsMut("iss", "https://OIDC.example.org")), 401, "invalid_client", bridge.CodeCaseOnlyMismatch},
		{"issuer trailing slash", sign(jwt.SigningMethodES256, svidKey, claimsMut("iss", localIss+"/")), 401, "invalid_client", bridge.CodeNoFICIssuer},
		{"unknown kid", sign(jwt.SigningMethodES256, svidKey, func(_ jwt.MapClaims, h map[string]any) { h["kid"] = "nope" }), 401, "invalid_client", bridge.CodeUnknownSigningKey},
		{"wrong key", sign(jwt.SigningMethodES256, otherEC, nil), 401, "invalid_client", bridge.CodeBadSignature},
		{"tampered payload", tamper(good(t)), 401, "invalid_client", bridge.CodeBadSignature},
		{"ES384 with P-256 kid", sign(jwt.SigningMethodES384, p384, nil), 401, "invalid_client", bridge.CodeBadSignature},
		{"RS256 with EC kid", sign(jwt.SigningMethodRS256, rsaIssKey1, nil), 401, "invalid_client", bridge.CodeBadSignature},
		{"expired", sign(jwt.SigningMethodES256, svidKey, claimsMut("exp", t0.Add(-61*time.Second).Unix())), 401, "invalid_client", bridge.CodeAssertionTime},
		{"not yet valid", sign(jwt.SigningMethodES256, svidKey, claimsMut("nbf", t0.Add(61*time.Second).Unix())), 401, "invalid_client", bridge.CodeAssertionTime},
		{"issued in future", sign(jwt.SigningMethodES256, svidKey, claimsMut("iat", t0.Add(61*time.Second).Unix())), 401, "invalid_client", bridge.CodeAssertionTime},
		{"wrong audience", sign(jwt.SigningMethodES256, svidKey, claimsMut("aud", "api://other")), 401, "invalid_client", bridge.CodeNoFICAudience},
		{"audience case", sign(jwt.SigningMethodES256, svidKey, claimsMut("aud", "API://AzureADTokenExchange")), 401, "invalid_client", bridge.CodeCaseOnlyMismatch},
		{"two audiences", sign(jwt.SigningMethodES256, svidKey, claimsMut("aud", []string{exchangeAz, "api://other"})), 401, "invalid_client", bridge.CodeNoFICAudience},
		{"wrong subject", sign(jwt.SigningMethodES256, svidKey, claimsMut("sub", "spiffe://example.org/ns/web/sa/backend")), 401, "invalid_client", bridge.CodeNoFICSubject},
		{"subject case", sign(jwt.SigningMethodES256, svidKey, claimsMut("sub", "spiffe://example.org/ns/web/sa/FRONTEND")), 401, "invalid_client", bridge.CodeCaseOnlyMismatch},
		{"own v2 token", sign(jwt.SigningMethodES256, svidKey, claimsMut("iss", baseURL+"/"+tenantID+"/v2.0")), 401, "invalid_client", bridge.CodeOwnTokenForbidden},
		{"own replica kid", sign(jwt.SigningMethodES256, svidKey, func(_ jwt.MapClaims, h map[string]any) { h["kid"] = otherKey.KID() }), 401, "invalid_client", bridge.CodeOwnTokenForbidden},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			requireError(t, f.post(t, v2Token, v2Form(tt.assertion)), tt.status, tt.kind, tt.code)
		})
	}
}

func good(t *testing.T) string { return svid(t) }

// tamper flips the subject in the payload and keeps the signature.
func tamper(tok string) string {
	parts := strings.Split(tok, ".")
	body, _ := base64.RawURLEncoding.DecodeString(parts[1])
	body = []byte(strings.Replace(string(body), "frontend", "frontenD", 1))
	return parts[0] + "." + base64.RawURLEncoding.EncodeToString(body) + "." + parts[2]
}

// A token the bridge issued, presented back as an assertion, is refused even
// when a credential names the bridge's issuer.
func TestOwnTokenRefused(t *testing.T) {
	f := newFixture(t)
	res := f.post(t, v2Token, v2Form(svid(t)))
	require.Equal(t, http.StatusOK, res.status)
	own := res.body["access_token"].(string)
	res = f.post(t, v1Token, v1Form(svid(t)))
	require.Equal(t, http.StatusOK, res.status)
	ownV1 := res.body["access_token"].(string)
	f.dir.SetFederatedCredentials(objectID, &ferrypb.FederatedCredential{
		IdentityObjectId: objectID, Name: "loop", Issuer: baseURL + "/" + tenantID + "/v2.0",
		Subject: objectID, Audiences: []string{resAppID},
	})
	requireError(t, f.post(t, v2Token, v2Form(own)), 401, "invalid_client", bridge.CodeOwnTokenForbidden)

	// A v1 token (issuer https://host/{tid}/) through the v1 endpoint, with a
	// credential naming the v1 issuer.
	f.dir.SetFederatedCredentials(objectID, &ferrypb.FederatedCredential{
		IdentityObjectId: objectID, Name: "loop-v1", Issuer: baseURL + "/" + tenantID + "/",
		Subject: objectID, Audiences: []string{resURI},
	})
	requireError(t, f.post(t, v1Token, v1Form(ownV1)), 401, "invalid_client", bridge.CodeOwnTokenForbidden)
}

// The bridge's issuer is refused for every tenant and every spelling of its
// host, before any credential is consulted, even when a credential names it.
func TestOwnIssuerRefused(t *testing.T) {
	f := newFixture(t)
	const otherTenant = "0a0a0a0a-0000-4000-8000-000000000001"
	for _, iss := range []string{
		baseURL + "/" + tenantID + "/v2.0",
		baseURL + "/" + otherTenant + "/v2.0",
		baseURL + "/" + otherTenant + "/",
		baseURL,
		"https://BRIDGE.test:8443/" + tenantID + "/v2.0",
	} {
		t.Run(iss, func(t *testing.T) {
			f.dir.SetFederatedCredentials(objectID, &ferrypb.FederatedCredential{
				IdentityObjectId: objectID, Name: "bridge-issuer", Issuer: iss, Subject: spiffeID, Audiences: []string{exchangeAz},
			})
			requireError(t, f.post(t, v2Token, v2Form(assertFrom(t, iss))), 401, "invalid_client", bridge.CodeOwnTokenForbidden)
		})
	}
	// Another host is not the bridge: the usual credential rules apply.
	requireError(t, f.post(t, v2Token, v2Form(assertFrom(t, "https://bridge.test:9443/"+tenantID+"/v2.0"))), 401, "invalid_client", bridge.CodeNoFICIssuer)

	// Without a configured base URL the request's host is the bridge's, and
	// the default port is implied.
	g := newFixture(t, func(c *bridge.Config) { c.BaseURL = "" })
	req := httptest.NewRequest(http.MethodPost, v2Token, strings.NewReader(v2Form(assertFrom(t, "https://login.bridge.test/"+tenantID+"/v2.0")).Encode()))
	req.Host = "login.bridge.test:443"
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	res := g.do(t, req)
	require.Equal(t, http.StatusUnauthorized, res.status)
	require.Equal(t, "invalid_client", res.body["error"])
	require.Contains(t, res.body["error_description"], fmt.Sprintf("AADSTS%d:", bridge.CodeOwnTokenForbidden))
}

// assertFrom mints an assertion from the local trust domain's key with issuer iss.
func assertFrom(t *testing.T, iss string) string {
	return svid(t, func(c jwt.MapClaims, _ map[string]any) { c["iss"] = iss })
}

// Expiry is honoured with a 60 s leeway, to the second.
func TestAssertionTimeBoundaries(t *testing.T) {
	f := newFixture(t)
	at := func(field string, offset time.Duration) string {
		return svid(t, func(c jwt.MapClaims, _ map[string]any) { c[field] = t0.Add(offset).Unix() })
	}
	require.Equal(t, 200, f.post(t, v2Token, v2Form(at("exp", -59*time.Second))).status)
	requireError(t, f.post(t, v2Token, v2Form(at("exp", -60*time.Second))), 401, "invalid_client", bridge.CodeAssertionTime)
	requireError(t, f.post(t, v2Token, v2Form(at("exp", -61*time.Second))), 401, "invalid_client", bridge.CodeAssertionTime)
	require.Equal(t, 200, f.post(t, v2Token, v2Form(at("nbf", 59*time.Second))).status)
	requireError(t, f.post(t, v2Token, v2Form(at("nbf", 61*time.Second))), 401, "invalid_client", bridge.CodeAssertionTime)
	require.Equal(t, 200, f.post(t, v2Token, v2Form(at("iat", 59*time.Second))).status)
	// A long-lived assertion (Kubernetes tokens live 24 h) is accepted.
	require.Equal(t, 200, f.post(t, v2Token, v2Form(at("exp", 24*time.Hour))).status)
}

type panicDir struct{ bridge.Directory }

func (panicDir) Tenant(string) (*ferrypb.Tenant, bool) { panic("directory exploded") }

func TestPanicBecomesEntraError(t *testing.T) {
	f := newFixture(t)
	b, err := bridge.New(bridge.Config{Directory: panicDir{f.dir}, Key: bridgeKey, BaseURL: baseURL, Clock: f.clock.Now})
	require.NoError(t, err)
	f.h = b.Handler()
	res := f.post(t, v2Token, v2Form(svid(t)))
	requireError(t, res, 500, "server_error", bridge.CodeTokenIssuance)
	require.NotContains(t, string(res.raw), "exploded")
}
