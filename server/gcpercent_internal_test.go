package server

import (
	"runtime"
	"runtime/debug"
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestGCPercent(t *testing.T) {
	for _, c := range []struct {
		live uint64
		want int
	}{
		{0, 400},
		{16 << 20, 400},
		{64 << 20, 400},  // headroom 256 MiB = 4x
		{128 << 20, 200}, // headroom 256 MiB = 2x
		{200 << 20, 128},
		{256 << 20, 100},
		{2 << 30, 100}, // never under Go's default
	} {
		assert.Equal(t, c.want, gcPercent(c.live), "live heap %d MiB", c.live>>20)
	}
}

// TestPaceGCFollowsLiveHeap: with 300 MiB live, GOGC comes down to 100 after
// a collection; once it is freed, it goes back up to 400.
func TestPaceGCFollowsLiveHeap(t *testing.T) {
	old := debug.SetGCPercent(-1)
	debug.SetGCPercent(old)
	t.Cleanup(func() { debug.SetGCPercent(old) })
	paceGC()
	live := make([][]byte, 300)
	for i := range live {
		live[i] = make([]byte, 1<<20)
	}
	current := func() int {
		p := debug.SetGCPercent(-1)
		debug.SetGCPercent(p)
		return p
	}
	// A collection, then the pacer's run after it (its finalizer).
	collect := func() {
		n := paced.Load()
		runtime.GC()
		for paced.Load() == n {
			runtime.Gosched()
		}
	}
	collect()
	collect()
	assert.Equal(t, minGCPercent, current(), "GOGC with 300 MiB live")
	runtime.KeepAlive(live)
	live = nil
	collect()
	collect()
	assert.Equal(t, maxGCPercent, current(), "GOGC once the heap is small again")
}
