// Package demoapi is a small protected resource: an HTTP API that accepts
// Entra-style access tokens the way an API registered in Entra validates them,
// so that a flow ending in "call the API" can be tried and tested against
// ferry's bridge. `ferry demo-api` runs it; `ferry dev` runs one in-process.
//
// Validation, in order:
//   - the tenant's OIDC metadata is read from
//     {authority}/{tenant}/v2.0/.well-known/openid-configuration (and the v1
//     document at {authority}/{tenant}/.well-known/openid-configuration); their
//     issuers are the only accepted values of iss, compared exactly;
//   - the signing key is found by kid in the JWKS of the token's issuer,
//     fetched through bridge/discovery: cached, refetched when a kid is
//     unknown at most once per MinRefresh, and when older than MaxAge;
//   - RS256 only, exp required, exp/nbf/iat with Leeway of skew;
//   - aud must be one of Audiences (the identifier URI v1 tokens carry when
//     requested by it, the app ID v2 tokens carry);
//   - tid must be the configured tenant;
//   - roles must hold Role, when one is required.
//
// Answers follow RFC 6750: 200 with who called; 401 with
// `WWW-Authenticate: Bearer` when no bearer token was sent, or with
// error="invalid_token" and an error_description when the token is refused;
// 403 with error="insufficient_scope" when a valid token lacks the role; 400
// with error="invalid_request" for a malformed Authorization header.
package demoapi

import (
	"context"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/ferry-id/ferry/bridge/discovery"
)

// Defaults for Config fields left zero.
const (
	// DefaultLeeway is the clock skew tolerated on exp, nbf and iat.
	DefaultLeeway = 60 * time.Second
	// DefaultMinRefresh is the least time between two JWKS fetches caused by
	// unknown kids (Entra's guidance for resource servers: not more often
	// than every 5 minutes).
	DefaultMinRefresh = 5 * time.Minute
	// DefaultMaxAge is how long fetched keys are used before a refetch.
	DefaultMaxAge = time.Hour
	// MaxTokenBytes bounds the bearer token.
	MaxTokenBytes = 16 << 10
)

// Config configures an API.
type Config struct {
	// Authority is the token service's https URL (scheme, host, optional
	// path), e.g. the bridge's https://localhost:8443.
	Authority string
	// Tenant is the tenant ID (GUID) tokens must be issued in.
	Tenant string
	// Audiences are the accepted values of aud: the API's identifier URI
	// and/or its app ID. At least one is required.
	Audiences []string
	// Role, when set, must be among the token's roles (else 403).
	Role string
	// HTTPClient fetches the metadata and keys; nil means a default client.
	HTTPClient *http.Client
	// Clock returns the current time; nil means time.Now.
	Clock func() time.Time
	// Leeway is the tolerated clock skew; default DefaultLeeway.
	Leeway time.Duration
	// MinRefresh and MaxAge tune the key cache; defaults DefaultMinRefresh
	// and DefaultMaxAge. MinRefresh also paces retries of the tenant's v1
	// metadata while it cannot be read.
	MinRefresh, MaxAge time.Duration
	// RetryAfterError is the least time between fetches of the tenant's v2
	// metadata while they fail; default 5 s.
	RetryAfterError time.Duration
	Logger          *slog.Logger
}

// API validates tokens and answers requests. It is safe for concurrent use.
type API struct {
	cfg  Config
	keys *discovery.Cache
	log  *slog.Logger
	http *http.Client

	mu        sync.Mutex // held while fetching metadata
	v2, v1    string     // the tenant's issuers, once read
	attempted time.Time  // last metadata fetch
	lastErr   error      // of the last v2 fetch
}

// New validates cfg and returns an API. Nothing is fetched until the first
// request (or Prefetch).
func New(cfg Config) (*API, error) {
	u, err := url.Parse(cfg.Authority)
	if err != nil || u.Scheme != "https" || u.Host == "" || u.RawQuery != "" || u.User != nil {
		return nil, fmt.Errorf("demoapi: authority %q must be an https URL", cfg.Authority)
	}
	cfg.Authority = strings.TrimSuffix(cfg.Authority, "/")
	if cfg.Tenant == "" || strings.ContainsAny(cfg.Tenant, "/?#") {
		return nil, fmt.Errorf("demoapi: tenant %q is not a tenant ID", cfg.Tenant)
	}
	var auds []string
	for _, a := range cfg.Audiences {
		if a != "" && !slices.Contains(auds, a) {
			auds = append(auds, a)
		}
	}
	if len(auds) == 0 {
		return nil, errors.New("demoapi: at least one audience is required")
	}
	cfg.Audiences = auds
	if cfg.Clock == nil {
		cfg.Clock = time.Now
	}
	if cfg.Leeway <= 0 {
		cfg.Leeway = DefaultLeeway
	}
	if cfg.MinRefresh <= 0 {
		cfg.MinRefresh = DefaultMinRefresh
	}
	if cfg.MaxAge <= 0 {
		cfg.MaxAge = DefaultMaxAge
	}
	if cfg.RetryAfterError <= 0 {
		cfg.RetryAfterError = 5 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	client := cfg.HTTPClient
	if client == nil {
		client = &http.Client{Timeout: 10 * time.Second}
	}
	return &API{
		cfg: cfg,
		log: cfg.Logger,
		keys: discovery.New(discovery.Config{
			HTTPClient: client, Clock: cfg.Clock, Logger: cfg.Logger,
			MinRefresh: cfg.MinRefresh, MaxAge: cfg.MaxAge, RetryAfterError: cfg.RetryAfterError,
		}),
		http: client,
	}, nil
}

// MetadataURL is the v2 OIDC metadata document of the tenant.
func (a *API) MetadataURL() string {
	return a.cfg.Authority + "/" + url.PathEscape(a.cfg.Tenant) + "/v2.0/.well-known/openid-configuration"
}

func (a *API) metadataURLV1() string {
	return a.cfg.Authority + "/" + url.PathEscape(a.cfg.Tenant) + "/.well-known/openid-configuration"
}

// Prefetch reads the tenant's metadata now, so that a misconfiguration shows
// at start rather than at the first request.
func (a *API) Prefetch(ctx context.Context) error {
	_, err := a.acceptedIssuers(ctx)
	return err
}

// acceptedIssuers returns the issuers of the tenant's v2 (required) and v1
// (when served) metadata. Each document is fetched until it has been read
// once: the v2 document at most once per RetryAfterError, the v1 document
// (which an authority need not serve) at most once per MinRefresh.
func (a *API) acceptedIssuers(ctx context.Context) ([]string, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	now := a.cfg.Clock()
	if a.v2 != "" && (a.v1 != "" || now.Sub(a.attempted) < a.cfg.MinRefresh) {
		return a.issuers(), nil
	}
	if a.v2 == "" && !a.attempted.IsZero() && now.Sub(a.attempted) < a.cfg.RetryAfterError {
		return nil, a.lastErr
	}
	a.attempted = now
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	if a.v2 == "" {
		v2, err := a.issuerOf(ctx, a.MetadataURL())
		if err != nil {
			a.lastErr = err
			a.log.Warn("tenant metadata unavailable", "url", a.MetadataURL(), "error", err)
			return nil, err
		}
		a.v2, a.lastErr = v2, nil
		a.log.Info("tenant metadata read", "issuer", v2)
	}
	if v1, err := a.issuerOf(ctx, a.metadataURLV1()); err == nil {
		a.v1 = v1
		a.log.Info("tenant v1 metadata read", "issuer", v1)
	} else {
		a.log.Info("no v1 metadata yet; only v2 tokens are accepted", "url", a.metadataURLV1(), "error", err)
	}
	return a.issuers(), nil
}

func (a *API) issuers() []string {
	if a.v1 == "" || a.v1 == a.v2 {
		return []string{a.v2}
	}
	return []string{a.v2, a.v1}
}

func (a *API) issuerOf(ctx context.Context, u string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return "", err
	}
	req.Header.Set("Accept", "application/json")
	resp, err := a.http.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("GET %s: status %d", u, resp.StatusCode)
	}
	var doc struct {
		Issuer  string `json:"issuer"`
		JWKSURI string `json:"jwks_uri"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&doc); err != nil {
		return "", fmt.Errorf("GET %s: %w", u, err)
	}
	if doc.Issuer == "" || doc.JWKSURI == "" {
		return "", fmt.Errorf("GET %s: no issuer or jwks_uri", u)
	}
	// The keys are looked up through the issuer's own discovery document,
	// which must be this one.
	if discovery.DiscoveryURL(doc.Issuer) != u {
		return "", fmt.Errorf("GET %s: issuer %q does not publish its metadata here", u, doc.Issuer)
	}
	return doc.Issuer, nil
}

// Caller is who called, from a valid token.
type Caller struct {
	ObjectID string   `json:"oid"`
	AppID    string   `json:"appid"`
	TenantID string   `json:"tid"`
	Roles    []string `json:"roles"`
	Version  string   `json:"ver"`
	Audience string   `json:"aud"`
}

// claims are the access token claims checked here.
type claims struct {
	jwt.RegisteredClaims
	Tid   string   `json:"tid"`
	Oid   string   `json:"oid"`
	AppID string   `json:"appid"`
	Azp   string   `json:"azp"`
	Roles []string `json:"roles"`
	Ver   string   `json:"ver"`
}

// Error is a refused request, in RFC 6750's terms.
type Error struct {
	Status int
	// Code is the RFC 6750 error code ("" for a request without a token).
	Code        string
	Description string
}

func (e *Error) Error() string {
	if e.Code == "" {
		return e.Description
	}
	return e.Code + ": " + e.Description
}

func invalidToken(format string, args ...any) *Error {
	return &Error{Status: http.StatusUnauthorized, Code: "invalid_token", Description: fmt.Sprintf(format, args...)}
}

// Authenticate validates the bearer token of r and returns its caller, or an
// *Error saying how to answer.
func (a *API) Authenticate(r *http.Request) (*Caller, *Error) {
	raw, e := bearer(r)
	if e != nil {
		return nil, e
	}
	return a.Validate(r.Context(), raw)
}

// bearer extracts the token from the Authorization header.
func bearer(r *http.Request) (string, *Error) {
	hs := r.Header.Values("Authorization")
	if len(hs) == 0 {
		return "", &Error{Status: http.StatusUnauthorized, Description: "No bearer token was sent"}
	}
	if len(hs) > 1 {
		return "", &Error{Status: http.StatusBadRequest, Code: "invalid_request", Description: "More than one Authorization header"}
	}
	scheme, tok, _ := strings.Cut(hs[0], " ")
	if !strings.EqualFold(scheme, "Bearer") {
		// Another scheme: this API knows nothing of it, and says which it wants.
		return "", &Error{Status: http.StatusUnauthorized, Description: "No bearer token was sent"}
	}
	tok = strings.TrimSpace(tok)
	switch {
	case tok == "":
		return "", &Error{Status: http.StatusBadRequest, Code: "invalid_request", Description: "The Bearer credentials are empty"}
	case len(tok) > MaxTokenBytes:
		return "", invalidToken("The token exceeds %d bytes", MaxTokenBytes)
	}
	return tok, nil
}

// Validate checks an access token and returns its caller.
func (a *API) Validate(ctx context.Context, raw string) (*Caller, *Error) {
	if len(raw) > MaxTokenBytes {
		return nil, invalidToken("The token exceeds %d bytes", MaxTokenBytes)
	}
	issuers, err := a.acceptedIssuers(ctx)
	if err != nil {
		return nil, &Error{Status: http.StatusServiceUnavailable, Code: "temporarily_unavailable",
			Description: "The token issuer's metadata could not be read"}
	}
	var keyErr *Error
	var c claims
	p := jwt.NewParser(
		jwt.WithValidMethods([]string{jwt.SigningMethodRS256.Alg()}),
		jwt.WithLeeway(a.cfg.Leeway),
		jwt.WithTimeFunc(a.cfg.Clock),
		jwt.WithExpirationRequired(),
		jwt.WithIssuedAt(),
	)
	tok, err := p.ParseWithClaims(raw, &c, func(t *jwt.Token) (any, error) {
		cl := t.Claims.(*claims)
		if !slices.Contains(issuers, cl.Issuer) {
			keyErr = invalidToken("The issuer '%s' is not accepted", cl.Issuer)
			return nil, keyErr
		}
		kid, _ := t.Header["kid"].(string)
		if kid == "" {
			keyErr = invalidToken("The token has no kid")
			return nil, keyErr
		}
		k, err := a.keys.Key(ctx, cl.Issuer, kid)
		switch {
		case errors.Is(err, discovery.ErrUnknownKey):
			keyErr = invalidToken("The signing key '%s' is not in the issuer's JWKS", kid)
			return nil, keyErr
		case err != nil:
			a.log.Warn("issuer keys unavailable", "issuer", cl.Issuer, "error", err)
			keyErr = &Error{Status: http.StatusServiceUnavailable, Code: "temporarily_unavailable",
				Description: "The token issuer's keys could not be read"}
			return nil, keyErr
		}
		rk, ok := k.Public.(*rsa.PublicKey)
		if !ok {
			keyErr = invalidToken("The signing key '%s' is not an RSA key", kid)
			return nil, keyErr
		}
		return rk, nil
	})
	if err != nil {
		if keyErr != nil {
			return nil, keyErr
		}
		if tok != nil && tok.Method != nil && tok.Method.Alg() != jwt.SigningMethodRS256.Alg() {
			return nil, invalidToken("The algorithm '%s' is not accepted; tokens must be signed with RS256", tok.Method.Alg())
		}
		return nil, parseError(err)
	}
	if len(c.Audience) == 0 {
		return nil, invalidToken("The token has no audience")
	}
	var aud string
	for _, v := range c.Audience {
		if slices.Contains(a.cfg.Audiences, v) {
			aud = v
			break
		}
	}
	if aud == "" {
		return nil, invalidToken("The audience '%s' is not accepted", strings.Join(c.Audience, " "))
	}
	if !strings.EqualFold(c.Tid, a.cfg.Tenant) {
		return nil, invalidToken("The tenant '%s' is not accepted", c.Tid)
	}
	if c.Oid == "" {
		return nil, invalidToken("The token has no oid")
	}
	appID := c.AppID
	if appID == "" {
		appID = c.Azp
	}
	caller := &Caller{ObjectID: c.Oid, AppID: appID, TenantID: c.Tid, Roles: c.Roles, Version: c.Ver, Audience: aud}
	if caller.Roles == nil {
		caller.Roles = []string{}
	}
	if a.cfg.Role != "" && !slices.Contains(c.Roles, a.cfg.Role) {
		return caller, &Error{Status: http.StatusForbidden, Code: "insufficient_scope",
			Description: fmt.Sprintf("The token does not grant the app role '%s'", a.cfg.Role)}
	}
	return caller, nil
}

func parseError(err error) *Error {
	switch {
	case errors.Is(err, jwt.ErrTokenMalformed):
		return invalidToken("The token is malformed")
	case errors.Is(err, jwt.ErrTokenSignatureInvalid):
		return invalidToken("The token signature is invalid")
	case errors.Is(err, jwt.ErrTokenUnverifiable):
		return invalidToken("The token's algorithm is not supported; tokens must be signed with RS256")
	case errors.Is(err, jwt.ErrTokenRequiredClaimMissing):
		return invalidToken("The token has no expiry")
	case errors.Is(err, jwt.ErrTokenExpired):
		return invalidToken("The token has expired")
	case errors.Is(err, jwt.ErrTokenNotValidYet):
		return invalidToken("The token is not valid yet")
	case errors.Is(err, jwt.ErrTokenUsedBeforeIssued):
		return invalidToken("The token was issued in the future")
	}
	return invalidToken("The token is invalid")
}

// ServeHTTP answers every path: 200 with the caller for a valid token that
// grants the role, an RFC 6750 challenge otherwise.
func (a *API) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	caller, e := a.Authenticate(r)
	if e != nil {
		if e.Status == http.StatusServiceUnavailable {
			w.Header().Set("Retry-After", "5")
		} else {
			w.Header().Set("WWW-Authenticate", challenge(e))
		}
		a.log.Debug("request refused", "path", r.URL.Path, "status", e.Status, "error", e.Error())
		writeJSON(w, e.Status, struct {
			Error       string `json:"error"`
			Description string `json:"error_description"`
		}{cmpOr(e.Code, "unauthorized"), e.Description})
		return
	}
	a.log.Info("request served", "path", r.URL.Path, "oid", caller.ObjectID, "appid", caller.AppID)
	writeJSON(w, http.StatusOK, caller)
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

// challenge is the WWW-Authenticate value for e.
func challenge(e *Error) string {
	if e.Code == "" {
		return "Bearer"
	}
	return fmt.Sprintf(`Bearer error="%s", error_description="%s"`, e.Code, quotable(e.Description))
}

// quotable keeps the characters RFC 6750 allows in error_description
// (%x20-21 / %x23-5B / %x5D-7E) and bounds the length: descriptions may
// quote values from the token.
func quotable(s string) string {
	var b strings.Builder
	for i := 0; i < len(s) && b.Len() < 256; i++ {
		c := s[i]
		switch {
		case c == '"' || c == '\\':
			b.WriteByte('\'')
		case c >= 0x20 && c <= 0x7e:
			b.WriteByte(c)
		default:
			b.WriteByte('?')
		}
	}
	return b.String()
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	_ = enc.Encode(v)
}

// Serve answers on ln until ctx ends, over TLS when tlsCfg is set.
func (a *API) Serve(ctx context.Context, ln net.Listener, tlsCfg *tls.Config) error {
	srv := &http.Server{
		Handler:           a,
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(a.log.Handler(), slog.LevelDebug),
	}
	if tlsCfg != nil {
		ln = tls.NewListener(ln, tlsCfg)
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = srv.Shutdown(sctx)
	a.log.Info("demo API stopped")
	return nil
}

// HTTPClient returns a client for the authority's metadata and keys that
// trusts only the PEM certificates in caFile, or the system roots when caFile
// is "".
func HTTPClient(caFile string) (*http.Client, error) {
	c := &http.Client{Timeout: 10 * time.Second}
	if caFile == "" {
		return c, nil
	}
	data, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("demoapi: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(data) {
		return nil, fmt.Errorf("demoapi: %s holds no PEM certificate", caFile)
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	c.Transport = tr
	return c, nil
}
