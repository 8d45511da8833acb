package cluster_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/ferry-id/ferry/server/cluster"
)

// A node snapshots once the log written since its last snapshot outgrows
// SnapshotMinBytes, though far fewer entries than SnapshotThreshold were
// written; a restart then restores that snapshot and replays only what came
// after it.
func TestSnapshotBySize(t *testing.T) {
	nodes, _ := startCluster(t, 1, func(c *cluster.Config) {
		c.SnapshotThreshold = 1 << 20 // never by count
		c.SnapshotInterval = time.Hour
		c.SnapshotMinBytes = 256 << 10
	})
	n := waitLeader(t, nodes)
	snapIndex := func(n *testNode) uint64 {
		var i uint64
		fmt.Sscan(n.Stats()["last_snapshot_index"], &i)
		return i
	}
	applySized(t, n, 20, 8<<10) // 160 KiB: not yet
	if i := snapIndex(n); i != 0 {
		t.Fatalf("snapshot at index %d after 160 KiB of log", i)
	}
	applySized(t, n, 20, 8<<10) // 320 KiB
	waitFor(t, 10*time.Second, "a snapshot for the log's size", func() bool { return snapIndex(n) > 0 })
	applySized(t, n, 3, 64)

	r := n.restart(t)
	waitLeader(t, []*testNode{r})
	// The only voter stood for election early; leading, it is back on the
	// configured timeouts.
	want := r.cfg.HeartbeatTimeout
	if want == 0 {
		want = cluster.DefaultHeartbeatTimeout
	}
	waitFor(t, time.Minute, "the configured heartbeat timeout", func() bool {
		return r.Stats()["heartbeat_timeout"] == want.String()
	})
	waitFor(t, 10*time.Second, "the state back", func() bool { return r.fsm.Count() == 43 })
	if r.fsm.Restores() != 1 {
		t.Fatalf("%d snapshot restores at start, want 1", r.fsm.Restores())
	}
	// The snapshot holds the commands up to about 256 KiB of log; only those
	// after it were applied again.
	if got := r.fsm.RestoredCount(); got < 30 {
		t.Fatalf("the snapshot restored %d commands, want at least the first 30", got)
	}
}
