package e2e

import (
	"context"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/test/testcluster"
)

// BenchmarkClusterWrites measures acknowledged writes per second and latency on a
// 3-node loopback cluster of real server processes, at several concurrencies.
// Each write is one registration entry created through the admin API of a node
// chosen round-robin (followers forward to the leader), with a request ID.
//
//	go test -run '^$' -bench ClusterWrites -benchtime 1x ./test/e2e/
//
// FERRY_BENCH_LOGSTORE=boltdb measures the other log store; FERRY_BENCH_SECONDS sets
// the time per concurrency (default 5); FERRY_BENCH_TARGET=leader sends every
// write to the leader's admin API instead of spreading them over all nodes.
func BenchmarkClusterWrites(b *testing.B) {
	store := os.Getenv("FERRY_BENCH_LOGSTORE")
	c := testcluster.New(b, testcluster.Options{Nodes: 3, LogStore: store, LogLevel: "info"})
	seconds := 5
	if s := os.Getenv("FERRY_BENCH_SECONDS"); s != "" {
		fmt.Sscan(s, &seconds)
	}
	if store == "" {
		store = "default"
	}
	var seq atomic.Int64
	levels := []int{1, 16, 64}
	if s := os.Getenv("FERRY_BENCH_CONCURRENCY"); s != "" {
		levels = nil
		for _, f := range strings.Split(s, ",") {
			var n int
			fmt.Sscan(f, &n)
			levels = append(levels, n)
		}
	}
	for _, conc := range levels {
		b.Run(fmt.Sprintf("c=%d", conc), func(b *testing.B) {
			lat, elapsed := runWrites(b, c, conc, time.Duration(seconds)*time.Second, &seq)
			sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
			n := len(lat)
			if n == 0 {
				b.Fatal("no write was acknowledged")
			}
			// Over the time the writers actually ran: the last writes finish
			// after the nominal end.
			rate := float64(n) / elapsed.Seconds()
			p50, p99 := lat[n/2], lat[n*99/100]
			b.ReportMetric(rate, "writes/s")
			b.ReportMetric(float64(p50.Microseconds())/1000, "p50-ms")
			b.ReportMetric(float64(p99.Microseconds())/1000, "p99-ms")
			fmt.Printf("cluster writes (3 nodes, log store %s) concurrency %2d: %7.0f writes/s  p50 %6.2f ms  p99 %6.2f ms  (%d writes)\n",
				store, conc, rate, ms(p50), ms(p99), n)
		})
	}
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// runWrites writes from conc goroutines for d and returns every write's
// latency and how long the writers ran, from the first start to the last
// acknowledgement.
func runWrites(b *testing.B, c *testcluster.Cluster, conc int, d time.Duration, seq *atomic.Int64) ([]time.Duration, time.Duration) {
	ctx := context.Background()
	began := time.Now()
	stop := began.Add(d)
	var mu sync.Mutex
	var all []time.Duration
	var wg sync.WaitGroup
	for g := 0; g < conc; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			admin := c.Nodes[g%len(c.Nodes)].Admin()
			if os.Getenv("FERRY_BENCH_TARGET") == "leader" {
				admin = c.WaitLeader(10*time.Second, nil).Admin()
			}
			var lat []time.Duration
			for time.Now().Before(stop) {
				id := fmt.Sprintf("b%08d", seq.Add(1))
				start := time.Now()
				resp, err := admin.BatchCreateEntry(ctx, &ferrypb.BatchCreateEntryRequest{
					Entries: []*ferrypb.Entry{testEntry(id)}, RequestId: "req-" + id,
				})
				if err != nil || codes.Code(resp.Results[0].Code) != codes.OK {
					b.Errorf("write %s: %v %v", id, err, resp)
					return
				}
				lat = append(lat, time.Since(start))
			}
			mu.Lock()
			all = append(all, lat...)
			mu.Unlock()
		}(g)
	}
	wg.Wait()
	return all, time.Since(began)
}
