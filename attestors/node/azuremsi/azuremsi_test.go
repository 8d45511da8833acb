package azuremsi_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/attestors/node"
	"github.com/ferry-id/ferry/attestors/node/azuremsi"
	"github.com/ferry-id/ferry/attestors/node/metadata"
	"github.com/ferry-id/ferry/internal/selector"
	"github.com/ferry-id/ferry/test/oidcissuer"
)

const (
	tenant   = "72f988bf-86f1-41af-91ab-2d7cd011db47"
	oid      = "9a2b6c0e-3f1d-4e5a-8b7c-6d5e4f3a2b1c"
	audience = "api://ferry-node-attestation"
	vmMirid  = "/subscriptions/8d10da13-8125-4ba9-a717-bf7490507b3d/resourcegroups/RG-Web/providers/Microsoft.Compute/virtualMachines/vm-web-1"
	arcMirid = "/subscriptions/8d10da13-8125-4ba9-a717-bf7490507b3d/resourceGroups/rg-edge/providers/Microsoft.HybridCompute/machines/edge-7"
)

var td = spiffeid.RequireTrustDomainFromString("example.org")

// tenantAuthority is an Entra tenant's issuer (v1 form: https://host/<tenant>/).
func tenantAuthority(t testing.TB) *oidcissuer.Issuer {
	t.Helper()
	iss, err := oidcissuer.Start(oidcissuer.Config{Path: "/" + tenant + "/"})
	require.NoError(t, err)
	t.Cleanup(func() { iss.Close() })
	return iss
}

func mint(t testing.TB, iss *oidcissuer.Issuer, mod func(*oidcissuer.Token)) string {
	t.Helper()
	tok := oidcissuer.Token{Subject: oid, Audience: audience, Lifetime: time.Hour,
		Claims: map[string]any{"tid": tenant, "oid": oid, "xms_mirid": vmMirid, "ver": "1.0", "idtyp": "app"}}
	if mod != nil {
		mod(&tok)
	}
	s, err := iss.Mint(tok)
	require.NoError(t, err)
	return s
}

func newServer(t testing.TB, iss *oidcissuer.Issuer, mod ...func(*azuremsi.ServerConfig)) *azuremsi.Server {
	t.Helper()
	base := strings.TrimSuffix(iss.URL(), "/"+tenant+"/")
	c := azuremsi.ServerConfig{TrustDomain: td, Tenants: []string{tenant}, Audience: audience,
		Issuers: []string{base + "/{tenant}/"}, HTTPClient: iss.Client()}
	for _, m := range mod {
		m(&c)
	}
	s, err := azuremsi.NewServer(c)
	require.NoError(t, err)
	return s
}

// endpoint is a managed-identity endpoint for one token: VM style, or Arc
// style with its challenge file in dir.
type endpoint struct {
	srv   *httptest.Server
	dir   string
	token func() string

	mu      sync.Mutex
	secret  string
	realm   string // overrides the challenge path
	queries []string
}

func newEndpoint(t *testing.T, arc bool, token func() string) *endpoint {
	e := &endpoint{dir: t.TempDir(), token: token}
	e.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		e.mu.Lock()
		defer e.mu.Unlock()
		e.queries = append(e.queries, r.URL.RawQuery)
		if r.Header.Get("Metadata") != "true" {
			w.WriteHeader(http.StatusBadRequest)
			_, _ = fmt.Fprint(w, `{"error":"invalid_request","error_description":"Required metadata header not specified"}`)
			return
		}
		if arc && (e.secret == "" || r.Header.Get("Authorization") != "Basic "+e.secret) {
			b := make([]byte, 16)
			_, _ = rand.Read(b)
			e.secret = hex.EncodeToString(b)
			path := filepath.Join(e.dir, hex.EncodeToString(b[:4])+".key")
			_ = os.WriteFile(path, []byte(e.secret), 0o600)
			if e.realm != "" {
				path = e.realm
			}
			w.Header().Set("WWW-Authenticate", "Basic realm="+path)
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		_ = json.NewEncoder(w).Encode(map[string]string{"access_token": e.token(), "token_type": "Bearer", "resource": r.URL.Query().Get("resource")})
	}))
	t.Cleanup(e.srv.Close)
	return e
}

func agent(t *testing.T, e *endpoint, arc bool) *azuremsi.Agent {
	t.Helper()
	c := azuremsi.AgentConfig{Resource: audience, Arc: arc, ArcTokenDir: e.dir, Client: metadata.Options{FirstBackoff: time.Millisecond, Budget: 10 * time.Second}}
	if arc {
		c.IdentityEndpoint = e.srv.URL + "/metadata/identity/oauth2/token"
	} else {
		c.MetadataURL = e.srv.URL
	}
	a, err := azuremsi.NewAgent(c)
	require.NoError(t, err)
	return a
}

func TestAttestVMAndArc(t *testing.T) {
	iss := tenantAuthority(t)
	s := newServer(t, iss)
	vm := newEndpoint(t, false, func() string { return mint(t, iss, nil) })
	res, err := node.Exchange(context.Background(), agent(t, vm, false), s)
	require.NoError(t, err)
	require.Equal(t, "spiffe://example.org/spire/agent/azure_msi/"+tenant+"/"+oid, res.AgentID.String())
	require.True(t, res.SingleAgent)
	require.Contains(t, vm.queries[0], "api-version=2018-02-01")
	var got []string
	for _, sel := range res.Selectors {
		got = append(got, selector.Format(sel))
		require.NoError(t, selector.MustRegistry(azuremsi.Selectors()).Check(selector.Node, sel))
	}
	require.Equal(t, []string{
		"azure_msi:machine-name:vm-web-1", "azure_msi:machine-type:vm", "azure_msi:principal-id:" + oid,
		"azure_msi:resource-group:rg-web", "azure_msi:subscription-id:8d10da13-8125-4ba9-a717-bf7490507b3d",
		"azure_msi:tenant-id:" + tenant,
	}, got)

	arc := newEndpoint(t, true, func() string {
		return mint(t, iss, func(tok *oidcissuer.Token) { tok.Claims["xms_mirid"] = arcMirid })
	})
	res, err = node.Exchange(context.Background(), agent(t, arc, true), s)
	require.NoError(t, err)
	require.Len(t, arc.queries, 2, "a challenge, then the token")
	require.Contains(t, arc.queries[0], "api-version=2020-06-01")
	require.Contains(t, fmt.Sprint(res.Selectors), "machine-type:arc")
	require.Contains(t, fmt.Sprint(res.Selectors), "machine-name:edge-7")
}

func TestArcChallengeChecks(t *testing.T) {
	iss := tenantAuthority(t)
	outside := filepath.Join(t.TempDir(), "x.key")
	require.NoError(t, os.WriteFile(outside, []byte("s"), 0o600))
	for name, c := range map[string]struct{ realm, want string }{
		"outside the token dir": {outside, "not a .key file directly in"},
		"traversal":             {"", "not a .key file directly in"},
		"not a .key":            {"", "not a .key file"},
		"too big":               {"", "at most 4096 bytes"},
		"missing":               {"", "no such file"},
	} {
		t.Run(name, func(t *testing.T) {
			e := newEndpoint(t, true, func() string { return mint(t, iss, nil) })
			switch name {
			case "traversal":
				c.realm = e.dir + "/../" + filepath.Base(e.dir) + "/a.key"
			case "not a .key":
				c.realm = filepath.Join(e.dir, "a.txt")
			case "too big":
				c.realm = filepath.Join(e.dir, "big.key")
				require.NoError(t, os.WriteFile(c.realm, make([]byte, 4097), 0o600))
			case "missing":
				c.realm = filepath.Join(e.dir, "gone.key")
			}
			e.realm = c.realm
			_, err := agent(t, e, true).Payload(context.Background())
			require.ErrorContains(t, err, c.want)
		})
	}
	e := newEndpoint(t, false, func() string { return "" })
	_, err := agent(t, e, false).Payload(context.Background())
	require.ErrorContains(t, err, "no access_token")
	_, err = azuremsi.NewAgent(azuremsi.AgentConfig{})
	require.ErrorContains(t, err, "resource is required")
}

func TestRefusals(t *testing.T) {
	iss := tenantAuthority(t)
	other := tenantAuthority(t)
	s := newServer(t, iss)
	pl := func(tok string) []byte { b, _ := json.Marshal(map[string]string{"token": tok}); return b }
	hs, _ := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.MapClaims{"iss": iss.URL(), "aud": audience, "exp": time.Now().Add(time.Hour).Unix()}).SignedString([]byte("k"))
	cases := []struct {
		name    string
		payload []byte
		want    string
	}{
		{"malformed", []byte("{"), "malformed payload"},
		{"not a jwt", pl("x.y"), "token is malformed"},
		{"issuer not configured", pl(mint(t, other, nil)), "is not a configured tenant's"},
		{"claims another issuer", pl(mint(t, other, func(tok *oidcissuer.Token) { tok.Issuer = iss.URL() })), "key not found"},
		{"hs256", pl(hs), "signing method HS256 is invalid"},
		{"wrong audience", pl(mint(t, iss, func(tok *oidcissuer.Token) { tok.Audience = "https://management.azure.com/" })), "invalid audience"},
		{"expired", pl(mint(t, iss, func(tok *oidcissuer.Token) { tok.IssuedAt = time.Now().Add(-3 * time.Hour) })), "expired"},
		{"tenant mismatch", pl(mint(t, iss, func(tok *oidcissuer.Token) { tok.Claims["tid"] = "00000000-0000-0000-0000-000000000000" })), "from the issuer of tenant"},
		{"no oid", pl(mint(t, iss, func(tok *oidcissuer.Token) { delete(tok.Claims, "oid") })), "oid"},
		{"bad xms_mirid", pl(mint(t, iss, func(tok *oidcissuer.Token) { tok.Claims["xms_mirid"] = "/subscriptions/x" })), "not an ARM resource ID"},
		{"bad machine name", pl(mint(t, iss, func(tok *oidcissuer.Token) { tok.Claims["xms_mirid"] = strings.Replace(vmMirid, "vm-web-1", "a b", 1) })), "not an Azure resource name"},
		{"oversized", []byte(strings.Repeat("a", node.MaxPayloadSize+1)), "over"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := s.Attest(context.Background(), tc.payload, nil)
			require.ErrorContains(t, err, tc.want)
		})
	}
	res, err := s.Attest(context.Background(), pl(mint(t, iss, func(tok *oidcissuer.Token) {
		tok.Claims["xms_mirid"] = "/subscriptions/8d10da13-8125-4ba9-a717-bf7490507b3d/resourceGroups/ids/providers/Microsoft.ManagedIdentity/userAssignedIdentities/node-id"
	})), nil)
	require.NoError(t, err, "the same server admits a well-made token")
	require.Contains(t, fmt.Sprint(res.Selectors), "identity-name:node-id")
}

func TestServerConfig(t *testing.T) {
	for name, c := range map[string]azuremsi.ServerConfig{
		"no tenants":      {TrustDomain: td, Audience: audience},
		"no audience":     {TrustDomain: td, Tenants: []string{tenant}},
		"bad tenant":      {TrustDomain: td, Tenants: []string{"contoso"}, Audience: audience},
		"http issuer":     {TrustDomain: td, Tenants: []string{tenant}, Audience: audience, Issuers: []string{"http://x/{tenant}/"}},
		"no placeholder":  {TrustDomain: td, Tenants: []string{tenant}, Audience: audience, Issuers: []string{"https://x/"}},
		"no trust domain": {Tenants: []string{tenant}, Audience: audience},
	} {
		_, err := azuremsi.NewServer(c)
		require.Error(t, err, name)
	}
}
