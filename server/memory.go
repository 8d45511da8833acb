package server

import (
	"context"
	"os"
	"runtime/debug"
	"runtime/metrics"
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

// defaultGCPercent is GOGC unless $GOGC is set: the heap may grow to twice
// what is live between collections (Go's default). GOGC 400, which the server
// once set, let RSS reach 755 MiB for 202 MiB live (100,000 entries, 10,000
// agents) and 997 MiB with 100,000 entries alone; a pace that followed the
// live heap (400 while small) raised the peak of 10,000-entry bursts from
// 74-82 to 100-122 MiB for no write throughput this machine could measure.
// docs/scale.md has the figures.
const defaultGCPercent = 100

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

// setGC applies the collector settings: defaultGCPercent unless $GOGC is set,
// and the soft memory limit when one is configured.
func (s *Server) setGC() error {
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(defaultGCPercent)
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
