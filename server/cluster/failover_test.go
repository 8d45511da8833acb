package cluster_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/ferry-id/ferry/server/cluster"
)

// TestLeaderKilled shuts the leader down while writes are in flight on the
// other nodes: a new leader is elected, writes resume, every acknowledged
// write is present exactly once, and the old leadership token is dead.
func TestLeaderKilled(t *testing.T) {
	nodes, _ := startCluster(t, 3, nil)
	leader := waitLeader(t, nodes)
	oldTok, ok, changed := leader.Leadership()
	if !ok || !leader.LeadershipCurrent(oldTok) {
		t.Fatalf("leader %s has no current token", leader.ID())
	}
	rest := followers(nodes, leader)

	var (
		mu    sync.Mutex
		acked []string
		stop  atomic.Bool
		wg    sync.WaitGroup
	)
	for _, n := range rest {
		for w := 0; w < 4; w++ {
			wg.Add(1)
			go func(n *testNode, w int) {
				defer wg.Done()
				for i := 0; !stop.Load(); i++ {
					ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
					cmd := entryCommand(fmt.Sprintf("%s-%d-%d", n.ID(), w, i), 50)
					_, err := n.Apply(ctx, cmd)
					cancel()
					if err != nil {
						t.Errorf("apply via %s during failover: %v", n.ID(), err)
						return
					}
					mu.Lock()
					acked = append(acked, cmd.GetRequestId())
					mu.Unlock()
				}
			}(n, w)
		}
	}
	// The leader goes while writes are in flight: once every writer has had
	// some acknowledged, so the kill lands in the middle of a steady stream.
	waitFor(t, time.Minute, "writes acknowledged before the kill", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(acked) >= 8*len(rest)
	})
	killed := time.Now()
	if err := leader.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-changed:
	default:
		t.Fatal("leadership watchers were not woken when the leader closed")
	}
	if leader.LeadershipCurrent(oldTok) {
		t.Fatal("closed leader's token is still current")
	}

	newLeader := waitLeader(t, rest)
	t.Logf("new leader %s after %v", newLeader.ID(), time.Since(killed))
	newTok, _, _ := newLeader.Leadership()
	if newTok.Term <= oldTok.Term {
		t.Fatalf("new term %d not above old %d", newTok.Term, oldTok.Term)
	}
	// Writes resume: give the writers time to get through.
	mu.Lock()
	before := len(acked)
	mu.Unlock()
	waitFor(t, 10*time.Second, "writes to resume", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(acked) >= before+50
	})
	stop.Store(true)
	wg.Wait()

	// No writes are in flight now: the most advanced FSM holds the final count.
	waitConverged(t, rest, max(rest[0].fsm.Count(), rest[1].fsm.Count()))
	for _, n := range rest {
		for _, id := range acked {
			if !n.fsm.Has(id) {
				t.Fatalf("acknowledged write %s missing on %s", id, n.ID())
			}
		}
	}
	// Each request ID appears once in the applied sequence.
	seen := map[string]bool{}
	for _, id := range rest[0].fsm.IDs() {
		if seen[id] {
			t.Fatalf("request %s applied twice", id)
		}
		seen[id] = true
	}
}

// TestRestartFromDataDir closes a follower, writes, and restarts it from its
// data dir with the same config (Bootstrap left on): it must rejoin as the
// same member, not bootstrap a second cluster, and catch up. Then the whole
// cluster restarts and keeps its state; n1 restarts with Bootstrap still on.
func TestRestartFromDataDir(t *testing.T) {
	nodes, _ := startCluster(t, 3, nil)
	leader := waitLeader(t, nodes)
	applyN(t, leader, 20)
	waitConverged(t, nodes, 20)

	f := followers(nodes, leader)[0]
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	applyN(t, leader, 30)
	for i, n := range nodes {
		if n == f {
			nodes[i] = startNode(t, f.cfg)
		}
	}
	waitConverged(t, nodes, 50)
	waitLeader(t, nodes)
	waitMembers(t, nodes, 3)

	// Full cluster restart.
	for _, n := range nodes {
		if err := n.Close(); err != nil {
			t.Fatal(err)
		}
	}
	for i, n := range nodes {
		nodes[i] = startNode(t, n.cfg)
	}
	// Each node is caught up only once its state holds everything written
	// before the restart (its new FSM starts empty).
	for _, n := range nodes {
		waitCaughtUp(t, n)
		if got := n.fsm.Count(); got != 50 {
			t.Fatalf("%s caught up holding %d of 50 writes", n.ID(), got)
		}
	}
	leader = waitLeader(t, nodes)
	waitConverged(t, nodes, 50)
	applyN(t, nodes[2], 5)
	waitConverged(t, nodes, 55)
	if ms, err := leader.Members(context.Background()); err != nil || len(ms) != 3 {
		t.Fatalf("members after restart: %v %v", ms, err)
	}
}

// TestCaughtUpOneNode restarts a one-node cluster from its data dir several
// times: each time CaughtUp closes only once the state holds every write made
// before, so startup work that reads it finds what exists.
func TestCaughtUpOneNode(t *testing.T) {
	pki := newPKI(t)
	cfg := fastConfig(t, pki, "n1")
	cfg.Bootstrap = true
	n := startNode(t, cfg)
	waitCaughtUp(t, n)
	want := 0
	for range 3 {
		applyN(t, n, 10)
		want += 10
		n = n.restart(t)
		waitCaughtUp(t, n)
		if got := n.fsm.Count(); got != want {
			t.Fatalf("caught up holding %d of %d writes", got, want)
		}
	}
}

// TestJoinRefusedForBootstrappedNode: a node that bootstrapped its own
// cluster must not join another one.
func TestJoinRefusedForBootstrappedNode(t *testing.T) {
	nodes, pki := startCluster(t, 1, nil)
	cfg := fastConfig(t, pki, "lone")
	cfg.Bootstrap = true
	lone := startNode(t, cfg)
	waitLeader(t, []*testNode{lone})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := lone.Join(ctx, nodes[0].Addr())
	if err == nil || !strings.Contains(err.Error(), "already belongs to a cluster") {
		t.Fatalf("join of a bootstrapped node: %v", err)
	}
	waitMembers(t, nodes, 1)
}

// TestSnapshotCatchUp keeps a follower down until the leader has compacted its
// log past the follower: the follower must catch up through InstallSnapshot.
// raft-wal deletes whole segments only (and serves entries of a truncated
// head segment), so the WAL variant uses small segments.
func TestSnapshotCatchUp(t *testing.T) {
	for _, store := range []string{cluster.LogStoreWAL, cluster.LogStoreBoltDB} {
		t.Run(store, func(t *testing.T) { testSnapshotCatchUp(t, store) })
	}
}

func testSnapshotCatchUp(t *testing.T, store string) {
	nodes, _ := startCluster(t, 3, func(c *cluster.Config) {
		c.LogStore = store
		c.WALSegmentSize = 32 << 10
		c.TrailingLogs = 10
		c.SnapshotThreshold = 50
		c.SnapshotInterval = 100 * time.Millisecond
	})
	leader := waitLeader(t, nodes)
	f := followers(nodes, leader)[0]
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	applySized(t, leader, 200, 1024)
	waitFor(t, 10*time.Second, "the leader to compact its log", func() bool {
		var first uint64
		fmt.Sscan(leader.Stats()["last_snapshot_index"], &first)
		return first >= 150
	})
	for i, n := range nodes {
		if n == f {
			nodes[i] = startNode(t, f.cfg)
			f = nodes[i]
		}
	}
	start := time.Now()
	waitConverged(t, nodes, 200)
	t.Logf("follower caught up in %v", time.Since(start))
	if f.fsm.Restores() == 0 {
		t.Fatal("follower caught up without installing a snapshot")
	}
}

// TestRemoveForwarded removes a follower through the other follower.
func TestRemoveForwarded(t *testing.T) {
	nodes, _ := startCluster(t, 3, nil)
	leader := waitLeader(t, nodes)
	fs := followers(nodes, leader)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := fs[0].Remove(ctx, fs[1].ID()); err != nil {
		t.Fatal(err)
	}
	ms, err := leader.Members(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) != 2 {
		t.Fatalf("members after remove: %+v", ms)
	}
	for _, m := range ms {
		if m.ID == fs[1].ID() {
			t.Fatalf("%s still a member", m.ID)
		}
	}
	if err := fs[0].Remove(ctx, "nope"); err == nil {
		t.Fatal("removing an unknown member succeeded")
	}
	// The remaining two still commit.
	applyN(t, fs[0], 3)
	waitConverged(t, []*testNode{leader, fs[0]}, 3)
	if fs[1].State() == raft.Leader {
		t.Fatal("removed node is leader")
	}
}
