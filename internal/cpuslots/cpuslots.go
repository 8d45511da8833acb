// Package cpuslots bounds how many goroutines of a process do CPU-heavy work
// at once, so that latency-critical goroutines (Raft's heartbeats and
// replication) find the CPU within a few scheduling slices even during a
// storm of work: thousands of agents reconnecting and each asking for its
// whole entry set after a cluster restart.
//
// The Go scheduler has no priorities: a goroutine woken by the network
// (a Raft heartbeat's reply) joins the run queue behind every goroutine that
// is runnable, and with 10,000 of those each doing a few hundred
// microseconds of work that queue is seconds long, longer than a Raft leader
// lease. Work held behind a slot waits parked, off the run queue.
//
// A slot is held only while computing, never while waiting for a peer: a
// slow or hostile client must not be able to hold one.
package cpuslots

import (
	"context"
	"runtime"
	"sync/atomic"
)

// Slots is a counting semaphore; its methods are safe for concurrent use.
// Waiters are served in arrival order.
type Slots struct {
	c       chan struct{}
	waiting atomic.Int64
}

// New returns Slots for n goroutines at once (at least 1).
func New(n int) *Slots {
	return &Slots{c: make(chan struct{}, max(n, 1))}
}

// Default returns Slots for twice the CPUs the process may use: enough to
// keep every CPU busy while one goroutine per CPU waits on memory or a
// lock, few enough that a woken goroutine waits at most a few slices.
func Default() *Slots { return New(2 * runtime.GOMAXPROCS(0)) }

// Acquire waits for a slot, or until ctx ends.
func (s *Slots) Acquire(ctx context.Context) error {
	select {
	case s.c <- struct{}{}:
		return nil
	default:
	}
	s.waiting.Add(1)
	defer s.waiting.Add(-1)
	select {
	case s.c <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Release returns a slot taken by Acquire.
func (s *Slots) Release() { <-s.c }

// Do runs f holding a slot.
func (s *Slots) Do(ctx context.Context, f func()) error {
	if err := s.Acquire(ctx); err != nil {
		return err
	}
	defer s.Release()
	f()
	return nil
}

// Waiting is how many goroutines wait for a slot.
func (s *Slots) Waiting() int { return int(s.waiting.Load()) }

// Size is how many goroutines may hold a slot at once.
func (s *Slots) Size() int { return cap(s.c) }
