// Package bridge is ferry's Entra-style security token service. It takes a
// JWT (a JWT-SVID of the local trust domain, or a token of an external OIDC
// issuer) as client assertion, matches it against the federated identity
// credentials of the identity named by client_id, and issues an Entra-style
// access token signed with this replica's RSA key. It also publishes OIDC
// discovery documents and the JWKS of every replica's key.
//
// The bridge holds no state of its own: identities, credentials, resources,
// trust bundles and the public keys of all replicas come from a Directory,
// which the server's replicated state implements.
package bridge

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ferry-id/ferry/bridge/assertion"
	"github.com/ferry-id/ferry/bridge/discovery"
	"github.com/ferry-id/ferry/bridge/fic"
	"github.com/ferry-id/ferry/bridge/signing"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

// Directory is the bridge's read-only view of replicated state. All methods
// must be safe for concurrent use and must not block on the network; returned
// rows must not be modified by either side afterwards.
type Directory interface {
	// Tenant returns the tenant with this ID (a GUID).
	Tenant(id string) (*ferrypb.Tenant, bool)
	// IdentityByClientID returns the identity with this client ID in the tenant.
	IdentityByClientID(tenantID, clientID string) (*ferrypb.Identity, bool)
	// FederatedCredentials returns the credentials of an identity.
	FederatedCredentials(identityObjectID string) []*ferrypb.FederatedCredential
	// ResourceByIdentifier returns the resource with this App ID URI or app ID.
	ResourceByIdentifier(tenantID, uriOrAppID string) (*ferrypb.Resource, bool)
	// RoleAssignments returns the app roles of a resource granted to a principal.
	RoleAssignments(resourceObjectID, principalObjectID string) []*ferrypb.RoleAssignment
	// LocalIssuer returns the JWT-SVID keys of the local trust domain when iss
	// is its OIDC issuer URL. Keys of a local issuer are never fetched.
	LocalIssuer(iss string) (LocalIssuer, bool)
	// SigningKeys returns the public halves of every bridge replica's keys.
	SigningKeys() []*ferrypb.SigningKey
}

// LocalIssuer is a trust domain whose JWT-SVID keys the bridge knows from the
// replicated bundle.
type LocalIssuer struct {
	TrustDomain string
	Authorities []*ferrypb.JWTAuthority
}

// Config configures a Bridge.
type Config struct {
	Directory Directory
	// Key is this replica's signing key.
	Key *signing.Key
	// BaseURL is the bridge's public scheme://host[:port] (no path), used in
	// issuers and endpoints. Empty means "https://" + the request's Host.
	BaseURL string

	// Listener and TLSConfig are used by Run; the handler does not need them.
	Listener  net.Listener
	TLSConfig *tls.Config

	// HTTPClient fetches external issuers' OIDC metadata; nil means a default client.
	HTTPClient *http.Client
	// Clock returns the current time; nil means time.Now.
	Clock  func() time.Time
	Logger *slog.Logger

	// MaxAssertionSize bounds the client assertion; default assertion.DefaultMaxSize.
	MaxAssertionSize int
	// Leeway is the clock skew tolerated on assertions; default 60 s.
	Leeway time.Duration
	// MaxBodyBytes bounds a token request body; default 64 KiB.
	MaxBodyBytes int64
	// TokenLifetime returns the lifetime of a new access token; default a
	// uniformly random value in [60, 90] minutes, as Entra.
	TokenLifetime func() time.Duration
	// Discovery overrides the settings of the external issuer key cache;
	// HTTPClient, Clock and Logger are filled from this Config when unset.
	Discovery discovery.Config
}

// DefaultMaxBodyBytes bounds a token request body.
const DefaultMaxBodyBytes = 64 << 10

// Bridge is the token service. It is safe for concurrent use.
type Bridge struct {
	cfg    Config
	dir    Directory
	issuer *discovery.Cache
	log    *slog.Logger

	rulesMu sync.Mutex
	rules   map[string]*fic.Rule

	keysMu sync.Mutex
	keys   map[string]crypto.PublicKey // PKIX DER -> parsed local JWT authority

	// key signs tokens; SetKey swaps it when the replica's key rotates.
	key atomic.Pointer[signing.Key]
}

// SetKey makes k the key new tokens are signed with. The previous key must stay
// published (in the directory) while tokens it signed live.
func (b *Bridge) SetKey(k *signing.Key) {
	if k != nil {
		b.key.Store(k)
	}
}

func (b *Bridge) signingKey() *signing.Key { return b.key.Load() }

// New validates cfg and returns a Bridge.
func New(cfg Config) (*Bridge, error) {
	if cfg.Directory == nil {
		return nil, errors.New("bridge: Config.Directory is required")
	}
	if cfg.Key == nil {
		return nil, errors.New("bridge: Config.Key is required")
	}
	if cfg.BaseURL != "" {
		u, err := url.Parse(cfg.BaseURL)
		if err != nil || u.Scheme != "https" || u.Host == "" || (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.User != nil {
			return nil, fmt.Errorf("bridge: BaseURL %q must be https://host[:port]", cfg.BaseURL)
		}
		cfg.BaseURL = "https://" + u.Host
	}
	if cfg.Clock == nil {
		cfg.Clock = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.MaxAssertionSize <= 0 {
		cfg.MaxAssertionSize = assertion.DefaultMaxSize
	}
	if cfg.Leeway <= 0 {
		cfg.Leeway = assertion.DefaultLeeway
	}
	if cfg.MaxBodyBytes <= 0 {
		cfg.MaxBodyBytes = DefaultMaxBodyBytes
	}
	if cfg.TokenLifetime == nil {
		cfg.TokenLifetime = defaultLifetime
	}
	dc := cfg.Discovery
	if dc.HTTPClient == nil {
		dc.HTTPClient = cfg.HTTPClient
	}
	if dc.Clock == nil {
		dc.Clock = cfg.Clock
	}
	if dc.Logger == nil {
		dc.Logger = cfg.Logger
	}
	b := &Bridge{
		cfg:    cfg,
		dir:    cfg.Directory,
		issuer: discovery.New(dc),
		log:    cfg.Logger,
		rules:  make(map[string]*fic.Rule),
		keys:   make(map[string]crypto.PublicKey),
	}
	b.key.Store(cfg.Key)
	return b, nil
}

// Handler returns the HTTP handler serving every bridge endpoint.
func (b *Bridge) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{tenant}/v2.0/.well-known/openid-configuration", b.serveMetadataV2)
	mux.HandleFunc("GET /{tenant}/.well-known/openid-configuration", b.serveMetadataV1)
	mux.HandleFunc("GET /{tenant}/discovery/v2.0/keys", b.serveKeys)
	mux.HandleFunc("GET /{tenant}/discovery/keys", b.serveKeys)
	mux.HandleFunc("/{tenant}/oauth2/v2.0/token", b.serveTokenV2)
	mux.HandleFunc("/{tenant}/oauth2/token", b.serveTokenV1)
	return b.recoverer(mux)
}

// Run serves the handler over HTTPS on Config.Listener until ctx ends.
func (b *Bridge) Run(ctx context.Context) error {
	if b.cfg.Listener == nil || b.cfg.TLSConfig == nil {
		return errors.New("bridge: Run needs Config.Listener and Config.TLSConfig")
	}
	tlsCfg := b.cfg.TLSConfig.Clone()
	if tlsCfg.MinVersion < tls.VersionTLS12 {
		tlsCfg.MinVersion = tls.VersionTLS12
	}
	srv := &http.Server{
		Handler:           b.Handler(),
		TLSConfig:         tlsCfg,
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(b.log.Handler(), slog.LevelDebug),
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	err := srv.ServeTLS(b.cfg.Listener, "", "")
	if errors.Is(err, http.ErrServerClosed) {
		<-done
		return nil
	}
	return fmt.Errorf("bridge: serve: %w", err)
}

// baseURL is the scheme://host the request addressed.
func (b *Bridge) baseURL(r *http.Request) string {
	if b.cfg.BaseURL != "" {
		return b.cfg.BaseURL
	}
	host := r.Host
	if host == "" || strings.ContainsAny(host, "/\\?#@ \"") {
		host = "localhost"
	}
	return "https://" + host
}

// rule compiles fc once; compiled rules are cached by content.
func (b *Bridge) rule(fc *ferrypb.FederatedCredential) (*fic.Rule, error) {
	key := strings.Join([]string{fc.GetName(), fc.GetIssuer(), fc.GetSubject(), fc.GetClaimsMatchingExpression(), strings.Join(fc.GetAudiences(), "\x00"), fc.GetIdentityObjectId()}, "\x01")
	b.rulesMu.Lock()
	r, ok := b.rules[key]
	b.rulesMu.Unlock()
	if ok {
		return r, nil
	}
	r, err := fic.Compile(fc)
	if err != nil {
		return nil, err
	}
	b.rulesMu.Lock()
	if len(b.rules) >= 8192 {
		clear(b.rules)
	}
	b.rules[key] = r
	b.rulesMu.Unlock()
	return r, nil
}

// localKey resolves kid among a local issuer's JWT authorities.
func (b *Bridge) localKey(li LocalIssuer, kid string, now time.Time) (assertion.Key, bool) {
	for _, a := range li.Authorities {
		if a.GetKeyId() != kid {
			continue
		}
		if exp := a.GetExpiresAt(); exp != 0 && now.Unix() > exp {
			continue
		}
		der := string(a.GetPublicKey())
		b.keysMu.Lock()
		pk, ok := b.keys[der]
		b.keysMu.Unlock()
		if !ok {
			var err error
			pk, err = x509.ParsePKIXPublicKey(a.GetPublicKey())
			if err != nil {
				b.log.Warn("unparseable JWT authority in bundle", "trust_domain", li.TrustDomain, "kid", kid, "error", err)
				continue
			}
			b.keysMu.Lock()
			if len(b.keys) >= 1024 {
				clear(b.keys)
			}
			b.keys[der] = pk
			b.keysMu.Unlock()
		}
		return assertion.Key{Public: pk}, true
	}
	return assertion.Key{}, false
}
