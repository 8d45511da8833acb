package imds

import (
	"context"
	"sync"
	"time"
)

// limiter bounds concurrent requests and, optionally, their rate. A request
// that finds no slot waits at most wait before being turned away.
type limiter struct {
	sem    chan struct{}
	wait   time.Duration
	queued func() // called when a request starts waiting; may be nil

	mu     sync.Mutex
	rate   float64 // tokens per second; 0 = unlimited
	burst  float64
	tokens float64
	last   time.Time
}

func newLimiter(concurrent int, wait time.Duration, rate float64, burst int, queued func()) *limiter {
	l := &limiter{sem: make(chan struct{}, concurrent), wait: wait, rate: rate, queued: queued}
	if rate > 0 {
		l.burst = float64(burst)
		if l.burst <= 0 {
			l.burst = max(rate, 1)
		}
		l.tokens = l.burst
		l.last = time.Now()
	}
	return l
}

// acquire takes a slot; on success the caller must call release. The rate
// is checked separately (allowRate), once per request.
func (l *limiter) acquire(ctx context.Context) bool {
	select {
	case l.sem <- struct{}{}:
		return true
	default:
	}
	t := time.NewTimer(l.wait)
	defer t.Stop()
	if l.queued != nil {
		l.queued()
	}
	select {
	case l.sem <- struct{}{}:
		return true
	case <-t.C:
		return false
	case <-ctx.Done():
		return false
	}
}

func (l *limiter) release() { <-l.sem }

func (l *limiter) allowRate() bool {
	if l.rate <= 0 {
		return true
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	now := time.Now()
	l.tokens = min(l.burst, l.tokens+now.Sub(l.last).Seconds()*l.rate)
	l.last = now
	if l.tokens < 1 {
		return false
	}
	l.tokens--
	return true
}
