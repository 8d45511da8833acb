package federation_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/federation"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/ca"
	"github.com/ferry-id/ferry/server/cluster"
	"github.com/ferry-id/ferry/server/state"
)

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(p []byte) (int, error) { w.t.Log(string(p)); return len(p), nil }

// fakeCluster commits commands straight into a real store, in order, and
// lets the test grant and revoke leadership.
type fakeCluster struct {
	t     testing.TB
	store *state.Store

	mu      sync.Mutex
	index   uint64
	applied []*ferrypb.Command
	tok     cluster.LeadershipToken
	leader  bool
	changed chan struct{}
}

func newFakeCluster(t testing.TB) *fakeCluster {
	s, err := state.New(state.Config{Logger: testLogger(t)})
	require.NoError(t, err)
	return &fakeCluster{t: t, store: s, changed: make(chan struct{})}
}

func (c *fakeCluster) Apply(_ context.Context, cmd *ferrypb.Command) (*ferrypb.CommandResult, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if cmd.TimeUnixNano == 0 {
		cmd.TimeUnixNano = time.Now().UnixNano()
	}
	data, err := state.EncodeCommand(cmd)
	if err != nil {
		return nil, err
	}
	c.index++
	c.applied = append(c.applied, cmd)
	return c.store.Apply(&raft.Log{Index: c.index, Term: c.tok.Term + 1, Type: raft.LogCommand, Data: data}).(*ferrypb.CommandResult), nil
}

// must applies a command that must succeed.
func (c *fakeCluster) must(cmd *ferrypb.Command) *ferrypb.CommandResult {
	c.t.Helper()
	res, err := c.Apply(context.Background(), cmd)
	require.NoError(c.t, err)
	require.EqualValues(c.t, 0, res.GetStatus().GetCode(), res.GetStatus().GetMessage())
	return res
}

func (c *fakeCluster) setLeader(leader bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.tok = cluster.LeadershipToken{Term: c.tok.Term + 1, Index: c.index}
	c.leader = leader
	close(c.changed)
	c.changed = make(chan struct{})
}

// fence ends this node's leadership without telling it yet: its token is
// no longer current, but Leadership still reports it leading and no change
// is signalled (the window between losing a term and hearing of it).
func (c *fakeCluster) fence() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.tok.Term++
}

func (c *fakeCluster) Leadership() (cluster.LeadershipToken, bool, <-chan struct{}) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.tok, c.leader, c.changed
}

func (c *fakeCluster) LeadershipCurrent(tok cluster.LeadershipToken) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.leader && c.tok == tok
}

func (c *fakeCluster) commands() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.applied)
}

// nopPublisher accepts a CA's keys without storing them: for trust domains
// whose bundles the test serves by hand.
type nopPublisher struct{}

func (nopPublisher) PublishX509Authority(context.Context, *ferrypb.X509Authority) error { return nil }
func (nopPublisher) PublishJWTAuthority(context.Context, *ferrypb.JWTAuthority) error   { return nil }
func (nopPublisher) RemoveX509Authority(context.Context, []byte) error                  { return nil }
func (nopPublisher) RemoveJWTAuthority(context.Context, string) error                   { return nil }

// storePublisher publishes a CA's keys into the fake cluster's store.
type storePublisher struct {
	c  *fakeCluster
	td string
}

func (p storePublisher) apply(ctx context.Context, cmd *ferrypb.Command) error {
	_, err := p.c.Apply(ctx, cmd)
	return err
}

func (p storePublisher) PublishX509Authority(ctx context.Context, a *ferrypb.X509Authority) error {
	return p.apply(ctx, &ferrypb.Command{Op: &ferrypb.Command_BundleX509AuthorityPut{BundleX509AuthorityPut: &ferrypb.BundleX509AuthorityPut{TrustDomain: p.td, Authority: a}}})
}

func (p storePublisher) PublishJWTAuthority(ctx context.Context, a *ferrypb.JWTAuthority) error {
	return p.apply(ctx, &ferrypb.Command{Op: &ferrypb.Command_BundleJwtAuthorityPut{BundleJwtAuthorityPut: &ferrypb.BundleJWTAuthorityPut{TrustDomain: p.td, Authority: a}}})
}

func (p storePublisher) RemoveX509Authority(ctx context.Context, der []byte) error {
	return p.apply(ctx, &ferrypb.Command{Op: &ferrypb.Command_BundleX509AuthorityRemove{BundleX509AuthorityRemove: &ferrypb.BundleX509AuthorityRemove{TrustDomain: p.td, Certificate: der}}})
}

func (p storePublisher) RemoveJWTAuthority(ctx context.Context, kid string) error {
	return p.apply(ctx, &ferrypb.Command{Op: &ferrypb.Command_BundleJwtAuthorityRemove{BundleJwtAuthorityRemove: &ferrypb.BundleJWTAuthorityRemove{TrustDomain: p.td, KeyId: kid}}})
}

// newCA returns a trust domain's CA with its first authorities active.
func newCA(t testing.TB, td string, pub ca.Publisher, ttl time.Duration, clock func() time.Time) *ca.CA {
	t.Helper()
	c, err := ca.New(ca.Config{TrustDomain: spiffeid.RequireTrustDomainFromString(td), DataDir: t.TempDir(), NodeID: "s1",
		Publisher: pub, CATTL: ttl, Clock: clock, Logger: testLogger(t)})
	require.NoError(t, err)
	require.NoError(t, c.Rotate(context.Background()))
	return c
}

// serverCert is a CA's server X509-SVID as a TLS certificate.
func serverCert(t testing.TB, c *ca.CA) *tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	chain, err := c.SignServerX509SVID(key.Public(), []string{"localhost"}, time.Hour)
	require.NoError(t, err)
	out := &tls.Certificate{PrivateKey: crypto.Signer(key), Leaf: chain[0]}
	for _, x := range chain {
		out.Certificate = append(out.Certificate, x.Raw)
	}
	return out
}

// spiffeBundle is a CA's published bundle with a sequence number and hint.
func spiffeBundle(t testing.TB, c *ca.CA, seq uint64, hint time.Duration) *spiffebundle.Bundle {
	t.Helper()
	b := c.Bundle()
	b.SequenceNumber = seq
	b.RefreshHintSeconds = int64(hint / time.Second)
	sb, err := ca.ToSPIFFEBundle(b)
	require.NoError(t, err)
	return sb
}

// foreignEndpoint is a foreign trust domain's bundle endpoint: go-spiffe's
// federation.Handler on an httptest TLS server, serving whatever bundle the
// test sets (or raw bytes, to serve what no handler would).
type foreignEndpoint struct {
	td   spiffeid.TrustDomain
	srv  *httptest.Server
	hits atomic.Int64

	mu     sync.Mutex
	bundle *spiffebundle.Bundle
	raw    []byte
	status int // with raw: the HTTP status to answer (0: 200)
	cert   *tls.Certificate
}

// startForeign serves td's bundle; with cert nil the server uses httptest's
// own certificate (the https_web profile, roots from webRoots).
func startForeign(t *testing.T, td string, cert *tls.Certificate) *foreignEndpoint {
	t.Helper()
	fe := &foreignEndpoint{td: spiffeid.RequireTrustDomainFromString(td), cert: cert}
	h, err := federation.NewHandler(fe.td, fe)
	require.NoError(t, err)
	fe.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fe.hits.Add(1)
		fe.mu.Lock()
		raw, code := fe.raw, fe.status
		fe.mu.Unlock()
		if raw != nil {
			w.Header().Set("Content-Type", "application/json")
			if code != 0 {
				w.WriteHeader(code)
			}
			_, _ = w.Write(raw)
			return
		}
		h.ServeHTTP(w, r)
	}))
	if cert != nil {
		fe.srv.TLS = &tls.Config{GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			fe.mu.Lock()
			defer fe.mu.Unlock()
			return &tls.Config{Certificates: []tls.Certificate{*fe.cert}}, nil
		}}
	}
	fe.srv.StartTLS()
	t.Cleanup(fe.srv.Close)
	return fe
}

func (fe *foreignEndpoint) GetBundleForTrustDomain(td spiffeid.TrustDomain) (*spiffebundle.Bundle, error) {
	fe.mu.Lock()
	defer fe.mu.Unlock()
	if fe.bundle == nil {
		return nil, http.ErrMissingFile
	}
	return fe.bundle, nil
}

func (fe *foreignEndpoint) serve(b *spiffebundle.Bundle) {
	fe.mu.Lock()
	defer fe.mu.Unlock()
	fe.bundle, fe.raw, fe.status = b, nil, 0
}

func (fe *foreignEndpoint) serveRaw(raw []byte) {
	fe.serveStatus(0, raw)
}

// serveStatus answers with HTTP status code and body raw.
func (fe *foreignEndpoint) serveStatus(code int, raw []byte) {
	fe.mu.Lock()
	defer fe.mu.Unlock()
	fe.raw, fe.status = raw, code
}

func (fe *foreignEndpoint) setCert(c *tls.Certificate) {
	fe.mu.Lock()
	defer fe.mu.Unlock()
	fe.cert = c
}

func (fe *foreignEndpoint) webRoots() *x509.CertPool {
	pool := x509.NewCertPool()
	pool.AddCert(fe.srv.Certificate())
	return pool
}

func putRelationship(c *fakeCluster, rel *ferrypb.FederationRelationship, initial *ferrypb.Bundle) {
	c.must(&ferrypb.Command{Op: &ferrypb.Command_FederationPut{FederationPut: &ferrypb.FederationPut{Relationship: rel, Bundle: initial}}})
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	require.Eventually(t, cond, 10*time.Second, 10*time.Millisecond, what)
}
