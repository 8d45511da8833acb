package cache

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/ferry-id/ferry/proto/ferrypb"
)

// FetchJWTSVID returns a JWT-SVID for the entry's SPIFFE ID and audience.
// Tokens are cached per SPIFFE ID and audience set (order and duplicates do
// not matter) and minted anew once less than half their lifetime is left;
// concurrent misses for one key make one Signer call. When minting fails but
// the cached token has not expired, the cached token is returned.
func (c *Cache) FetchJWTSVID(ctx context.Context, entry *ferrypb.Entry, audience []string) (*JWTSVID, error) {
	aud, err := audienceSet(audience)
	if err != nil {
		return nil, err
	}
	cur, err := c.currentEntry(entry)
	if err != nil {
		return nil, err
	}
	it, err := c.jwts.get(ctx, jwtKey(cur.GetSpiffeId(), aud), func(ctx context.Context) (*tokenItem, error) {
		tok, err := c.signer.MintJWTSVID(ctx, cur.GetId(), aud)
		if err != nil {
			return nil, fmt.Errorf("cache: mint JWT-SVID for entry %s: %w", cur.GetId(), err)
		}
		return newTokenItem(tok, nil, c.clock.Now())
	})
	if err != nil {
		return nil, err
	}
	return &JWTSVID{Token: it.token, ExpiresAt: it.expires, IssuedAt: it.issued}, nil
}

// AgentSigner is implemented by a Signer that can also mint JWT-SVIDs for
// the agent's own SPIFFE ID (*session.Session).
type AgentSigner interface {
	MintAgentJWTSVID(ctx context.Context, audience []string) (string, error)
}

// ErrNoAgentSigner means the cache's Signer cannot mint the agent's own
// JWT-SVIDs.
var ErrNoAgentSigner = errors.New("cache: the signer mints no agent JWT-SVIDs")

// FetchAgentJWTSVID returns a JWT-SVID for the agent's own SPIFFE ID agentID
// and audience, cached as FetchJWTSVID. A token whose subject is not agentID
// (the agent attested anew in between) is refused, not cached.
func (c *Cache) FetchAgentJWTSVID(ctx context.Context, agentID string, audience []string) (*JWTSVID, error) {
	as, ok := c.signer.(AgentSigner)
	if !ok {
		return nil, ErrNoAgentSigner
	}
	aud, err := audienceSet(audience)
	if err != nil {
		return nil, err
	}
	// The prefix keeps the agent's tokens apart from entries' (keys of
	// those start with their SPIFFE ID, "spiffe://").
	it, err := c.jwts.get(ctx, "agent\x00"+jwtKey(agentID, aud), func(ctx context.Context) (*tokenItem, error) {
		tok, err := as.MintAgentJWTSVID(ctx, aud)
		if err != nil {
			return nil, fmt.Errorf("cache: mint the agent's JWT-SVID: %w", err)
		}
		it, err := newTokenItem(tok, nil, c.clock.Now())
		if err != nil {
			return nil, err
		}
		if it.subject != agentID {
			return nil, fmt.Errorf("cache: the agent's JWT-SVID is for %q, not %q", it.subject, agentID)
		}
		return it, nil
	})
	if err != nil {
		return nil, err
	}
	return &JWTSVID{Token: it.token, ExpiresAt: it.expires, IssuedAt: it.issued}, nil
}

// audienceSet sorts and deduplicates an audience list, which must name at
// least one non-empty audience.
func audienceSet(audience []string) ([]string, error) {
	aud := slices.Clone(audience)
	slices.Sort(aud)
	aud = slices.Compact(aud)
	if len(aud) == 0 || aud[0] == "" {
		return nil, ErrNoAudience
	}
	return aud, nil
}

// jwtKey is the cache key of a JWT-SVID for a SPIFFE ID and audience set.
func jwtKey(spiffeID string, aud []string) string {
	var b strings.Builder
	b.WriteString(spiffeID)
	for _, a := range aud {
		// Length-prefixed, so no two audience lists share a key.
		b.WriteString("\x00" + strconv.Itoa(len(a)) + ":" + a)
	}
	return b.String()
}

// FetchWITSVID returns a WIT-SVID for the entry's SPIFFE ID with the P-256
// key it is bound to (generated here; the server sees the public half).
// Caching as FetchJWTSVID, per SPIFFE ID.
func (c *Cache) FetchWITSVID(ctx context.Context, entry *ferrypb.Entry) (*WITSVID, error) {
	cur, err := c.currentEntry(entry)
	if err != nil {
		return nil, err
	}
	it, err := c.wits.get(ctx, cur.GetSpiffeId(), func(ctx context.Context) (*tokenItem, error) {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, fmt.Errorf("cache: generate WIT key: %w", err)
		}
		tok, err := c.signer.MintWITSVID(ctx, cur.GetId(), key.Public())
		if err != nil {
			return nil, fmt.Errorf("cache: mint WIT-SVID for entry %s: %w", cur.GetId(), err)
		}
		return newTokenItem(tok, key, c.clock.Now())
	})
	if err != nil {
		return nil, err
	}
	return &WITSVID{Entry: cur, Token: it.token, PrivateKey: it.key, ExpiresAt: it.expires}, nil
}

// currentEntry returns the cache's version of entry, which must still be
// served.
func (c *Cache) currentEntry(entry *ferrypb.Entry) (*ferrypb.Entry, error) {
	if entry == nil {
		return nil, fmt.Errorf("%w: nil", ErrUnknownEntry)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	es := c.entries[entry.GetId()]
	if es == nil || !es.servable(c.clock.Now()) {
		return nil, fmt.Errorf("%w: %q", ErrUnknownEntry, entry.GetId())
	}
	return es.entry, nil
}

// tokenItem is a cached JWT (a JWT-SVID, or a WIT-SVID with its key).
type tokenItem struct {
	token    string
	subject  string
	kid      string // the signing key's ID (header kid)
	key      crypto.Signer
	issued   time.Time
	expires  time.Time
	lastUsed time.Time
}

// fresh reports whether it has at least half its lifetime left at now.
func (it *tokenItem) fresh(now time.Time) bool {
	return now.Before(it.issued.Add(it.expires.Sub(it.issued) / 2))
}

// newTokenItem reads exp (required) and iat (default now) without checking
// the signature: the token comes from our own server over mTLS, and the
// workload's relying party verifies it.
func newTokenItem(token string, key crypto.Signer, now time.Time) (*tokenItem, error) {
	var claims jwt.RegisteredClaims
	parsed, _, err := jwt.NewParser().ParseUnverified(token, &claims)
	if err != nil {
		return nil, fmt.Errorf("cache: server returned a malformed token: %w", err)
	}
	if claims.ExpiresAt == nil {
		return nil, fmt.Errorf("cache: server returned a token without exp")
	}
	kid, _ := parsed.Header["kid"].(string)
	it := &tokenItem{token: token, subject: claims.Subject, kid: kid, key: key, issued: now, expires: claims.ExpiresAt.Time}
	if claims.IssuedAt != nil && claims.IssuedAt.Before(it.expires) {
		it.issued = claims.IssuedAt.Time
	}
	return it, nil
}

// tokenCache holds tokens by key with single-flight minting and a size cap.
type tokenCache struct {
	max     int
	clock   Clock
	timeout time.Duration

	mu      sync.Mutex
	items   map[string]*tokenItem
	flights map[string]*tokenFlight
	// tainted are key IDs whose tokens are no longer cached; issued counts
	// the tokens handed out per key ID until the last one expires.
	tainted map[string]bool
	issued  map[string]*issuedTokens
	// newKey is called (under mu) when a token of a key not handed out
	// before is: what the cache holds changed.
	newKey func()
}

// issuedTokens are the tokens one key signed that the cache handed out.
type issuedTokens struct {
	count   uint32
	expires time.Time // of the last to expire
}

type tokenFlight struct {
	done chan struct{}
	it   *tokenItem
	err  error
}

func newTokenCache(max int, clock Clock, timeout time.Duration, newKey func()) *tokenCache {
	return &tokenCache{
		max: max, clock: clock, timeout: timeout, newKey: newKey,
		items: make(map[string]*tokenItem), flights: make(map[string]*tokenFlight),
		tainted: make(map[string]bool), issued: make(map[string]*issuedTokens),
	}
}

// taint drops the cached tokens signed by the given key IDs and keeps tokens
// from them out of the cache from now on. The list is the complete set of
// tainted keys of the trust domain.
func (t *tokenCache) taint(kids []string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	clear(t.tainted)
	for _, k := range kids {
		t.tainted[k] = true
	}
	for key, it := range t.items {
		if t.tainted[it.kid] {
			delete(t.items, key)
		}
	}
}

// handedOut returns, per key ID, the tokens handed out that have not
// expired at now, and forgets the others.
func (t *tokenCache) handedOut(now time.Time) map[string]issuedTokens {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make(map[string]issuedTokens, len(t.issued))
	for kid, is := range t.issued {
		if !now.Before(is.expires) {
			delete(t.issued, kid)
			continue
		}
		out[kid] = *is
	}
	return out
}

// get returns the token for key, minting one when none with half its
// lifetime left is cached. The mint runs detached from ctx (bounded by the
// sign timeout) so one caller giving up does not fail the others waiting on
// the same flight.
func (t *tokenCache) get(ctx context.Context, key string, mint func(context.Context) (*tokenItem, error)) (*tokenItem, error) {
	t.mu.Lock()
	now := t.clock.Now()
	if it := t.items[key]; it != nil && it.fresh(now) {
		it.lastUsed = now
		t.mu.Unlock()
		return it, nil
	}
	f := t.flights[key]
	if f == nil {
		f = &tokenFlight{done: make(chan struct{})}
		t.flights[key] = f
		mctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), t.timeout)
		go func() {
			defer cancel()
			it, err := mint(mctx)
			t.mu.Lock()
			delete(t.flights, key)
			if err == nil {
				it.lastUsed = t.clock.Now()
				is := t.issued[it.kid]
				if is == nil {
					is = &issuedTokens{}
					t.issued[it.kid] = is
					if t.newKey != nil {
						t.newKey()
					}
				}
				is.count++
				if it.expires.After(is.expires) {
					is.expires = it.expires
				}
				// A token from a key tainted while it was minted goes to
				// its callers once but is not kept.
				if !t.tainted[it.kid] {
					t.items[key] = it
					t.trimLocked()
				}
			}
			t.mu.Unlock()
			f.it, f.err = it, err
			close(f.done)
		}()
	}
	t.mu.Unlock()

	select {
	case <-f.done:
	case <-ctx.Done():
		return nil, fmt.Errorf("cache: fetch token: %w", context.Cause(ctx))
	}
	if f.err == nil {
		return f.it, nil
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if it := t.items[key]; it != nil && t.clock.Now().Before(it.expires) && !t.tainted[it.kid] {
		return it, nil // minting failed; the cached token is still valid
	}
	return nil, f.err
}

// trimLocked keeps at most max tokens: expired ones go first, then the least
// recently used.
func (t *tokenCache) trimLocked() {
	if len(t.items) <= t.max {
		return
	}
	now := t.clock.Now()
	for k, it := range t.items {
		if !now.Before(it.expires) {
			delete(t.items, k)
		}
	}
	for len(t.items) > t.max {
		var oldest string
		var at time.Time
		for k, it := range t.items {
			if oldest == "" || it.lastUsed.Before(at) {
				oldest, at = k, it.lastUsed
			}
		}
		delete(t.items, oldest)
	}
}

func (t *tokenCache) len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.items)
}
