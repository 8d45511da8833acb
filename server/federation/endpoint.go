// Package federation is SPIFFE federation for a ferry server: the bundle
// endpoint that serves our trust domain's bundle to federated peers, and the
// refresher that fetches each federated trust domain's bundle from its bundle
// endpoint on the Raft leader and commits it through the log. Both sides of
// the protocol are go-spiffe's federation package; this package decides what
// is served, when to fetch, and what a fetched bundle must satisfy before it
// replaces the one held.
//
// # New keys reach peers before they sign
//
// A server node publishes a new authority into the bundle when it prepares it,
// at half of the active authority's lifetime, and activates it when a sixth of
// that lifetime remains (server/ca). Between the two lies a third of the CA TTL
// (8 hours at the default 24 h). RefreshHint lowers the served refresh hint so
// that peers refresh at least MinRefreshesBeforeActivation times in that
// window: a peer that misses a few refreshes still holds the new key before
// anything is signed with it.
package federation

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/federation"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/ca"
	"github.com/ferry-id/ferry/server/state"
)

// Bundle endpoint profiles (SPIFFE Federation, section 5).
const (
	ProfileHTTPSWeb    = state.ProfileHTTPSWeb
	ProfileHTTPSSPIFFE = state.ProfileHTTPSSPIFFE
)

// DefaultRefreshHint is the refresh hint served when none is configured
// (SPIRE's default too).
const DefaultRefreshHint = 5 * time.Minute

// MinRefreshesBeforeActivation is how many refresh hints RefreshHint fits
// between a new authority's publication and its activation.
const MinRefreshesBeforeActivation = 6

// publicationLead is how long before activation server/ca publishes a new
// authority of a CA with the given TTL: prepared when min(ttl/2, 30 days)
// remains, activated when min(ttl/6, 7 days) remains.
func publicationLead(caTTL time.Duration) time.Duration {
	return min(caTTL/2, 30*24*time.Hour) - min(caTTL/6, 7*24*time.Hour)
}

// RefreshHint returns the refresh hint to serve for a CA TTL: the configured
// hint (DefaultRefreshHint when zero), lowered so that peers refresh at least
// MinRefreshesBeforeActivation times between the publication of a new
// authority and its activation, and never below one second. With caTTL zero
// the configured hint is returned as is.
func RefreshHint(configured, caTTL time.Duration) time.Duration {
	if configured <= 0 {
		configured = DefaultRefreshHint
	}
	if caTTL <= 0 {
		return configured
	}
	return max(min(configured, publicationLead(caTTL)/MinRefreshesBeforeActivation), time.Second)
}

// Bundles reads the replicated state. *state.Store implements it.
type Bundles interface {
	View() *state.View
}

// EndpointConfig configures the bundle endpoint.
type EndpointConfig struct {
	// TrustDomain is ours: the only bundle served.
	TrustDomain spiffeid.TrustDomain
	Store       Bundles
	// Profile is ProfileHTTPSWeb (CertFile and KeyFile) or ProfileHTTPSSPIFFE
	// (GetCertificate, the node's server X509-SVID).
	Profile           string
	CertFile, KeyFile string
	GetCertificate    func(*tls.ClientHelloInfo) (*tls.Certificate, error)
	// RefreshHint is served as spiffe_refresh_hint (DefaultRefreshHint if 0).
	RefreshHint time.Duration
	Logger      *slog.Logger
}

// Endpoint serves our trust domain's bundle over HTTPS. It reads the bundle
// from the replicated state on every request, so every server node serves the
// same bundle as soon as it has applied the change.
type Endpoint struct {
	cfg     EndpointConfig
	log     *slog.Logger
	handler http.Handler
	tls     *tls.Config

	mu     sync.Mutex
	rev    uint64
	cached *spiffebundle.Bundle
}

// NewEndpoint validates cfg; for https_web it loads the certificate files.
func NewEndpoint(cfg EndpointConfig) (*Endpoint, error) {
	if cfg.TrustDomain.IsZero() || cfg.Store == nil {
		return nil, errors.New("federation: trust domain and store are required")
	}
	if cfg.RefreshHint <= 0 {
		cfg.RefreshHint = DefaultRefreshHint
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	e := &Endpoint{cfg: cfg, log: cfg.Logger}
	getCert := cfg.GetCertificate
	switch cfg.Profile {
	case ProfileHTTPSWeb:
		if cfg.CertFile == "" || cfg.KeyFile == "" {
			return nil, errors.New("federation: the https_web profile needs cert_file and key_file")
		}
		fc := &fileCert{certFile: cfg.CertFile, keyFile: cfg.KeyFile, log: e.log}
		if _, err := fc.load(); err != nil {
			return nil, err
		}
		getCert = fc.get
	case ProfileHTTPSSPIFFE:
		if getCert == nil {
			return nil, errors.New("federation: the https_spiffe profile needs the server's SVID")
		}
	default:
		return nil, fmt.Errorf("federation: bundle endpoint profile %q is neither %s nor %s", cfg.Profile, ProfileHTTPSWeb, ProfileHTTPSSPIFFE)
	}
	e.tls = &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: getCert}
	h, err := federation.NewHandler(cfg.TrustDomain, e)
	if err != nil {
		return nil, fmt.Errorf("federation: %w", err)
	}
	e.handler = h
	return e, nil
}

// Handler is the bundle endpoint's HTTP handler (GET, any path), without TLS.
func (e *Endpoint) Handler() http.Handler { return e.handler }

// TLSConfig is the endpoint's server TLS configuration.
func (e *Endpoint) TLSConfig() *tls.Config { return e.tls.Clone() }

// Serve serves the bundle over TLS on lis until ctx ends.
func (e *Endpoint) Serve(ctx context.Context, lis net.Listener) error {
	hs := &http.Server{
		Handler:           e.handler,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      10 * time.Second,
		IdleTimeout:       time.Minute,
		MaxHeaderBytes:    16 << 10,
	}
	done := make(chan struct{})
	defer close(done)
	go func() {
		select {
		case <-ctx.Done():
		case <-done:
		}
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = hs.Shutdown(sctx)
	}()
	e.log.Info("bundle endpoint serving", "addr", lis.Addr().String(), "profile", e.cfg.Profile, "refresh_hint", e.cfg.RefreshHint)
	err := hs.Serve(tls.NewListener(lis, e.tls))
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return fmt.Errorf("federation: bundle endpoint: %w", err)
}

// GetBundleForTrustDomain returns our trust domain's bundle as held in the
// replicated state, with the configured refresh hint. It implements
// spiffebundle.Source for go-spiffe's handler.
func (e *Endpoint) GetBundleForTrustDomain(td spiffeid.TrustDomain) (*spiffebundle.Bundle, error) {
	if td != e.cfg.TrustDomain {
		return nil, fmt.Errorf("federation: no bundle for trust domain %q", td)
	}
	b := e.cfg.Store.View().Bundle(td.Name())
	if b == nil || (len(b.X509Authorities) == 0 && len(b.JwtAuthorities) == 0) {
		return nil, fmt.Errorf("federation: trust domain %q has no bundle yet", td)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.cached != nil && e.rev == b.Revision {
		return e.cached, nil
	}
	served := &ferrypb.Bundle{
		TrustDomain: b.TrustDomain, X509Authorities: b.X509Authorities, JwtAuthorities: b.JwtAuthorities,
		SequenceNumber: b.SequenceNumber, RefreshHintSeconds: int64(max(e.cfg.RefreshHint/time.Second, 1)),
	}
	sb, err := ca.ToSPIFFEBundle(served)
	if err != nil {
		return nil, fmt.Errorf("federation: %w", err)
	}
	// ToSPIFFEBundle leaves out a zero sequence number; the spec's field is
	// still worth serving, so peers can order what they fetch.
	sb.SetSequenceNumber(b.SequenceNumber)
	e.cached, e.rev = sb, b.Revision
	return sb, nil
}

// fileCert serves a certificate and key from files, reloading them when
// either changes (checked at most every reloadEvery).
type fileCert struct {
	certFile, keyFile string
	log               *slog.Logger

	mu      sync.Mutex
	cert    *tls.Certificate
	mtimes  [2]time.Time
	checked time.Time
}

const reloadEvery = 10 * time.Second

func (f *fileCert) load() (*tls.Certificate, error) {
	var mt [2]time.Time
	for i, p := range []string{f.certFile, f.keyFile} {
		fi, err := os.Stat(p)
		if err != nil {
			return nil, fmt.Errorf("federation: bundle endpoint certificate: %w", err)
		}
		mt[i] = fi.ModTime()
	}
	if f.cert != nil && mt == f.mtimes {
		return f.cert, nil
	}
	c, err := tls.LoadX509KeyPair(f.certFile, f.keyFile)
	if err != nil {
		return nil, fmt.Errorf("federation: bundle endpoint certificate: %w", err)
	}
	f.cert, f.mtimes = &c, mt
	return f.cert, nil
}

func (f *fileCert) get(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.cert != nil && time.Since(f.checked) < reloadEvery {
		return f.cert, nil
	}
	f.checked = time.Now()
	c, err := f.load()
	if err != nil {
		if f.cert != nil {
			f.log.Warn("bundle endpoint certificate reload failed; serving the loaded one", "error", err)
			return f.cert, nil
		}
		return nil, err
	}
	return c, nil
}
