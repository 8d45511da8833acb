package server

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/ferry-id/ferry/internal/cpuslots"
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

// handshakeSlots makes the agent API's TLS handshakes compute holding one
// of the server's work slots: the server's share of a handshake (its key
// exchange and its signature) runs between reading the client's hello and
// writing its own flight, with no wait for the peer in between, so the slot
// is taken when the hello has arrived (GetConfigForClient) and given back
// at the first write. A client that connects and sends nothing holds none.
// After a cluster restart or a failover every agent redials at once; without
// the bound thousands of handshakes are runnable together and Raft's
// heartbeats wait behind all of them.
type handshakeSlots struct {
	credentials.TransportCredentials
	slots *cpuslots.Slots
}

// withHandshakeSlots wraps the TLS config's GetConfigForClient and the
// credentials built from it.
func withHandshakeSlots(cfg *tls.Config, slots *cpuslots.Slots) credentials.TransportCredentials {
	next := cfg.GetConfigForClient
	cfg = cfg.Clone()
	cfg.GetConfigForClient = func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
		if c, ok := hello.Conn.(*slotConn); ok {
			if err := c.acquire(hello.Context()); err != nil {
				return nil, err
			}
		}
		if next == nil {
			return nil, nil
		}
		return next(hello)
	}
	return handshakeSlots{TransportCredentials: credentials.NewTLS(cfg), slots: slots}
}

func (h handshakeSlots) ServerHandshake(raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	c := &slotConn{Conn: raw, slots: h.slots}
	defer c.release()
	return h.TransportCredentials.ServerHandshake(c)
}

func (h handshakeSlots) Clone() credentials.TransportCredentials {
	return handshakeSlots{TransportCredentials: h.TransportCredentials.Clone(), slots: h.slots}
}

// slotConn is a server connection during (and after) its handshake: it
// holds a work slot from the client's hello until its first write.
type slotConn struct {
	net.Conn
	slots *cpuslots.Slots
	held  atomic.Bool
}

func (c *slotConn) acquire(ctx context.Context) error {
	if err := c.slots.Acquire(ctx); err != nil {
		return err
	}
	c.held.Store(true)
	return nil
}

func (c *slotConn) release() {
	if c.held.CompareAndSwap(true, false) {
		c.slots.Release()
	}
}

func (c *slotConn) Write(b []byte) (int, error) {
	c.release()
	return c.Conn.Write(b)
}

// SyscallConn lets gRPC read the socket only when it is readable, as it
// does for an unwrapped connection.
func (c *slotConn) SyscallConn() (syscall.RawConn, error) {
	sc, ok := c.Conn.(syscall.Conn)
	if !ok {
		return nil, errors.New("server: connection has no file descriptor")
	}
	return sc.SyscallConn()
}
