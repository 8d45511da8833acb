package server

import (
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"sync"
	"sync/atomic"
)

// The collector's pace follows the state's size. A small server runs at
// GOGC 400: the state store's immutable trees make garbage on every write,
// and at Go's default (100) the collector took a large share of a small
// server's cores. But GOGC 400 lets the heap grow to five times what is live:
// with 100,000 entries and 10,000 agents (200 MiB live, test/scale) the
// server's RSS reached 755 MiB. So the headroom above the live heap is at most
// four times the live heap and at most gcHeadroom (but never less than the
// live heap itself, GOGC 100): a large server spends a little more CPU on
// collection and its RSS stays within reach of its state.
const (
	maxGCPercent = 400
	minGCPercent = 100
	gcHeadroom   = 256 << 20
)

// gcPercent returns the GOGC for a live heap of live bytes.
func gcPercent(live uint64) int {
	if live == 0 {
		return maxGCPercent
	}
	p := int(uint64(gcHeadroom) * 100 / live)
	return min(maxGCPercent, max(minGCPercent, p))
}

// paceGC sets GOGC from the live heap after every collection, for the
// process's lifetime. It is started once, and only when $GOGC is not set.
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
