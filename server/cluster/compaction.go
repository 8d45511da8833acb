package cluster

import (
	"errors"
	"io"
	"sync"
	"time"

	"github.com/hashicorp/raft"
)

// Snapshots by size. hashicorp/raft snapshots when the log since the last
// snapshot holds SnapshotThreshold entries (checked every SnapshotInterval),
// but one entry can be a batch of 1,000 registration entries: after 100,000
// entries there was still no snapshot, and every restart replayed the whole
// log. A node therefore also snapshots once the log written since its last
// snapshot exceeds max(SnapshotMinBytes, SnapshotStateRatio × the size of
// that snapshot): a restart restores the state and replays a log no larger
// than a share of it, however long the history.

// Defaults for the size trigger (see Config). Replaying a byte of log costs
// about twice what restoring a byte of snapshot does (an entry created is
// validated, checked for duplicates and remembered for deduplication; one
// restored is only inserted), so with a quarter a restart costs at most about
// one and a half restores of the state. A snapshot costs about a tenth of
// applying the entries it holds, so snapshotting every quarter of the state
// adds about 40% to the apply work, on a goroutine of its own. The minimum
// keeps a small state from being snapshotted for every few writes.
const (
	DefaultSnapshotMinBytes   = 4 << 20
	DefaultSnapshotStateRatio = 0.25
)

const (
	// compactionGap is the least time between two size-triggered snapshots,
	// so a node whose FSM lags behind its log does not snapshot in a loop.
	compactionGap = time.Second
	// markBytes is how far apart the counter remembers positions in the log:
	// what it reports is exact to within that, and it holds one mark per
	// markBytes of log since the last snapshot.
	markBytes = 64 << 10
)

// logMark is the log's byte count (since the node started) after the entry at
// index was stored.
type logMark struct {
	index uint64
	total int64
}

// compactor counts the bytes of log stored since the last snapshot and says
// when the next one is due. It is safe for concurrent use.
type compactor struct {
	minBytes int64
	ratio    float64
	kick     chan struct{} // a snapshot may be due

	mu        sync.Mutex
	total     int64     // bytes of log stored since the node started
	marks     []logMark // ascending; entries after the last snapshot
	snapIndex uint64    // the last snapshot's index
	snapBase  int64     // total when the entry at snapIndex was stored (as far as known)
	snapBytes int64     // the last snapshot's size
}

func newCompactor(minBytes int64, ratio float64) *compactor {
	return &compactor{minBytes: minBytes, ratio: ratio, kick: make(chan struct{}, 1)}
}

// stored counts entries the log store has just stored.
func (c *compactor) stored(logs []*raft.Log) {
	if len(logs) == 0 {
		return
	}
	c.mu.Lock()
	for _, l := range logs {
		c.total += int64(len(l.Data) + len(l.Extensions))
	}
	last := logs[len(logs)-1].Index
	n := len(c.marks)
	if n > 0 && last < c.marks[n-1].index {
		// The log was truncated and rewritten: forget positions past it.
		c.marks, n = c.marks[:0], 0
	}
	// Marks lie markBytes apart, but for the last, which moves with the log.
	if n >= 2 && c.marks[n-1].total-c.marks[n-2].total < markBytes {
		c.marks[n-1] = logMark{index: last, total: c.total}
	} else {
		c.marks = append(c.marks, logMark{index: last, total: c.total})
	}
	due := c.dueLocked()
	c.mu.Unlock()
	if due {
		c.wake()
	}
}

// snapshotted records a snapshot of size bytes at index, taken by this
// trigger, by Raft's own, or installed from the leader.
func (c *compactor) snapshotted(index uint64, size int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if index < c.snapIndex {
		return
	}
	c.snapIndex, c.snapBytes = index, size
	// The last position at or before index is where the new snapshot begins;
	// everything stored after it counts towards the next one.
	keep := 0
	for keep < len(c.marks) && c.marks[keep].index <= index {
		c.snapBase = c.marks[keep].total
		keep++
	}
	c.marks = append(c.marks[:0], c.marks[keep:]...)
}

// sinceSnapshot is the bytes of log stored after the last snapshot.
func (c *compactor) sinceSnapshot() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.total - c.snapBase
}

// threshold is the log size since the last snapshot that makes the next due.
func (c *compactor) thresholdLocked() int64 {
	return max(c.minBytes, int64(c.ratio*float64(c.snapBytes)))
}

func (c *compactor) dueLocked() bool { return c.total-c.snapBase > c.thresholdLocked() }

func (c *compactor) due() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.dueLocked()
}

// countTail adds to the count the entries already in the log after the last
// snapshot (at snapIndex, of snapBytes) when the node starts, read from logs
// (the store without its cache), so a long tail left by an earlier run is
// snapshotted soon. It may run while new entries are stored.
func (c *compactor) countTail(logs raft.LogStore, snapIndex uint64, snapBytes int64) error {
	c.snapshotted(snapIndex, snapBytes)
	first, err := logs.FirstIndex()
	if err != nil {
		return err
	}
	last, err := logs.LastIndex()
	if err != nil {
		return err
	}
	var tail int64
	for i := max(first, snapIndex+1); first > 0 && i <= last; i++ {
		var l raft.Log
		if err := logs.GetLog(i, &l); err != nil {
			if errors.Is(err, raft.ErrLogNotFound) {
				continue
			}
			return err
		}
		tail += int64(len(l.Data) + len(l.Extensions))
	}
	c.mu.Lock()
	// The tail was stored before anything counted since the start.
	c.total += tail
	for i := range c.marks {
		c.marks[i].total += tail
	}
	if tail > 0 && (len(c.marks) == 0 || c.marks[0].index > last) {
		c.marks = append([]logMark{{index: last, total: tail}}, c.marks...)
	}
	due := c.dueLocked()
	c.mu.Unlock()
	if due {
		c.wake()
	}
	return nil
}

// wake tells the loop a snapshot may be due.
func (c *compactor) wake() {
	select {
	case c.kick <- struct{}{}:
	default:
	}
}

// snapshotStore tells the compactor of every snapshot written to or
// installed in the node's store.
type snapshotStore struct {
	raft.SnapshotStore
	c *compactor
}

func (s *snapshotStore) Create(version raft.SnapshotVersion, index, term uint64, configuration raft.Configuration,
	configurationIndex uint64, trans raft.Transport) (raft.SnapshotSink, error) {
	sink, err := s.SnapshotStore.Create(version, index, term, configuration, configurationIndex, trans)
	if err != nil {
		return nil, err
	}
	return &countingSink{SnapshotSink: sink, c: s.c, index: index}, nil
}

type countingSink struct {
	raft.SnapshotSink
	c     *compactor
	index uint64
	n     int64
}

func (s *countingSink) Write(p []byte) (int, error) {
	n, err := s.SnapshotSink.Write(p)
	s.n += int64(n)
	return n, err
}

func (s *countingSink) Close() error {
	if err := s.SnapshotSink.Close(); err != nil {
		return err
	}
	s.c.snapshotted(s.index, s.n)
	return nil
}

var _ io.Writer = (*countingSink)(nil)

// compactLoop takes a snapshot whenever the compactor says one is due.
func (n *Node) compactLoop() {
	c := n.compact
	if list, err := n.snaps.List(); err == nil {
		var index uint64
		var size int64
		if len(list) > 0 {
			index, size = list[0].Index, list[0].Size
		}
		if err := c.countTail(n.store.raw, index, size); err != nil {
			n.log.Warn("cluster: could not measure the log since the last snapshot", "error", err)
		}
	}
	for {
		select {
		case <-n.ctx.Done():
			return
		case <-c.kick:
		}
		if !c.due() {
			continue
		}
		since := c.sinceSnapshot()
		start := time.Now()
		err := n.raft.Snapshot().Error()
		switch {
		case err == nil:
			n.log.Info("cluster: snapshot taken for the log's size", "log_bytes", since, "took", time.Since(start).Round(time.Millisecond))
		case errors.Is(err, raft.ErrNothingNewToSnapshot):
		case errors.Is(err, raft.ErrRaftShutdown):
			return
		default:
			n.log.Warn("cluster: snapshot for the log's size failed", "log_bytes", since, "error", err)
		}
		select {
		case <-n.ctx.Done():
			return
		case <-time.After(compactionGap):
		}
		if c.due() {
			c.wake()
		}
	}
}
