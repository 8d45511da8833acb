// Package e2e holds end-to-end tests that start real ferry processes.
package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/test/testcluster"
)

func testEntry(id string) *ferrypb.Entry {
	return &ferrypb.Entry{
		Id:        id,
		SpiffeId:  "spiffe://example.org/workload/" + id,
		ParentId:  "spiffe://example.org/spire/agent/a",
		Selectors: []*ferrypb.Selector{{Type: "unix", Value: "uid:1000"}},
	}
}

// writer sends entry creations with request IDs to the running nodes, retrying a
// failed request with the same request ID on the next node until it is
// acknowledged. An acknowledged write must never be lost.
type writer struct {
	c *testcluster.Cluster

	mu    sync.Mutex
	acked map[string]uint64 // entry ID -> index that applied it
	ackAt []time.Time
	retry atomic.Int64
}

func (w *writer) write(ctx context.Context, id string, start int) error {
	req := &ferrypb.BatchCreateEntryRequest{Entries: []*ferrypb.Entry{testEntry(id)}, RequestId: "req-" + id}
	deadline := time.Now().Add(90 * time.Second)
	for attempt := 0; ; attempt++ {
		n := w.c.Nodes[(start+attempt)%len(w.c.Nodes)]
		if n.Running() {
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			resp, err := n.Admin().BatchCreateEntry(cctx, req)
			cancel()
			if err == nil {
				if c := codes.Code(resp.Results[0].GetCode()); c != codes.OK {
					return fmt.Errorf("write %s: %s %s", id, c, resp.Results[0].GetMessage())
				}
				w.mu.Lock()
				w.acked[id] = resp.Index
				w.ackAt = append(w.ackAt, time.Now())
				w.mu.Unlock()
				return nil
			}
			w.retry.Add(1)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("write %s not acknowledged in 90s", id)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (w *writer) count() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.acked)
}

// entryIDs lists every entry on node n from its local state.
func entryIDs(t *testing.T, n *testcluster.Node) map[string]bool {
	t.Helper()
	ids := map[string]bool{}
	req := &ferrypb.ListEntriesRequest{PageSize: 5000}
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		resp, err := n.Admin().ListEntries(ctx, req)
		cancel()
		require.NoError(t, err)
		for _, e := range resp.Entries {
			ids[e.Id] = true
		}
		if resp.NextPageToken == "" {
			return ids
		}
		req.PageToken = resp.NextPageToken
	}
}

// TestClusterSurvivesLeaderKill runs once per log store. raft-wal keeps
// compacted entries readable until their whole segment is dropped, so a follower
// often catches up from the log there; with BoltDB compaction deletes them and
// the follower must install a snapshot, which the test then insists on.
func TestClusterSurvivesLeaderKill(t *testing.T) {
	if testing.Short() {
		t.Skip("starts real server processes")
	}
	for _, store := range []string{"wal", "boltdb"} {
		t.Run(store, func(t *testing.T) { leaderKill(t, store) })
	}
}

func leaderKill(t *testing.T, logStore string) {
	c := testcluster.New(t, testcluster.Options{
		Nodes:    3,
		LogStore: logStore,
		// Small so that the killed node falls out of the leader's log and must
		// catch up from a snapshot.
		SnapshotThreshold: 1000,
		TrailingLogs:      500,
		SnapshotInterval:  "1s",
	})
	const total, workers = 10000, 16
	w := &writer{c: c, acked: map[string]uint64{}}
	ctx := context.Background()

	var next atomic.Int64
	var killedAt time.Time
	var victim *testcluster.Node
	killOnce := sync.Once{}
	errs := make(chan error, workers)
	var wg sync.WaitGroup
	for g := 0; g < workers; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= total {
					return
				}
				if i == total/3 {
					killOnce.Do(func() {
						victim = c.Leader(ctx)
						if victim == nil {
							errs <- fmt.Errorf("no leader to kill")
							return
						}
						killedAt = time.Now()
						victim.Kill()
					})
				}
				if err := w.write(ctx, fmt.Sprintf("w%05d", i), g); err != nil {
					errs <- err
					return
				}
			}
		}(g)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	require.NotNil(t, victim)
	require.Equal(t, total, w.count())

	newLeader := c.WaitLeader(30*time.Second, victim)
	var failover time.Duration
	w.mu.Lock()
	sort.Slice(w.ackAt, func(i, j int) bool { return w.ackAt[i].Before(w.ackAt[j]) })
	for _, at := range w.ackAt {
		// The first acknowledgement well after the kill: writes resumed.
		if at.After(killedAt.Add(5 * time.Millisecond)) {
			failover = at.Sub(killedAt)
			break
		}
	}
	var maxIndex uint64
	for _, idx := range w.acked {
		maxIndex = max(maxIndex, idx)
	}
	w.mu.Unlock()
	t.Logf("killed leader %s; new leader %s; writes resumed after %s; %d writes acknowledged, %d retries", victim.ID, newLeader.ID, failover.Round(time.Millisecond), total, w.retry.Load())
	fmt.Printf("failover (%s): killed leader %s, writes resumed after %s\n", logStore, victim.ID, failover.Round(time.Millisecond))

	// Every acknowledged write is on every surviving node.
	c.WaitApplied(maxIndex, 30*time.Second)
	for _, n := range c.Nodes {
		if n == victim {
			continue
		}
		ids := entryIDs(t, n)
		require.Len(t, ids, total, "node %s", n.ID)
		for id := range w.acked {
			require.True(t, ids[id], "node %s lost acknowledged write %s", n.ID, id)
		}
	}

	// The killed node rejoins and catches up; the leader compacted its log long
	// ago, so it installs a snapshot.
	victim.Start()
	c.WaitApplied(maxIndex, 60*time.Second)
	ids := entryIDs(t, victim)
	for id := range w.acked {
		require.True(t, ids[id], "restarted node %s misses %s", victim.ID, id)
	}
	viaSnapshot := strings.Contains(victim.LogTail(100000), "Installed remote snapshot")
	t.Logf("restarted node caught up; via snapshot: %t", viaSnapshot)
	if logStore == "boltdb" && !viaSnapshot {
		t.Fatalf("the restarted node did not catch up from a snapshot although its log was compacted away")
	}

	// And it takes writes again, through any node.
	require.NoError(t, w.write(ctx, "after-rejoin", 0))
}

func TestClusterRestartLosesNothing(t *testing.T) {
	if testing.Short() {
		t.Skip("starts real server processes")
	}
	c := testcluster.New(t, testcluster.Options{Nodes: 3})
	w := &writer{c: c, acked: map[string]uint64{}}
	ctx := context.Background()
	for i := 0; i < 300; i++ {
		require.NoError(t, w.write(ctx, fmt.Sprintf("r%03d", i), i))
	}

	// A retried request ID applies once, even through another node.
	req := &ferrypb.BatchCreateEntryRequest{Entries: []*ferrypb.Entry{testEntry("once")}, RequestId: "retry-me"}
	first, err := c.Nodes[1].Admin().BatchCreateEntry(ctx, req)
	require.NoError(t, err)
	require.Equal(t, codes.OK, codes.Code(first.Results[0].Code))
	again, err := c.Nodes[2].Admin().BatchCreateEntry(ctx, req)
	require.NoError(t, err)
	require.Equal(t, codes.OK, codes.Code(again.Results[0].Code), "the retry is answered with the first result")
	require.Equal(t, first.Index, again.Index)

	// Hard-stop every node at once, then bring them all back.
	for _, n := range c.Nodes {
		n.Kill()
	}
	for _, n := range c.Nodes {
		n.Start()
	}
	l := c.WaitLeader(30*time.Second, nil)
	cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	cnt, err := l.Admin().CountEntries(cctx, &ferrypb.CountEntriesRequest{Consistency: ferrypb.ReadConsistency_READ_LINEARIZABLE})
	require.NoError(t, err)
	require.EqualValues(t, 301, cnt.Count)

	// The request ID is still remembered after the restart.
	third, err := c.Nodes[0].Admin().BatchCreateEntry(cctx, req)
	require.NoError(t, err)
	require.Equal(t, first.Index, third.Index)
	for _, n := range c.Nodes {
		// A linearizable read through every node, followers included.
		cnt, err := n.Admin().CountEntries(cctx, &ferrypb.CountEntriesRequest{Consistency: ferrypb.ReadConsistency_READ_LINEARIZABLE})
		require.NoError(t, err)
		require.EqualValues(t, 301, cnt.Count, "node %s", n.ID)
	}
}

func TestClusterRefusesBadInput(t *testing.T) {
	if testing.Short() {
		t.Skip("starts real server processes")
	}
	c := testcluster.New(t, testcluster.Options{Nodes: 3})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	t.Run("node with a certificate from another CA cannot join", func(t *testing.T) {
		intruder := c.AddNode("intruder", true)
		intruder.Start()
		out, err := intruder.CLI("cluster", "join", c.Nodes[0].ClusterAddr, "--timeout", "10s")
		require.Error(t, err, out)
		members, err := c.Nodes[0].Admin().ClusterList(ctx, &ferrypb.ClusterListRequest{})
		require.NoError(t, err)
		require.Len(t, members.Members, 3)
		intruder.Stop()
	})

	t.Run("oversize entry", func(t *testing.T) {
		// One entry with a huge selector: refused on its own.
		e := testEntry("huge")
		e.Selectors[0].Value = strings.Repeat("x", 600<<10)
		resp, err := c.Nodes[1].Admin().BatchCreateEntry(ctx, &ferrypb.BatchCreateEntryRequest{Entries: []*ferrypb.Entry{e}})
		require.NoError(t, err)
		require.Equal(t, codes.InvalidArgument, codes.Code(resp.Results[0].GetCode()))
		require.Contains(t, resp.Results[0].GetMessage(), "value longer than 1024 bytes")

		// Entries each valid, too large together for one command: the
		// request is refused whole, before Raft sees it.
		var batch []*ferrypb.Entry
		for i := range 1000 {
			e := testEntry(fmt.Sprintf("big-%d", i))
			e.Hint = strings.Repeat("h", 1000)
			batch = append(batch, e)
		}
		_, err = c.Nodes[1].Admin().BatchCreateEntry(ctx, &ferrypb.BatchCreateEntryRequest{Entries: batch})
		require.Equal(t, codes.InvalidArgument, status.Code(err), "%v", err)
		require.Contains(t, status.Convert(err).Message(), "512 KiB")
	})

	t.Run("corrupted snapshot", func(t *testing.T) {
		w := &writer{c: c, acked: map[string]uint64{}}
		require.NoError(t, w.write(ctx, "keep", 0))
		l := c.WaitLeader(10*time.Second, nil)
		snap := filepath.Join(t.TempDir(), "state.snap")
		out, err := l.CLI("cluster", "snapshot", "save", snap)
		require.NoError(t, err, out)
		data, err := os.ReadFile(snap)
		require.NoError(t, err)
		data[len(data)/2] ^= 0x01
		bad := snap + ".bad"
		require.NoError(t, os.WriteFile(bad, data, 0o600))
		out, err = l.CLI("cluster", "snapshot", "restore", bad)
		require.Error(t, err)
		require.Contains(t, out, "corrupt")

		// Truncated, too.
		require.NoError(t, os.WriteFile(bad, data[:len(data)-40], 0o600))
		out, err = l.CLI("cluster", "snapshot", "restore", bad)
		require.Error(t, err, out)

		cnt, err := l.Admin().CountEntries(ctx, &ferrypb.CountEntriesRequest{Consistency: ferrypb.ReadConsistency_READ_LINEARIZABLE})
		require.NoError(t, err)
		require.EqualValues(t, 1, cnt.Count, "state untouched")

		// The intact snapshot restores.
		_, err = l.Admin().BatchDeleteEntry(ctx, &ferrypb.BatchDeleteEntryRequest{Ids: []string{"keep"}})
		require.NoError(t, err)
		out, err = l.CLI("cluster", "snapshot", "restore", snap)
		require.NoError(t, err, out)
		for _, n := range c.Nodes {
			if !n.Running() {
				continue
			}
			require.Eventually(t, func() bool {
				e, err := n.Admin().GetEntry(ctx, &ferrypb.GetEntryRequest{Id: "keep"})
				return err == nil && e.Id == "keep"
			}, 20*time.Second, 50*time.Millisecond, "node %s", n.ID)
		}
	})
}
