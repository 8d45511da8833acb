// Package discovery fetches and caches the signing keys of external OIDC
// issuers: the issuer's /.well-known/openid-configuration names its jwks_uri,
// whose first 100 keys are kept per issuer.
//
// Only issuers a caller names are fetched (the bridge names only issuers of
// federated identity credentials), never a URL taken from a token. Fetches are
// https only, bounded in time and size, serialized per issuer, and an unknown
// kid triggers a refresh at most once per MinRefresh (5 minutes by default), so
// a stream of tokens with random kids cannot make the bridge hammer an issuer.
package discovery

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/ferry-id/ferry/bridge/assertion"
)

// Defaults for Config fields left zero.
const (
	DefaultFetchTimeout     = 10 * time.Second
	DefaultMaxResponseBytes = 1 << 20
	DefaultMinRefresh       = 5 * time.Minute
	DefaultMaxAge           = 24 * time.Hour
	DefaultRetryAfterError  = 30 * time.Second
	// MaxKeys is how many keys of an issuer's JWKS are kept, as Entra does.
	MaxKeys = 100
)

// Sentinel errors returned (wrapped) by Cache.Key.
var (
	ErrUnknownKey = errors.New("discovery: key not found in the issuer's JWKS")
	ErrFetch      = errors.New("discovery: request to the issuer's OIDC endpoint failed")
)

// Config configures a Cache.
type Config struct {
	// HTTPClient performs the fetches; nil means a client with default transport.
	// Its CheckRedirect is replaced by one that follows https redirects only.
	HTTPClient *http.Client
	// Clock returns the current time; nil means time.Now.
	Clock  func() time.Time
	Logger *slog.Logger

	FetchTimeout     time.Duration // per fetch (discovery + JWKS); default 10 s
	MaxResponseBytes int64         // per document; default 1 MiB
	// MinRefresh is the least time between two fetches for one issuer once its
	// keys are known; default 5 min.
	MinRefresh time.Duration
	// MaxAge is how long fetched keys are used before a refresh; default 24 h.
	// Keys past MaxAge are still used while a refresh fails.
	MaxAge time.Duration
	// RetryAfterError is the least time between fetches while an issuer has no
	// keys because fetches fail; default 30 s.
	RetryAfterError time.Duration
}

// Cache holds the keys of external issuers. It is safe for concurrent use.
type Cache struct {
	cfg    Config
	client *http.Client

	mu      sync.Mutex
	issuers map[string]*issuerKeys
}

type issuerKeys struct {
	mu          sync.Mutex // held during a fetch: one fetch per issuer at a time
	keys        map[string]assertion.Key
	fetchedAt   time.Time // last successful fetch
	attemptedAt time.Time // last fetch, successful or not
	lastErr     error
}

// New returns an empty Cache.
func New(cfg Config) *Cache {
	if cfg.Clock == nil {
		cfg.Clock = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.FetchTimeout <= 0 {
		cfg.FetchTimeout = DefaultFetchTimeout
	}
	if cfg.MaxResponseBytes <= 0 {
		cfg.MaxResponseBytes = DefaultMaxResponseBytes
	}
	if cfg.MinRefresh <= 0 {
		cfg.MinRefresh = DefaultMinRefresh
	}
	if cfg.MaxAge <= 0 {
		cfg.MaxAge = DefaultMaxAge
	}
	if cfg.RetryAfterError <= 0 {
		cfg.RetryAfterError = DefaultRetryAfterError
	}
	client := &http.Client{}
	if cfg.HTTPClient != nil {
		c := *cfg.HTTPClient
		client = &c
	}
	client.CheckRedirect = func(req *http.Request, via []*http.Request) error {
		if req.URL.Scheme != "https" {
			return fmt.Errorf("discovery: refusing redirect to %s URL", req.URL.Scheme)
		}
		if len(via) >= 3 {
			return errors.New("discovery: too many redirects")
		}
		return nil
	}
	return &Cache{cfg: cfg, client: client, issuers: make(map[string]*issuerKeys)}
}

// Key returns the key kid of issuer iss, fetching the issuer's keys when none
// are cached, when they are older than MaxAge, or when kid is unknown and the
// last fetch is at least MinRefresh old. Errors wrap ErrUnknownKey or ErrFetch.
func (c *Cache) Key(ctx context.Context, iss, kid string) (assertion.Key, error) {
	return c.key(ctx, iss, kid, c.fetch)
}

// JWKSKey is Key for keys published at a JWKS URL known in advance, without
// a discovery document (Google's instance identity tokens, say): the same
// caching and refresh rules, keyed by the URL, which must be https.
func (c *Cache) JWKSKey(ctx context.Context, jwksURL, kid string) (assertion.Key, error) {
	return c.key(ctx, "jwks "+jwksURL, kid, func(ctx context.Context, _ string) (map[string]assertion.Key, error) {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.cfg.FetchTimeout)
		defer cancel()
		if err := httpsURL(jwksURL); err != nil {
			return nil, fmt.Errorf("jwks: %w", err)
		}
		return c.fetchJWKS(ctx, jwksURL)
	})
}

func (c *Cache) key(ctx context.Context, iss, kid string, fetch func(context.Context, string) (map[string]assertion.Key, error)) (assertion.Key, error) {
	c.mu.Lock()
	ik, ok := c.issuers[iss]
	if !ok {
		ik = &issuerKeys{}
		c.issuers[iss] = ik
	}
	c.mu.Unlock()

	ik.mu.Lock()
	defer ik.mu.Unlock()
	now := c.cfg.Clock()
	k, found := ik.keys[kid]
	fresh := ik.keys != nil && now.Sub(ik.fetchedAt) < c.cfg.MaxAge
	if found && fresh {
		return k, nil
	}
	if c.mayFetch(ik, now) {
		keys, err := fetch(ctx, iss)
		ik.attemptedAt = now
		ik.lastErr = err
		if err != nil {
			c.cfg.Logger.Warn("issuer key fetch failed", "issuer", iss, "error", err)
		} else {
			c.cfg.Logger.Info("issuer keys fetched", "issuer", iss, "keys", len(keys))
			ik.keys, ik.fetchedAt = keys, now
		}
		k, found = ik.keys[kid]
	}
	switch {
	case found:
		return k, nil
	case ik.keys == nil && ik.lastErr != nil:
		return assertion.Key{}, fmt.Errorf("%w: %w", ErrFetch, ik.lastErr)
	case ik.keys == nil:
		return assertion.Key{}, ErrFetch
	}
	return assertion.Key{}, fmt.Errorf("%w: kid %q", ErrUnknownKey, kid)
}

func (c *Cache) mayFetch(ik *issuerKeys, now time.Time) bool {
	if ik.attemptedAt.IsZero() {
		return true
	}
	since := now.Sub(ik.attemptedAt)
	if ik.keys == nil {
		return since >= c.cfg.RetryAfterError
	}
	if now.Sub(ik.fetchedAt) >= c.cfg.MaxAge && ik.lastErr != nil {
		// Stale keys and a failing issuer: retry at the error pace.
		return since >= c.cfg.RetryAfterError
	}
	return since >= c.cfg.MinRefresh
}

// DiscoveryURL is where the OIDC configuration of iss lives.
func DiscoveryURL(iss string) string {
	return strings.TrimSuffix(iss, "/") + "/.well-known/openid-configuration"
}

func (c *Cache) fetch(ctx context.Context, iss string) (map[string]assertion.Key, error) {
	// The fetch outlives a caller that gives up: its result serves everyone
	// waiting on this issuer, and a cancelled caller must not count as a failure.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.cfg.FetchTimeout)
	defer cancel()
	if err := httpsURL(iss); err != nil {
		return nil, fmt.Errorf("issuer: %w", err)
	}
	var meta struct {
		Issuer  string `json:"issuer"`
		JWKSURI string `json:"jwks_uri"`
	}
	if err := c.getJSON(ctx, DiscoveryURL(iss), &meta); err != nil {
		return nil, err
	}
	if meta.Issuer != iss {
		return nil, fmt.Errorf("discovery document names issuer %q, want %q", meta.Issuer, iss)
	}
	if err := httpsURL(meta.JWKSURI); err != nil {
		return nil, fmt.Errorf("jwks_uri: %w", err)
	}
	return c.fetchJWKS(ctx, meta.JWKSURI)
}

func (c *Cache) fetchJWKS(ctx context.Context, jwksURI string) (map[string]assertion.Key, error) {
	var set struct {
		Keys []json.RawMessage `json:"keys"`
	}
	if err := c.getJSON(ctx, jwksURI, &set); err != nil {
		return nil, err
	}
	if len(set.Keys) > MaxKeys {
		set.Keys = set.Keys[:MaxKeys]
	}
	keys := make(map[string]assertion.Key, len(set.Keys))
	for _, raw := range set.Keys {
		kid, k, err := parseJWK(raw)
		if err != nil {
			continue // one bad key must not hide the others
		}
		if _, dup := keys[kid]; !dup {
			keys[kid] = k
		}
	}
	return keys, nil
}

func httpsURL(s string) error {
	u, err := url.Parse(s)
	if err != nil {
		return err
	}
	if u.Scheme != "https" || u.Host == "" {
		return fmt.Errorf("%q is not an https URL", s)
	}
	return nil
}

func (c *Cache) getJSON(ctx context.Context, u string, v any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return err
	}
	req.Header.Set("Accept", "application/json")
	resp, err := c.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: status %d", u, resp.StatusCode)
	}
	if resp.ContentLength > c.cfg.MaxResponseBytes {
		return fmt.Errorf("GET %s: response of %d bytes exceeds %d", u, resp.ContentLength, c.cfg.MaxResponseBytes)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, c.cfg.MaxResponseBytes+1))
	if err != nil {
		return fmt.Errorf("GET %s: %w", u, err)
	}
	if int64(len(body)) > c.cfg.MaxResponseBytes {
		return fmt.Errorf("GET %s: response exceeds %d bytes", u, c.cfg.MaxResponseBytes)
	}
	if err := json.Unmarshal(body, v); err != nil {
		return fmt.Errorf("GET %s: %w", u, err)
	}
	return nil
}

type jwk struct {
	Kty string `json:"kty"`
	Use string `json:"use"`
	Kid string `json:"kid"`
	Alg string `json:"alg"`
	N   string `json:"n"`
	E   string `json:"e"`
	Crv string `json:"crv"`
	X   string `json:"x"`
	Y   string `json:"y"`
}

func parseJWK(raw json.RawMessage) (string, assertion.Key, error) {
	var j jwk
	if err := json.Unmarshal(raw, &j); err != nil {
		return "", assertion.Key{}, err
	}
	if j.Kid == "" {
		return "", assertion.Key{}, errors.New("key without kid")
	}
	if j.Use != "" && j.Use != "sig" {
		return "", assertion.Key{}, fmt.Errorf("key use %q", j.Use)
	}
	if j.Alg != "" && !assertion.AllowedAlg(j.Alg) {
		return "", assertion.Key{}, fmt.Errorf("key alg %q", j.Alg)
	}
	b64 := base64.RawURLEncoding
	var pub crypto.PublicKey
	switch j.Kty {
	case "RSA":
		n, err1 := b64.DecodeString(j.N)
		e, err2 := b64.DecodeString(j.E)
		if err := errors.Join(err1, err2); err != nil {
			return "", assertion.Key{}, err
		}
		if len(e) == 0 || len(e) > 4 {
			return "", assertion.Key{}, errors.New("bad RSA exponent")
		}
		ev := new(big.Int).SetBytes(e).Int64()
		if ev < 3 || ev%2 == 0 {
			return "", assertion.Key{}, errors.New("bad RSA exponent")
		}
		pk := &rsa.PublicKey{N: new(big.Int).SetBytes(n), E: int(ev)}
		if pk.N.BitLen() < assertion.MinRSABits {
			return "", assertion.Key{}, errors.New("RSA key too small")
		}
		pub = pk
	case "EC":
		var curve elliptic.Curve
		switch j.Crv {
		case "P-256":
			curve = elliptic.P256()
		case "P-384":
			curve = elliptic.P384()
		case "P-521":
			curve = elliptic.P521()
		default:
			return "", assertion.Key{}, fmt.Errorf("curve %q", j.Crv)
		}
		x, err1 := b64.DecodeString(j.X)
		y, err2 := b64.DecodeString(j.Y)
		if err := errors.Join(err1, err2); err != nil {
			return "", assertion.Key{}, err
		}
		size := (curve.Params().BitSize + 7) / 8
		if len(x) != size || len(y) != size {
			return "", assertion.Key{}, errors.New("bad EC coordinates")
		}
		uncompressed := append(append([]byte{4}, x...), y...)
		pk, err := ecdsa.ParseUncompressedPublicKey(curve, uncompressed)
		if err != nil {
			return "", assertion.Key{}, err
		}
		pub = pk
	default:
		return "", assertion.Key{}, fmt.Errorf("kty %q", j.Kty)
	}
	return j.Kid, assertion.Key{Public: pub, Alg: j.Alg}, nil
}
