package federation_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	gofed "github.com/spiffe/go-spiffe/v2/federation"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/ca"
	"github.com/ferry-id/ferry/server/federation"
)

// ourDomain is a trust domain served by our code: a store holding the bundle
// its CA published, and the CA.
type ourDomain struct {
	c  *fakeCluster
	ca *ca.CA
}

func newOurDomain(t testing.TB, td string) *ourDomain {
	c := newFakeCluster(t)
	return &ourDomain{c: c, ca: newCA(t, td, storePublisher{c: c, td: td}, time.Hour, nil)}
}

// serve runs an endpoint on loopback until the test ends and returns its URL.
func serve(t *testing.T, e *federation.Endpoint) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- e.Serve(ctx, lis) }()
	t.Cleanup(func() {
		cancel()
		require.NoError(t, <-done)
	})
	return "https://" + lis.Addr().String()
}

func TestEndpointHTTPSSPIFFE(t *testing.T) {
	d := newOurDomain(t, ourTD.Name())
	cert := serverCert(t, d.ca)
	e, err := federation.NewEndpoint(federation.EndpointConfig{TrustDomain: ourTD, Store: d.c.store, Profile: federation.ProfileHTTPSSPIFFE,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return cert, nil }, RefreshHint: 90 * time.Second, Logger: testLogger(t)})
	require.NoError(t, err)
	url := serve(t, e)

	// A go-spiffe client authenticates the endpoint with our bundle and the
	// server's SPIFFE ID.
	held, err := ca.ToSPIFFEBundle(d.c.store.View().Bundle(ourTD.Name()))
	require.NoError(t, err)
	fetch := func() *spiffebundle.Bundle {
		t.Helper()
		sb, err := gofed.FetchBundle(context.Background(), ourTD, url, gofed.WithSPIFFEAuth(held, d.ca.ServerID()))
		require.NoError(t, err)
		return sb
	}
	sb := fetch()
	stored := d.c.store.View().Bundle(ourTD.Name())
	seq, ok := sb.SequenceNumber()
	require.True(t, ok)
	require.Equal(t, stored.SequenceNumber, seq)
	hint, ok := sb.RefreshHint()
	require.True(t, ok)
	require.Equal(t, 90*time.Second, hint)
	got, err := ca.FromSPIFFEBundle(sb)
	require.NoError(t, err)
	require.True(t, sameKeys(stored, got))

	// A prepared authority is served as soon as it is published.
	_, err = d.ca.Prepare(context.Background(), ca.KindX509)
	require.NoError(t, err)
	sb = fetch()
	seq2, _ := sb.SequenceNumber()
	require.Greater(t, seq2, seq)
	require.Len(t, sb.X509Authorities(), 2)

	// Another SPIFFE ID expected by the client is refused by the client.
	_, err = gofed.FetchBundle(context.Background(), ourTD, url, gofed.WithSPIFFEAuth(held, ourTD.ID()))
	require.ErrorContains(t, err, "unexpected ID")
}

func TestEndpointHTTPSWeb(t *testing.T) {
	d := newOurDomain(t, ourTD.Name())
	certFile, keyFile, roots := webCert(t)
	e, err := federation.NewEndpoint(federation.EndpointConfig{TrustDomain: ourTD, Store: d.c.store, Profile: federation.ProfileHTTPSWeb,
		CertFile: certFile, KeyFile: keyFile, Logger: testLogger(t)})
	require.NoError(t, err)
	url := serve(t, e)

	sb, err := gofed.FetchBundle(context.Background(), ourTD, url+"/any/path", gofed.WithWebPKIRoots(roots))
	require.NoError(t, err)
	hint, _ := sb.RefreshHint()
	require.Equal(t, federation.DefaultRefreshHint, hint)
	got, err := ca.FromSPIFFEBundle(sb)
	require.NoError(t, err)
	require.True(t, sameKeys(d.c.store.View().Bundle(ourTD.Name()), got))

	// Without the roots the client refuses the endpoint.
	_, err = gofed.FetchBundle(context.Background(), ourTD, url)
	require.ErrorContains(t, err, "certificate")
}

func TestEndpointConfigAndEmptyState(t *testing.T) {
	c := newFakeCluster(t)
	certFile, keyFile, _ := webCert(t)
	for name, cfg := range map[string]federation.EndpointConfig{
		"no trust domain":   {Store: c.store, Profile: federation.ProfileHTTPSSPIFFE},
		"unknown profile":   {TrustDomain: ourTD, Store: c.store, Profile: "https_acme"},
		"web without files": {TrustDomain: ourTD, Store: c.store, Profile: federation.ProfileHTTPSWeb},
		"web, missing file": {TrustDomain: ourTD, Store: c.store, Profile: federation.ProfileHTTPSWeb, CertFile: certFile, KeyFile: keyFile + ".gone"},
		"spiffe, no SVID":   {TrustDomain: ourTD, Store: c.store, Profile: federation.ProfileHTTPSSPIFFE},
	} {
		_, err := federation.NewEndpoint(cfg)
		require.Error(t, err, name)
	}

	// Before the CA published anything there is no bundle to serve.
	e, err := federation.NewEndpoint(federation.EndpointConfig{TrustDomain: ourTD, Store: c.store, Profile: federation.ProfileHTTPSWeb, CertFile: certFile, KeyFile: keyFile})
	require.NoError(t, err)
	rec := httptest.NewRecorder()
	e.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/", nil))
	require.Equal(t, http.StatusInternalServerError, rec.Code)
	rec = httptest.NewRecorder()
	e.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/", nil))
	require.Equal(t, http.StatusMethodNotAllowed, rec.Code)
}

// TestFederateTwoFerryDomains runs our refresher against our endpoint: trust
// domain B follows A's bundle over https_spiffe, through A's CA rotation.
func TestFederateTwoFerryDomains(t *testing.T) {
	a := newOurDomain(t, foreignTD.Name())
	var mu sync.Mutex
	cert := serverCert(t, a.ca)
	e, err := federation.NewEndpoint(federation.EndpointConfig{TrustDomain: foreignTD, Store: a.c.store, Profile: federation.ProfileHTTPSSPIFFE,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { mu.Lock(); defer mu.Unlock(); return cert, nil }})
	require.NoError(t, err)
	url := serve(t, e)

	b := newFakeCluster(t)
	initial := a.c.store.View().Bundle(foreignTD.Name())
	putRelationship(b, &ferrypb.FederationRelationship{TrustDomain: foreignTD.Name(), BundleEndpointUrl: url, Profile: federation.ProfileHTTPSSPIFFE,
		EndpointSpiffeId: a.ca.ServerID().String()}, &ferrypb.Bundle{TrustDomain: initial.TrustDomain, X509Authorities: initial.X509Authorities})
	b.setLeader(true)
	r := startRefresher(t, b, federation.RefresherConfig{})
	require.NoError(t, refresh(t, r, foreignTD))
	require.True(t, sameKeys(a.c.store.View().Bundle(foreignTD.Name()), b.store.View().Bundle(foreignTD.Name())))

	// A prepares (publishes) a new CA; B refreshes; A activates it and its
	// endpoint now presents an SVID B can only verify with the new CA.
	next, err := a.ca.Prepare(context.Background(), ca.KindX509)
	require.NoError(t, err)
	require.NoError(t, refresh(t, r, foreignTD))
	_, err = a.ca.Activate(context.Background(), ca.KindX509, next.ID)
	require.NoError(t, err)
	mu.Lock()
	cert = serverCert(t, a.ca)
	mu.Unlock()
	require.NoError(t, cert.Leaf.CheckSignatureFrom(next.Certificate), "the SVID is signed by the new CA")
	require.NoError(t, refresh(t, r, foreignTD))
	require.True(t, sameKeys(a.ca.Bundle(), b.store.View().Bundle(foreignTD.Name())))
	require.Equal(t, a.c.store.View().Bundle(foreignTD.Name()).SequenceNumber, heldSequence(b, foreignTD))
}

// TestRefreshHintCoversPublication drives a real CA through a rotation on a
// fake clock and checks that the served refresh hint fits the promised number
// of refreshes between a new authority's publication and its activation.
func TestRefreshHintCoversPublication(t *testing.T) {
	for _, ttl := range []time.Duration{10 * time.Minute, time.Hour, 24 * time.Hour, 90 * 24 * time.Hour} {
		t.Run(ttl.String(), func(t *testing.T) {
			now := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
			var mu sync.Mutex
			clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
			c := newCA(t, "ours.org", nopPublisher{}, ttl, clock)
			first := c.List(ca.KindX509)[0].ID
			var published, activated time.Time
			step := ttl / 1000
			for i := 0; i < 1000 && activated.IsZero(); i++ {
				mu.Lock()
				now = now.Add(step)
				mu.Unlock()
				require.NoError(t, c.Rotate(context.Background()))
				for _, a := range c.List(ca.KindX509) {
					if a.ID == first {
						continue
					}
					if published.IsZero() && a.Published {
						published = clock()
					}
					if a.Status == ca.StatusActive {
						activated = clock()
					}
				}
			}
			require.False(t, activated.IsZero(), "the CA rotated")
			hint := federation.RefreshHint(federation.DefaultRefreshHint, ttl)
			require.LessOrEqual(t, hint, federation.DefaultRefreshHint)
			require.LessOrEqual(t, hint*federation.MinRefreshesBeforeActivation, activated.Sub(published)+step,
				"hint %s, published %s before activation", hint, activated.Sub(published))
		})
	}
	require.Equal(t, time.Second, federation.RefreshHint(time.Minute, time.Second), "never below a second")
	require.Equal(t, 42*time.Second, federation.RefreshHint(42*time.Second, 0))
}

// webCert writes a self-signed certificate for 127.0.0.1 and its key.
func webCert(t testing.TB) (certFile, keyFile string, roots *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "bundle.test"},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, DNSNames: []string{"localhost"},
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true, IsCA: true}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	require.NoError(t, err)
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	require.NoError(t, err)
	dir := t.TempDir()
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	require.NoError(t, os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644))
	require.NoError(t, os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), 0o600))
	cert, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	roots = x509.NewCertPool()
	roots.AddCert(cert)
	return certFile, keyFile, roots
}

// BenchmarkEndpointHandler measures serving our bundle (two X.509 and two JWT
// authorities) from the replicated state, without TLS.
func BenchmarkEndpointHandler(b *testing.B) {
	d := newOurDomain(b, ourTD.Name())
	if _, err := d.ca.Prepare(context.Background(), ca.KindX509); err != nil {
		b.Fatal(err)
	}
	if _, err := d.ca.Prepare(context.Background(), ca.KindJWT); err != nil {
		b.Fatal(err)
	}
	certFile, keyFile, _ := webCert(b)
	e, err := federation.NewEndpoint(federation.EndpointConfig{TrustDomain: ourTD, Store: d.c.store, Profile: federation.ProfileHTTPSWeb, CertFile: certFile, KeyFile: keyFile})
	if err != nil {
		b.Fatal(err)
	}
	req := httptest.NewRequest(http.MethodGet, "/", nil)
	b.ReportAllocs()
	for b.Loop() {
		rec := httptest.NewRecorder()
		e.Handler().ServeHTTP(rec, req)
		if rec.Code != http.StatusOK {
			b.Fatal(rec.Code)
		}
	}
}
