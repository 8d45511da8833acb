package cache_test

import (
	"cmp"
	"crypto/x509"
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/proto"

	"github.com/ferry-id/ferry/agent/cache"
	"github.com/ferry-id/ferry/internal/selector"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

func TestNewValidatesConfig(t *testing.T) {
	if _, err := cache.New(cache.Config{}); err == nil {
		t.Fatal("New without a Signer succeeded")
	}
	clock := &fakeClock{now: epoch}
	_, err := cache.New(cache.Config{Signer: newTestSigner(t, clock), RetryMin: time.Hour, RetryMax: time.Minute})
	if err == nil {
		t.Fatal("New with RetryMax < RetryMin succeeded")
	}
}

func TestMatchingIsSubsetWithExclusions(t *testing.T) {
	e := newEnv(t, nil)
	late := e.entry("late", "/late", "unix:uid:1000")
	early := e.entry("early", "/early", "unix:uid:1000", "unix:gid:50")
	late.CreatedIndex, early.CreatedIndex = 20, 10 // the default identity is the oldest entry
	other := e.entry("other-uid", "/other", "unix:uid:1001")
	extra := e.entry("needs-unit", "/unit", "unix:uid:1000", "systemd:id:web.service")
	empty := e.entry("empty", "/empty")
	expired := e.entry("expired", "/expired", "unix:uid:1000")
	expired.ExpiresAt = epoch.Add(-time.Second).Unix()
	e.cache.SetEntries([]*ferrypb.Entry{late, early, other, extra, empty, expired}, 7)

	u := next(t, e.subscribe("unix:uid:1000", "unix:gid:50", "unix:user:bob"))
	if got, want := ids(u), []string{early.SpiffeId, late.SpiffeId}; !slices.Equal(got, want) {
		t.Fatalf("identities %v, want %v", got, want)
	}
	verify(t, u, e.clock.Now())

	u = next(t, e.subscribe("unix:uid:1000", "systemd:id:web.service"))
	if got, want := ids(u), []string{extra.SpiffeId, late.SpiffeId}; !slices.Equal(got, want) {
		t.Fatalf("identities %v, want %v", got, want)
	}
	if u := next(t, e.subscribe()); len(u.Identities) != 0 {
		t.Fatalf("empty selector set got %v", ids(u))
	}
	if u := next(t, e.subscribe("unix:gid:50")); len(u.Identities) != 0 {
		t.Fatalf("partial selector set got %v", ids(u))
	}
	if got := e.cache.Revision(); got != 7 {
		t.Fatalf("Revision %d, want 7", got)
	}
	if got := e.cache.Stats().Entries; got != 5 {
		t.Fatalf("Stats().Entries = %d, want 5 (expired entry not kept)", got)
	}
}

func TestFirstUpdateIsImmediate(t *testing.T) {
	e := newEnv(t, nil)
	a := e.entry("a", "/a", "unix:uid:1")
	e.cache.SetEntries([]*ferrypb.Entry{a}, 1)

	// No clock movement: the first update follows the signing at once.
	u := next(t, e.subscribe("unix:uid:1"))
	if got := ids(u); !slices.Equal(got, []string{a.SpiffeId}) {
		t.Fatalf("identities %v", got)
	}
	if u.Bundle == nil || !u.Bundle.Equal(e.signer.bundle()) {
		t.Fatal("update lacks the own bundle")
	}
	// Nothing to sign: the update is there when Subscribe returns.
	sub := e.subscribe("unix:uid:2")
	select {
	case u := <-sub.Updates():
		if len(u.Identities) != 0 {
			t.Fatalf("identities %v", ids(u))
		}
	default:
		t.Fatal("no update for a workload without identities")
	}
}

func TestFirstUpdateWaitsForOwnBundle(t *testing.T) {
	e := newEnv(t, nil)
	e.cache.SetBundles(nil, nil)
	a := e.entry("a", "/a", "unix:uid:1")
	e.cache.SetEntries([]*ferrypb.Entry{a}, 1)
	sub := e.subscribe("unix:uid:1")
	eventually(t, "SVID recorded", func() bool { return e.cache.Stats().X509SVIDs == 1 })
	noUpdate(t, sub)
	e.cache.SetBundles(e.signer.bundle(), nil)
	if u := next(t, sub); len(u.Identities) != 1 || u.Bundle == nil {
		t.Fatalf("update %v, bundle %v", ids(u), u.Bundle)
	}
}

func TestUpdatesFollowEntryChanges(t *testing.T) {
	e := newEnv(t, nil)
	a := e.entry("a", "/a", "unix:uid:1")
	e.cache.SetEntries([]*ferrypb.Entry{a}, 1)
	sub := e.subscribe("unix:uid:1", "unix:gid:1")
	u := next(t, sub)
	firstSerial := serial(u.Identities[0])

	// Added.
	b := e.entry("b", "/b", "unix:gid:1")
	e.cache.ApplyEntryChanges([]*ferrypb.Entry{b}, nil, 2)
	u = next(t, sub)
	if got := ids(u); !slices.Equal(got, []string{a.SpiffeId, b.SpiffeId}) {
		t.Fatalf("after add: %v", got)
	}

	// Changed without touching the certificate: same SVID, new entry.
	a2 := proto.Clone(a).(*ferrypb.Entry)
	a2.Hint, a2.Revision = "primary", 3
	e.cache.ApplyEntryChanges([]*ferrypb.Entry{a2}, nil, 3)
	u = next(t, sub)
	if u.Identities[0].Entry.GetHint() != "primary" || serial(u.Identities[0]) != firstSerial {
		t.Fatalf("after hint change: hint %q serial %s (was %s)", u.Identities[0].Entry.GetHint(), serial(u.Identities[0]), firstSerial)
	}

	// SPIFFE ID changed: a new SVID naming the new ID.
	a3 := proto.Clone(a2).(*ferrypb.Entry)
	a3.SpiffeId, a3.Revision = td.ID().String()+"/a-renamed", 4
	e.signer.register(a3)
	e.cache.ApplyEntryChanges([]*ferrypb.Entry{a3}, nil, 4)
	u = next(t, sub)
	if got := ids(u); !slices.Equal(got, []string{a3.SpiffeId, b.SpiffeId}) {
		t.Fatalf("after rename: %v", got)
	}
	verify(t, u, e.clock.Now())

	// A change that does not concern the subscriber sends nothing.
	c := e.entry("c", "/c", "unix:uid:2")
	e.cache.ApplyEntryChanges([]*ferrypb.Entry{c}, nil, 5)
	noUpdate(t, sub)
	// Nor does a stale change.
	e.cache.ApplyEntryChanges(nil, []string{"b"}, 4)
	noUpdate(t, sub)

	// Selectors changed so the entry no longer matches.
	b2 := proto.Clone(b).(*ferrypb.Entry)
	b2.Selectors, b2.Revision = sels(t, "unix:gid:2"), 6
	e.cache.ApplyEntryChanges([]*ferrypb.Entry{b2}, nil, 6)
	if got := ids(next(t, sub)); !slices.Equal(got, []string{a3.SpiffeId}) {
		t.Fatalf("after selector change: %v", got)
	}

	// Deleted.
	e.cache.ApplyEntryChanges(nil, []string{"a"}, 7)
	if u := next(t, sub); len(u.Identities) != 0 {
		t.Fatalf("after delete: %v", ids(u))
	}

	// A resync that no longer lists an entry deletes it; unchanged entries
	// keep their SVIDs and cause no update.
	sub2 := e.subscribe("unix:uid:2")
	next(t, sub2)
	_, before, _, _ := e.signer.counts()
	e.cache.SetEntries([]*ferrypb.Entry{b2, c}, 8)
	noUpdate(t, sub2)
	e.cache.SetEntries([]*ferrypb.Entry{b2}, 9)
	if u := next(t, sub2); len(u.Identities) != 0 {
		t.Fatalf("after resync: %v", ids(u))
	}
	if _, after, _, _ := e.signer.counts(); after != before {
		t.Fatalf("resync caused %d signings", after-before)
	}
}

func TestUpdatesFollowBundleChanges(t *testing.T) {
	e := newEnv(t, nil)
	other := spiffeid.RequireTrustDomainFromString("other.org")
	a := e.entry("a", "/a", "unix:uid:1")
	a.FederatesWith = []string{"other.org"}
	b := e.entry("b", "/b", "unix:uid:2")
	e.cache.SetEntries([]*ferrypb.Entry{a, b}, 1)
	subA := e.subscribe("unix:uid:1")
	subB := e.subscribe("unix:uid:2")
	if u := next(t, subA); len(u.FederatedBundles) != 0 {
		t.Fatal("federated bundle before one is known")
	}
	next(t, subB)

	// Same content, new value: nothing to tell.
	e.cache.SetBundles(e.signer.bundle(), nil)
	noUpdate(t, subA)
	noUpdate(t, subB)

	// A federated bundle concerns only the entries that federate with it.
	fed := spiffebundle.FromX509Authorities(other, []*x509.Certificate{e.signer.caCert})
	e.cache.SetBundles(e.signer.bundle(), map[spiffeid.TrustDomain]*spiffebundle.Bundle{other: fed})
	u := next(t, subA)
	if got := u.FederatedBundles[other]; got == nil || !got.Equal(fed) {
		t.Fatalf("federated bundles %v", maps.Keys(u.FederatedBundles))
	}
	noUpdate(t, subB)

	// The own bundle concerns everyone.
	own := e.signer.bundle()
	own.SetSequenceNumber(2)
	e.cache.SetBundles(own, map[spiffeid.TrustDomain]*spiffebundle.Bundle{other: fed})
	for _, sub := range []cache.Subscriber{subA, subB} {
		if u := next(t, sub); u.Bundle != own {
			t.Fatal("update does not carry the new bundle")
		}
	}
	// Removing the federated bundle.
	e.cache.SetBundles(own, nil)
	if u := next(t, subA); len(u.FederatedBundles) != 0 {
		t.Fatal("federated bundle not removed")
	}
	noUpdate(t, subB)
}

func TestRotationAtHalfLife(t *testing.T) {
	e := newEnv(t, nil)
	a := e.entry("a", "/a", "unix:uid:1")
	e.cache.SetEntries([]*ferrypb.Entry{a}, 1)
	sub := e.subscribe("unix:uid:1")

	u := next(t, sub)
	var prevNotAfter time.Time // a wake-up aimed at the expiry of the SVID being replaced
	for round := range 3 {
		verify(t, u, e.clock.Now())
		leaf := u.Identities[0].SVID[0]
		life := leaf.NotAfter.Sub(leaf.NotBefore)
		lo, hi := leaf.NotBefore.Add(life*45/100), leaf.NotBefore.Add(life*55/100)
		var wake time.Time
		eventually(t, "the scheduler to aim at half-life ±10%", func() bool {
			wake = e.clock.lastWake()
			return !wake.Before(lo) && !wake.After(hi) && !wake.Equal(prevNotAfter)
		})
		_, before, _, _ := e.signer.counts()
		e.clock.Set(wake.Add(-time.Second))
		noUpdate(t, sub)
		if _, n, _, _ := e.signer.counts(); n != before {
			t.Fatalf("round %d: rotated before the rotation time", round)
		}
		e.clock.Set(wake)
		u2 := next(t, sub)
		if _, n, _, _ := e.signer.counts(); n != before+1 {
			t.Fatalf("round %d: %d signings for one rotation", round, n-before)
		}
		if serial(u2.Identities[0]) == serial(u.Identities[0]) {
			t.Fatalf("round %d: same SVID after rotation", round)
		}
		prevNotAfter = leaf.NotAfter
		u = u2
	}
}

// TestMatchingAgreesWithSelectorMatch drives the index through random
// entry sets, changes and deletions and compares every lookup with a brute
// force selector.Match over all entries.
func TestMatchingAgreesWithSelectorMatch(t *testing.T) {
	e := newEnv(t, nil)
	rng := rand.New(rand.NewPCG(1, 2))
	universe := []string{"unix:uid:0", "unix:uid:1", "unix:gid:0", "unix:gid:1", "unix:user:a", "systemd:id:x", "docker:label:a:b"}
	pick := func(max int) []*ferrypb.Selector {
		n := rng.IntN(max + 1)
		var out []string
		for range n {
			out = append(out, universe[rng.IntN(len(universe))])
		}
		return sels(t, out...)
	}
	live := map[string]*ferrypb.Entry{}
	rev := uint64(0)
	for round := range 200 {
		rev++
		var upserts []*ferrypb.Entry
		var deletes []string
		touched := map[string]bool{} // one change per entry per revision, as the server sends
		for range rng.IntN(8) {
			id := fmt.Sprint(rng.IntN(60))
			if touched[id] {
				continue
			}
			touched[id] = true
			if _, ok := live[id]; ok && rng.IntN(3) == 0 {
				deletes = append(deletes, id)
				delete(live, id)
				continue
			}
			ent := &ferrypb.Entry{Id: id, SpiffeId: "spiffe://example.org/" + id, Selectors: pick(3), Revision: rev, CreatedIndex: uint64(rng.IntN(5))}
			live[id] = ent
			upserts = append(upserts, ent)
		}
		if round%50 == 0 {
			all := slices.Collect(maps.Values(live))
			e.cache.SetEntries(all, rev)
		} else {
			e.cache.ApplyEntryChanges(upserts, deletes, rev)
		}
		for range 5 {
			w := pick(5)
			var want []*ferrypb.Entry
			for _, ent := range live {
				if selector.Match(ent.Selectors, w) {
					want = append(want, ent)
				}
			}
			slices.SortFunc(want, func(a, b *ferrypb.Entry) int {
				if c := cmp.Compare(a.CreatedIndex, b.CreatedIndex); c != 0 {
					return c
				}
				return cmp.Compare(a.Id, b.Id)
			})
			var wantIDs []string
			for _, ent := range want {
				wantIDs = append(wantIDs, ent.Id)
			}
			if got := cache.MatchedEntryIDs(e.cache, w); !slices.Equal(got, wantIDs) {
				t.Fatalf("round %d, workload %v: matched %v, want %v", round, selector.NewSet(w...), got, wantIDs)
			}
		}
	}
}
