package server

import (
	"context"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Admission control for the gRPC servers. Every unary call holds one of
// maxInFlight slots while its handler runs; a call that finds none free waits
// up to admissionWait for one and is then refused with ResourceExhausted, so a
// storm of requests (thousands of agents reconnecting after a partition heals,
// a runaway script) is shed at the door instead of piling up behind Raft's
// queue with every caller's memory held. Streams are long-lived watches and are
// not counted.
const (
	maxInFlight   = 512
	admissionWait = 250 * time.Millisecond
)

// limiter is a counting semaphore over unary calls; safe for concurrent use.
type limiter struct {
	slots chan struct{}
	wait  time.Duration
	// after starts the wait for a free slot; time.After unless a test
	// drives the clock. waiting, when set, is told each time a call starts
	// waiting.
	after   func(time.Duration) <-chan time.Time
	waiting func()
}

func newLimiter(n int, wait time.Duration) *limiter {
	return &limiter{slots: make(chan struct{}, n), wait: wait, after: time.After}
}

// admission returns a server option that limits the server's unary calls in
// flight. Each gRPC server gets its own limit.
func (s *Server) admission() grpc.ServerOption {
	return grpc.ChainUnaryInterceptor(newLimiter(maxInFlight, admissionWait).unary)
}

func (l *limiter) unary(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	select {
	case l.slots <- struct{}{}:
	default:
		expired := l.after(l.wait)
		if l.waiting != nil {
			l.waiting()
		}
		select {
		case l.slots <- struct{}{}:
		case <-expired:
			return nil, status.Errorf(codes.ResourceExhausted, "server: overloaded: %d requests in flight; retry later", cap(l.slots))
		case <-ctx.Done():
			return nil, status.FromContextError(ctx.Err()).Err()
		}
	}
	defer func() { <-l.slots }()
	return h(ctx, req)
}
