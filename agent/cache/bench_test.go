package cache_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"runtime"
	"testing"
	"time"

	"github.com/ferry-id/ferry/agent/cache"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

// benchCache is a running cache with n entries, one per uid.
func benchCache(b *testing.B, n int) (*cache.Cache, *testSigner, []*ferrypb.Entry, func()) {
	b.Helper()
	clock := &fakeClock{now: epoch}
	signer := newTestSigner(b, clock)
	c, err := cache.New(cache.Config{Signer: signer, Clock: clock, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		b.Fatal(err)
	}
	c.SetBundles(signer.bundle(), nil)
	entries := make([]*ferrypb.Entry, n)
	for i := range entries {
		entries[i] = &ferrypb.Entry{
			Id:           fmt.Sprintf("%08x-0000-4000-8000-%012x", i, i),
			SpiffeId:     fmt.Sprintf("spiffe://example.org/ns/prod/sa/workload-%d", i),
			ParentId:     "spiffe://example.org/spire/agent/join_token/abc",
			Selectors:    sels(b, fmt.Sprintf("unix:uid:%d", 10000+i), "unix:gid:100"),
			Revision:     uint64(i + 1),
			CreatedIndex: uint64(i + 1),
			CreatedAt:    epoch.Unix(),
		}
		signer.register(entries[i])
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = c.Run(ctx); close(done) }()
	return c, signer, entries, func() { cancel(); <-done }
}

// heapInUse returns the live heap after two collections, signed so that
// differences between readings may be negative (the heap shrank) instead of
// wrapping around.
func heapInUse() int64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return int64(m.HeapAlloc)
}

// BenchmarkMemoryPerEntry reports the heap the cache holds per entry for
// 10,000 entries: entries only (cache overhead beyond the entry messages,
// which are reported on their own), and with an X509-SVID minted for every
// entry (key, parsed chain).
//
//	go test -run '^$' -bench MemoryPerEntry -benchtime 1x ./agent/cache/
func BenchmarkMemoryPerEntry(b *testing.B) {
	const n = 10000
	for _, minted := range []bool{false, true} {
		b.Run(fmt.Sprintf("svids=%v", minted), func(b *testing.B) {
			for range b.N {
				b.StopTimer()
				base := heapInUse()
				c, _, entries, stop := benchCache(b, n)
				withEntries := heapInUse()
				b.StartTimer()
				c.SetEntries(entries, uint64(n))
				b.StopTimer()
				held := heapInUse()
				b.ReportMetric(float64(withEntries-base)/n, "entry-proto-B/entry")
				b.ReportMetric(float64(held-withEntries)/n, "cache-B/entry")
				if minted {
					var all []string
					for i := range n {
						all = append(all, fmt.Sprintf("unix:uid:%d", 10000+i))
					}
					b.StartTimer()
					sub, err := c.SubscribeToCacheChanges(context.Background(), sels(b, append(all, "unix:gid:100")...))
					if err != nil {
						b.Fatal(err)
					}
					select {
					case u := <-sub.Updates():
						if len(u.Identities) != n {
							b.Fatalf("%d identities", len(u.Identities))
						}
					case <-time.After(5 * time.Minute):
						b.Fatal("no update")
					}
					b.StopTimer()
					runtime.KeepAlive(sub)
					withSVIDs := heapInUse()
					b.ReportMetric(float64(withSVIDs-held)/n, "svid-B/entry")
					b.ReportMetric(float64(withSVIDs-withEntries)/n, "cache+svid-B/entry")
					sub.Finish()
				}
				stop()
				runtime.KeepAlive(c)
				runtime.KeepAlive(entries)
			}
		})
	}
}

// BenchmarkFetchWorkloadUpdateCached is a one-shot fetch served from cache
// with 10,000 entries held.
func BenchmarkFetchWorkloadUpdateCached(b *testing.B) {
	c, _, entries, stop := benchCache(b, 10000)
	defer stop()
	c.SetEntries(entries, 1)
	ws := sels(b, "unix:uid:10042", "unix:gid:100", "unix:user:svc")
	if _, err := c.FetchWorkloadUpdate(context.Background(), ws); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		u, err := c.FetchWorkloadUpdate(context.Background(), ws)
		if err != nil || len(u.Identities) != 1 {
			b.Fatalf("%v %v", u, err)
		}
	}
}

// BenchmarkFetchJWTSVIDHit is a JWT-SVID cache hit.
func BenchmarkFetchJWTSVIDHit(b *testing.B) {
	c, _, entries, stop := benchCache(b, 100)
	defer stop()
	c.SetEntries(entries, 1)
	aud := []string{"api://AzureADTokenExchange"}
	if _, err := c.FetchJWTSVID(context.Background(), entries[7], aud); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := c.FetchJWTSVID(context.Background(), entries[7], aud); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkSubscribeOthers is one subscribe-receive-finish (what one X509
// Workload API call does) and one one-shot fetch, by a workload with one
// entry, while the cache also holds others entries that do not match it.
// The cost per call must not grow with others.
//
//	go test -run '^$' -bench SubscribeOthers ./agent/cache/
func BenchmarkSubscribeOthers(b *testing.B) {
	for _, others := range []int{0, 1000, 10000, 100000} {
		b.Run(fmt.Sprintf("others=%d", others), func(b *testing.B) {
			c, _, entries, stop := benchCache(b, others+1)
			defer stop()
			c.SetEntries(entries, 1)
			ws := sels(b, fmt.Sprintf("unix:uid:%d", 10000+others), "unix:gid:100", "unix:user:svc")
			sub, err := c.SubscribeToCacheChanges(context.Background(), ws)
			if err != nil {
				b.Fatal(err)
			}
			<-sub.Updates()
			sub.Finish()
			b.ReportAllocs()
			for b.Loop() {
				sub, err := c.SubscribeToCacheChanges(context.Background(), ws)
				if err != nil {
					b.Fatal(err)
				}
				if u := <-sub.Updates(); len(u.Identities) != 1 {
					b.Fatalf("%d identities", len(u.Identities))
				}
				sub.Finish()
			}
		})
	}
}
