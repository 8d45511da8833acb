package cluster

import (
	"bytes"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
)

func cacheLogs(first, n, size int) []*raft.Log {
	var out []*raft.Log
	for i := range n {
		out = append(out, &raft.Log{Index: uint64(first + i), Term: 1, Type: raft.LogCommand, Data: bytes.Repeat([]byte{byte(first + i)}, size)})
	}
	return out
}

// cached reports which of [lo, hi] the cache itself holds.
func cached(c *logCache, lo, hi uint64) (held []uint64) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	for _, l := range c.logs {
		if l.Index >= lo && l.Index <= hi {
			held = append(held, l.Index)
		}
	}
	return held
}

func TestLogCacheBounds(t *testing.T) {
	store := raft.NewInmemStore()
	var counted int
	c := newLogCache(store, 8, 10*(1000+128), func(ls []*raft.Log) { counted += len(ls) })
	if err := c.StoreLogs(cacheLogs(1, 6, 1000)); err != nil {
		t.Fatal(err)
	}
	if err := c.StoreLogs(cacheLogs(7, 6, 1000)); err != nil {
		t.Fatal(err)
	}
	if counted != 12 {
		t.Fatalf("counter told of %d entries, want 12", counted)
	}
	// At most 8 entries.
	if got := cached(c, 1, 12); len(got) != 8 || got[0] != 5 {
		t.Fatalf("cached %v, want 5..12", got)
	}
	// Big entries: bounded by bytes.
	if err := c.StoreLogs(cacheLogs(13, 2, 4000)); err != nil {
		t.Fatal(err)
	}
	if got := cached(c, 1, 14); len(got) != 4 || got[0] != 11 {
		t.Fatalf("cached %v, want 11..14 (10 KiB or so)", got)
	}
	if c.bytes > c.maxBytes {
		t.Fatalf("%d bytes cached, bound %d", c.bytes, c.maxBytes)
	}
	// Every entry is still there, from the cache or the store.
	for i := uint64(1); i <= 14; i++ {
		var l raft.Log
		if err := c.GetLog(i, &l); err != nil || l.Index != i || l.Data[0] != byte(i) {
			t.Fatalf("GetLog(%d) = %v, %v", i, l.Index, err)
		}
	}
	// Compaction deletes a prefix: the newer entries stay cached.
	if err := c.DeleteRange(1, 12); err != nil {
		t.Fatal(err)
	}
	if got := cached(c, 1, 14); len(got) != 2 || got[0] != 13 {
		t.Fatalf("after deleting a prefix: cached %v, want 13, 14", got)
	}
	// A conflicting suffix is deleted and rewritten.
	if err := c.DeleteRange(14, 14); err != nil {
		t.Fatal(err)
	}
	if got := cached(c, 1, 20); len(got) != 1 || got[0] != 13 {
		t.Fatalf("after deleting a suffix: cached %v, want 13", got)
	}
	rewritten := cacheLogs(14, 1, 10)
	rewritten[0].Term = 2
	if err := c.StoreLogs(rewritten); err != nil {
		t.Fatal(err)
	}
	var l raft.Log
	if err := c.GetLog(14, &l); err != nil || l.Term != 2 {
		t.Fatalf("GetLog(14) after rewrite: term %d, %v", l.Term, err)
	}
	// A gap (entries not following the cached ones) starts the cache over.
	if err := c.StoreLogs(cacheLogs(30, 1, 10)); err != nil {
		t.Fatal(err)
	}
	if got := cached(c, 1, 40); len(got) != 1 || got[0] != 30 {
		t.Fatalf("after a gap: cached %v, want 30", got)
	}
}

// The cache keeps its own copy of each entry: Raft's entries live inside
// their apply futures, with the command's result, which the cache must not
// keep alive (a batch delete's result holds every deleted row).
func TestLogCacheCopiesEntries(t *testing.T) {
	c := newLogCache(raft.NewInmemStore(), 8, 1<<20, nil)
	type future struct {
		log      raft.Log
		response []byte
	}
	f := &future{log: raft.Log{Index: 1, Term: 1, Type: raft.LogCommand, Data: []byte("cmd")}, response: make([]byte, 1<<20)}
	if err := c.StoreLogs([]*raft.Log{&f.log}); err != nil {
		t.Fatal(err)
	}
	c.mu.RLock()
	held := c.logs[0]
	c.mu.RUnlock()
	if held == &f.log {
		t.Fatal("the cache holds the pointer Raft gave it (and so the future around it)")
	}
	var l raft.Log
	if err := c.GetLog(1, &l); err != nil || string(l.Data) != "cmd" {
		t.Fatalf("GetLog: %q %v", l.Data, err)
	}
}

// Raft must learn that the store behind the cache is monotonic (raft-wal),
// or it leaves old entries behind after installing a snapshot and the next
// append leaves a gap the store refuses.
func TestLogCacheMonotonic(t *testing.T) {
	if newLogCache(raft.NewInmemStore(), 1, 1, nil).IsMonotonic() {
		t.Fatal("an in-memory store is not monotonic")
	}
	dir := t.TempDir()
	ls, err := openLogStore(LogStoreWAL, dir, 1<<20, hclog.NewNullLogger(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ls.closer.Close()
	if m, ok := ls.logs.(raft.MonotonicLogStore); !ok || !m.IsMonotonic() {
		t.Fatal("the cache in front of raft-wal does not say it is monotonic")
	}
}

func TestCompactorThreshold(t *testing.T) {
	c := newCompactor(1000, 0.5)
	c.stored(cacheLogs(1, 9, 100))
	if c.due() {
		t.Fatal("due after 900 bytes with a 1,000-byte minimum")
	}
	c.stored(cacheLogs(10, 2, 100))
	if !c.due() {
		t.Fatal("not due after 1,100 bytes")
	}
	select {
	case <-c.kick:
	default:
		t.Fatal("the loop was not woken")
	}
	// A snapshot of 10,000 bytes at index 11: the next is due after 5,000
	// more bytes of log.
	c.snapshotted(11, 10000)
	if got := c.sinceSnapshot(); got != 0 {
		t.Fatalf("%d bytes since the snapshot, want 0", got)
	}
	c.stored(cacheLogs(12, 40, 100))
	if c.due() {
		t.Fatal("due after 4,000 bytes with a 5,000-byte threshold")
	}
	c.stored(cacheLogs(52, 20, 100))
	if !c.due() {
		t.Fatal("not due after 6,000 bytes")
	}
	// A snapshot that covers part of the log counts from its index on, to
	// within the counter's resolution.
	c.snapshotted(71, 10000)
	if got := c.sinceSnapshot(); got > markBytes {
		t.Fatalf("%d bytes since a snapshot at the last index", got)
	}
	// An older snapshot (installed late) changes nothing.
	c.snapshotted(5, 1)
	if c.snapIndex != 71 {
		t.Fatalf("snapshot index went back to %d", c.snapIndex)
	}
}

func TestCompactorCountsTail(t *testing.T) {
	store := raft.NewInmemStore()
	if err := store.StoreLogs(cacheLogs(1, 30, 100)); err != nil {
		t.Fatal(err)
	}
	c := newCompactor(1000, 0.5)
	// Something stored while the tail is being read counts after it.
	c.stored(cacheLogs(31, 1, 100))
	if err := c.countTail(store, 10, 100); err != nil {
		t.Fatal(err)
	}
	if got := c.sinceSnapshot(); got != 2100 {
		t.Fatalf("%d bytes since the snapshot, want 2,000 of tail and 100 stored", got)
	}
	if !c.due() {
		t.Fatal("a tail over the threshold is not due")
	}
}
