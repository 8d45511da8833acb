package e2e

import (
	"context"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/test/testcluster"
)

// Server costs that must follow the state, not its history: a real `ferry
// server` process (one node), its restart and its memory.
//
//	go test -run '^$' -bench 'ServerRestart|ServerChurn' -benchtime 1x -timeout 60m ./test/e2e/

// BenchmarkServerRestart loads FERRY_BENCH_ENTRIES entries (default 100,000)
// in batches of 1,000 (one Raft command each), then stops and starts the
// server FERRY_BENCH_RESTARTS times (default 3) and prints, for each restart,
// the time from starting the process to its admin socket answering, to a
// local read seeing every entry, and to /ready answering 200, the CPU time
// the server used by then, and the bytes of snapshots and log files on disk
// (raft-wal preallocates its segments: 64 MiB each).
func BenchmarkServerRestart(b *testing.B) {
	total := envInt("FERRY_BENCH_ENTRIES", 100000)
	restarts := envInt("FERRY_BENCH_RESTARTS", 3)
	for range b.N {
		c := testcluster.New(b, testcluster.Options{Nodes: 1, LogLevel: "warn"})
		srv := c.WaitLeader(30*time.Second, nil)
		d := createBatches(b, c, benchEntries("restart", total), 1000, 2)
		fmt.Printf("server restart: %d entries created in %s\n", total, d.Round(time.Millisecond))
		var ready []time.Duration
		for i := range restarts {
			snaps, logs := raftBytes(b, srv)
			srv.Stop()
			start := time.Now()
			srv.Start() // returns once the admin socket accepts
			socket := time.Since(start)
			// Both from the same moment: /ready may come before or after
			// every entry is readable.
			readyc := make(chan error, 1)
			var readyIn time.Duration
			go func() {
				var err error
				readyIn, err = waitReady(srv, 5*time.Minute)
				readyc <- err
			}()
			all := socket + waitCount(b, srv, int64(total), 5*time.Minute)
			if err := <-readyc; err != nil {
				b.Fatal(err)
			}
			readyAt := socket + readyIn
			cpu := procCPU(b, srv.PID())
			r := max(all, readyAt)
			ready = append(ready, r)
			fmt.Printf("server restart %d with %d entries: admin socket %5.0f ms, all entries readable %5.0f ms, /ready %5.0f ms; server CPU by then %5.0f ms (on disk before: snapshots %.1f MiB, log files %.1f MiB)\n",
				i+1, total, ms(socket), ms(all), ms(readyAt), ms(cpu), float64(snaps)/(1<<20), float64(logs)/(1<<20))
		}
		slices.Sort(ready)
		b.ReportMetric(ms(ready[len(ready)/2]), "restart-to-ready-ms")
	}
}

// waitCount polls n's local entry count until it reaches want and returns
// how long that took from the call.
func waitCount(b *testing.B, n *testcluster.Node, want int64, timeout time.Duration) time.Duration {
	b.Helper()
	start := time.Now()
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		resp, err := n.Admin().CountEntries(ctx, &ferrypb.CountEntriesRequest{})
		cancel()
		if err == nil && resp.Count == want {
			return time.Since(start)
		}
		if time.Since(start) > timeout {
			b.Fatalf("node %s: entry count %v (err %v) after %s, want %d", n.ID, resp.GetCount(), err, timeout, want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// waitReady polls n's /ready until it answers 200 and returns how long that
// took from the call.
func waitReady(n *testcluster.Node, timeout time.Duration) (time.Duration, error) {
	start := time.Now()
	client := &http.Client{Timeout: 5 * time.Second}
	for {
		resp, err := client.Get("http://" + n.HealthAddr + "/ready")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return time.Since(start), nil
			}
		}
		if time.Since(start) > timeout {
			return 0, fmt.Errorf("node %s: not ready after %s", n.ID, timeout)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// raftBytes returns the bytes of n's Raft snapshots and of its log store.
func raftBytes(b *testing.B, n *testcluster.Node) (snapshots, logs int64) {
	b.Helper()
	root := filepath.Join(n.Dir, "data", "raft")
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		if strings.Contains(path, string(filepath.Separator)+"snapshots"+string(filepath.Separator)) {
			snapshots += info.Size()
		} else {
			logs += info.Size()
		}
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}
	return snapshots, logs
}

// BenchmarkServerChurn runs FERRY_BENCH_ROUNDS rounds (default 3) of creating
// FERRY_BENCH_CHURN entries (default 10,000, in batches of 1,000) and
// deleting them again on a server that keeps 3 entries throughout, and prints
// the server's RSS after each round once the runtime has returned what it
// freed (FERRY_BENCH_SETTLE, default 10s); then the RSS of the same server
// restarted (a fresh process holding the same replicated state) and of a new
// server holding the same 3 entries. FERRY_BENCH_HEAPPROFILE=DIR saves the churned server's
// heap profile there.
func BenchmarkServerChurn(b *testing.B) {
	rounds := envInt("FERRY_BENCH_ROUNDS", 3)
	churn := envInt("FERRY_BENCH_CHURN", 10000)
	settle := 10 * time.Second
	if s := os.Getenv("FERRY_BENCH_SETTLE"); s != "" {
		var err error
		if settle, err = time.ParseDuration(s); err != nil {
			b.Fatal(err)
		}
	}
	for range b.N {
		c := testcluster.New(b, testcluster.Options{Nodes: 1, LogLevel: "warn"})
		srv := c.WaitLeader(30*time.Second, nil)
		createBatches(b, c, benchEntries("keep", 3), 3, 1)
		time.Sleep(settle)
		base := vmRSS(b, srv)
		fmt.Printf("server churn: start, 3 entries: RSS %6.1f MiB\n", mib(base))
		var last int64
		for r := range rounds {
			entries := benchEntries(fmt.Sprintf("churn%d", r), churn)
			start := time.Now()
			createBatches(b, c, entries, 1000, 2)
			loaded := vmRSS(b, srv)
			deleteEntries(b, srv, entries, 1000)
			d := time.Since(start)
			if got := countEntries(b, srv); got != 3 {
				b.Fatalf("%d entries after round %d, want 3", got, r+1)
			}
			time.Sleep(settle)
			last = vmRSS(b, srv)
			fmt.Printf("server churn: round %d (%d entries created and deleted in %s): RSS %6.1f MiB with them, %6.1f MiB after (3 entries left; %s)\n",
				r+1, churn, d.Round(time.Millisecond), mib(loaded), mib(last), heapStats(b, srv))
		}
		if dir := os.Getenv("FERRY_BENCH_HEAPPROFILE"); dir != "" {
			saveHeapProfile(b, srv, filepath.Join(dir, "heap-churned.pb.gz"))
		}
		// The same server restarted: a fresh process holding the same
		// replicated state (the request IDs of the last 15 minutes included).
		srv.Stop()
		srv.Start()
		waitCount(b, srv, 3, time.Minute)
		time.Sleep(settle)
		restarted := vmRSS(b, srv)
		fmt.Printf("server churn: after %d rounds %6.1f MiB; the same server restarted %6.1f MiB (%+.0f%%; %s)\n",
			rounds, mib(last), mib(restarted), 100*(float64(last)/float64(restarted)-1), heapStats(b, srv))
		// A new server holding the same entries.
		fresh := testcluster.New(b, testcluster.Options{Nodes: 1, LogLevel: "warn"})
		fs := fresh.WaitLeader(30*time.Second, nil)
		createBatches(b, fresh, benchEntries("keep", 3), 3, 1)
		time.Sleep(settle)
		want := vmRSS(b, fs)
		fmt.Printf("server churn: after %d rounds %6.1f MiB; a new server with the same 3 entries %6.1f MiB (%+.0f%%; %s)\n",
			rounds, mib(last), mib(want), 100*(float64(last)/float64(want)-1), heapStats(b, fs))
		b.ReportMetric(mib(last), "churned-RSS-MiB")
		b.ReportMetric(mib(restarted), "restarted-RSS-MiB")
		b.ReportMetric(mib(want), "new-RSS-MiB")
	}
}

// deleteEntries deletes entries through the admin API in batches of size.
func deleteEntries(b *testing.B, n *testcluster.Node, entries []*ferrypb.Entry, size int) {
	b.Helper()
	for len(entries) > 0 {
		k := min(size, len(entries))
		ids := make([]string, k)
		for i, e := range entries[:k] {
			ids[i] = e.Id
		}
		entries = entries[k:]
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		resp, err := n.Admin().BatchDeleteEntry(ctx, &ferrypb.BatchDeleteEntryRequest{Ids: ids})
		cancel()
		if err != nil {
			b.Fatal(err)
		}
		for _, r := range resp.Results {
			if codes.Code(r.Code) != codes.OK {
				b.Fatalf("delete: %s", r.Message)
			}
		}
	}
}

// heapStats summarizes the Go heap of n's process from its /metrics: what
// is in use, what is free but still held, and what was returned.
func heapStats(b *testing.B, n *testcluster.Node) string {
	b.Helper()
	resp, err := http.Get("http://" + n.HealthAddr + "/metrics")
	if err != nil {
		b.Fatal(err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		b.Fatal(err)
	}
	val := func(name string) float64 {
		for line := range strings.SplitSeq(string(data), "\n") {
			if v, ok := strings.CutPrefix(line, name+" "); ok {
				var f float64
				fmt.Sscan(v, &f)
				return f
			}
		}
		return 0
	}
	return fmt.Sprintf("heap in use %.1f MiB, idle %.1f MiB of which released %.1f MiB",
		val("go_memstats_heap_inuse_bytes")/(1<<20), val("go_memstats_heap_idle_bytes")/(1<<20), val("go_memstats_heap_released_bytes")/(1<<20))
}
