package cache_test

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/ferry-id/ferry/agent/cache"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

func TestServesCachedSVIDWhileSignerFails(t *testing.T) {
	e := newEnv(t, nil) // retries from 1 min, up to 4 min
	a := e.entry("a", "/a", "unix:uid:1")
	e.cache.SetEntries([]*ferrypb.Entry{a}, 1)
	sub := e.subscribe("unix:uid:1")
	u := next(t, sub)
	first := u.Identities[0]
	notAfter := first.SVID[0].NotAfter

	e.signer.setFail(true)
	var rotateAt time.Time
	eventually(t, "rotation scheduled", func() bool {
		rotateAt = e.clock.lastWake()
		return rotateAt.After(epoch) && rotateAt.Before(notAfter)
	})
	calls := len(e.signer.batches())
	e.clock.Set(rotateAt)
	// Retries back off (1 min doubling to 4 min, ±10%) while the SVID is
	// still good, and it stays served.
	retries := 0
	for n := 1; ; n++ {
		eventually(t, "a signing attempt", func() bool { return len(e.signer.batches()) > calls })
		b := min(time.Minute<<(n-1), 4*time.Minute)
		now := e.clock.Now()
		lo, hi := earliest(now.Add(b*9/10), notAfter), earliest(now.Add(b*11/10), notAfter)
		var wake time.Time
		eventually(t, fmt.Sprintf("retry %d scheduled in [%s, %s]", n, lo, hi), func() bool {
			wake = e.clock.lastWake()
			return !wake.Before(lo) && !wake.After(hi)
		})
		noUpdate(t, sub)
		got, err := e.cache.FetchWorkloadUpdate(context.Background(), sels(t, "unix:uid:1"))
		if err != nil {
			t.Fatal(err)
		}
		if len(got.Identities) != 1 || serial(got.Identities[0]) != serial(first) {
			t.Fatal("cached SVID not served while the signer fails")
		}
		if !wake.Before(notAfter) {
			break
		}
		retries++
		calls = len(e.signer.batches())
		e.clock.Set(wake)
	}
	if retries < 4 {
		t.Fatalf("only %d retries in half an SVID lifetime", retries)
	}
	e.clock.Set(notAfter)

	// Expired: the identity is withdrawn at once.
	if u := next(t, sub); len(u.Identities) != 0 {
		t.Fatalf("expired SVID still served: %v", ids(u))
	}

	// The server is back: the next retry mints a new SVID.
	e.signer.setFail(false)
	eventually(t, "a retry scheduled", func() bool { return e.clock.lastWake().After(e.clock.Now()) })
	e.clock.Set(e.clock.lastWake())
	u = next(t, sub)
	if len(u.Identities) != 1 || serial(u.Identities[0]) == serial(first) {
		t.Fatal("no new SVID after recovery")
	}
	verify(t, u, e.clock.Now())
}

func earliest(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}

func TestSignerFailureBeforeFirstSVID(t *testing.T) {
	e := newEnv(t, nil)
	e.signer.setFail(true)
	a := e.entry("a", "/a", "unix:uid:1")
	e.cache.SetEntries([]*ferrypb.Entry{a}, 1)
	sub := e.subscribe("unix:uid:1")
	// The workload hears after the first failed attempt that it has nothing
	// yet, rather than waiting on a server that may be down for long.
	if u := next(t, sub); len(u.Identities) != 0 {
		t.Fatalf("identities %v", ids(u))
	}
	e.signer.setFail(false)
	eventually(t, "a retry scheduled", func() bool { return e.clock.lastWake().After(e.clock.Now()) })
	e.clock.Set(e.clock.lastWake())
	if u := next(t, sub); len(u.Identities) != 1 {
		t.Fatalf("identities %v", ids(u))
	}
}

func TestRejectsWrongSVIDFromSigner(t *testing.T) {
	e := newEnv(t, nil)
	a := e.entry("a", "/a", "unix:uid:1")
	// The signer's view of the entry names another ID.
	e.signer.register(&ferrypb.Entry{Id: "a", SpiffeId: td.ID().String() + "/someone-else"})
	e.cache.SetEntries([]*ferrypb.Entry{a}, 1)
	if u := next(t, e.subscribe("unix:uid:1")); len(u.Identities) != 0 {
		t.Fatalf("served an SVID naming %v", u.Identities[0].SVID[0].URIs)
	}
}

func TestLazyMintingAndIdleEviction(t *testing.T) {
	e := newEnv(t, nil) // idle timeout 5 min
	var all []*ferrypb.Entry
	for i := range 20 {
		all = append(all, e.entry(fmt.Sprint(i), fmt.Sprintf("/w%d", i), fmt.Sprintf("unix:uid:%d", i)))
	}
	e.cache.SetEntries(all, 1)

	sub := e.subscribe("unix:uid:3")
	u := next(t, sub)
	first := serial(u.Identities[0])
	if _, csrs, _, _ := e.signer.counts(); csrs != 1 {
		t.Fatalf("%d CSRs signed for one workload with one entry", csrs)
	}
	if st := e.cache.Stats(); st.X509SVIDs != 1 || st.Entries != 20 {
		t.Fatalf("stats %+v", st)
	}

	// A one-shot fetch within the idle timeout is served from the cache.
	sub.Finish()
	if _, ok := <-sub.Updates(); ok {
		t.Fatal("Updates not closed by Finish")
	}
	e.clock.Advance(4 * time.Minute)
	got, err := e.cache.FetchWorkloadUpdate(context.Background(), sels(t, "unix:uid:3"))
	if err != nil {
		t.Fatal(err)
	}
	if serial(got.Identities[0]) != first {
		t.Fatal("one-shot fetch did not reuse the cached SVID")
	}
	if _, csrs, _, _ := e.signer.counts(); csrs != 1 {
		t.Fatalf("%d CSRs", csrs)
	}

	// Nobody asks for 5 min: the SVID and its key are dropped, counting from
	// the one-shot fetch (the scheduler may have planned its wake-up from the
	// subscriber's end, and then looks again).
	idleAt := e.clock.Now().Add(5 * time.Minute)
	eventually(t, "wake-up planned", func() bool { w := e.clock.lastWake(); return w.After(e.clock.Now()) && !w.After(idleAt) })
	e.clock.Set(idleAt.Add(-time.Second))
	eventually(t, "eviction scheduled", func() bool { return e.clock.lastWake().Equal(idleAt) })
	if st := e.cache.Stats(); st.X509SVIDs != 1 {
		t.Fatalf("SVID evicted a second before its idle timeout: %+v", st)
	}
	e.clock.Set(idleAt)
	eventually(t, "eviction", func() bool { return e.cache.Stats().X509SVIDs == 0 })

	got, err = e.cache.FetchWorkloadUpdate(context.Background(), sels(t, "unix:uid:3"))
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Identities) != 1 || serial(got.Identities[0]) == first {
		t.Fatal("no fresh SVID after eviction")
	}
	if _, csrs, _, _ := e.signer.counts(); csrs != 2 {
		t.Fatalf("%d CSRs, want 2", csrs)
	}

	// Minted again on demand, the SVID is evicted again once idle.
	idleAt = e.clock.Now().Add(5 * time.Minute)
	eventually(t, "second eviction scheduled", func() bool { return e.clock.lastWake().Equal(idleAt) })
	e.clock.Set(idleAt)
	eventually(t, "second eviction", func() bool { return e.cache.Stats().X509SVIDs == 0 })
}

// Entries expire in the order of their expiry times, as changed by updates,
// whichever workloads use them.
func TestEntryExpiryOrder(t *testing.T) {
	e := newEnv(t, nil)
	at := func(m int) int64 { return epoch.Add(time.Duration(m) * time.Minute).Unix() }
	var all []*ferrypb.Entry
	for i, m := range []int{30, 10, 20, 40, 50} {
		x := e.entry(fmt.Sprint(i), fmt.Sprintf("/w%d", i), fmt.Sprintf("unix:uid:%d", i))
		x.ExpiresAt = at(m)
		all = append(all, x)
	}
	e.cache.SetEntries(all, 1)
	sub := e.subscribe("unix:uid:4")
	if got := ids(next(t, sub)); len(got) != 1 {
		t.Fatalf("identities %v", got)
	}
	// Entry 3 now expires first, entry 0 never, entry 4 (the subscriber's)
	// later than before.
	changed := func(x *ferrypb.Entry, m int) *ferrypb.Entry {
		c := withHint(x, "changed", x.Revision+10)
		c.X509SvidTtl, c.DnsNames, c.ExpiresAt = x.X509SvidTtl, x.DnsNames, 0
		if m > 0 {
			c.ExpiresAt = at(m)
		}
		return c
	}
	e.cache.ApplyEntryChanges([]*ferrypb.Entry{changed(all[3], 5), changed(all[0], 0), changed(all[4], 60)}, nil, 2)
	if u := next(t, sub); len(u.Identities) != 1 || u.Identities[0].Entry.GetHint() != "changed" {
		t.Fatalf("after the change: %+v", u.Identities)
	}
	for _, step := range []struct {
		minute int
		left   int
	}{{5, 4}, {10, 3}, {20, 2}} {
		eventually(t, fmt.Sprintf("wake-up at minute %d", step.minute), func() bool {
			return e.clock.lastWake().Equal(time.Unix(at(step.minute), 0))
		})
		e.clock.Set(time.Unix(at(step.minute), 0))
		eventually(t, fmt.Sprintf("%d entries left at minute %d", step.left, step.minute), func() bool {
			return e.cache.Stats().Entries == step.left
		})
	}
	e.clock.Set(time.Unix(at(60), 0))
	if got := ids(next(t, sub)); len(got) != 0 {
		t.Fatalf("after the subscriber's entry expired: %v", got)
	}
	if st := e.cache.Stats(); st.Entries != 1 {
		t.Fatalf("stats %+v, want the entry without expiry only", st)
	}
}

func TestBatchesConcurrentDemand(t *testing.T) {
	for _, tc := range []struct {
		name     string
		maxBatch int
		subs     int
		maxCalls int
	}{
		{"one batch after the first", 500, 40, 2},
		{"capped batches", 8, 40, 1 + 5}, // the first call, then ceil(39/8)
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, func(c *cache.Config) { c.MaxBatch = tc.maxBatch })
			var all []*ferrypb.Entry
			for i := range tc.subs {
				all = append(all, e.entry(fmt.Sprint(i), fmt.Sprintf("/w%d", i), fmt.Sprintf("unix:uid:%d", i)))
			}
			e.cache.SetEntries(all, 1)
			gate := make(chan struct{})
			e.signer.setGate(gate)

			subs := make([]cache.Subscriber, tc.subs)
			var wg sync.WaitGroup
			for i := range tc.subs {
				wg.Go(func() {
					s, err := e.cache.SubscribeToCacheChanges(context.Background(), sels(t, fmt.Sprintf("unix:uid:%d", i)))
					if err != nil {
						t.Error(err)
						return
					}
					subs[i] = s
				})
			}
			wg.Wait()
			<-e.signer.started // the first call is in flight; everyone else is queued
			e.signer.setGate(nil)
			close(gate)
			for i, s := range subs {
				u := next(t, s)
				if got := ids(u); len(got) != 1 || got[0] != all[i].SpiffeId {
					t.Fatalf("subscriber %d got %v", i, got)
				}
				verify(t, u, e.clock.Now())
				s.Finish()
			}
			sizes := e.signer.batches()
			total := 0
			for _, n := range sizes {
				total += n
				if n > tc.maxBatch {
					t.Fatalf("batch of %d over the cap %d", n, tc.maxBatch)
				}
			}
			if total != tc.subs || len(sizes) > tc.maxCalls {
				t.Fatalf("batches %v: want %d CSRs in at most %d calls", sizes, tc.subs, tc.maxCalls)
			}
		})
	}
}

func TestBatchShrinksAfterFailure(t *testing.T) {
	e := newEnv(t, func(c *cache.Config) { c.MaxBatch = 8 })
	var all []*ferrypb.Entry
	for i := range 8 {
		all = append(all, e.entry(fmt.Sprint(i), fmt.Sprintf("/w%d", i), fmt.Sprintf("unix:uid:%d", i)))
	}
	e.cache.SetEntries(all, 1)
	gate := make(chan struct{})
	e.signer.setGate(gate)
	subs := []cache.Subscriber{e.subscribe("unix:uid:0")}
	<-e.signer.started
	for i := 1; i < 8; i++ {
		subs = append(subs, e.subscribe(fmt.Sprintf("unix:uid:%d", i)))
	}
	e.signer.setFail(true)
	e.signer.setGate(nil)
	close(gate)
	for _, s := range subs {
		if u := next(t, s); len(u.Identities) != 0 {
			t.Fatal("identity while the signer fails")
		}
	}
	// Each failed call halves the next one (1 in flight, then 7 queued).
	if got, want := e.signer.batches(), []int{1, 4, 2, 1}; !slices.Equal(got, want) {
		t.Fatalf("batches %v, want %v", got, want)
	}
}

func TestSlowSubscriberDoesNotBlockOthers(t *testing.T) {
	e := newEnv(t, nil)
	a := e.entry("a", "/a", "unix:uid:1")
	e.cache.SetEntries([]*ferrypb.Entry{a}, 1)
	slow := e.subscribe("unix:uid:1")
	fast := e.subscribe("unix:uid:1")
	next(t, fast)
	for i := range 10 {
		a2 := withHint(a, fmt.Sprintf("hint-%d", i), uint64(10+i))
		e.cache.ApplyEntryChanges([]*ferrypb.Entry{a2}, nil, uint64(10+i))
		if got := next(t, fast).Identities[0].Entry.GetHint(); got != fmt.Sprintf("hint-%d", i) {
			t.Fatalf("fast subscriber got hint %q", got)
		}
	}
	// The slow one holds only the latest state.
	if got := next(t, slow).Identities[0].Entry.GetHint(); got != "hint-9" {
		t.Fatalf("slow subscriber got hint %q, want the latest", got)
	}
	noUpdate(t, slow)
}

// withHint returns a copy of e with a new hint and revision.
func withHint(e *ferrypb.Entry, hint string, rev uint64) *ferrypb.Entry {
	return &ferrypb.Entry{
		Id: e.Id, SpiffeId: e.SpiffeId, ParentId: e.ParentId, Selectors: e.Selectors,
		CreatedIndex: e.CreatedIndex, Hint: hint, Revision: rev,
	}
}

func TestEntryExpiry(t *testing.T) {
	e := newEnv(t, nil)
	a := e.entry("a", "/a", "unix:uid:1")
	b := e.entry("b", "/b", "unix:uid:1")
	b.ExpiresAt = epoch.Add(10 * time.Minute).Unix()
	e.cache.SetEntries([]*ferrypb.Entry{a, b}, 1)
	sub := e.subscribe("unix:uid:1")
	if got := ids(next(t, sub)); len(got) != 2 {
		t.Fatalf("identities %v", got)
	}
	eventually(t, "expiry scheduled", func() bool { return e.clock.lastWake().Equal(time.Unix(b.ExpiresAt, 0)) })
	e.clock.Set(time.Unix(b.ExpiresAt, 0))
	if got := ids(next(t, sub)); !slices.Equal(got, []string{a.SpiffeId}) {
		t.Fatalf("after expiry: %v", got)
	}
	if _, err := e.cache.FetchJWTSVID(context.Background(), b, []string{"x"}); !errors.Is(err, cache.ErrUnknownEntry) {
		t.Fatalf("JWT for an expired entry: %v", err)
	}
}

func TestSubscriptionEndsWithContext(t *testing.T) {
	e := newEnv(t, nil)
	ctx, cancel := context.WithCancel(context.Background())
	sub, err := e.cache.SubscribeToCacheChanges(ctx, sels(t, "unix:uid:1"))
	if err != nil {
		t.Fatal(err)
	}
	next(t, sub)
	if got := e.cache.Stats().Subscribers; got != 1 {
		t.Fatalf("%d subscribers", got)
	}
	cancel()
	select {
	case _, ok := <-sub.Updates():
		if ok {
			t.Fatal("update after cancel")
		}
	case <-time.After(waitFor):
		t.Fatal("Updates not closed after the context ended")
	}
	sub.Finish() // idempotent
	if got := e.cache.Stats().Subscribers; got != 0 {
		t.Fatalf("%d subscribers after cancel", got)
	}
	if _, err := e.cache.SubscribeToCacheChanges(ctx, nil); err == nil {
		t.Fatal("subscribe with a dead context succeeded")
	}
}

func TestFetchWorkloadUpdateHonoursContext(t *testing.T) {
	e := newEnv(t, nil)
	a := e.entry("a", "/a", "unix:uid:1")
	e.cache.SetEntries([]*ferrypb.Entry{a}, 1)
	gate := make(chan struct{})
	defer close(gate)
	e.signer.setGate(gate)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := e.cache.FetchWorkloadUpdate(ctx, sels(t, "unix:uid:1")); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err %v, want deadline exceeded", err)
	}
}

func TestSelectorKinds(t *testing.T) {
	e := newEnv(t, nil)
	if got := e.cache.SelectorKinds(); got != nil {
		t.Fatalf("kinds %v before any entry set, want nil (not known)", got)
	}
	e.cache.SetEntries(nil, 1)
	if got := e.cache.SelectorKinds(); got == nil || len(got) != 0 {
		t.Fatalf("kinds %v with no entries, want none", got)
	}
	a := e.entry("a", "/a", "unix:uid:1000", "unix:sha256:abcd")
	b := e.entry("b", "/b", "systemd:id:web.service", "unix:uid:1001")
	c := e.entry("c", "/c", "docker:root")
	e.cache.SetEntries([]*ferrypb.Entry{a, b, c}, 1)
	want := map[string]bool{"unix:uid": true, "unix:sha256": true, "systemd:id": true, "docker": true}
	if got := e.cache.SelectorKinds(); !maps.Equal(got, want) {
		t.Fatalf("kinds %v, want %v", got, want)
	}
	e.cache.ApplyEntryChanges(nil, []string{"a", "c"}, 2)
	want = map[string]bool{"unix:uid": true, "systemd:id": true}
	if got := e.cache.SelectorKinds(); !maps.Equal(got, want) {
		t.Fatalf("kinds after delete %v, want %v", got, want)
	}
}

func TestRunOnlyOnce(t *testing.T) {
	e := newEnv(t, nil)
	a := e.entry("a", "/a", "unix:uid:1")
	e.cache.SetEntries([]*ferrypb.Entry{a}, 1)
	next(t, e.subscribe("unix:uid:1")) // minted: Run is running
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if err := e.cache.Run(ctx); err == nil {
		t.Fatal("a second concurrent Run succeeded")
	}
}

func TestMintsOnlyWhileRunning(t *testing.T) {
	checkNoLeaks(t)
	clock := &fakeClock{now: epoch}
	signer := newTestSigner(t, clock)
	c, err := cache.New(cache.Config{Signer: signer, Clock: clock})
	if err != nil {
		t.Fatal(err)
	}
	c.SetBundles(signer.bundle(), nil)
	e := &env{t: t, clock: clock, signer: signer, cache: c}
	a := e.entry("a", "/a", "unix:uid:1")
	c.SetEntries([]*ferrypb.Entry{a}, 1)
	sub := e.subscribe("unix:uid:1")
	noUpdate(t, sub)
	// Demand recorded before Run is served once it starts.
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = c.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	if u := next(t, sub); len(u.Identities) != 1 {
		t.Fatalf("identities %v", ids(u))
	}
}
