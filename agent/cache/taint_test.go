package cache_test

import (
	"context"
	"crypto/x509"
	"encoding/hex"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/ferry-id/ferry/agent/cache"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

func authorityID(c *x509.Certificate) string { return hex.EncodeToString(c.SubjectKeyId) }

func heldOf(t *testing.T, c *cache.Cache, at time.Time) map[string]*ferrypb.HeldAuthority {
	t.Helper()
	out := map[string]*ferrypb.HeldAuthority{}
	for _, h := range c.HeldAuthorities(at) {
		out[h.Kind+":"+h.AuthorityId] = h
	}
	return out
}

// TestTaintReplacesX509SVIDs: once an authority is tainted, every X509-SVID
// it signed is signed again within the taint jitter (not at its half-life),
// subscribers get the new ones, and what the cache reports holding moves to
// the new authority.
func TestTaintReplacesX509SVIDs(t *testing.T) {
	const jitter = 10 * time.Second
	e := newEnv(t, func(c *cache.Config) { c.TaintJitter = jitter })
	a := e.entry("a", "/a", "unix:uid:1")
	b := e.entry("b", "/b", "unix:uid:1", "unix:gid:1")
	e.cache.SetEntries([]*ferrypb.Entry{a, b}, 1)
	sub := e.subscribe("unix:uid:1", "unix:gid:1")
	u := next(t, sub)
	if len(u.Identities) != 2 {
		t.Fatalf("identities %v", ids(u))
	}
	oldCA := e.signer.caCert
	held := heldOf(t, e.cache, e.clock.Now())
	if h := held["x509:"+authorityID(oldCA)]; h == nil || h.Count != 2 || h.ExpiresAt != u.Identities[0].SVID[0].NotAfter.Unix() {
		t.Fatalf("held before the taint: %v", held)
	}

	// The server activates a new authority, then the old one is tainted.
	e.signer.rotate(t, "jwt-2")
	newCA := e.signer.caCert
	e.cache.TaintAuthorities([]*x509.Certificate{oldCA}, nil)
	deadline := e.clock.Now().Add(jitter)
	// Scheduled within the jitter, or already done: a delay drawn shorter
	// than the rotation slack signs again at once.
	eventually(t, "the replacement is scheduled within the jitter", func() bool {
		if w := e.clock.lastWake(); w.After(epoch) && !w.After(deadline) {
			return true
		}
		return heldOf(t, e.cache, e.clock.Now())["x509:"+authorityID(oldCA)] == nil
	})
	e.clock.Set(deadline)
	for {
		u = next(t, sub)
		replaced := 0
		for _, id := range u.Identities {
			if hex.EncodeToString(id.SVID[0].AuthorityKeyId) == authorityID(newCA) {
				replaced++
			}
		}
		if replaced == len(u.Identities) {
			break
		}
	}
	held = heldOf(t, e.cache, e.clock.Now())
	if len(held) != 1 || held["x509:"+authorityID(newCA)].GetCount() != 2 {
		t.Fatalf("held after the replacement: %v", held)
	}

	// Tainting again (the next bundle still lists it) changes nothing.
	calls := len(e.signer.batches())
	e.cache.TaintAuthorities([]*x509.Certificate{oldCA}, nil)
	noUpdate(t, sub)
	if got := len(e.signer.batches()); got != calls {
		t.Fatalf("%d more signing calls for an authority already handled", got-calls)
	}
}

// TestTaintedAuthorityLateSVID: an SVID the old authority signed that arrives
// after the taint (its request was in flight) is replaced as well.
func TestTaintedAuthorityLateSVID(t *testing.T) {
	const jitter = 5 * time.Second
	e := newEnv(t, func(c *cache.Config) { c.TaintJitter = jitter })
	a := e.entry("a", "/a", "unix:uid:1")
	e.cache.SetEntries([]*ferrypb.Entry{a}, 1)
	gate := make(chan struct{})
	e.signer.setGate(gate)
	sub := e.subscribe("unix:uid:1")
	<-e.signer.started
	oldCA := e.signer.caCert
	e.cache.TaintAuthorities([]*x509.Certificate{oldCA}, nil)
	// A replacement asked for at once (the jitter drew less than the
	// rotation slack) waits until the signer has its new authority.
	hold := make(chan struct{})
	e.signer.setGate(hold)
	close(gate) // signed by the authority just tainted
	u := next(t, sub)
	if got := hex.EncodeToString(u.Identities[0].SVID[0].AuthorityKeyId); got != authorityID(oldCA) {
		t.Fatalf("the late SVID chains to %s, not to the tainted authority", got)
	}
	e.signer.rotate(t, "jwt-2")
	newCA := e.signer.caCert
	e.signer.setGate(nil)
	close(hold)
	deadline := e.clock.Now().Add(jitter)
	eventually(t, "its replacement is scheduled within the jitter", func() bool {
		if w := e.clock.lastWake(); w.After(epoch) && !w.After(deadline) {
			return true
		}
		return heldOf(t, e.cache, e.clock.Now())["x509:"+authorityID(oldCA)] == nil
	})
	e.clock.Set(deadline)
	for hex.EncodeToString(u.Identities[0].SVID[0].AuthorityKeyId) != authorityID(newCA) {
		u = next(t, sub) // fails at its limit if the late SVID is never replaced
	}
}

// TestTaintDropsJWTSVIDs: tokens signed by a tainted JWT key leave the cache,
// so the next fetch gets one from the active key; the cache keeps reporting
// the tainted key until the tokens it handed out have expired.
func TestTaintDropsJWTSVIDs(t *testing.T) {
	e := newEnv(t, nil)
	a := e.entry("a", "/a", "unix:uid:1")
	e.cache.SetEntries([]*ferrypb.Entry{a}, 1)
	kid := func(tok string) string {
		p, _, err := jwt.NewParser().ParseUnverified(tok, jwt.MapClaims{})
		if err != nil {
			t.Fatal(err)
		}
		return p.Header["kid"].(string)
	}
	ctx := context.Background()
	select {
	case <-e.cache.HeldChanged():
	default:
	}
	first, err := e.cache.FetchJWTSVID(ctx, a, []string{"aud"})
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-e.cache.HeldChanged():
	default:
		t.Fatal("a token of a key not handed out before changes what the cache holds")
	}
	if again, _ := e.cache.FetchJWTSVID(ctx, a, []string{"aud"}); again.Token != first.Token {
		t.Fatal("a fresh token is served from the cache")
	}
	e.signer.rotate(t, "jwt-2")
	e.cache.TaintAuthorities(nil, []string{"jwt-1"})
	got, err := e.cache.FetchJWTSVID(ctx, a, []string{"aud"})
	if err != nil {
		t.Fatal(err)
	}
	if kid(got.Token) != "jwt-2" {
		t.Fatalf("token from key %s after its taint", kid(got.Token))
	}
	held := heldOf(t, e.cache, e.clock.Now())
	if held["jwt:jwt-1"].GetExpiresAt() != first.ExpiresAt.Unix() || held["jwt:jwt-2"].GetExpiresAt() != got.ExpiresAt.Unix() {
		t.Fatalf("held tokens: %v", held)
	}
	e.clock.Set(first.ExpiresAt)
	if held = heldOf(t, e.cache, e.clock.Now()); held["jwt:jwt-1"] != nil {
		t.Fatalf("expired tokens still reported: %v", held)
	}
}
