package cluster

import (
	"sync"

	"github.com/hashicorp/raft"
)

// logCache keeps the most recent log entries in memory in front of the log
// store, so replication to followers and the FSM rarely read the disk. Unlike
// raft.LogCache it is bounded in bytes as well as in entries: one entry can
// be a batch of 1,000 registration entries (up to 512 KiB), and 512 such
// entries held a quarter of a gigabyte of history. It keeps copies of the
// entries, not the pointers Raft hands it (see StoreLogs).
// It also tells a counter (the snapshot trigger) the size of every entry
// stored. It is safe for concurrent use.
type logCache struct {
	store    raft.LogStore
	maxLogs  int
	maxBytes int
	stored   func([]*raft.Log) // called after every successful store; may be nil

	mu sync.RWMutex
	// logs are consecutive entries, oldest first; bytes their size.
	logs  []*raft.Log
	bytes int
}

var (
	_ raft.LogStore          = (*logCache)(nil)
	_ raft.MonotonicLogStore = (*logCache)(nil)
)

// IsMonotonic passes on whether the store accepts only consecutive indexes
// (raft-wal does): Raft then removes every entry after installing a snapshot,
// since the next entry follows the snapshot, not the old log.
func (c *logCache) IsMonotonic() bool {
	m, ok := c.store.(raft.MonotonicLogStore)
	return ok && m.IsMonotonic()
}

func newLogCache(store raft.LogStore, maxLogs, maxBytes int, stored func([]*raft.Log)) *logCache {
	return &logCache{store: store, maxLogs: maxLogs, maxBytes: maxBytes, stored: stored}
}

// logSize is what an entry takes in memory, roughly: its payloads and the
// struct.
func logSize(l *raft.Log) int { return len(l.Data) + len(l.Extensions) + 128 }

func (c *logCache) GetLog(index uint64, out *raft.Log) error {
	c.mu.RLock()
	if n := len(c.logs); n > 0 && index >= c.logs[0].Index && index <= c.logs[n-1].Index {
		*out = *c.logs[index-c.logs[0].Index]
		c.mu.RUnlock()
		return nil
	}
	c.mu.RUnlock()
	return c.store.GetLog(index, out)
}

func (c *logCache) StoreLog(l *raft.Log) error { return c.StoreLogs([]*raft.Log{l}) }

func (c *logCache) StoreLogs(logs []*raft.Log) error {
	err := c.store.StoreLogs(logs)
	c.mu.Lock()
	if err != nil {
		// What the store kept is unknown: forget everything.
		c.logs, c.bytes = nil, 0
		c.mu.Unlock()
		return err
	}
	for _, l := range logs {
		if n := len(c.logs); n > 0 && l.Index != c.logs[n-1].Index+1 {
			// Not the next entry (the log was truncated and rewritten):
			// start over from this one.
			c.logs, c.bytes = nil, 0
		}
		// A copy: Raft hands the leader's entries as pointers into their
		// apply futures, and keeping those would keep every command's result
		// (deleted rows included) for as long as the entry is cached.
		cp := *l
		c.logs = append(c.logs, &cp)
		c.bytes += logSize(l)
	}
	drop, bytes := 0, c.bytes
	for drop < len(c.logs) && (len(c.logs)-drop > c.maxLogs || bytes > c.maxBytes) {
		bytes -= logSize(c.logs[drop])
		drop++
	}
	if drop > 0 {
		c.trimLocked(drop)
	}
	c.mu.Unlock()
	if c.stored != nil {
		c.stored(logs)
	}
	return nil
}

func (c *logCache) FirstIndex() (uint64, error) { return c.store.FirstIndex() }
func (c *logCache) LastIndex() (uint64, error)  { return c.store.LastIndex() }

// DeleteRange deletes [lo, hi] from the store and the cache: a prefix after a
// snapshot (compaction), a suffix when a follower's log is overwritten.
func (c *logCache) DeleteRange(lo, hi uint64) error {
	c.mu.Lock()
	if n := len(c.logs); n > 0 {
		first, last := c.logs[0].Index, c.logs[n-1].Index
		switch {
		case hi < first || lo > last:
		case lo <= first && hi >= last:
			c.logs, c.bytes = nil, 0
		case lo <= first:
			c.trimLocked(int(hi - first + 1))
		case hi >= last:
			for _, l := range c.logs[lo-first:] {
				c.bytes -= logSize(l)
			}
			clear(c.logs[lo-first:])
			c.logs = c.logs[:lo-first]
		default:
			c.logs, c.bytes = nil, 0
		}
	}
	c.mu.Unlock()
	return c.store.DeleteRange(lo, hi)
}

// trimLocked drops the oldest n cached entries.
func (c *logCache) trimLocked(n int) {
	for _, l := range c.logs[:n] {
		c.bytes -= logSize(l)
	}
	c.logs = append(c.logs[:0:0], c.logs[n:]...)
}
