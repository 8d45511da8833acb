package cache_test

import (
	"context"
	"crypto/ecdsa"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/ferry-id/ferry/agent/cache"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

func TestJWTSVIDCache(t *testing.T) {
	e := newEnv(t, nil) // the signer issues 5 min JWT-SVIDs
	a := e.entry("a", "/a", "unix:uid:1")
	b := e.entry("b", "/b", "unix:uid:2")
	e.cache.SetEntries([]*ferrypb.Entry{a, b}, 1)
	ctx := context.Background()
	jwtCalls := func() int { _, _, n, _ := e.signer.counts(); return n }

	first, err := e.cache.FetchJWTSVID(ctx, a, []string{"svc-b", "svc-a"})
	if err != nil {
		t.Fatal(err)
	}
	// The signer's token, verified with the bundle's JWT authority at the
	// fake clock's time.
	var claims jwt.RegisteredClaims
	_, err = jwt.ParseWithClaims(first.Token, &claims, func(tok *jwt.Token) (any, error) {
		key, ok := e.signer.bundle().FindJWTAuthority(tok.Header["kid"].(string))
		if !ok {
			return nil, errors.New("unknown kid")
		}
		return key, nil
	}, jwt.WithTimeFunc(e.clock.Now), jwt.WithAudience("svc-a"), jwt.WithExpirationRequired())
	if err != nil {
		t.Fatalf("JWT-SVID does not verify: %v", err)
	}
	if claims.Subject != a.SpiffeId || !first.ExpiresAt.Equal(claims.ExpiresAt.Time) || !first.IssuedAt.Equal(e.clock.Now()) {
		t.Fatalf("JWT-SVID for %s expiring %s issued %s", claims.Subject, first.ExpiresAt, first.IssuedAt)
	}

	// Hit: same audience set in another order, with a duplicate.
	got, err := e.cache.FetchJWTSVID(ctx, a, []string{"svc-a", "svc-b", "svc-a"})
	if err != nil || got.Token != first.Token || jwtCalls() != 1 {
		t.Fatalf("expected a cache hit: err %v, calls %d", err, jwtCalls())
	}
	// Miss: another audience, another identity.
	if got, err := e.cache.FetchJWTSVID(ctx, a, []string{"svc-a"}); err != nil || got.Token == first.Token {
		t.Fatalf("audience subset shared a token: %v", err)
	}
	if got, err := e.cache.FetchJWTSVID(ctx, b, []string{"svc-a", "svc-b"}); err != nil || got.Token == first.Token {
		t.Fatalf("two identities shared a token: %v", err)
	}
	if n := jwtCalls(); n != 3 {
		t.Fatalf("%d mint calls, want 3", n)
	}

	// Still more than half the lifetime left: hit.
	e.clock.Advance(2*time.Minute + 29*time.Second)
	if got, _ := e.cache.FetchJWTSVID(ctx, a, []string{"svc-a", "svc-b"}); got.Token != first.Token {
		t.Fatal("reissued with more than half the lifetime left")
	}
	// Less than half left: reissued.
	e.clock.Advance(2 * time.Second)
	second, err := e.cache.FetchJWTSVID(ctx, a, []string{"svc-a", "svc-b"})
	if err != nil || second.Token == first.Token || jwtCalls() != 4 {
		t.Fatalf("not reissued past half-life: err %v, calls %d", err, jwtCalls())
	}

	// Server down past half-life: the cached, still valid token is served.
	e.signer.setFail(true)
	e.clock.Advance(3 * time.Minute)
	if got, err := e.cache.FetchJWTSVID(ctx, a, []string{"svc-a", "svc-b"}); err != nil || got.Token != second.Token {
		t.Fatalf("cached token not served while the signer fails: %v", err)
	}
	// Expired and the server still down: an error.
	e.clock.Advance(3 * time.Minute)
	if _, err := e.cache.FetchJWTSVID(ctx, a, []string{"svc-a", "svc-b"}); !errors.Is(err, errUnavailable) {
		t.Fatalf("err %v, want the signer's error", err)
	}

	if _, err := e.cache.FetchJWTSVID(ctx, a, nil); !errors.Is(err, cache.ErrNoAudience) {
		t.Fatalf("no audience: %v", err)
	}
	if _, err := e.cache.FetchJWTSVID(ctx, a, []string{""}); !errors.Is(err, cache.ErrNoAudience) {
		t.Fatalf("empty audience: %v", err)
	}
	unknown := &ferrypb.Entry{Id: "nope", SpiffeId: a.SpiffeId}
	if _, err := e.cache.FetchJWTSVID(ctx, unknown, []string{"x"}); !errors.Is(err, cache.ErrUnknownEntry) {
		t.Fatalf("unknown entry: %v", err)
	}
}

func TestJWTSVIDSingleFlight(t *testing.T) {
	e := newEnv(t, nil)
	a := e.entry("a", "/a", "unix:uid:1")
	e.cache.SetEntries([]*ferrypb.Entry{a}, 1)
	gate := make(chan struct{})
	e.signer.setGate(gate)

	// One caller gives up early; that must not fail the others.
	quitter, cancel := context.WithCancel(context.Background())
	quitErr := make(chan error, 1)
	go func() {
		_, err := e.cache.FetchJWTSVID(quitter, a, []string{"aud"})
		quitErr <- err
	}()
	<-e.signer.started

	const n = 20
	tokens := make([]string, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			s, err := e.cache.FetchJWTSVID(context.Background(), a, []string{"aud"})
			if err != nil {
				t.Error(err)
				return
			}
			tokens[i] = s.Token
		})
	}
	cancel()
	if err := <-quitErr; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled caller: %v", err)
	}
	close(gate)
	wg.Wait()
	if _, _, calls, _ := e.signer.counts(); calls != 1 {
		t.Fatalf("%d mint calls for %d concurrent misses", calls, n+1)
	}
	for i, tok := range tokens {
		if tok == "" || tok != tokens[0] {
			t.Fatalf("caller %d got another token", i)
		}
	}
}

func TestWITSVID(t *testing.T) {
	e := newEnv(t, nil)
	a := e.entry("a", "/a", "unix:uid:1")
	e.cache.SetEntries([]*ferrypb.Entry{a}, 1)
	ctx := context.Background()

	w, err := e.cache.FetchWITSVID(ctx, a)
	if err != nil {
		t.Fatal(err)
	}
	if w.Entry.GetId() != "a" || w.Token == "" || !w.ExpiresAt.Equal(e.clock.Now().Add(5*time.Minute)) {
		t.Fatalf("WIT-SVID %+v", w)
	}
	e.signer.mu.Lock()
	sent := e.signer.witKeys[0]
	e.signer.mu.Unlock()
	pub, ok := w.PrivateKey.Public().(*ecdsa.PublicKey)
	if !ok || !pub.Equal(sent) {
		t.Fatal("the key returned is not the one whose public half was sent")
	}

	again, err := e.cache.FetchWITSVID(ctx, a)
	if err != nil || again.Token != w.Token {
		t.Fatalf("expected a cache hit: %v", err)
	}
	e.clock.Advance(3 * time.Minute)
	fresh, err := e.cache.FetchWITSVID(ctx, a)
	if err != nil || fresh.Token == w.Token || fresh.PrivateKey == w.PrivateKey {
		t.Fatalf("not reissued with a new key past half-life: %v", err)
	}
	if _, _, _, calls := e.signer.counts(); calls != 2 {
		t.Fatalf("%d mint calls, want 2", calls)
	}
	if got := e.cache.Stats().WITSVIDs; got != 1 {
		t.Fatalf("%d cached WIT-SVIDs", got)
	}
}

func TestTokenCacheIsBounded(t *testing.T) {
	e := newEnv(t, func(c *cache.Config) { c.MaxTokens = 3 })
	a := e.entry("a", "/a", "unix:uid:1")
	e.cache.SetEntries([]*ferrypb.Entry{a}, 1)
	for _, aud := range []string{"1", "2", "3", "4", "5"} {
		if _, err := e.cache.FetchJWTSVID(context.Background(), a, []string{aud}); err != nil {
			t.Fatal(err)
		}
		e.clock.Advance(time.Second)
	}
	if got := e.cache.Stats().JWTSVIDs; got != 3 {
		t.Fatalf("%d cached JWT-SVIDs, want 3", got)
	}
	// The least recently used went first: "5" is still cached.
	before := func() int { _, _, n, _ := e.signer.counts(); return n }()
	if _, err := e.cache.FetchJWTSVID(context.Background(), a, []string{"5"}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.cache.FetchJWTSVID(context.Background(), a, []string{"1"}); err != nil {
		t.Fatal(err)
	}
	if _, _, n, _ := e.signer.counts(); n != before+1 {
		t.Fatalf("%d mints, want 1 (for the evicted audience only)", n-before)
	}
}

func TestAgentJWTSVID(t *testing.T) {
	e := newEnv(t, nil)
	const agentID = "spiffe://example.org/spire/agent/x509pop/node-1"
	e.signer.mu.Lock()
	e.signer.agentID = agentID
	e.signer.mu.Unlock()
	ctx := context.Background()
	jwtCalls := func() int { _, _, n, _ := e.signer.counts(); return n }
	aud := []string{"api://AzureADTokenExchange"}

	first, err := e.cache.FetchAgentJWTSVID(ctx, agentID, aud)
	if err != nil {
		t.Fatal(err)
	}
	var claims jwt.RegisteredClaims
	if _, _, err := jwt.NewParser().ParseUnverified(first.Token, &claims); err != nil || claims.Subject != agentID {
		t.Fatalf("token for %q: %v", claims.Subject, err)
	}
	if got, err := e.cache.FetchAgentJWTSVID(ctx, agentID, aud); err != nil || got.Token != first.Token || jwtCalls() != 1 {
		t.Fatalf("expected a cache hit: err %v, calls %d", err, jwtCalls())
	}
	// Past half its life it is minted anew.
	e.clock.Advance(3 * time.Minute)
	if got, err := e.cache.FetchAgentJWTSVID(ctx, agentID, aud); err != nil || got.Token == first.Token || jwtCalls() != 2 {
		t.Fatalf("expected a new token: err %v, calls %d", err, jwtCalls())
	}
	// The agent attested anew as another ID: a token for the old one is
	// never handed out for the new one, nor cached under it.
	const next = "spiffe://example.org/spire/agent/join_token/new"
	if _, err := e.cache.FetchAgentJWTSVID(ctx, next, aud); err == nil {
		t.Fatal("a token for another subject was accepted")
	}
	e.signer.mu.Lock()
	e.signer.agentID = next
	e.signer.mu.Unlock()
	if got, err := e.cache.FetchAgentJWTSVID(ctx, next, aud); err != nil || got.Token == first.Token {
		t.Fatalf("after the new ID: %v", err)
	}
	if _, err := e.cache.FetchAgentJWTSVID(ctx, next, nil); !errors.Is(err, cache.ErrNoAudience) {
		t.Fatalf("no audience: %v", err)
	}
}
