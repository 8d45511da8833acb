package workloadapi

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/tap"

	"github.com/ferry-id/ferry/agent/budget"
)

// Limits bound what local callers may hold of the Workload API. Any local
// process may connect: without them one user's processes could take the
// agent's memory and descriptors and starve everyone else. The defaults
// (DefaultLimits) and the attacks they were measured against are in
// RELIABILITY.md.
type Limits struct {
	// MaxConnections bounds the connections open at once; it is lowered at
	// start to what the agent's descriptor limit (RLIMIT_NOFILE) can hold.
	MaxConnections int
	// MaxConnectionsPerUID bounds those of one uid.
	MaxConnectionsPerUID int
	// MaxCalls bounds the calls in flight (streams open) at once; a
	// workload following its SVIDs holds one for as long as it runs.
	MaxCalls int
	// MaxCallsPerUID bounds those of one uid.
	MaxCallsPerUID int
	// MaxCallsPerConnection is the HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS
	// the agent announces and enforces.
	MaxCallsPerConnection int
	// IdleTimeout closes (with GOAWAY) a connection that has had no call in
	// flight for this long.
	IdleTimeout time.Duration
	// HandshakeTimeout bounds the time from accept to the client's HTTP/2
	// preface (pinning the caller included): a connection that says nothing
	// for this long is closed.
	HandshakeTimeout time.Duration
	// MaxHeaderListBytes bounds a call's header list as decoded (RFC 9113
	// SETTINGS_MAX_HEADER_LIST_SIZE: every field's name and value plus 32,
	// fields repeated by HPACK reference counted each time); a call over it
	// is reset (RST_STREAM) before any handler sees it.
	MaxHeaderListBytes int
	// MaxRequestBytes bounds a request message; a call over it gets
	// ResourceExhausted before its body is buffered. With the 64 KiB flow
	// control window, it bounds what one call buffers.
	MaxRequestBytes int
}

// DefaultLimits returns the limits a zero Limits field takes.
func DefaultLimits() Limits {
	return Limits{
		MaxConnections:        1024,
		MaxConnectionsPerUID:  256,
		MaxCalls:              1024,
		MaxCallsPerUID:        256,
		MaxCallsPerConnection: 64,
		IdleTimeout:           5 * time.Minute,
		HandshakeTimeout:      10 * time.Second,
		MaxHeaderListBytes:    8 << 10,
		// The largest request is a JWT-SVID to validate (at most
		// maxJWTSVIDSize) and its audience.
		MaxRequestBytes: maxJWTSVIDSize + 4<<10,
	}
}

// withDefaults fills the zero fields of l from DefaultLimits and validates
// the result.
func (l Limits) withDefaults() (Limits, error) {
	d := DefaultLimits()
	fill := func(v *int, def int) {
		if *v == 0 {
			*v = def
		}
	}
	fill(&l.MaxConnections, d.MaxConnections)
	fill(&l.MaxConnectionsPerUID, min(d.MaxConnectionsPerUID, l.MaxConnections))
	fill(&l.MaxCalls, d.MaxCalls)
	fill(&l.MaxCallsPerUID, min(d.MaxCallsPerUID, l.MaxCalls))
	fill(&l.MaxCallsPerConnection, d.MaxCallsPerConnection)
	fill(&l.MaxHeaderListBytes, d.MaxHeaderListBytes)
	fill(&l.MaxRequestBytes, d.MaxRequestBytes)
	if l.IdleTimeout == 0 {
		l.IdleTimeout = d.IdleTimeout
	}
	if l.HandshakeTimeout == 0 {
		l.HandshakeTimeout = d.HandshakeTimeout
	}
	return l, l.Validate()
}

// Validate reports a limit that is negative or inconsistent. Zero fields
// are valid: they take their default.
func (l Limits) Validate() error {
	for _, f := range []struct {
		name string
		v    int
	}{
		{"max_connections", l.MaxConnections}, {"max_connections_per_uid", l.MaxConnectionsPerUID},
		{"max_calls", l.MaxCalls}, {"max_calls_per_uid", l.MaxCallsPerUID},
		{"max_calls_per_connection", l.MaxCallsPerConnection},
		{"max_header_list_bytes", l.MaxHeaderListBytes}, {"max_request_bytes", l.MaxRequestBytes},
	} {
		if f.v < 0 {
			return fmt.Errorf("workloadapi: %s must not be negative (got %d)", f.name, f.v)
		}
	}
	if l.IdleTimeout < 0 {
		return fmt.Errorf("workloadapi: idle_timeout must not be negative (got %v)", l.IdleTimeout)
	}
	if l.HandshakeTimeout < 0 {
		return fmt.Errorf("workloadapi: handshake_timeout must not be negative (got %v)", l.HandshakeTimeout)
	}
	if l.MaxConnections > 0 && l.MaxConnectionsPerUID > l.MaxConnections {
		return fmt.Errorf("workloadapi: max_connections_per_uid (%d) is above max_connections (%d)", l.MaxConnectionsPerUID, l.MaxConnections)
	}
	if l.MaxCalls > 0 && l.MaxCallsPerUID > l.MaxCalls {
		return fmt.Errorf("workloadapi: max_calls_per_uid (%d) is above max_calls (%d)", l.MaxCallsPerUID, l.MaxCalls)
	}
	if l.MaxHeaderListBytes > 0 && l.MaxHeaderListBytes < minHeaderListBytes {
		return fmt.Errorf("workloadapi: max_header_list_bytes (%d) is below %d: ordinary clients would be refused", l.MaxHeaderListBytes, minHeaderListBytes)
	}
	if l.MaxRequestBytes > 0 && l.MaxRequestBytes < minRequestBytes {
		return fmt.Errorf("workloadapi: max_request_bytes (%d) is below %d: ordinary requests would be refused", l.MaxRequestBytes, minRequestBytes)
	}
	return nil
}

// The smallest header list and request limits that still admit ordinary
// clients (go-spiffe's requests carry well under 1 KiB of headers).
const (
	minHeaderListBytes = 1 << 10
	minRequestBytes    = 4 << 10
)

// descriptorsPerConn is what one connection can hold open: its socket, the
// caller's pinned /proc/PID directory, and the procfs files read through it
// (stat, status, cgroup).
const descriptorsPerConn = 5

// reservedDescriptors are left for everything else the agent opens (its
// server connections, the token endpoint, files).
const reservedDescriptors = 256

// fitDescriptors lowers MaxConnections (and MaxConnectionsPerUID with it) to
// what the process's descriptor limit holds, so that callers are refused by
// the budget, with a reason, before accept(2) fails for everyone.
func fitDescriptors(l Limits, log *slog.Logger) Limits {
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err != nil {
		return l
	}
	fit := (int64(rl.Cur) - reservedDescriptors) / descriptorsPerConn
	if fit < 1 {
		fit = 1
	}
	if int64(l.MaxConnections) <= fit {
		return l
	}
	log.Warn("workload API: max_connections lowered to fit the descriptor limit",
		"configured", l.MaxConnections, "max_connections", fit, "rlimit_nofile", rl.Cur, "descriptors_per_connection", descriptorsPerConn)
	l.MaxConnections = int(fit)
	l.MaxConnectionsPerUID = min(l.MaxConnectionsPerUID, l.MaxConnections)
	return l
}

// startCall is the gRPC server's tap: it charges each new call to its
// connection's uid before a handler runs, or refuses it with
// ResourceExhausted.
func (s *Server) startCall(ctx context.Context, _ *tap.Info) (context.Context, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return nil, status.Error(codes.Internal, "caller credentials missing from connection")
	}
	c, ok := budget.ConnOf(p.Addr)
	if !ok {
		return nil, status.Error(codes.Internal, "caller credentials missing from connection")
	}
	cctx, err := c.StartCall(ctx)
	if err != nil {
		return nil, status.Error(codes.ResourceExhausted, "workload API: call refused: "+err.Error())
	}
	return cctx, nil
}

// shedErr is the error a call taken back by the budget ends with.
func shedErr(ctx context.Context) error {
	if errors.Is(context.Cause(ctx), budget.ErrShed) {
		return status.Error(codes.ResourceExhausted, budget.ErrShed.Error())
	}
	return nil
}

// logRefusal logs a refused or shed connection or call, at most
// callerLogBurst lines per uid per callerLogWindow.
func (s *Server) logRefusal(r *budget.Refusal) {
	msg := "workload API " + r.Kind + " refused"
	if r.Shed {
		msg = "workload API " + r.Kind + " shed"
	}
	s.callerLog.Log(context.Background(), slog.LevelWarn, "uid", uint64(r.UID), msg,
		slog.Int("pid", int(r.PID)), slog.Uint64("uid", uint64(r.UID)), slog.String("reason", r.Reason))
}
