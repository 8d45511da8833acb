package tokens

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"
)

// Key names a cached token.
type Key struct {
	// TenantID and ClientID name the identity the token is for.
	TenantID, ClientID string
	// Resource is the audience.
	Resource string
}

// FetchFunc obtains a new token for a key.
type FetchFunc func(ctx context.Context) (*Token, error)

// CacheConfig configures a Cache.
type CacheConfig struct {
	// MinRemaining is the lifetime a served token must still have; a cached
	// token closer to expiry is fetched anew before anyone is answered.
	// Default 10 min (Azure SDK clients do not cache tokens with 5 min or
	// less left, and would call again at once).
	MinRemaining time.Duration
	// FetchTimeout bounds one upstream fetch; default 30 s.
	FetchTimeout time.Duration
	// RetryBackoff is how long a failed background refresh waits before the
	// next attempt; default 30 s.
	RetryBackoff time.Duration
	// Now is the clock; default time.Now.
	Now func() time.Time
	// Logger; default slog.Default().
	Logger *slog.Logger
}

// Cache holds access tokens per Key. A token is served from the cache until
// its refresh time (RefreshOn, else half its lifetime); after that one
// background refresh runs while the cached token is still served, until it
// is within MinRemaining of expiry. Concurrent misses for one key share a
// single fetch. Cache is safe for concurrent use.
type Cache struct {
	minRemaining time.Duration
	fetchTimeout time.Duration
	backoff      time.Duration
	now          func() time.Time
	log          *slog.Logger

	mu      sync.RWMutex
	entries map[Key]*entry
	flights map[Key]*flight
	swept   time.Time
}

type entry struct {
	tok       *Token
	refreshAt time.Time // serve, but start a refresh, from here
	staleAt   time.Time // do not serve from here
}

type flight struct {
	done chan struct{}
	tok  *Token
	err  error
}

// NewCache returns an empty Cache.
func NewCache(c CacheConfig) *Cache {
	if c.MinRemaining <= 0 {
		c.MinRemaining = 10 * time.Minute
	}
	if c.FetchTimeout <= 0 {
		c.FetchTimeout = 30 * time.Second
	}
	if c.RetryBackoff <= 0 {
		c.RetryBackoff = 30 * time.Second
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return &Cache{
		minRemaining: c.MinRemaining, fetchTimeout: c.FetchTimeout, backoff: c.RetryBackoff,
		now: c.Now, log: c.Logger.With("component", "tokens"),
		entries: make(map[Key]*entry), flights: make(map[Key]*flight),
	}
}

// Peek returns the token for k if one is cached and not yet due for refresh;
// it never fetches and never blocks on a fetch.
func (c *Cache) Peek(k Key) (*Token, bool) {
	now := c.now()
	c.mu.RLock()
	e := c.entries[k]
	c.mu.RUnlock()
	if e != nil && now.Before(e.refreshAt) {
		return e.tok, true
	}
	return nil, false
}

// Get returns the token for k, calling fetch when the cache has no usable
// token. fetch runs detached from ctx (bounded by FetchTimeout) so that one
// caller giving up does not fail the others waiting on the same fetch.
func (c *Cache) Get(ctx context.Context, k Key, fetch FetchFunc) (*Token, error) {
	now := c.now()
	c.mu.RLock()
	e := c.entries[k]
	c.mu.RUnlock()
	if e != nil && now.Before(e.refreshAt) {
		return e.tok, nil
	}

	c.mu.Lock()
	e = c.entries[k]
	if e != nil && now.Before(e.refreshAt) {
		c.mu.Unlock()
		return e.tok, nil
	}
	if e != nil && now.Before(e.staleAt) {
		// Due for refresh but still good: refresh in the background.
		if c.flights[k] == nil {
			c.startLocked(ctx, k, fetch)
		}
		c.mu.Unlock()
		return e.tok, nil
	}
	f := c.flights[k]
	if f == nil {
		f = c.startLocked(ctx, k, fetch)
	}
	c.mu.Unlock()

	select {
	case <-f.done:
		return f.tok, f.err
	case <-ctx.Done():
		return nil, fmt.Errorf("tokens: %w", ctx.Err())
	}
}

func (c *Cache) startLocked(ctx context.Context, k Key, fetch FetchFunc) *flight {
	f := &flight{done: make(chan struct{})}
	c.flights[k] = f
	fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.fetchTimeout)
	go func() {
		defer cancel()
		tok, err := safeFetch(fctx, fetch)
		c.finish(k, f, tok, err)
	}()
	return f
}

func safeFetch(ctx context.Context, fetch FetchFunc) (tok *Token, err error) {
	defer func() {
		if p := recover(); p != nil {
			tok, err = nil, fmt.Errorf("tokens: fetch panicked: %v", p)
		}
	}()
	tok, err = fetch(ctx)
	if err == nil && (tok == nil || tok.AccessToken == "") {
		err = errors.New("tokens: fetch returned no token")
	}
	return tok, err
}

func (c *Cache) finish(k Key, f *flight, tok *Token, err error) {
	now := c.now()
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.flights, k)
	if err != nil {
		f.err = err
		if e := c.entries[k]; e != nil && now.Before(e.staleAt) {
			// A background refresh failed: keep serving, retry later.
			e.refreshAt = earliest(now.Add(c.backoff), e.staleAt)
			c.log.Warn("token refresh failed; serving cached token", "tenant", k.TenantID, "client_id", k.ClientID, "resource", k.Resource, "error", err)
		}
		close(f.done)
		return
	}
	f.tok = tok
	staleAt := tok.ExpiresOn.Add(-c.minRemaining)
	refreshAt := tok.RefreshOn
	if refreshAt.IsZero() {
		start := tok.Obtained
		if start.IsZero() {
			start = now
		}
		refreshAt = start.Add(tok.ExpiresOn.Sub(start) / 2)
	}
	refreshAt = earliest(refreshAt, staleAt)
	if now.Before(staleAt) {
		c.entries[k] = &entry{tok: tok, refreshAt: refreshAt, staleAt: staleAt}
	} else {
		// Too short-lived to cache; the waiters still get it.
		delete(c.entries, k)
	}
	c.sweepLocked(now)
	close(f.done)
}

// sweepLocked drops expired entries, at most once a minute.
func (c *Cache) sweepLocked(now time.Time) {
	if now.Sub(c.swept) < time.Minute {
		return
	}
	c.swept = now
	for k, e := range c.entries {
		if !now.Before(e.tok.ExpiresOn) {
			delete(c.entries, k)
		}
	}
}

// Len is the number of cached tokens.
func (c *Cache) Len() int {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return len(c.entries)
}

func earliest(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}

// waitFlight waits for the fetch in flight for k, if any, to be recorded.
func (c *Cache) waitFlight(k Key) {
	c.mu.RLock()
	f := c.flights[k]
	c.mu.RUnlock()
	if f != nil {
		<-f.done
	}
}
