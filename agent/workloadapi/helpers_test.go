package workloadapi_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"log/slog"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/agent/cache"
	"github.com/ferry-id/ferry/agent/workloadapi"
	"github.com/ferry-id/ferry/attestors/workload/unix"
	"github.com/ferry-id/ferry/internal/selector"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

var (
	ownTD   = spiffeid.RequireTrustDomainFromString("example.org")
	otherTD = spiffeid.RequireTrustDomainFromString("other.org")
	thirdTD = spiffeid.RequireTrustDomainFromString("third.org")
)

// testCA is an in-test X.509 CA and JWT/WIT signing authority for one trust
// domain.
type testCA struct {
	td     spiffeid.TrustDomain
	cert   *x509.Certificate
	key    *ecdsa.PrivateKey
	jwtKey crypto.Signer
	jwtKid string
	// rsaJWT is a second JWT authority, so JWKS encoding of RSA keys is
	// exercised by every bundle fetch.
	rsaJWT *rsa.PrivateKey
	witKey *ecdsa.PrivateKey
	witKid string
	serial atomic.Int64
	// extraJWT are more JWT authorities; guarded by the manager's mutex.
	extraJWT map[string]crypto.PublicKey
}

var (
	rsaOnce sync.Once
	rsaKey  *rsa.PrivateKey
)

// sharedRSAKey avoids generating an RSA key per CA: it is slow under -race.
func sharedRSAKey(t testing.TB) *rsa.PrivateKey {
	rsaOnce.Do(func() {
		k, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			panic(err)
		}
		rsaKey = k
	})
	return rsaKey
}

func newCA(t testing.TB, td spiffeid.TrustDomain) *testCA {
	t.Helper()
	key := mustEC(t, elliptic.P256())
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: td.Name() + " CA"},
		URIs:                  []*url.URL{td.ID().URL()},
		NotBefore:             time.Now().Add(-time.Minute),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	require.NoError(t, err)
	cert, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	return &testCA{
		td: td, cert: cert, key: key,
		jwtKey: mustEC(t, elliptic.P256()), jwtKid: td.Name() + "-jwt-1",
		rsaJWT: sharedRSAKey(t),
		witKey: mustEC(t, elliptic.P384()), witKid: td.Name() + "-wit-1",
	}
}

func mustEC(t testing.TB, c elliptic.Curve) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(c, rand.Reader)
	require.NoError(t, err)
	return k
}

// bundle returns the CA's SPIFFE bundle.
func (ca *testCA) bundle() *spiffebundle.Bundle {
	b := spiffebundle.New(ca.td)
	b.AddX509Authority(ca.cert)
	_ = b.AddJWTAuthority(ca.jwtKid, ca.jwtKey.Public())
	_ = b.AddJWTAuthority(ca.td.Name()+"-jwt-rsa", ca.rsaJWT.Public())
	_ = b.AddWITAuthority(ca.witKid, ca.witKey.Public())
	for kid, pub := range ca.extraJWT {
		_ = b.AddJWTAuthority(kid, pub)
	}
	b.SetRefreshHint(90 * time.Second)
	b.SetSequenceNumber(7)
	return b
}

// issue signs an X509-SVID for id.
func (ca *testCA) issue(t testing.TB, id string, pub crypto.PublicKey) *x509.Certificate {
	t.Helper()
	u, err := url.Parse(id)
	require.NoError(t, err)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(100 + ca.serial.Add(1)),
		URIs:         []*url.URL{u},
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, pub, ca.key)
	require.NoError(t, err)
	cert, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	return cert
}

// signJWT mints a JWT-SVID; extra claims are merged in.
func (ca *testCA) signJWT(sub string, aud []string, exp time.Time, extra map[string]any) (string, error) {
	claims := jwt.MapClaims{"sub": sub, "aud": aud, "exp": exp.Unix(), "iat": time.Now().Unix()}
	for k, v := range extra {
		claims[k] = v
	}
	tok := jwt.NewWithClaims(jwt.SigningMethodES256, claims)
	tok.Header["kid"] = ca.jwtKid
	tok.Header["typ"] = "JWT"
	return tok.SignedString(ca.jwtKey)
}

// signWIT mints a WIT-SVID binding pub (cnf.jwk).
func (ca *testCA) signWIT(sub string, pub crypto.PublicKey, exp time.Time) (string, error) {
	cnf, err := publicJWKForTest(pub)
	if err != nil {
		return "", err
	}
	tok := jwt.NewWithClaims(jwt.SigningMethodES384, jwt.MapClaims{
		"sub": sub, "exp": exp.Unix(), "iat": time.Now().Unix(),
		"cnf": map[string]any{"jwk": cnf},
	})
	tok.Header["kid"] = ca.witKid
	tok.Header["typ"] = "wit+jwt"
	return tok.SignedString(ca.witKey)
}

func publicJWKForTest(pub crypto.PublicKey) (map[string]any, error) {
	enc := base64.RawURLEncoding.EncodeToString
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		size := (k.Curve.Params().BitSize + 7) / 8
		crv, alg := "P-256", "ES256"
		if size == 48 {
			crv, alg = "P-384", "ES384"
		}
		return map[string]any{"kty": "EC", "crv": crv, "alg": alg,
			"x": enc(k.X.FillBytes(make([]byte, size))), "y": enc(k.Y.FillBytes(make([]byte, size)))}, nil
	case *rsa.PublicKey:
		return map[string]any{"kty": "RSA", "alg": "RS256", "n": enc(k.N.Bytes()), "e": enc(big.NewInt(int64(k.E)).Bytes())}, nil
	}
	return nil, fmt.Errorf("unsupported key %T", pub)
}

// fakeManager is an in-test cache.Manager and cache.WITSource: entries match
// workloads by selector subset, SVIDs are signed by the in-test CA, and the
// test pushes updates to subscribers.
type fakeManager struct {
	t   testing.TB
	ca  *testCA
	fed map[spiffeid.TrustDomain]*spiffebundle.Bundle

	mu         sync.Mutex
	entries    []*ferrypb.Entry
	idents     map[string]cache.Identity // by entry ID
	subs       map[*fakeSub]struct{}
	jwts       map[string]*cache.JWTSVID
	wits       map[string]*cache.WITSVID
	witKeyType string        // "ec" (default) or "rsa"
	witTTL     time.Duration // default 5 minutes

	subscribes atomic.Int64
	jwtMints   atomic.Int64
}

var _ cache.Manager = (*fakeManager)(nil)
var _ cache.WITSource = (*fakeManager)(nil)

func newFakeManager(t testing.TB, ca *testCA, fed ...*testCA) *fakeManager {
	m := &fakeManager{
		t: t, ca: ca,
		fed:    make(map[spiffeid.TrustDomain]*spiffebundle.Bundle),
		idents: make(map[string]cache.Identity),
		subs:   make(map[*fakeSub]struct{}),
		jwts:   make(map[string]*cache.JWTSVID),
		wits:   make(map[string]*cache.WITSVID),
	}
	for _, f := range fed {
		m.fed[f.td] = f.bundle()
	}
	return m
}

// entry builds an entry for the unix uid of this test process.
func entry(id, spiffeID, hint string, federatesWith ...string) *ferrypb.Entry {
	return &ferrypb.Entry{
		Id:            id,
		SpiffeId:      spiffeID,
		Hint:          hint,
		FederatesWith: federatesWith,
		Selectors:     []*ferrypb.Selector{{Type: "unix", Value: "uid:" + strconv.Itoa(os.Getuid())}},
	}
}

// setEntries replaces the entries (issuing SVIDs for new ones) and pushes
// the new state to every subscriber.
func (m *fakeManager) setEntries(entries ...*ferrypb.Entry) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.entries = entries
	for _, e := range entries {
		if ident, ok := m.idents[e.Id]; ok {
			ident.Entry = e
			m.idents[e.Id] = ident
		} else {
			m.idents[e.Id] = m.newIdentity(e)
		}
	}
	m.pushLocked()
}

// addJWTAuthority adds a JWT authority to the own bundle and pushes.
func (m *fakeManager) addJWTAuthority(kid string, pub crypto.PublicKey) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.ca.extraJWT == nil {
		m.ca.extraJWT = make(map[string]crypto.PublicKey)
	}
	m.ca.extraJWT[kid] = pub
	m.pushLocked()
}

// rotate reissues the SVID of entry id and pushes.
func (m *fakeManager) rotate(id string) *x509.Certificate {
	m.mu.Lock()
	defer m.mu.Unlock()
	ident := m.newIdentity(m.idents[id].Entry)
	m.idents[id] = ident
	m.pushLocked()
	return ident.SVID[0]
}

func (m *fakeManager) newIdentity(e *ferrypb.Entry) cache.Identity {
	key := mustEC(m.t, elliptic.P256())
	return cache.Identity{Entry: e, SVID: []*x509.Certificate{m.ca.issue(m.t, e.SpiffeId, key.Public())}, PrivateKey: key}
}

func (m *fakeManager) updateLocked(sels []*ferrypb.Selector) *cache.WorkloadUpdate {
	u := &cache.WorkloadUpdate{Bundle: m.ca.bundle(), FederatedBundles: m.fed}
	have := selector.NewSet(sels...)
	for _, e := range m.entries {
		if selector.NewSet(e.Selectors...).Match(have) {
			u.Identities = append(u.Identities, m.idents[e.Id])
		}
	}
	return u
}

func (m *fakeManager) pushLocked() {
	for s := range m.subs {
		u := m.updateLocked(s.sels)
		select { // latest state wins
		case <-s.ch:
		default:
		}
		s.ch <- u
	}
}

// setWIT sets the key type and lifetime of WIT-SVIDs minted from now on.
func (m *fakeManager) setWIT(keyType string, ttl time.Duration) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.witKeyType, m.witTTL = keyType, ttl
}

func (m *fakeManager) activeSubscribers() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.subs)
}

type fakeSub struct {
	m    *fakeManager
	sels []*ferrypb.Selector
	ch   chan *cache.WorkloadUpdate
	once sync.Once
}

func (s *fakeSub) Updates() <-chan *cache.WorkloadUpdate { return s.ch }

func (s *fakeSub) Finish() {
	s.once.Do(func() {
		s.m.mu.Lock()
		defer s.m.mu.Unlock()
		delete(s.m.subs, s)
		close(s.ch)
	})
}

func (m *fakeManager) SubscribeToCacheChanges(_ context.Context, sels []*ferrypb.Selector) (cache.Subscriber, error) {
	m.subscribes.Add(1)
	m.mu.Lock()
	defer m.mu.Unlock()
	s := &fakeSub{m: m, sels: sels, ch: make(chan *cache.WorkloadUpdate, 1)}
	s.ch <- m.updateLocked(sels)
	m.subs[s] = struct{}{}
	return s, nil
}

func (m *fakeManager) FetchWorkloadUpdate(_ context.Context, sels []*ferrypb.Selector) (*cache.WorkloadUpdate, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.updateLocked(sels), nil
}

func (m *fakeManager) FetchJWTSVID(_ context.Context, e *ferrypb.Entry, aud []string) (*cache.JWTSVID, error) {
	key := e.SpiffeId + "\x00" + strings.Join(aud, "\x00")
	m.mu.Lock()
	defer m.mu.Unlock()
	if j, ok := m.jwts[key]; ok && time.Until(j.ExpiresAt) > 2*time.Minute {
		return j, nil
	}
	now := time.Now()
	exp := now.Add(5 * time.Minute)
	tok, err := m.ca.signJWT(e.SpiffeId, aud, exp, map[string]any{"iss": "https://oidc.example.org"})
	if err != nil {
		return nil, err
	}
	m.jwtMints.Add(1)
	j := &cache.JWTSVID{Token: tok, IssuedAt: now, ExpiresAt: exp}
	m.jwts[key] = j
	return j, nil
}

func (m *fakeManager) FetchWITSVID(_ context.Context, e *ferrypb.Entry) (*cache.WITSVID, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	ttl := m.witTTL
	if ttl == 0 {
		ttl = 5 * time.Minute
	}
	if w, ok := m.wits[e.SpiffeId]; ok && time.Until(w.ExpiresAt) > ttl/2 {
		return w, nil
	}
	var key crypto.Signer = mustEC(m.t, elliptic.P256())
	if m.witKeyType == "rsa" {
		key = sharedRSAKey(m.t)
	}
	exp := time.Now().Add(ttl)
	tok, err := m.ca.signWIT(e.SpiffeId, key.Public(), exp)
	if err != nil {
		return nil, err
	}
	w := &cache.WITSVID{Entry: e, Token: tok, PrivateKey: key, ExpiresAt: exp}
	m.wits[e.SpiffeId] = w
	return w, nil
}

func (m *fakeManager) SelectorKinds() map[string]bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := map[string]bool{}
	for _, e := range m.entries {
		for _, s := range e.Selectors {
			kind, _, _ := strings.Cut(s.Value, ":")
			out[s.Type+":"+kind] = true
		}
	}
	return out
}

// onlyManager hides the WITSource side of a Manager.
type onlyManager struct{ cache.Manager }

// logBuffer collects JSON log lines; safe for concurrent use.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// calls returns the "workload API call" lines.
func (l *logBuffer) calls() []map[string]any {
	var out []map[string]any
	for _, line := range strings.Split(l.String(), "\n") {
		if line == "" {
			continue
		}
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) == nil && m["msg"] == "workload API call" {
			out = append(out, m)
		}
	}
	return out
}

// waitCall waits for a call line matching method and pid.
func (l *logBuffer) waitCall(t testing.TB, method string, pid int) map[string]any {
	t.Helper()
	var found map[string]any
	require.Eventually(t, func() bool {
		for _, c := range l.calls() {
			if c["method"] == method && c["pid"] == float64(pid) {
				found = c
				return true
			}
		}
		return false
	}, 10*time.Second, 10*time.Millisecond, "no log line for %s pid %d; log:\n%s", method, pid, l.String())
	return found
}

// fixture is a running server with its manager, socket and log.
type fixture struct {
	mgr     *fakeManager
	ca      *testCA
	fedCA   *testCA
	thirdCA *testCA
	socket  string
	addr    string
	log     *logBuffer
	srv     *workloadapi.Server
}

type fixtureOpt func(*workloadapi.Config)

// publicDir returns a fresh directory that every user can traverse (0755
// up from the test's temporary root), for sockets other uids must reach.
func publicDir(t testing.TB) string {
	t.Helper()
	dir := t.TempDir()
	for d := dir; d != os.TempDir() && d != "/" && d != "."; d = filepath.Dir(d) {
		fi, err := os.Stat(d)
		require.NoError(t, err)
		if fi.Mode().Perm()&0o055 != 0o055 {
			require.NoError(t, os.Chmod(d, 0o755))
		}
		if filepath.Dir(d) == os.TempDir() {
			break
		}
	}
	return dir
}

func startServer(t testing.TB, opts ...fixtureOpt) *fixture {
	t.Helper()
	ca := newCA(t, ownTD)
	fedCA := newCA(t, otherTD)
	thirdCA := newCA(t, thirdTD)
	mgr := newFakeManager(t, ca, fedCA, thirdCA)
	mgr.setEntries(
		entry("e1", "spiffe://example.org/web", "internal", "other.org"),
		entry("e2", "spiffe://example.org/admin", "external"),
	)
	ua := mustUnixAttestor(t)
	lb := &logBuffer{}
	cfg := workloadapi.Config{
		SocketPath: filepath.Join(publicDir(t), "api.sock"),
		Manager:    mgr,
		Attestor:   workloadapi.WorkloadAttestors(mgr, ua),
		Log:        slog.New(slog.NewJSONHandler(lb, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	for _, o := range opts {
		o(&cfg)
	}
	srv, err := workloadapi.New(cfg)
	require.NoError(t, err)
	// Listen before Serve, so the socket accepts as soon as this returns.
	l, err := workloadapi.Listen(cfg.SocketPath)
	require.NoError(t, err)
	done := make(chan error, 1)
	go func() { done <- srv.Serve(l) }()
	t.Cleanup(func() {
		srv.Stop()
		select {
		case err := <-done:
			require.NoError(t, err)
		case <-time.After(10 * time.Second):
			t.Errorf("server did not stop")
		}
	})
	return &fixture{mgr: mgr, ca: ca, fedCA: fedCA, thirdCA: thirdCA, socket: cfg.SocketPath, addr: "unix://" + cfg.SocketPath, log: lb, srv: srv}
}

func mustUnixAttestor(t testing.TB) *unix.Attestor {
	t.Helper()
	ua, err := unix.New(unix.Config{DisableWorkloadPath: true, Log: slog.New(slog.DiscardHandler)})
	require.NoError(t, err)
	return ua
}
