package tokens_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ferry-id/ferry/agent/tokens"
	"github.com/stretchr/testify/require"
)

type clock struct {
	mu  sync.Mutex
	now time.Time
}

func newClock() *clock { return &clock{now: time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)} }

func (c *clock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }

func (c *clock) Advance(d time.Duration) { c.mu.Lock(); c.now = c.now.Add(d); c.mu.Unlock() }

// fetcher counts calls and hands out tokens "tok-N" living for life.
type fetcher struct {
	clock *clock
	life  time.Duration
	calls atomic.Int32
	gate  chan struct{} // when set, each fetch waits for a value
	fail  atomic.Bool
}

func (f *fetcher) fetch(ctx context.Context) (*tokens.Token, error) {
	n := f.calls.Add(1)
	if f.gate != nil {
		select {
		case <-f.gate:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if f.fail.Load() {
		return nil, errors.New("upstream down")
	}
	now := f.clock.Now()
	return &tokens.Token{AccessToken: fmt.Sprintf("tok-%d", n), Obtained: now, ExpiresOn: now.Add(f.life)}, nil
}

var key = tokens.Key{TenantID: "t", ClientID: "c", Resource: "https://r"}

func TestCacheHit(t *testing.T) {
	clk := newClock()
	c := tokens.NewCache(tokens.CacheConfig{Now: clk.Now, Logger: testLogger(t)})
	f := &fetcher{clock: clk, life: time.Hour}
	for range 3 {
		tok, err := c.Get(context.Background(), key, f.fetch)
		require.NoError(t, err)
		require.Equal(t, "tok-1", tok.AccessToken)
	}
	// Another resource is another token.
	tok, err := c.Get(context.Background(), tokens.Key{TenantID: "t", ClientID: "c", Resource: "https://other"}, f.fetch)
	require.NoError(t, err)
	require.Equal(t, "tok-2", tok.AccessToken)
	require.Equal(t, 2, c.Len())
}

func TestCacheCollapsesConcurrentMisses(t *testing.T) {
	clk := newClock()
	c := tokens.NewCache(tokens.CacheConfig{Now: clk.Now})
	f := &fetcher{clock: clk, life: time.Hour, gate: make(chan struct{})}
	const n = 50
	var wg sync.WaitGroup
	results := make(chan string, n)
	for range n {
		wg.Go(func() {
			tok, err := c.Get(context.Background(), key, f.fetch)
			if err != nil {
				results <- err.Error()
				return
			}
			results <- tok.AccessToken
		})
	}
	require.Eventually(t, func() bool { return f.calls.Load() == 1 }, 5*time.Second, time.Millisecond)
	close(f.gate)
	wg.Wait()
	close(results)
	for r := range results {
		require.Equal(t, "tok-1", r)
	}
	require.Equal(t, int32(1), f.calls.Load())
}

func TestCacheRefreshesInBackground(t *testing.T) {
	clk := newClock()
	c := tokens.NewCache(tokens.CacheConfig{Now: clk.Now, MinRemaining: 10 * time.Minute, RetryBackoff: time.Minute})
	f := &fetcher{clock: clk, life: time.Hour}
	ctx := context.Background()
	get := func() string {
		t.Helper()
		tok, err := c.Get(ctx, key, f.fetch)
		require.NoError(t, err)
		return tok.AccessToken
	}

	require.Equal(t, "tok-1", get())

	// Before half-life: cached, no fetch.
	clk.Advance(29 * time.Minute)
	require.Equal(t, "tok-1", get())
	require.Equal(t, int32(1), f.calls.Load())

	// After half-life: the cached token is served at once and one refresh
	// starts behind it.
	clk.Advance(2 * time.Minute)
	require.Equal(t, "tok-1", get())
	c.WaitFlight(key)
	require.Equal(t, int32(2), f.calls.Load())
	require.Equal(t, "tok-2", get())

	// A failed background refresh keeps the old token and waits RetryBackoff.
	f.fail.Store(true)
	clk.Advance(31 * time.Minute)
	require.Equal(t, "tok-2", get())
	c.WaitFlight(key)
	require.Equal(t, int32(3), f.calls.Load())
	require.Equal(t, "tok-2", get())
	clk.Advance(30 * time.Second)
	require.Equal(t, "tok-2", get())
	require.Equal(t, int32(3), f.calls.Load(), "retried before the backoff")
	clk.Advance(31 * time.Second)
	require.Equal(t, "tok-2", get())
	c.WaitFlight(key)
	require.Equal(t, int32(4), f.calls.Load())

	// Within MinRemaining of expiry the cached token is no longer served:
	// the caller waits for a fetch, and gets its error.
	clk.Advance(20 * time.Minute) // tok-2 has about 8 min left
	_, err := c.Get(ctx, key, f.fetch)
	require.ErrorContains(t, err, "upstream down")
	require.Equal(t, int32(5), f.calls.Load())
	f.fail.Store(false)
	require.Equal(t, "tok-6", get())
}

func TestCacheDoesNotCacheErrorsOrShortTokens(t *testing.T) {
	clk := newClock()
	c := tokens.NewCache(tokens.CacheConfig{Now: clk.Now, MinRemaining: 10 * time.Minute})
	f := &fetcher{clock: clk, life: time.Hour}
	f.fail.Store(true)
	_, err := c.Get(context.Background(), key, f.fetch)
	require.Error(t, err)
	_, err = c.Get(context.Background(), key, f.fetch)
	require.Error(t, err)
	require.Equal(t, int32(2), f.calls.Load())

	f.fail.Store(false)
	f.life = 5 * time.Minute // shorter than MinRemaining: served, not cached
	tok, err := c.Get(context.Background(), key, f.fetch)
	require.NoError(t, err)
	require.Equal(t, "tok-3", tok.AccessToken)
	tok, err = c.Get(context.Background(), key, f.fetch)
	require.NoError(t, err)
	require.Equal(t, "tok-4", tok.AccessToken)
	require.Zero(t, c.Len())
}

func TestCacheWaiterCancellationDoesNotFailOthers(t *testing.T) {
	clk := newClock()
	c := tokens.NewCache(tokens.CacheConfig{Now: clk.Now})
	f := &fetcher{clock: clk, life: time.Hour, gate: make(chan struct{})}

	ctx1, cancel1 := context.WithCancel(context.Background())
	err1 := make(chan error, 1)
	go func() { _, err := c.Get(ctx1, key, f.fetch); err1 <- err }()
	require.Eventually(t, func() bool { return f.calls.Load() == 1 }, 5*time.Second, time.Millisecond)

	tok2 := make(chan *tokens.Token, 1)
	go func() { tok, _ := c.Get(context.Background(), key, f.fetch); tok2 <- tok }()

	cancel1()
	require.ErrorIs(t, <-err1, context.Canceled)
	close(f.gate)
	tok := <-tok2
	require.NotNil(t, tok)
	require.Equal(t, "tok-1", tok.AccessToken)
	require.Equal(t, int32(1), f.calls.Load())
}

func TestCacheFetchPanicIsAnError(t *testing.T) {
	c := tokens.NewCache(tokens.CacheConfig{})
	_, err := c.Get(context.Background(), key, func(context.Context) (*tokens.Token, error) { panic("boom") })
	require.ErrorContains(t, err, "panicked")
	_, err = c.Get(context.Background(), key, func(context.Context) (*tokens.Token, error) { return nil, nil })
	require.Error(t, err)
}
