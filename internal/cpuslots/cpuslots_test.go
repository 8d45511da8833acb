package cpuslots

import (
	"context"
	"errors"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
)

func TestSlotsBoundConcurrency(t *testing.T) {
	s := New(3)
	var in, peak atomic.Int32
	var wg sync.WaitGroup
	release := make(chan struct{})
	for range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_ = s.Do(context.Background(), func() {
				n := in.Add(1)
				for {
					p := peak.Load()
					if n <= p || peak.CompareAndSwap(p, n) {
						break
					}
				}
				<-release
				in.Add(-1)
			})
		}()
	}
	// Three hold the slots; the rest wait parked until they are released.
	for in.Load() < 3 {
		runtime.Gosched()
	}
	close(release)
	wg.Wait()
	if p := peak.Load(); p != 3 {
		t.Fatalf("peak concurrency %d, want 3", p)
	}
}

func TestAcquireEndsWithContext(t *testing.T) {
	s := New(1)
	if err := s.Acquire(context.Background()); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := s.Acquire(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("Acquire with every slot held and a cancelled context: %v", err)
	}
	s.Release()
	if err := s.Acquire(ctx); err != nil {
		t.Fatalf("a free slot is taken even when the context has ended: %v", err)
	}
}

func TestDefaultAtLeastOne(t *testing.T) {
	if New(0).Size() != 1 || Default().Size() < 2 {
		t.Fatal("sizes")
	}
}
