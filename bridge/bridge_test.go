package bridge_test

import (
	"encoding/json"
	"net/http"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/bridge"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

func parseAccessToken(t *testing.T, f *fixture, tok, jwksPath string) (*jwt.Token, jwt.MapClaims) {
	t.Helper()
	claims := jwt.MapClaims{}
	parsed, err := jwt.ParseWithClaims(tok, claims, func(tk *jwt.Token) (any, error) {
		kid, _ := tk.Header["kid"].(string)
		return jwksKey(t, f, jwksPath, kid), nil
	}, jwt.WithValidMethods([]string{"RS256"}), jwt.WithTimeFunc(f.clock.Now), jwt.WithExpirationRequired())
	require.NoError(t, err)
	return parsed, claims
}

func TestExchangeV2(t *testing.T) {
	f := newFixture(t)

	// What MSAL reads first: the tenant metadata.
	md := f.get(t, "/"+tenantID+"/v2.0/.well-known/openid-configuration")
	require.Equal(t, http.StatusOK, md.status)
	require.Equal(t, baseURL+"/"+tenantID+"/v2.0", md.body["issuer"])
	require.Equal(t, baseURL+"/"+tenantID+"/oauth2/v2.0/token", md.body["token_endpoint"])
	require.Equal(t, baseURL+"/"+tenantID+"/oauth2/v2.0/authorize", md.body["authorization_endpoint"])
	jwksURI := md.body["jwks_uri"].(string)
	require.Equal(t, baseURL+"/"+tenantID+"/discovery/v2.0/keys", jwksURI)
	require.Equal(t, []any{"RS256"}, md.body["id_token_signing_alg_values_supported"])

	req := f.post(t, v2Token, v2Form(svid(t)))
	require.Equal(t, http.StatusOK, req.status, "%s", req.raw)
	require.Equal(t, "no-store, no-cache", req.header.Get("Cache-Control"))
	// Numbers, as Entra's v2 endpoint; no scope (MSAL rejects a scope it did not ask for).
	require.Equal(t, "Bearer", req.body["token_type"])
	require.Equal(t, json.Number("4500"), req.body["expires_in"])
	require.Equal(t, json.Number("4500"), req.body["ext_expires_in"])
	require.NotContains(t, req.body, "scope")
	require.NotContains(t, req.body, "refresh_token")
	require.Len(t, req.body, 4)

	parsed, c := parseAccessToken(t, f, req.body["access_token"].(string), jwksURI[len(baseURL):])
	require.Equal(t, "JWT", parsed.Header["typ"])
	require.Equal(t, bridgeKey.KID(), parsed.Header["kid"])
	require.NotContains(t, parsed.Header, "x5t")

	iss := baseURL + "/" + tenantID + "/v2.0"
	require.Equal(t, resAppID, c["aud"])
	require.Equal(t, iss, c["iss"])
	require.Equal(t, iss, c["idp"])
	require.Equal(t, float64(t0.Add(-5*time.Minute).Unix()), c["iat"])
	require.Equal(t, float64(t0.Add(-5*time.Minute).Unix()), c["nbf"])
	require.Equal(t, float64(t0.Add(75*time.Minute).Unix()), c["exp"])
	require.Equal(t, clientID, c["azp"])
	require.Equal(t, "2", c["azpacr"])
	require.NotContains(t, c, "appid")
	require.NotContains(t, c, "appidacr")
	require.Equal(t, objectID, c["oid"])
	require.Equal(t, objectID, c["sub"])
	require.Equal(t, tenantID, c["tid"])
	require.Equal(t, "2.0", c["ver"])
	require.Equal(t, "app", c["idtyp"])
	require.Equal(t, "/subscriptions/"+tenantID+"/resourceGroups/ferry/providers/Microsoft.ManagedIdentity/userAssignedIdentities/web", c["xms_mirid"], "a managed identity's token names its resource, as Entra's")
	require.Equal(t, []any{"Orders.Read"}, c["roles"])
	require.Len(t, c["uti"], 22)

	// A second exchange of the same assertion works (no one-time jti) and gets a new uti.
	again := f.post(t, v2Token, v2Form(svid(t)))
	require.Equal(t, http.StatusOK, again.status)
	_, c2 := parseAccessToken(t, f, again.body["access_token"].(string), jwksURI[len(baseURL):])
	require.NotEqual(t, c["uti"], c2["uti"])
}

func TestExchangeV1(t *testing.T) {
	f := newFixture(t)
	md := f.get(t, "/"+tenantID+"/.well-known/openid-configuration")
	require.Equal(t, http.StatusOK, md.status)
	require.Equal(t, baseURL+"/"+tenantID+"/", md.body["issuer"])
	require.Equal(t, baseURL+"/"+tenantID+"/oauth2/token", md.body["token_endpoint"])
	jwksURI := md.body["jwks_uri"].(string)
	require.Equal(t, baseURL+"/common/discovery/keys", jwksURI)

	res := f.post(t, v1Token, v1Form(svid(t)))
	require.Equal(t, http.StatusOK, res.status, "%s", res.raw)
	// Strings, as Entra's v1 endpoint.
	require.Equal(t, "Bearer", res.body["token_type"])
	require.Equal(t, "4500", res.body["expires_in"])
	require.Equal(t, "4500", res.body["ext_expires_in"])
	require.Equal(t, itoa(int(t0.Add(75*time.Minute).Unix())), res.body["expires_on"])
	require.Equal(t, itoa(int(t0.Add(-5*time.Minute).Unix())), res.body["not_before"])
	require.Equal(t, resURI, res.body["resource"])

	parsed, c := parseAccessToken(t, f, res.body["access_token"].(string), jwksURI[len(baseURL):])
	require.Equal(t, bridgeKey.KID(), parsed.Header["kid"])
	require.Equal(t, bridgeKey.KID(), parsed.Header["x5t"])
	iss := baseURL + "/" + tenantID + "/"
	require.Equal(t, resURI, c["aud"])
	require.Equal(t, iss, c["iss"])
	require.Equal(t, iss, c["idp"])
	require.Equal(t, clientID, c["appid"])
	require.Equal(t, "2", c["appidacr"])
	require.NotContains(t, c, "azp")
	require.Equal(t, "1.0", c["ver"])
	require.Equal(t, "app", c["idtyp"])
	require.Equal(t, objectID, c["oid"])
	require.Equal(t, []any{"Orders.Read"}, c["roles"])

	// v1 by app ID: aud is what was requested.
	form := v1Form(svid(t))
	form.Set("resource", resAppID)
	res = f.post(t, v1Token, form)
	require.Equal(t, http.StatusOK, res.status, "%s", res.raw)
	_, c = parseAccessToken(t, f, res.body["access_token"].(string), "/common/discovery/keys")
	require.Equal(t, resAppID, c["aud"])
}

// A resource named with or without a trailing slash, when only the other
// form is registered, is that resource; a v1 token's aud and the response's
// resource are what was asked for, byte for byte, as Entra issues them (its
// guidance: an API expecting https://database.windows.net/ in aud is asked
// for as https://database.windows.net//.default). A v2 token's aud is the
// app ID either way.
func TestExchangeTrailingSlash(t *testing.T) {
	f := newFixture(t)
	const slashed = "https://db.example.org/"
	f.dir.PutResource(&ferrypb.Resource{ObjectId: "db", AppId: "33333333-3333-4333-8333-333333333333", TenantId: tenantID, IdentifierUris: []string{slashed}})
	for _, tc := range []struct{ requested, registered string }{
		{resURI + "/", resURI},              // registered without the slash
		{resURI, resURI},                    // exact
		{"https://db.example.org", slashed}, // registered with it
		{slashed, slashed},                  // exact
	} {
		form := v1Form(svid(t))
		form.Set("resource", tc.requested)
		res := f.post(t, v1Token, form)
		require.Equal(t, http.StatusOK, res.status, "%s: %s", tc.requested, res.raw)
		require.Equal(t, tc.requested, res.body["resource"])
		_, c := parseAccessToken(t, f, res.body["access_token"].(string), "/common/discovery/keys")
		require.Equal(t, tc.requested, c["aud"], "v1 aud is the resource as requested")

		form = v2Form(svid(t))
		form.Set("scope", tc.requested+"/.default")
		res = f.post(t, v2Token, form)
		require.Equal(t, http.StatusOK, res.status, "%s: %s", tc.requested, res.raw)
		_, c = parseAccessToken(t, f, res.body["access_token"].(string), "/common/discovery/keys")
		want := resAppID
		if tc.registered == slashed {
			want = "33333333-3333-4333-8333-333333333333"
		}
		require.Equal(t, want, c["aud"])
	}
	// Two slashes are not one.
	form := v1Form(svid(t))
	form.Set("resource", resURI+"//")
	res := f.post(t, v1Token, form)
	require.Equal(t, http.StatusBadRequest, res.status, "%s", res.raw)
	require.Equal(t, "invalid_resource", res.body["error"])
}

func TestExchangeWithoutRoles(t *testing.T) {
	f := newFixture(t)
	f.dir.PutResource(&ferrypb.Resource{ObjectId: "other", AppId: "22222222-2222-4222-8222-222222222222", TenantId: tenantID, IdentifierUris: []string{"https://other.example.org"}})
	form := v2Form(svid(t))
	// Entra accepts a trailing slash before /.default.
	form.Set("scope", "https://other.example.org//.default")
	res := f.post(t, v2Token, form)
	require.Equal(t, http.StatusOK, res.status, "%s", res.raw)
	_, c := parseAccessToken(t, f, res.body["access_token"].(string), "/common/discovery/keys")
	require.NotContains(t, c, "roles")
}

func TestExchangeWithClaimsExpression(t *testing.T) {
	f := newFixture(t)
	f.dir.SetFederatedCredentials(objectID, &ferrypb.FederatedCredential{
		IdentityObjectId: objectID, Name: "all-web", Issuer: localIss,
		ClaimsMatchingExpression: "claims['sub'] matches 'spiffe://example.org/ns/web/*' and claims['aud'] eq '" + exchangeAz + "'",
		Audiences:                []string{exchangeAz},
	})
	res := f.post(t, v2Token, v2Form(svid(t)))
	require.Equal(t, http.StatusOK, res.status, "%s", res.raw)

	other := svid(t, func(c jwt.MapClaims, _ map[string]any) { c["sub"] = "spiffe://example.org/ns/db/sa/x" })
	requireError(t, f.post(t, v2Token, v2Form(other)), http.StatusUnauthorized, "invalid_client", bridge.CodeNoFICSubject)
}

func TestTokenLifetimeDefault(t *testing.T) {
	f := newFixture(t, func(c *bridge.Config) { c.TokenLifetime = nil })
	for range 5 {
		res := f.post(t, v2Token, v2Form(svid(t)))
		require.Equal(t, http.StatusOK, res.status)
		in, err := res.body["expires_in"].(json.Number).Int64()
		require.NoError(t, err)
		require.GreaterOrEqual(t, in, int64(3600))
		require.LessOrEqual(t, in, int64(5400))
	}
}

func TestMetadataErrorsAndCommon(t *testing.T) {
	f := newFixture(t)
	for _, p := range []string{
		"/nope/v2.0/.well-known/openid-configuration",
		"/nope/.well-known/openid-configuration",
		"/nope/discovery/v2.0/keys",
		"/nope/discovery/keys",
	} {
		requireError(t, f.get(t, p), http.StatusBadRequest, "invalid_tenant", bridge.CodeUnknownTenant)
	}
	res := f.get(t, "/common/v2.0/.well-known/openid-configuration")
	require.Equal(t, http.StatusOK, res.status)
	require.Equal(t, baseURL+"/{tenantid}/v2.0", res.body["issuer"])

	// Every replica's key is listed once, this replica's included.
	keys := f.get(t, "/common/discovery/keys")
	require.Equal(t, http.StatusOK, keys.status)
	var set struct{ Keys []map[string]any }
	require.NoError(t, json.Unmarshal(keys.raw, &set))
	require.Len(t, set.Keys, 2)
	jwksKey(t, f, "/common/discovery/keys", otherKey.KID())
}

func TestBaseURLFromHost(t *testing.T) {
	f := newFixture(t, func(c *bridge.Config) { c.BaseURL = "" })
	res := f.get(t, "/"+tenantID+"/v2.0/.well-known/openid-configuration")
	// httptest.NewRequest uses Host example.com.
	require.Equal(t, "https://example.com/"+tenantID+"/v2.0", res.body["issuer"])

	_, err := bridge.New(bridge.Config{Directory: f.dir, Key: bridgeKey, BaseURL: "http://bridge"})
	require.Error(t, err)
	_, err = bridge.New(bridge.Config{Directory: f.dir})
	require.ErrorContains(t, err, "bridge: ")
}
