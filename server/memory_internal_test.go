package server

import (
	"context"
	"sync/atomic"
	"testing"
	"time"
)

// A memoryFollower releases memory once per burst of writes of burstBytes or
// more, after no write for memoryQuiet; never during a burst, never for small
// ones, never without writes.
func TestMemoryFollowerReleasesAfterWriteBursts(t *testing.T) {
	var applied atomic.Uint64
	var now atomic.Int64 // unix nanoseconds
	released := make(chan uint64, 10)
	f := memoryFollower{
		applied: applied.Load,
		now:     func() time.Time { return time.Unix(0, now.Load()) },
		release: func() { released <- applied.Load() },
	}
	ctx, cancel := context.WithCancel(context.Background())
	tick := make(chan time.Time)
	done := make(chan struct{})
	go func() { f.run(ctx, tick); close(done) }()
	defer func() { cancel(); <-done }()
	// step moves the clock and ticks; the second tick returns once the
	// follower has handled the first, at the new time.
	step := func(d time.Duration) {
		now.Add(int64(d))
		tick <- time.Time{}
		tick <- time.Time{}
	}
	noRelease := func(what string) {
		t.Helper()
		select {
		case a := <-released:
			t.Fatalf("%s: released after %d bytes", what, a)
		default:
		}
	}
	write := func(n uint64) {
		applied.Add(n)
		step(250 * time.Millisecond)
	}

	for range 10 {
		step(time.Second)
	}
	noRelease("no writes")

	// A burst: nothing while it goes on, one release once it stopped for a
	// second.
	for range 8 {
		write(256 << 10)
	}
	step(500 * time.Millisecond)
	noRelease("half a second after the last write")
	step(600 * time.Millisecond)
	select {
	case a := <-released:
		if a != 2<<20 {
			t.Fatalf("released after %d bytes, want %d", a, 2<<20)
		}
	default:
		t.Fatal("no release a second after the writes stopped")
	}
	for range 10 {
		step(time.Second)
	}
	noRelease("no writes since the release")

	// Small writes, however long after: not worth a collection, until they
	// add up to a burst's worth.
	for range 3 {
		write(100 << 10)
		step(2 * time.Second)
	}
	noRelease("small writes")
	write(800 << 10)
	step(2 * time.Second)
	select {
	case <-released:
	default:
		t.Fatal("no release once the writes added up")
	}
}
