package server

import (
	"context"
	"os"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"sync"
	"sync/atomic"
	"time"
)

// Memory that follows the state. The Go runtime keeps the pages its heap
// grew into until a collection finds them free and its scavenger returns
// them, slowly; and an idle process collects only every two minutes. After a
// burst of writes (entries created and deleted, a log replayed at start) a
// server therefore held the memory of the burst's peak for minutes, whatever
// the state left behind. Once writes stop, the server collects and returns
// what the burst left free at once: its memory falls back to what the state
// needs.

// The collector's pace follows the live heap. A small server runs at GOGC
// 400: the state store's immutable trees make garbage on every write, and at
// Go's default (100) the collector takes a larger share of a small server's
// cores. But GOGC 400 lets the heap grow to five times what is live: with
// 100,000 entries and 10,000 agents (200 MiB live, test/scale) the server's
// RSS reached 755 MiB, and 997 MiB with 100,000 entries alone. So the headroom above the live heap is at most four times the live
// heap and at most gcHeadroom, but never less than the live heap itself (GOGC
// 100): a large server spends a little more CPU on collection and its RSS
// stays within reach of its state. docs/scale.md has the measurements.
const (
	maxGCPercent = 400
	minGCPercent = 100
	gcHeadroom   = 256 << 20
)

const (
	// memorySampleInterval is how often the applied writes are looked at;
	// memoryQuiet how long no write may have been applied before memory is
	// released (each release is a full collection).
	memorySampleInterval = 250 * time.Millisecond
	memoryQuiet          = time.Second
	// burstBytes is how much log a burst must have applied for a release to
	// be worth a collection: a megabyte is about 5,000 entries, which took
	// some 12 MiB of heap with their indexes while they were written.
	burstBytes = 1 << 20
)

// setGC applies the collector settings: GOGC follows the live heap (paceGC)
// unless $GOGC is set, and the soft memory limit when one is configured.
func (s *Server) setGC() error {
	if os.Getenv("GOGC") == "" {
		paceGC()
	}
	if s.cfg.MemoryLimit != "" {
		n, err := parseBytes(s.cfg.MemoryLimit)
		if err != nil {
			return err
		}
		debug.SetMemoryLimit(n)
	}
	return nil
}

// gcPercent returns the GOGC for a live heap of live bytes.
func gcPercent(live uint64) int {
	if live == 0 {
		return maxGCPercent
	}
	p := int(uint64(gcHeadroom) * 100 / live)
	return min(maxGCPercent, max(minGCPercent, p))
}

// paceGC sets GOGC from the live heap after every collection, for the
// process's lifetime. It is started once.
func paceGC() {
	paceOnce.Do(func() {
		debug.SetGCPercent(maxGCPercent)
		armGCPacer(maxGCPercent)
	})
}

var (
	paceOnce sync.Once
	// paced counts the pacer's runs (tests wait on it).
	paced atomic.Int64
)

// armGCPacer leaves an object for the collector to find: its finalizer runs
// after the next collection, sets GOGC for the live heap then, and arms the
// next one.
func armGCPacer(current int) {
	sentinel := new([16]byte)
	runtime.SetFinalizer(sentinel, func(*[16]byte) {
		sample := []metrics.Sample{{Name: "/gc/heap/live:bytes"}}
		metrics.Read(sample)
		next := current
		if sample[0].Value.Kind() == metrics.KindUint64 {
			next = gcPercent(sample[0].Value.Uint64())
		}
		// Setting GOGC stops the world: only for a change worth it.
		if next*10 < current*9 || next*10 > current*11 {
			debug.SetGCPercent(next)
		} else {
			next = current
		}
		armGCPacer(next)
		paced.Add(1)
	})
}

// releaseMemory collects and returns free memory to the system.
func releaseMemory() { debug.FreeOSMemory() }

// memoryFollower calls release after each burst of writes of burstBytes or
// more, once no write has been applied for memoryQuiet. It runs until ctx
// ends.
type memoryFollower struct {
	applied func() uint64 // bytes of log applied so far
	release func()
	now     func() time.Time
}

func (f memoryFollower) run(ctx context.Context, tick <-chan time.Time) {
	last := f.applied()
	released, moved := last, f.now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick:
		}
		if a := f.applied(); a != last {
			last, moved = a, f.now()
			continue
		}
		if last-released >= burstBytes && f.now().Sub(moved) >= memoryQuiet {
			f.release()
			released = last
		}
	}
}

// heapHeld is the memory the heap holds from the system: its objects (dead
// ones not yet collected included) and the free memory it has not returned.
func heapHeld() uint64 {
	s := []metrics.Sample{
		{Name: "/memory/classes/heap/objects:bytes"},
		{Name: "/memory/classes/heap/unused:bytes"},
		{Name: "/memory/classes/heap/free:bytes"},
	}
	metrics.Read(s)
	var n uint64
	for _, v := range s {
		if v.Value.Kind() == metrics.KindUint64 {
			n += v.Value.Uint64()
		}
	}
	return n
}
