package ca_test

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
	"errors"
	"log/slog"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/ca"
)

var (
	td    = spiffeid.RequireTrustDomainFromString("example.org")
	td2   = spiffeid.RequireTrustDomainFromString("other.org")
	t0    = time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	errPB = errors.New("publisher down")
)

// fakeClock is a settable clock.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *fakeClock { return &fakeClock{t: t0} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Set(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = t
}

func (c *fakeClock) Add(d time.Duration) { c.Set(c.Now().Add(d)) }

// fakePublisher is an in-memory bundle. fail makes every call fail; block,
// when set, is waited on by every call.
type fakePublisher struct {
	mu    sync.Mutex
	x509  map[string]bool // DER -> tainted
	jwt   map[string]*ferrypb.JWTAuthority
	calls []string
	fail  bool
	block chan struct{}
	// entered, when set, receives the name of every call before it
	// blocks or fails.
	entered chan string
}

func newPublisher() *fakePublisher {
	return &fakePublisher{x509: map[string]bool{}, jwt: map[string]*ferrypb.JWTAuthority{}}
}

func (p *fakePublisher) enter(ctx context.Context, call string) error {
	p.mu.Lock()
	block, fail, entered := p.block, p.fail, p.entered
	p.mu.Unlock()
	if entered != nil {
		entered <- call
	}
	if block != nil {
		select {
		case <-block:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if fail {
		return errPB
	}
	p.mu.Lock()
	p.calls = append(p.calls, call)
	p.mu.Unlock()
	return nil
}

func (p *fakePublisher) PublishX509Authority(ctx context.Context, a *ferrypb.X509Authority) error {
	if err := p.enter(ctx, "publish-x509"); err != nil {
		return err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.x509[string(a.Certificate)] = a.Tainted
	return nil
}

func (p *fakePublisher) PublishJWTAuthority(ctx context.Context, a *ferrypb.JWTAuthority) error {
	if err := p.enter(ctx, "publish-jwt"); err != nil {
		return err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.jwt[a.KeyId] = a
	return nil
}

func (p *fakePublisher) RemoveX509Authority(ctx context.Context, der []byte) error {
	if err := p.enter(ctx, "remove-x509"); err != nil {
		return err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.x509, string(der))
	return nil
}

func (p *fakePublisher) RemoveJWTAuthority(ctx context.Context, kid string) error {
	if err := p.enter(ctx, "remove-jwt"); err != nil {
		return err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.jwt, kid)
	return nil
}

func (p *fakePublisher) setFail(f bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.fail = f
}

func (p *fakePublisher) hasX509(cert *x509.Certificate) (published, tainted bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	tainted, published = p.x509[string(cert.Raw)]
	return published, tainted
}

func (p *fakePublisher) hasJWT(kid string) *ferrypb.JWTAuthority {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.jwt[kid]
}

func (p *fakePublisher) counts() (x, j int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.x509), len(p.jwt)
}

// bundle is what the publisher holds, as the server would store it.
func (p *fakePublisher) bundle() *ferrypb.Bundle {
	p.mu.Lock()
	defer p.mu.Unlock()
	b := &ferrypb.Bundle{TrustDomain: td.Name()}
	for der, tainted := range p.x509 {
		b.X509Authorities = append(b.X509Authorities, &ferrypb.X509Authority{Certificate: []byte(der), Tainted: tainted})
	}
	for _, a := range p.jwt {
		b.JwtAuthorities = append(b.JwtAuthorities, a)
	}
	return b
}

// testLogger writes to t.Log and to buf when given.
func testLogger(t testing.TB, buf *bytes.Buffer) *slog.Logger {
	w := &tlogWriter{t: t, buf: buf}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tlogWriter struct {
	t   testing.TB
	mu  sync.Mutex
	buf *bytes.Buffer
}

func (w *tlogWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.buf != nil {
		w.buf.Write(p)
	}
	w.t.Log(string(bytes.TrimRight(p, "\n")))
	return len(p), nil
}

type env struct {
	ca    *ca.CA
	clock *fakeClock
	pub   *fakePublisher
	cfg   ca.Config
}

// newEnv builds a CA on a temp dir with a fake clock and publisher; mod
// adjusts the config. It does not rotate.
func newEnv(t testing.TB, mod func(*ca.Config)) *env {
	t.Helper()
	e := &env{clock: newClock(), pub: newPublisher()}
	e.cfg = ca.Config{
		TrustDomain: td,
		DataDir:     t.TempDir() + "/ca",
		NodeID:      "node-1",
		Publisher:   e.pub,
		Logger:      testLogger(t, nil),
		Clock:       e.clock.Now,
	}
	if mod != nil {
		mod(&e.cfg)
	}
	c, err := ca.New(e.cfg)
	require.NoError(t, err)
	e.ca = c
	return e
}

// newReadyEnv is newEnv after a first successful Rotate.
func newReadyEnv(t testing.TB, mod func(*ca.Config)) *env {
	t.Helper()
	e := newEnv(t, mod)
	require.NoError(t, e.ca.Rotate(context.Background()))
	return e
}

// reopen starts a new CA on the same data dir, as after a restart.
func (e *env) reopen(t testing.TB) {
	t.Helper()
	c, err := ca.New(e.cfg)
	require.NoError(t, err)
	e.ca = c
}

func (e *env) active(t testing.TB, k ca.Kind) ca.Authority {
	t.Helper()
	var out []ca.Authority
	for _, a := range e.ca.List(k) {
		if a.Status == ca.StatusActive {
			out = append(out, a)
		}
	}
	require.Len(t, out, 1, "active %s authorities", k)
	return out[0]
}

func (e *env) withStatus(k ca.Kind, s ca.Status) []ca.Authority {
	var out []ca.Authority
	for _, a := range e.ca.List(k) {
		if a.Status == s {
			out = append(out, a)
		}
	}
	return out
}

func ecKey(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	return k
}

func rsaKey(t testing.TB, bits int) *rsa.PrivateKey {
	t.Helper()
	k, err := rsa.GenerateKey(rand.Reader, bits)
	require.NoError(t, err)
	return k
}

// makeCSR makes a CSR whose subject and SANs claim an identity the CA must
// ignore.
func makeCSR(t testing.TB, key crypto.Signer) []byte {
	t.Helper()
	evil, _ := url.Parse("spiffe://evil.example/admin")
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject:        pkix.Name{CommonName: "admin", Organization: []string{"Evil"}},
		URIs:           []*url.URL{evil},
		DNSNames:       []string{"evil.example"},
		EmailAddresses: []string{"root@evil.example"},
	}, key)
	require.NoError(t, err)
	return der
}

func wid(path string) spiffeid.ID { return spiffeid.RequireFromPath(td, path) }
