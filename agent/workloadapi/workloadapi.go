// Package workloadapi is the agent's SPIFFE Workload API: the standard
// SpiffeWorkloadAPI gRPC service (go-spiffe's generated code) on a unix socket,
// serving X509-SVIDs, JWT-SVIDs, WIT-SVIDs and trust bundles to local processes.
//
// A caller is identified by the kernel, never by anything it sends: when it
// connects, the server reads the socket's SO_PEERCRED credentials (its pid,
// and its effective uid and gid at connect) and pins the peer process (its
// /proc/PID directory held open and its start time recorded). Each call is
// attested through workload.AttestCaller, the rule the managed-identity
// endpoint applies too: Config.Attestor reads the process through the pin,
// its ids are read from /proc/PID/status once for the call, and the call is
// answered only if
//
//   - the pinned process is still the one alive under that PID, else
//     Unauthenticated (a caller that exits and whose PID is recycled
//     mid-attestation cannot pass its identity on, as with SPIRE's
//     peertracker);
//   - its real, effective, saved and filesystem uids are all the uid the
//     kernel recorded at connect, and likewise its gids, and, when some
//     entry selects supplementary groups, its groups are those it had at
//     connect (SO_PEERGROUPS), else PermissionDenied and nothing is looked
//     up or issued. So a process that connects and then executes a setuid or
//     setgid program, or changes its ids, and any child it handed the
//     connection to, gets nothing; a process running a setuid program is
//     never attested as its effective ids.
//
// A caller that executed another program since it connected (same process,
// same ids) is attested as the program it runs when it calls: unix:path and
// unix:sha256 describe that program, read at every call. The connection
// follows the process, not the program that opened it; what tells programs
// apart is the selectors each call is attested with. Processes of the same
// uid can trade connections and programs, so path and hash selectors
// distinguish programs against mistakes, not against a hostile process of
// the same uid (which could also ptrace the program).
//
// Every call must carry the metadata `workload.spiffe.io: true` (exactly one
// value), else InvalidArgument: the header defeats server-side request forgery.
// A caller that matches no entry gets PermissionDenied "no identity issued".
// Streams send the full state in every message, the first at once, and a new
// one on every update the cache delivers (bundle streams skip an update that
// leaves their message unchanged; WIT-SVID streams also renew tokens at half
// their remaining life). Every call is logged once, with the method, the
// caller's pid and uid, and the result code (at Debug when served, Info when
// refused, Warn when the agent failed); keys and tokens are never logged.
//
// The API is served by grpc-go's server inside budgets that hold against any
// local process (Limits): connections and calls in flight, in total and per
// uid (agent/budget charges each connection to its peer's uid at accept,
// before gRPC reads a byte of it, and each call when its headers arrive),
// calls per connection, the decoded size of a call's header list, the size of
// a request, and an idle timeout. When a budget is exhausted the uid holding
// the most is refused or shed first; a refused call gets ResourceExhausted, a
// refused connection an HTTP/2 GOAWAY that says why. Lines a caller can
// provoke (refusals, failures) are rate-limited per uid.
//
// The socket file is made world-accessible (mode 0777) inside a directory that
// only the agent (or root) may change, up to /: access is decided by
// attestation, not file modes.
package workloadapi

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"time"

	workloadpb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"

	"github.com/ferry-id/ferry/agent/budget"
	"github.com/ferry-id/ferry/agent/cache"
	"github.com/ferry-id/ferry/attestors/workload"
	"github.com/ferry-id/ferry/internal/grpchealth"
	"github.com/ferry-id/ferry/internal/logging"
	"github.com/ferry-id/ferry/internal/securedir"
)

// Config configures a Server.
type Config struct {
	// SocketPath is the unix socket Run listens on. Its directory is created
	// (0755) if missing; no other user may be able to change it or any
	// directory above it (see Listen).
	SocketPath string
	// Manager serves identities and bundles. Required.
	Manager cache.Manager
	// WITSource serves WIT-SVIDs. When nil, Manager is used if it implements
	// cache.WITSource; otherwise the WIT RPCs answer Unimplemented.
	WITSource cache.WITSource
	// Attestor turns a caller's PID into selectors. Required.
	Attestor Attestor
	// Log receives one line per call. Defaults to slog.Default().
	Log *slog.Logger
	// ProcRoot is the procfs mount used to pin callers. Defaults to /proc.
	ProcRoot string
	// AllowedForeignJWTClaims lists claims, beyond sub, aud and exp, that
	// ValidateJWTSVID returns for tokens of other trust domains. Claims of
	// foreign tokens are otherwise dropped: another domain's claims mean
	// nothing here.
	AllowedForeignJWTClaims []string
	// AllowUnauthenticatedVerifiers lets callers without an identity fetch the
	// agent's own trust bundle (FetchX509Bundles, FetchJWTBundles,
	// FetchWITBundles), as SPIRE's allow_unauthenticated_verifiers does.
	AllowUnauthenticatedVerifiers bool
	// ShutdownTimeout bounds how long Stop waits for in-flight calls.
	// Defaults to 5 s.
	ShutdownTimeout time.Duration
	// Limits bound what local callers may hold; a zero field takes its
	// default (DefaultLimits).
	Limits Limits
	// Health, when set, serves the gRPC health service on the socket (calls
	// carry the security header like any other): SERVING while it returns
	// nil.
	Health func() error
}

// Server is a Workload API server. Serve (or Run) may be called once.
type Server struct {
	manager        cache.Manager
	wit            cache.WITSource
	attestor       Attestor
	log            *slog.Logger
	socketPath     string
	health         func() error
	foreignClaims  map[string]bool
	unauthVerifier bool
	shutdown       time.Duration

	limits    Limits
	budget    *budget.Budget
	callerLog *logging.PerKey
	grpc      *grpc.Server
	quit      chan struct{}
	stopOnce  sync.Once
}

// New validates c and returns a Server.
func New(c Config) (*Server, error) {
	if c.Manager == nil {
		return nil, errors.New("workloadapi: Manager is required")
	}
	if c.Attestor == nil {
		return nil, errors.New("workloadapi: Attestor is required")
	}
	s := &Server{
		manager:        c.Manager,
		wit:            c.WITSource,
		attestor:       c.Attestor,
		log:            c.Log,
		socketPath:     c.SocketPath,
		health:         c.Health,
		foreignClaims:  make(map[string]bool, len(c.AllowedForeignJWTClaims)),
		unauthVerifier: c.AllowUnauthenticatedVerifiers,
		shutdown:       c.ShutdownTimeout,
		quit:           make(chan struct{}),
	}
	if s.wit == nil {
		s.wit, _ = c.Manager.(cache.WITSource)
	}
	if s.log == nil {
		s.log = slog.Default()
	}
	if s.shutdown <= 0 {
		s.shutdown = 5 * time.Second
	}
	for _, claim := range c.AllowedForeignJWTClaims {
		s.foreignClaims[claim] = true
	}
	procRoot := c.ProcRoot
	if procRoot == "" {
		procRoot = workload.DefaultProcRoot
	}
	s.callerLog = logging.NewPerKey(s.log, callerLogBurst, callerLogWindow)
	lim, err := c.Limits.withDefaults()
	if err != nil {
		return nil, err
	}
	s.limits = fitDescriptors(lim, s.log)
	s.budget, err = budget.New(budget.Limits{
		Conns:       s.limits.MaxConnections,
		ConnsPerUID: s.limits.MaxConnectionsPerUID,
		Calls:       s.limits.MaxCalls,
		CallsPerUID: s.limits.MaxCallsPerUID,
	}, s.logRefusal)
	if err != nil {
		return nil, fmt.Errorf("workloadapi: %w", err)
	}
	s.grpc = s.newGRPCServer(procPinner(procRoot))
	return s, nil
}

// The lines one uid can make the agent write: callerLogBurst per
// callerLogWindow, then a count of those suppressed.
const (
	callerLogBurst  = 10
	callerLogWindow = 10 * time.Second
)

func (s *Server) newGRPCServer(pin pinFunc) *grpc.Server {
	lim := s.limits
	srv := grpc.NewServer(
		grpc.Creds(&peerCreds{pin: pin, log: s.callerLog}),
		grpc.InTapHandle(s.startCall),
		grpc.ChainUnaryInterceptor(s.unaryInterceptor),
		grpc.ChainStreamInterceptor(s.streamInterceptor),
		grpc.MaxRecvMsgSize(lim.MaxRequestBytes),
		grpc.MaxHeaderListSize(uint32(lim.MaxHeaderListBytes)),
		grpc.MaxConcurrentStreams(uint32(lim.MaxCallsPerConnection)),
		grpc.ConnectionTimeout(lim.HandshakeTimeout),
		// A connection with no call in flight for IdleTimeout gets a
		// GOAWAY; clients reconnect on their next call.
		grpc.KeepaliveParams(keepalive.ServerParameters{MaxConnectionIdle: lim.IdleTimeout}),
		// Every connection gets its own read buffer (32 KiB by default): a
		// client that connects per call would allocate it per call, while
		// requests are a few hundred bytes. Larger reads bypass the buffer.
		grpc.ReadBufferSize(4<<10),
		// The write buffer goes back to a pool after each flush, so an idle
		// or one-call connection holds none.
		grpc.SharedWriteBuffer(true),
		// A fixed window turns off gRPC's bandwidth estimation, which pings
		// the client after a request arrives: an extra write and read on
		// both sides of every call, for requests of a few hundred bytes.
		// 64 KiB, gRPC's smallest, is what a call may buffer before its
		// handler reads it; the handler then reads at most
		// MaxRequestBytes.
		grpc.InitialWindowSize(64<<10),
		grpc.InitialConnWindowSize(64<<10),
		// Calls run on a few long-lived goroutines whose stacks have already
		// grown to what a call needs, instead of a new goroutine per call
		// that grows its stack (copying it) each time. Beyond the workers,
		// for instance while they serve long-lived streams, gRPC starts a
		// goroutine per call as before.
		grpc.NumStreamWorkers(uint32(max(4, runtime.GOMAXPROCS(0)))),
	)
	workloadpb.RegisterSpiffeWorkloadAPIServer(srv, service{Server: s})
	if s.health != nil {
		healthpb.RegisterHealthServer(srv, grpchealth.New(s.health))
	}
	return srv
}

// Run listens on Config.SocketPath (see Listen) and serves until ctx is
// done, then stops and removes the socket.
func (s *Server) Run(ctx context.Context) error {
	l, err := Listen(s.socketPath) // the listener unlinks the socket when closed
	if err != nil {
		return err
	}
	errc := make(chan error, 1)
	go func() { errc <- s.Serve(l) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
		s.Stop()
		return <-errc
	}
}

// Serve serves the Workload API on l, which must yield unix socket
// connections, until Stop. It returns nil after Stop.
func (s *Server) Serve(l net.Listener) error {
	lim := s.limits
	s.log.Info("workload API serving", "addr", l.Addr().String(),
		"max_connections", lim.MaxConnections, "max_connections_per_uid", lim.MaxConnectionsPerUID,
		"max_calls", lim.MaxCalls, "max_calls_per_uid", lim.MaxCallsPerUID,
		"max_calls_per_connection", lim.MaxCallsPerConnection, "idle_timeout", lim.IdleTimeout,
		"max_header_list_bytes", lim.MaxHeaderListBytes, "max_request_bytes", lim.MaxRequestBytes)
	err := s.grpc.Serve(s.budget.Listener(l))
	if err == nil || errors.Is(err, grpc.ErrServerStopped) { // stopped before it started
		return nil
	}
	return fmt.Errorf("workloadapi: serve: %w", err)
}

// Stop ends every stream (clients see Unavailable and reconnect with
// backoff), waits up to Config.ShutdownTimeout for unary calls in flight, and
// closes every connection. It is safe to call more than once.
func (s *Server) Stop() {
	s.stopOnce.Do(func() {
		close(s.quit)
		done := make(chan struct{})
		go func() {
			s.grpc.GracefulStop()
			close(done)
		}()
		t := time.NewTimer(s.shutdown)
		defer t.Stop()
		select {
		case <-done:
		case <-t.C:
			s.grpc.Stop()
			<-done
		}
	})
}

// Listen creates the Workload API socket at path: it creates the directory
// (0755) if missing, refuses it when another user could change it or any
// directory above it (see securedir: they could move the socket aside and
// relay every caller through their own), replaces a stale socket left by a
// previous run but never a live one or a non-socket file, and makes the
// socket mode 0777.
func Listen(path string) (net.Listener, error) {
	if path == "" {
		return nil, errors.New("workloadapi: SocketPath is required")
	}
	if !filepath.IsAbs(path) {
		return nil, fmt.Errorf("workloadapi: socket path %q is not absolute", path)
	}
	if err := securedir.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("workloadapi: socket directory: %w", err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != os.ModeSocket {
			return nil, fmt.Errorf("workloadapi: %s exists and is not a socket", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("workloadapi: %s is in use by another process", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("workloadapi: remove stale socket: %w", err)
		}
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("workloadapi: listen: %w", err)
	}
	// Access is governed by attestation: every local process may connect.
	if err := os.Chmod(path, 0o777); err != nil {
		l.Close()
		return nil, fmt.Errorf("workloadapi: chmod socket: %w", err)
	}
	return l, nil
}
