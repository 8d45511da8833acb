package cache_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net/url"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/ferry-id/ferry/agent/cache"
	"github.com/ferry-id/ferry/internal/selector"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

var td = spiffeid.RequireTrustDomainFromString("example.org")

// epoch is the fake clock's start, on a whole second because certificate
// times have one-second precision.
var epoch = time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)

// fakeClock is a manual clock: time moves only through Advance.
type fakeClock struct {
	mu      sync.Mutex
	now     time.Time
	waiters []fakeWaiter
	last    time.Time // deadline of the latest Until call
}

type fakeWaiter struct {
	at time.Time
	ch chan time.Time
}

func (f *fakeClock) Now() time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.now
}

func (f *fakeClock) Until(t time.Time) <-chan time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	ch := make(chan time.Time, 1)
	f.last = t
	if !f.now.Before(t) {
		ch <- f.now
		return ch
	}
	f.waiters = append(f.waiters, fakeWaiter{t, ch})
	return ch
}

func (f *fakeClock) Advance(d time.Duration) { f.Set(f.Now().Add(d)) }

func (f *fakeClock) Set(t time.Time) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.now = t
	kept := f.waiters[:0]
	for _, w := range f.waiters {
		if !t.Before(w.at) {
			w.ch <- t
			continue
		}
		kept = append(kept, w)
	}
	f.waiters = kept
}

// lastWake is the time the cache's scheduler last asked to be woken at.
func (f *fakeClock) lastWake() time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.last
}

// testSigner is the server side: it signs with an in-test CA, counts calls,
// and can be made to fail or to hold calls until released.
type testSigner struct {
	clock   *fakeClock
	caCert  *x509.Certificate
	caKey   *ecdsa.PrivateKey
	jwtKey  *ecdsa.PrivateKey
	x509TTL time.Duration
	jwtTTL  time.Duration

	mu         sync.Mutex
	entries    map[string]*ferrypb.Entry
	fail       bool
	gate       chan struct{} // when set, calls wait for it to close
	started    chan struct{} // receives (non-blocking) when a call starts
	x509Calls  int
	batchSizes []int
	jwtCalls   int
	witCalls   int
	witKeys    []crypto.PublicKey
	agentID    string // the subject of MintAgentJWTSVID's tokens
	jwtKid     string // the kid of the tokens minted
}

func newTestSigner(t testing.TB, clock *fakeClock) *testSigner {
	t.Helper()
	ca, key := newTestCA(t)
	jwtKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return &testSigner{
		clock: clock, caCert: ca, caKey: key, jwtKey: jwtKey, jwtKid: "jwt-1",
		x509TTL: time.Hour, jwtTTL: 5 * time.Minute,
		entries: make(map[string]*ferrypb.Entry),
		started: make(chan struct{}, 1),
	}
}

// rotate makes the signer sign with a new CA and JWT key ID from now on, as a
// server does once another authority is active; it returns the old CA.
func (s *testSigner) rotate(t testing.TB, jwtKid string) *x509.Certificate {
	t.Helper()
	ca, key := newTestCA(t)
	s.mu.Lock()
	defer s.mu.Unlock()
	old := s.caCert
	s.caCert, s.caKey, s.jwtKid = ca, key, jwtKid
	return old
}

func newTestCA(t testing.TB) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "test CA"},
		URIs:                  []*url.URL{td.ID().URL()},
		NotBefore:             epoch.Add(-time.Hour),
		NotAfter:              epoch.Add(10 * 24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	ca, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return ca, key
}

func (s *testSigner) bundle() *spiffebundle.Bundle {
	b := spiffebundle.FromX509Authorities(td, []*x509.Certificate{s.caCert})
	if err := b.AddJWTAuthority("jwt-1", s.jwtKey.Public()); err != nil {
		panic(err)
	}
	return b
}

func (s *testSigner) register(e *ferrypb.Entry) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.entries[e.GetId()] = e
}

func (s *testSigner) setFail(v bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.fail = v
}

func (s *testSigner) setGate(ch chan struct{}) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.gate = ch
}

func (s *testSigner) counts() (x509Calls, csrs, jwtCalls, witCalls int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, n := range s.batchSizes {
		csrs += n
	}
	return s.x509Calls, csrs, s.jwtCalls, s.witCalls
}

func (s *testSigner) batches() []int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]int(nil), s.batchSizes...)
}

// enter counts a call, then waits at the gate; it reports whether the call
// must fail.
func (s *testSigner) enter(ctx context.Context, count *int) (bool, error) {
	s.mu.Lock()
	*count++
	gate, fail := s.gate, s.fail
	s.mu.Unlock()
	select {
	case s.started <- struct{}{}:
	default:
	}
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return false, ctx.Err()
		}
	}
	s.mu.Lock()
	fail = fail || s.fail
	s.mu.Unlock()
	return fail, nil
}

var errUnavailable = errors.New("server unavailable")

func (s *testSigner) SignX509SVIDs(ctx context.Context, reqs []cache.SignRequest) ([]cache.SignResult, error) {
	s.mu.Lock()
	s.batchSizes = append(s.batchSizes, len(reqs))
	s.mu.Unlock()
	fail, err := s.enter(ctx, &s.x509Calls)
	if err != nil {
		return nil, err
	}
	if fail {
		return nil, errUnavailable
	}
	out := make([]cache.SignResult, len(reqs))
	for i, r := range reqs {
		out[i].Chain, out[i].Err = s.sign(r)
	}
	return out, nil
}

func (s *testSigner) sign(r cache.SignRequest) ([]*x509.Certificate, error) {
	s.mu.Lock()
	e, caCert, caKey := s.entries[r.EntryID], s.caCert, s.caKey
	s.mu.Unlock()
	if e == nil {
		return nil, fmt.Errorf("entry %q not authorized", r.EntryID)
	}
	csr, err := x509.ParseCertificateRequest(r.CSR)
	if err != nil {
		return nil, err
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, err
	}
	id, err := spiffeid.FromString(e.GetSpiffeId())
	if err != nil {
		return nil, err
	}
	ttl := s.x509TTL
	if e.GetX509SvidTtl() > 0 {
		ttl = time.Duration(e.GetX509SvidTtl()) * time.Second
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 64))
	if err != nil {
		return nil, err
	}
	now := s.clock.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		URIs:                  []*url.URL{id.URL()},
		DNSNames:              e.GetDnsNames(),
		NotBefore:             now,
		NotAfter:              now.Add(ttl),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, csr.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return []*x509.Certificate{leaf}, nil
}

func (s *testSigner) token(entryID string, claims jwt.MapClaims) (string, error) {
	s.mu.Lock()
	e, kid := s.entries[entryID], s.jwtKid
	s.mu.Unlock()
	if e == nil {
		return "", fmt.Errorf("entry %q not authorized", entryID)
	}
	now := s.clock.Now()
	claims["sub"] = e.GetSpiffeId()
	claims["iat"] = now.Unix()
	claims["exp"] = now.Add(s.jwtTTL).Unix()
	claims["jti"] = rand.Text() // every mint is a distinct token
	tok := jwt.NewWithClaims(jwt.SigningMethodES256, claims)
	tok.Header["kid"] = kid
	return tok.SignedString(s.jwtKey)
}

func (s *testSigner) MintJWTSVID(ctx context.Context, entryID string, audience []string) (string, error) {
	fail, err := s.enter(ctx, &s.jwtCalls)
	if err != nil {
		return "", err
	}
	if fail {
		return "", errUnavailable
	}
	return s.token(entryID, jwt.MapClaims{"aud": audience})
}

func (s *testSigner) MintAgentJWTSVID(ctx context.Context, audience []string) (string, error) {
	fail, err := s.enter(ctx, &s.jwtCalls)
	if err != nil {
		return "", err
	}
	if fail {
		return "", errUnavailable
	}
	s.mu.Lock()
	sub := s.agentID
	s.mu.Unlock()
	now := s.clock.Now()
	tok := jwt.NewWithClaims(jwt.SigningMethodES256, jwt.MapClaims{
		"sub": sub, "aud": audience, "iat": now.Unix(), "exp": now.Add(s.jwtTTL).Unix(), "jti": rand.Text(),
	})
	tok.Header["kid"] = "jwt-1"
	return tok.SignedString(s.jwtKey)
}

func (s *testSigner) MintWITSVID(ctx context.Context, entryID string, pub crypto.PublicKey) (string, error) {
	fail, err := s.enter(ctx, &s.witCalls)
	if err != nil {
		return "", err
	}
	if fail {
		return "", errUnavailable
	}
	ec, ok := pub.(*ecdsa.PublicKey)
	if !ok {
		return "", fmt.Errorf("unexpected key type %T", pub)
	}
	s.mu.Lock()
	s.witKeys = append(s.witKeys, pub)
	s.mu.Unlock()
	pt, err := ec.Bytes()
	if err != nil {
		return "", err
	}
	return s.token(entryID, jwt.MapClaims{"cnf": map[string]any{"jwk": fmt.Sprintf("%x", pt)}})
}

// env is a running cache with its fake clock and signer.
type env struct {
	t      *testing.T
	clock  *fakeClock
	signer *testSigner
	cache  *cache.Cache
	nextIx uint64
}

func newEnv(t *testing.T, mod func(*cache.Config)) *env {
	t.Helper()
	checkNoLeaks(t)
	clock := &fakeClock{now: epoch}
	signer := newTestSigner(t, clock)
	cfg := cache.Config{
		Signer:      signer,
		Clock:       clock,
		Logger:      slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug})),
		IdleTimeout: 5 * time.Minute,
		RetryMin:    time.Minute,
		RetryMax:    4 * time.Minute,
	}
	if mod != nil {
		mod(&cfg)
	}
	c, err := cache.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	c.SetBundles(signer.bundle(), nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Error("Run did not return after cancel")
		}
	})
	return &env{t: t, clock: clock, signer: signer, cache: c}
}

type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// entry makes an entry (created in call order) and authorizes it at the signer.
func (e *env) entry(id, path string, sels ...string) *ferrypb.Entry {
	e.t.Helper()
	e.nextIx++
	ss, err := selector.ParseAll(sels)
	if err != nil {
		e.t.Fatal(err)
	}
	ent := &ferrypb.Entry{
		Id:           id,
		SpiffeId:     td.ID().String() + path,
		ParentId:     td.ID().String() + "/spire/agent/test",
		Selectors:    ss,
		Revision:     e.nextIx,
		CreatedIndex: e.nextIx,
	}
	e.signer.register(ent)
	return ent
}

func sels(t testing.TB, ss ...string) []*ferrypb.Selector {
	t.Helper()
	out, err := selector.ParseAll(ss)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func (e *env) subscribe(ss ...string) cache.Subscriber {
	e.t.Helper()
	sub, err := e.cache.SubscribeToCacheChanges(context.Background(), sels(e.t, ss...))
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(sub.Finish)
	return sub
}

const waitFor = 5 * time.Second

func next(t testing.TB, sub cache.Subscriber) *cache.WorkloadUpdate {
	t.Helper()
	select {
	case u, ok := <-sub.Updates():
		if !ok {
			t.Fatal("updates closed")
		}
		return u
	case <-time.After(waitFor):
		t.Fatal("no update")
	}
	return nil
}

// noUpdate checks that no update is pending. Entry and bundle changes notify
// before they return, so this is exact right after one.
func noUpdate(t testing.TB, sub cache.Subscriber) {
	t.Helper()
	select {
	case u := <-sub.Updates():
		t.Fatalf("unexpected update with %d identities", len(u.Identities))
	default:
	}
}

// eventually polls cond until it holds or the wait runs out.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitFor)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// ids returns the SPIFFE IDs of u's identities, in order.
func ids(u *cache.WorkloadUpdate) []string {
	var out []string
	for _, id := range u.Identities {
		out = append(out, id.Entry.GetSpiffeId())
	}
	return out
}

func serial(id cache.Identity) string { return id.SVID[0].SerialNumber.String() }

// verify checks every identity of u against u's own bundle with go-spiffe,
// at the fake clock's time.
func verify(t testing.TB, u *cache.WorkloadUpdate, at time.Time) {
	t.Helper()
	for _, id := range u.Identities {
		got, _, err := x509svid.Verify(id.SVID, u.Bundle, x509svid.WithTime(at))
		if err != nil {
			t.Fatalf("verify %s: %v", id.Entry.GetSpiffeId(), err)
		}
		if got.String() != id.Entry.GetSpiffeId() {
			t.Fatalf("SVID names %s, entry %s", got, id.Entry.GetSpiffeId())
		}
		pub, ok := id.PrivateKey.Public().(*ecdsa.PublicKey)
		if !ok || !pub.Equal(id.SVID[0].PublicKey) {
			t.Fatalf("private key does not match SVID of %s", id.Entry.GetSpiffeId())
		}
		if pub.Curve != elliptic.P256() {
			t.Fatalf("key curve %s, want P-256", pub.Curve.Params().Name)
		}
	}
}

// checkNoLeaks fails the test if goroutines of package cache outlive it.
// Registered first, so it runs after every other cleanup.
func checkNoLeaks(t *testing.T) {
	t.Cleanup(func() {
		deadline := time.Now().Add(waitFor)
		for {
			buf := make([]byte, 1<<20)
			buf = buf[:runtime.Stack(buf, true)]
			var leaked []string
			for _, g := range strings.Split(string(buf), "\n\n") {
				if strings.Contains(g, "ferry/agent/cache.") {
					leaked = append(leaked, g)
				}
			}
			if len(leaked) == 0 {
				return
			}
			if time.Now().After(deadline) {
				t.Errorf("%d goroutines leaked:\n%s", len(leaked), strings.Join(leaked, "\n\n"))
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
	})
}
