// Package gcp stands in for Compute Engine's metadata server and Google's
// token keys, for tests of the gcp_iit node attestor: the identity path with
// its audience and format parameters, the Metadata-Flavor: Google header both
// ways (403 without it), and RS256 instance identity tokens shaped as
// Google's full-format ones, whose keys a JWKS endpoint serves over HTTPS
// with a test CA (Google's www.googleapis.com/oauth2/v3/certs).
package gcp

import (
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/ferry-id/ferry/attestors/node/gcpiit"
	"github.com/ferry-id/ferry/test/metadata/testpki"
)

// Instance is what tokens say about the machine.
type Instance struct {
	ProjectID, Zone, InstanceID, InstanceName, ServiceAccount string
	ProjectNumber                                             int64
}

// Google is the token issuer: its signing key and its JWKS endpoint.
type Google struct {
	key  *testpki.CA
	kid  string
	jwks *httptest.Server
	// CA is the root the JWKS endpoint's TLS certificate chains to.
	CA *x509.Certificate
}

// NewGoogle starts a JWKS endpoint on a loopback port until the test ends.
func NewGoogle(t testing.TB) *Google {
	t.Helper()
	root := testpki.NewRoot(t, "Test GTS Root R1")
	tlsLeaf := root.Leaf(t, "127.0.0.1")
	g := &Google{key: root.Leaf(t, "token signer"), CA: root.Cert}
	b := make([]byte, 20)
	_, _ = rand.Read(b)
	g.kid = fmt.Sprintf("%x", b)
	pub := g.key.Key.PublicKey
	body, _ := json.Marshal(map[string]any{"keys": []map[string]string{{
		"e": base64.RawURLEncoding.EncodeToString(big.NewInt(int64(pub.E)).Bytes()), "kty": "RSA", "alg": "RS256",
		"n": base64.RawURLEncoding.EncodeToString(pub.N.Bytes()), "use": "sig", "kid": g.kid,
	}}})
	g.jwks = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/oauth2/v3/certs" {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "application/json; charset=UTF-8")
		_, _ = w.Write(body)
	}))
	g.jwks.TLS = &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{tlsLeaf.Cert.Raw}, PrivateKey: tlsLeaf.Key}}}
	g.jwks.StartTLS()
	t.Cleanup(g.jwks.Close)
	return g
}

// JWKSURL is the keys' URL, as the server's jwks_url.
func (g *Google) JWKSURL() string { return g.jwks.URL + "/oauth2/v3/certs" }

// Claims are a full-format token's claims for inst and audience, issued now.
func Claims(inst Instance, audience string, now time.Time) jwt.MapClaims {
	return jwt.MapClaims{
		"aud": audience, "azp": "110" + inst.InstanceID, "email": inst.ServiceAccount, "email_verified": true,
		"exp": now.Add(time.Hour).Unix(), "iat": now.Unix(), "iss": gcpiit.Issuer, "sub": "110" + inst.InstanceID,
		"google": map[string]any{"compute_engine": map[string]any{
			"instance_creation_timestamp": now.Add(-24 * time.Hour).Unix(), "instance_id": inst.InstanceID,
			"instance_name": inst.InstanceName, "project_id": inst.ProjectID, "project_number": inst.ProjectNumber, "zone": inst.Zone,
		}},
	}
}

// Sign returns claims as an RS256 JWT with Google's header (alg, kid, typ).
func (g *Google) Sign(claims jwt.Claims) (string, error) {
	tok := jwt.NewWithClaims(jwt.SigningMethodRS256, claims)
	tok.Header["kid"] = g.kid
	return tok.SignedString(g.key.Key)
}

// Metadata is a running metadata server stand-in.
type Metadata struct {
	srv    *httptest.Server
	google *Google

	mu       sync.Mutex
	inst     Instance
	fail     []int
	requests int
}

// Start serves the metadata server for inst on a loopback port until the
// test ends.
func Start(t testing.TB, g *Google, inst Instance) *Metadata {
	t.Helper()
	m := &Metadata{google: g, inst: inst}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	m.srv = httptest.NewUnstartedServer(http.HandlerFunc(m.serve))
	m.srv.Listener.Close()
	m.srv.Listener = l
	m.srv.Start()
	t.Cleanup(m.srv.Close)
	return m
}

// URL is the base URL, as the agent's metadata_url (GCE_METADATA_HOST).
func (m *Metadata) URL() string { return m.srv.URL }

// SetInstance changes what later tokens say.
func (m *Metadata) SetInstance(i Instance) { m.mu.Lock(); m.inst = i; m.mu.Unlock() }

// FailNext makes the next requests answer these statuses, in order.
func (m *Metadata) FailNext(statuses ...int) {
	m.mu.Lock()
	m.fail = append(m.fail, statuses...)
	m.mu.Unlock()
}

// Requests counts the requests answered so far.
func (m *Metadata) Requests() int { m.mu.Lock(); defer m.mu.Unlock(); return m.requests }

func (m *Metadata) serve(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Metadata-Flavor", "Google")
	w.Header().Set("Content-Type", "text/html")
	m.mu.Lock()
	m.requests++
	inst := m.inst
	var fail int
	if len(m.fail) > 0 {
		fail, m.fail = m.fail[0], m.fail[1:]
	}
	m.mu.Unlock()
	switch {
	case fail != 0:
		w.WriteHeader(fail)
		return
	case r.Header.Get("Metadata-Flavor") != "Google" || r.Header.Get("X-Forwarded-For") != "":
		w.WriteHeader(http.StatusForbidden)
		_, _ = fmt.Fprint(w, "Your client does not have permission to get URL from this server. Missing Metadata-Flavor:Google header.")
		return
	case r.Method != http.MethodGet:
		w.WriteHeader(http.StatusMethodNotAllowed)
		return
	case r.URL.Path != "/computeMetadata/v1/instance/service-accounts/default/identity" &&
		r.URL.Path != "/computeMetadata/v1/instance/service-accounts/"+inst.ServiceAccount+"/identity":
		w.WriteHeader(http.StatusNotFound)
		return
	}
	aud := r.URL.Query().Get("audience")
	if aud == "" {
		w.WriteHeader(http.StatusBadRequest)
		_, _ = fmt.Fprint(w, "non-empty audience parameter required")
		return
	}
	claims := Claims(inst, aud, time.Now())
	if r.URL.Query().Get("format") != "full" {
		delete(claims, "google")
	}
	tok, err := m.google.Sign(claims)
	if err != nil {
		w.WriteHeader(http.StatusInternalServerError)
		return
	}
	_, _ = fmt.Fprint(w, tok)
}
