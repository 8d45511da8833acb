package server

import (
	"context"
	"os"
	"runtime/debug"
	"time"
)

// Memory that follows the state. The Go runtime keeps the pages a heap grew
// into until a collection finds them free and its scavenger returns them,
// slowly; an idle server collects only every two minutes. After a burst of
// writes that left a smaller state behind (entries created and deleted) a
// server therefore kept the RSS of its peak for minutes. The server watches
// the state's size and, once it has shrunk by a good share since the last
// look, collects and returns the free memory at once.

// defaultGCPercent is GOGC unless $GOGC is set: the heap may grow to twice
// what is live between collections (Go's default). 400 (five times) wrote
// entries about 10% faster but held 997 MiB for 100,000 entries instead of
// 469 MiB (see README, "Memory").
const defaultGCPercent = 100

const (
	// memorySampleInterval is how often the state's size is looked at (an
	// atomic read), so a short burst's peak is seen; memoryQuiet how long the
	// size must stay put before memory is released: once a burst of writes
	// is over, not in the middle of it (each release is a full collection).
	memorySampleInterval = 250 * time.Millisecond
	memoryQuiet          = time.Second
	// shrinkFraction and shrinkMinBytes: the state must have shrunk by at
	// least this share of its largest size since the last release, and by
	// this many bytes, for memory to be released. A megabyte of state is
	// about 5,000 entries, which take some 12 MiB of heap with their indexes.
	shrinkFraction = 0.25
	shrinkMinBytes = 1 << 20
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

// followStateMemory calls release (which returns free memory to the system)
// whenever the state, having shrunk by shrinkFraction and shrinkMinBytes of
// its peak since the last release, has kept its size for memoryQuiet; until
// ctx ends. size reports the state's size in bytes.
func followStateMemory(ctx context.Context, size func() int64, release func()) {
	t := time.NewTicker(memorySampleInterval)
	defer t.Stop()
	peak := size()
	prev, since := peak, time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		cur := size()
		if cur != prev {
			prev, since = cur, time.Now()
		}
		peak = max(peak, cur)
		shrunk := peak - cur
		if shrunk >= shrinkMinBytes && float64(shrunk) >= shrinkFraction*float64(peak) && time.Since(since) >= memoryQuiet {
			release()
			peak = cur
		}
	}
}
