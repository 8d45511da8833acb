package gcpiit_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/attestors/node"
	"github.com/ferry-id/ferry/attestors/node/gcpiit"
	"github.com/ferry-id/ferry/attestors/node/metadata"
	"github.com/ferry-id/ferry/internal/selector"
	gcp "github.com/ferry-id/ferry/test/metadata/gcp"
	"github.com/ferry-id/ferry/test/metadata/testpki"
)

var td = spiffeid.RequireTrustDomainFromString("example.org")

func instance() gcp.Instance {
	return gcp.Instance{ProjectID: "ferry-prod", ProjectNumber: 123456789012, Zone: "europe-west1-b",
		InstanceID: "4526170237546731267", InstanceName: "web-1", ServiceAccount: "web@ferry-prod.iam.gserviceaccount.com"}
}

func client(ca *x509.Certificate) *http.Client {
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	return &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
}

func newServer(t *testing.T, g *gcp.Google, mod ...func(*gcpiit.ServerConfig)) *gcpiit.Server {
	t.Helper()
	c := gcpiit.ServerConfig{TrustDomain: td, ProjectIDs: []string{"ferry-prod"}, JWKSURL: g.JWKSURL(), HTTPClient: client(g.CA)}
	for _, m := range mod {
		m(&c)
	}
	s, err := gcpiit.NewServer(c)
	require.NoError(t, err)
	return s
}

func newAgent(t *testing.T, url string) *gcpiit.Agent {
	t.Helper()
	a, err := gcpiit.NewAgent(gcpiit.AgentConfig{MetadataURL: url, Client: metadata.Options{FirstBackoff: time.Millisecond, Budget: 20 * time.Second}})
	require.NoError(t, err)
	return a
}

func TestAttest(t *testing.T) {
	g := gcp.NewGoogle(t)
	md := gcp.Start(t, g, instance())
	md.FailNext(http.StatusServiceUnavailable, http.StatusTooManyRequests)
	res, err := node.Exchange(context.Background(), newAgent(t, md.URL()), newServer(t, g))
	require.NoError(t, err, "503 and 429 are retried")
	require.Equal(t, 3, md.Requests())
	require.Equal(t, "spiffe://example.org/spire/agent/gcp_iit/ferry-prod/4526170237546731267", res.AgentID.String())
	require.True(t, res.SingleAgent)
	var got []string
	for _, s := range res.Selectors {
		got = append(got, selector.Format(s))
		require.NoError(t, selector.MustRegistry(gcpiit.Selectors()).Check(selector.Node, s))
	}
	require.Equal(t, []string{
		"gcp_iit:instance-id:4526170237546731267", "gcp_iit:instance-name:web-1", "gcp_iit:project-id:ferry-prod",
		"gcp_iit:sa:web@ferry-prod.iam.gserviceaccount.com", "gcp_iit:zone:europe-west1-b",
	}, got)

	res, err = node.Exchange(context.Background(), newAgent(t, md.URL()), newServer(t, g, func(c *gcpiit.ServerConfig) { c.AllowReattestation = true }))
	require.NoError(t, err)
	require.True(t, res.CanReattest)
	require.False(t, res.SingleAgent)
}

func TestAgentErrors(t *testing.T) {
	g := gcp.NewGoogle(t)
	md := gcp.Start(t, g, instance())
	md.FailNext(http.StatusNotFound)
	_, err := newAgent(t, md.URL()).Payload(context.Background())
	require.ErrorContains(t, err, "404", "a final status is reported")

	a, err := gcpiit.NewAgent(gcpiit.AgentConfig{MetadataURL: "http://127.0.0.1:1", Client: metadata.Options{FirstBackoff: time.Millisecond, Budget: 200 * time.Millisecond}})
	require.NoError(t, err)
	_, err = a.Payload(context.Background())
	require.ErrorContains(t, err, "gave up")
	_, err = gcpiit.NewAgent(gcpiit.AgentConfig{ServiceAccount: "../x"})
	require.Error(t, err)

	// The stand-in refuses as Google's does.
	resp, err := http.Get(md.URL() + "/computeMetadata/v1/instance/service-accounts/default/identity?audience=x")
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusForbidden, resp.StatusCode)
	require.Equal(t, "Google", resp.Header.Get("Metadata-Flavor"))
}

func TestRefusals(t *testing.T) {
	g := gcp.NewGoogle(t)
	other := gcp.NewGoogle(t)
	now := time.Now()
	s := newServer(t, g)
	sign := func(signer *gcp.Google, mod func(jwt.MapClaims)) []byte {
		c := gcp.Claims(instance(), gcpiit.DefaultAudience, now)
		if mod != nil {
			mod(c)
		}
		tok, err := signer.Sign(c)
		require.NoError(t, err)
		return []byte(tok)
	}
	ce := func(key string, v any) func(jwt.MapClaims) {
		return func(c jwt.MapClaims) { c["google"].(map[string]any)["compute_engine"].(map[string]any)[key] = v }
	}
	hs256, _ := jwt.NewWithClaims(jwt.SigningMethodHS256, gcp.Claims(instance(), gcpiit.DefaultAudience, now)).SignedString([]byte("secret"))
	none, _ := jwt.NewWithClaims(jwt.SigningMethodNone, gcp.Claims(instance(), gcpiit.DefaultAudience, now)).SignedString(jwt.UnsafeAllowNoneSignatureType)
	cases := []struct {
		name  string
		token []byte
		want  string
	}{
		{"not a jwt", []byte("hello"), "token refused"},
		{"unknown key", sign(other, nil), "key not found"},
		{"hs256", []byte(hs256), "signing method HS256 is invalid"},
		{"none", []byte(none), "signing method none is invalid"},
		{"tampered", func() []byte {
			tok := string(sign(g, nil))
			parts := strings.Split(tok, ".")
			parts[1] = parts[1][:len(parts[1])-4] + "AAAA"
			return []byte(strings.Join(parts, "."))
		}(), "token refused"},
		{"wrong audience", sign(g, func(c jwt.MapClaims) { c["aud"] = "https://other.example" }), "audience"},
		{"expired", sign(g, func(c jwt.MapClaims) { c["exp"] = now.Add(-2 * time.Minute).Unix() }), "expired"},
		{"no exp", sign(g, func(c jwt.MapClaims) { delete(c, "exp") }), "exp claim is required"},
		{"issued in the future", sign(g, func(c jwt.MapClaims) { c["iat"] = now.Add(10 * time.Minute).Unix() }), "used before issued"},
		{"no iat", sign(g, func(c jwt.MapClaims) { delete(c, "iat") }), "no iat"},
		{"not google", sign(g, func(c jwt.MapClaims) { c["iss"] = "https://evil.example" }), "not Google"},
		{"no compute_engine", sign(g, func(c jwt.MapClaims) { delete(c, "google") }), "format=full"},
		{"project not allowed", sign(g, ce("project_id", "other-project")), "project other-project is not allowed"},
		{"bad instance id", sign(g, ce("instance_id", "../../x")), "not a GCP instance ID"},
		{"bad zone", sign(g, ce("zone", "moon")), "not a GCP zone"},
		{"unverified email", sign(g, func(c jwt.MapClaims) { c["email_verified"] = false }), "not verified"},
		{"oversized", []byte(strings.Repeat("a", node.MaxPayloadSize+1)), "over"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := s.Attest(context.Background(), tc.token, nil)
			require.ErrorContains(t, err, tc.want)
		})
	}
	_, err := s.Attest(context.Background(), sign(g, nil), nil)
	require.NoError(t, err, "the same server admits a well-made token")

	// Keys are fetched over https only, from a server the configured roots trust.
	plain := newServer(t, g, func(c *gcpiit.ServerConfig) { c.JWKSURL = strings.Replace(g.JWKSURL(), "https://", "http://", 1) })
	_, err = plain.Attest(context.Background(), sign(g, nil), nil)
	require.ErrorContains(t, err, "not an https URL")
	untrusted := newServer(t, g, func(c *gcpiit.ServerConfig) { c.HTTPClient = client(testpki.NewRoot(t, "x").Cert) })
	_, err = untrusted.Attest(context.Background(), sign(g, nil), nil)
	require.ErrorContains(t, err, "certificate")
}

func TestServerConfig(t *testing.T) {
	for name, c := range map[string]gcpiit.ServerConfig{
		"no projects":     {TrustDomain: td},
		"bad project":     {TrustDomain: td, ProjectIDs: []string{"Not A Project"}},
		"no trust domain": {ProjectIDs: []string{"ferry-prod"}},
	} {
		_, err := gcpiit.NewServer(c)
		require.Error(t, err, name)
	}
}
