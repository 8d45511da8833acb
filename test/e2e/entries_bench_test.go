package e2e

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/test/testcluster"
)

// benchEntry is a registration entry of a typical size: a Kubernetes-style
// workload under one of 100 agents, with three selectors.
func benchEntry(prefix string, i int) *ferrypb.Entry {
	return &ferrypb.Entry{
		Id:       fmt.Sprintf("%s-%07d", prefix, i),
		SpiffeId: fmt.Sprintf("spiffe://example.org/ns/%s/sa/workload-%07d", prefix, i),
		ParentId: fmt.Sprintf("spiffe://example.org/spire/agent/k8s/node-%03d", i%100),
		Selectors: []*ferrypb.Selector{
			{Type: "unix", Value: "group:" + prefix},
			{Type: "systemd", Value: fmt.Sprintf("id:workload-%07d.service", i)},
			{Type: "unix", Value: "uid:1000"},
		},
		X509SvidTtl: 3600,
	}
}

func benchEntries(prefix string, n int) []*ferrypb.Entry {
	out := make([]*ferrypb.Entry, n)
	for i := range out {
		out[i] = benchEntry(prefix, i)
	}
	return out
}

// createBatches sends entries through BatchCreateEntry in batches of size,
// from conc goroutines spread over the cluster's nodes, and returns the
// elapsed time.
func createBatches(b *testing.B, c *testcluster.Cluster, entries []*ferrypb.Entry, size, conc int) time.Duration {
	b.Helper()
	var batches [][]*ferrypb.Entry
	for len(entries) > 0 {
		n := min(size, len(entries))
		batches = append(batches, entries[:n])
		entries = entries[n:]
	}
	var next atomic.Int64
	var wg sync.WaitGroup
	var failed atomic.Bool
	start := time.Now()
	for g := 0; g < conc; g++ {
		admin := c.Nodes[g%len(c.Nodes)].Admin()
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= len(batches) || failed.Load() {
					return
				}
				resp, err := admin.BatchCreateEntry(context.Background(), &ferrypb.BatchCreateEntryRequest{Entries: batches[i]})
				if err != nil {
					b.Errorf("batch %d: %v", i, err)
					failed.Store(true)
					return
				}
				for _, r := range resp.Results {
					if codes.Code(r.Code) != codes.OK {
						b.Errorf("batch %d: %s", i, r.Message)
						failed.Store(true)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	return time.Since(start)
}

func countEntries(b *testing.B, n *testcluster.Node) int64 {
	b.Helper()
	resp, err := n.Admin().CountEntries(context.Background(), &ferrypb.CountEntriesRequest{Consistency: ferrypb.ReadConsistency_READ_LINEARIZABLE})
	if err != nil {
		b.Fatal(err)
	}
	return resp.Count
}

// BenchmarkEntryCreate measures registration entries created per second on a
// one-node and a three-node cluster of real server processes: through the CLI
// batch path (`ferry entry create --data FILE` with 10,000 entries, the whole
// process run included) and through the admin API's BatchCreateEntry with
// batches of 500 (one client, and 4 clients spread over the nodes) and of 1 (1
// and 32 concurrent clients). Every figure counts only acknowledged entries.
//
//	go test -run '^$' -bench EntryCreate -benchtime 1x ./test/e2e/
func BenchmarkEntryCreate(b *testing.B) {
	const n = 10000
	for _, nodes := range []int{1, 3} {
		b.Run(fmt.Sprintf("nodes=%d", nodes), func(b *testing.B) {
			c := testcluster.New(b, testcluster.Options{Nodes: nodes, LogLevel: "warn"})
			leader := c.WaitLeader(30*time.Second, nil)
			report := func(b *testing.B, what string, count int, d time.Duration) {
				rate := float64(count) / d.Seconds()
				b.ReportMetric(rate, "entries/s")
				fmt.Printf("entry create (%d node(s)) %-28s %8.0f entries/s  (%d entries in %s)\n", nodes, what, rate, count, d.Round(time.Millisecond))
			}
			var round atomic.Int64
			prefix := func() string { return fmt.Sprintf("r%d", round.Add(1)) }

			b.Run("cli-data-10000", func(b *testing.B) {
				for b.Loop() {
					before := countEntries(b, leader)
					req := &ferrypb.BatchCreateEntryRequest{Entries: benchEntries(prefix(), n)}
					data, err := protojson.Marshal(req)
					if err != nil {
						b.Fatal(err)
					}
					path := filepath.Join(b.TempDir(), "entries.json")
					if err := os.WriteFile(path, data, 0o600); err != nil {
						b.Fatal(err)
					}
					start := time.Now()
					out, err := leader.CLI("entry", "create", "--data", path, "--output", "json")
					d := time.Since(start)
					if err != nil {
						b.Fatalf("ferry entry create --data: %v\n%.2000s", err, out)
					}
					if got := countEntries(b, leader) - before; got != n {
						b.Fatalf("created %d entries, want %d", got, n)
					}
					report(b, "cli --data (10,000)", n, d)
				}
			})
			for _, tc := range []struct {
				name        string
				size, conc  int
				count       int
				description string
			}{
				{"api-batch500-c1", 500, 1, n, "api batch 500, 1 client"},
				{"api-batch500-c4", 500, 4, n, "api batch 500, 4 clients"},
				{"api-batch1-c1", 1, 1, 1000, "api batch 1, 1 client"},
				{"api-batch1-c32", 1, 32, 5000, "api batch 1, 32 clients"},
			} {
				b.Run(tc.name, func(b *testing.B) {
					for b.Loop() {
						before := countEntries(b, leader)
						entries := benchEntries(prefix(), tc.count)
						d := createBatches(b, c, entries, tc.size, tc.conc)
						if got := countEntries(b, leader) - before; got != int64(tc.count) {
							b.Fatalf("created %d entries, want %d", got, tc.count)
						}
						report(b, tc.description, tc.count, d)
					}
				})
			}
		})
	}
}

// BenchmarkServerRSS loads 100,000 entries into a one-node and a three-node
// cluster and reports each server process's resident memory (VmRSS) before
// loading, right after, and once the runtime has settled (FERRY_BENCH_SETTLE, default
// 15s). FERRY_BENCH_HEAPPROFILE=DIR also saves the leader's heap profile
// there.
//
//	go test -run '^$' -bench ServerRSS -benchtime 1x ./test/e2e/
func BenchmarkServerRSS(b *testing.B) {
	const total = 100000
	for _, nodes := range []int{1, 3} {
		b.Run(fmt.Sprintf("nodes=%d", nodes), func(b *testing.B) {
			for b.Loop() {
				c := testcluster.New(b, testcluster.Options{Nodes: nodes, LogLevel: "warn"})
				leader := c.WaitLeader(30*time.Second, nil)
				before := map[string]int64{}
				for _, n := range c.Nodes {
					before[n.ID] = vmRSS(b, n)
				}
				d := createBatches(b, c, benchEntries("rss", total), 500, 4)
				if got := countEntries(b, leader); got != total {
					b.Fatalf("%d entries, want %d", got, total)
				}
				resp, err := leader.Admin().ClusterList(context.Background(), &ferrypb.ClusterListRequest{})
				if err != nil {
					b.Fatal(err)
				}
				c.WaitApplied(resp.AppliedIndex, 60*time.Second)
				var maxRSS int64
				after := map[string]int64{}
				for _, n := range c.Nodes {
					after[n.ID] = vmRSS(b, n)
					maxRSS = max(maxRSS, after[n.ID])
				}
				// The runtime returns freed pages to the OS in the background:
				// RSS right after the load still holds the load's garbage.
				settle := 15 * time.Second
				if s := os.Getenv("FERRY_BENCH_SETTLE"); s != "" {
					if settle, err = time.ParseDuration(s); err != nil {
						b.Fatal(err)
					}
				}
				time.Sleep(settle)
				var maxSettled int64
				for _, n := range c.Nodes {
					rss := vmRSS(b, n)
					maxSettled = max(maxSettled, rss)
					role := "follower"
					if n == leader {
						role = "leader"
					}
					fmt.Printf("server RSS (%d node(s)) %s %-8s %6.1f MiB with %d entries, %6.1f MiB %s later (%5.1f MiB empty; loaded in %s)\n",
						nodes, n.ID, role, mib(after[n.ID]), total, mib(rss), settle, mib(before[n.ID]), d.Round(time.Millisecond))
				}
				b.ReportMetric(mib(maxSettled), "settled-RSS-MiB")
				b.ReportMetric(mib(maxRSS), "loaded-RSS-MiB")
				if dir := os.Getenv("FERRY_BENCH_HEAPPROFILE"); dir != "" {
					saveHeapProfile(b, leader, filepath.Join(dir, fmt.Sprintf("heap-%dnodes.pb.gz", nodes)))
				}
			}
		})
	}
}

// saveHeapProfile fetches /debug/pprof/heap, after a collection, from the node's health listener
// (the test cluster enables profiling).
func saveHeapProfile(b *testing.B, n *testcluster.Node, path string) {
	b.Helper()
	resp, err := http.Get("http://" + n.HealthAddr + "/debug/pprof/heap?gc=1")
	if err != nil {
		b.Fatal(err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		b.Fatalf("heap profile: %v %s", err, resp.Status)
	}
	if err := os.WriteFile(path, data, 0o644); err != nil {
		b.Fatal(err)
	}
	fmt.Printf("heap profile of %s: %s\n", n.ID, path)
}

func mib(kb int64) float64 { return float64(kb) / 1024 }

// vmRSS returns the VmRSS of n's server process in KiB.
func vmRSS(b *testing.B, n *testcluster.Node) int64 {
	b.Helper()
	rss, err := testcluster.ProcRSS(n.PID())
	if err != nil {
		b.Fatal(err)
	}
	return rss >> 10
}
