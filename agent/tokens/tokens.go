// Package tokens obtains Entra-style access tokens for the agent's callers:
// it resolves the caller's identity, signs a client assertion for it, trades
// the assertion at the token authority (Exchanger) and caches the result per
// identity and resource (Cache). Provider ties these together and is the
// agent's imds.Tokens.
package tokens

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/ferry-id/ferry/agent/imds"
)

// Token is an access token from the authority.
type Token struct {
	AccessToken string
	ExpiresOn   time.Time
	// ExtExpiresOn is the extended expiry (ext_expires_in); ExpiresOn when not sent.
	ExtExpiresOn time.Time
	// RefreshOn is the authority's proactive refresh hint (refresh_in); zero
	// when not sent.
	RefreshOn time.Time
	// NotBefore is zero unless the authority sent not_before.
	NotBefore time.Time
	// Obtained is when the request was sent.
	Obtained time.Time
}

// Identity is the managed identity a caller gets a token for.
type Identity struct {
	TenantID string
	ClientID string
	ObjectID string
	// SPIFFEID is the subject the client assertion is issued for; the
	// identity's federated credential must match it.
	SPIFFEID string
}

// Identities resolves a caller and selector to one identity. It returns
// errors wrapping imds.ErrIdentityNotFound, imds.ErrAmbiguousIdentity or
// imds.ErrForbidden. Called on every request: it is the authorization step,
// so it must not be cached by identity alone. Safe for concurrent use.
type Identities interface {
	Identity(ctx context.Context, c imds.Caller, s imds.Selector) (Identity, error)
}

// Granted is implemented by Identities that remember decisions: it returns,
// without blocking, the identity Identity would return for the same call if
// it has made that decision already and it still holds (for
// identities.Resolver: granted on the same connection, to the same caller
// and selector, within its re-attestation bound). ok is false otherwise.
type Granted interface {
	Granted(ctx context.Context, c imds.Caller, s imds.Selector) (id Identity, ok bool)
}

// Assertions signs a client assertion (a JWT-SVID with audience
// api://AzureADTokenExchange) for id.SPIFFEID. Safe for concurrent use.
type Assertions interface {
	Assertion(ctx context.Context, id Identity) (string, error)
}

// Exchange trades an assertion for an access token. *Exchanger implements it.
type Exchange interface {
	Exchange(ctx context.Context, r ExchangeRequest) (*Token, error)
}

// Config configures a Provider.
type Config struct {
	Identities Identities
	Assertions Assertions
	Exchange   Exchange
	// Cache; default NewCache(CacheConfig{Logger: Logger}).
	Cache *Cache
	// Logger; default slog.Default().
	Logger *slog.Logger
}

// Provider implements imds.Tokens.
type Provider struct {
	ids     Identities
	granted Granted // nil unless ids implements it
	asrt    Assertions
	exch    Exchange
	cache   *Cache
}

var (
	_ imds.Tokens       = (*Provider)(nil)
	_ imds.CachedTokens = (*Provider)(nil)
)

// New returns a Provider.
func New(c Config) (*Provider, error) {
	if c.Identities == nil || c.Assertions == nil || c.Exchange == nil {
		return nil, errors.New("tokens: Identities, Assertions and Exchange are required")
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.Cache == nil {
		c.Cache = NewCache(CacheConfig{Logger: c.Logger})
	}
	granted, _ := c.Identities.(Granted)
	return &Provider{ids: c.Identities, granted: granted, asrt: c.Assertions, exch: c.Exchange, cache: c.Cache}, nil
}

// CachedToken answers from memory only: the identity already granted to this
// caller (Identities implementing Granted) and a token cached for it that is
// not due for refresh. Anything else is a miss, for Token to handle.
func (p *Provider) CachedToken(ctx context.Context, c imds.Caller, r imds.Request) (*imds.Token, bool) {
	if p.granted == nil {
		return nil, false
	}
	id, ok := p.granted.Granted(ctx, c, r.Selector)
	if !ok {
		return nil, false
	}
	tok, ok := p.cache.Peek(cacheKey(id, r.Resource))
	if !ok {
		return nil, false
	}
	return imdsToken(id, tok), true
}

func cacheKey(id Identity, resource string) Key {
	return Key{TenantID: id.TenantID, ClientID: id.ClientID, Resource: resource}
}

func imdsToken(id Identity, tok *Token) *imds.Token {
	return &imds.Token{
		AccessToken:  tok.AccessToken,
		ClientID:     id.ClientID,
		ExpiresOn:    tok.ExpiresOn,
		NotBefore:    tok.NotBefore,
		ExtExpiresOn: tok.ExtExpiresOn,
	}
}

// Token resolves the caller's identity and returns a cached or new token.
func (p *Provider) Token(ctx context.Context, c imds.Caller, r imds.Request) (*imds.Token, error) {
	id, err := p.ids.Identity(ctx, c, r.Selector)
	if err != nil {
		return nil, fmt.Errorf("tokens: %w", err)
	}
	key := cacheKey(id, r.Resource)
	tok, err := p.cache.Get(ctx, key, func(ctx context.Context) (*Token, error) {
		a, err := p.asrt.Assertion(ctx, id)
		if err != nil {
			return nil, fmt.Errorf("tokens: assertion for %s: %w", id.SPIFFEID, err)
		}
		return p.exch.Exchange(ctx, ExchangeRequest{
			TenantID: id.TenantID, ClientID: id.ClientID, Assertion: a, Resource: r.Resource,
		})
	})
	if err != nil {
		return nil, err
	}
	return imdsToken(id, tok), nil
}
