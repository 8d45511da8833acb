// Package server is the ferry server role: one node of a Raft-replicated
// trust-domain authority. It wires the replicated state (server/state), the Raft
// membership (server/cluster) and the gRPC APIs (server/api), and serves health
// and metrics.
package server

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/ferry-id/ferry/attestors/catalog"
	nodeattestor "github.com/ferry-id/ferry/attestors/node"
	"github.com/ferry-id/ferry/attestors/node/jointoken"
	"github.com/ferry-id/ferry/attestors/node/x509pop"
	"github.com/ferry-id/ferry/internal/buildinfo"
	"github.com/ferry-id/ferry/internal/cpuslots"
	"github.com/ferry-id/ferry/internal/grpchealth"
	"github.com/ferry-id/ferry/internal/logging"
	"github.com/ferry-id/ferry/internal/securedir"
	"github.com/ferry-id/ferry/internal/selector"
	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/api"
	"github.com/ferry-id/ferry/server/ca"
	"github.com/ferry-id/ferry/server/cluster"
	"github.com/ferry-id/ferry/server/federation"
	"github.com/ferry-id/ferry/server/state"
)

// Config configures one server node.
type Config struct {
	NodeID      string
	TrustDomain spiffeid.TrustDomain
	// DataDir holds Raft's log and snapshots and this node's keys (created 0700).
	DataDir string
	// AdminSocket is the admin API's unix socket (mode 0600); default admin.sock
	// in $RUNTIME_DIRECTORY, else in /run/ferry/server.
	AdminSocket string
	// HealthAddr serves /live, /ready and /metrics over plain HTTP; empty disables it.
	// /ready is 200 once the node has caught up with the log (CaughtUp), knows a
	// leader and its CA can sign (ca.CA.SigningErr).
	HealthAddr string
	// Profiling serves Go's /debug/pprof on the health listener.
	Profiling bool
	// MemoryLimit is a soft limit on the process's memory ("1GiB", "800MB";
	// empty: none). Near it the collector works harder instead of the heap
	// growing to GOGC's target.
	MemoryLimit string
	LogLevel    string
	LogFormat   string
	Cluster     ClusterConfig
	// AgentAddr is the agent API's TCP address (TLS with the server's SVID).
	AgentAddr string
	// AdminAddr, when set, also serves the admin services (Admin, Directory,
	// ...) over mutual TLS, to workloads whose X509-SVID is issued by an entry
	// marked admin (remote bridge replicas, remote operators).
	AdminAddr string
	CA        CAConfig
	// X509PoPBundle is a PEM file of CAs for the x509pop node attestor; empty
	// disables it. join_token is always on.
	X509PoPBundle string
	// NodeAttestors are the further node attestors configured (azure_imds, …).
	NodeAttestors []NodeAttestorFunc
	// OIDC serves OIDC discovery for JWT-SVIDs; zero serves none.
	OIDC OIDCConfig
	// Federation is SPIFFE federation: our bundle endpoint, and the roots of
	// https_web endpoints of federated trust domains.
	Federation FederationConfig
	// Logger overrides the logger built from LogLevel and LogFormat.
	Logger *slog.Logger
	// Listen opens the node's TCP listeners (cluster, agent, admin, health,
	// OIDC, bundle endpoint); default net.Listen. ferry dev passes the
	// listeners it opened when it chose the ports, so no other process can
	// take a port between the choice and the bind.
	Listen func(network, address string) (net.Listener, error)
	// Level, when set, is Logger's level, which `ferry logger set|reset`
	// changes while the server runs.
	Level *logging.Level
}

// ClusterConfig is the Raft part of Config.
type ClusterConfig struct {
	BindAddr      string
	AdvertiseAddr string
	// Bootstrap makes a node with an empty data dir start a new one-node cluster.
	Bootstrap bool
	// RetryJoin lists members to join through until one accepts, when this node
	// is in no cluster yet.
	RetryJoin         []string
	LogStore          string
	TLS               cluster.TLSFiles
	SnapshotThreshold uint64
	TrailingLogs      uint64
	SnapshotInterval  time.Duration
	// RaftMultiplier scales Raft's heartbeat, election and leader-lease
	// timeouts (1 s, 1 s, 500 ms at 1; 0 means 1; at most MaxRaftMultiplier),
	// as Consul's raft_multiplier does: a higher value keeps a leader through
	// CPU starvation (a host shared with other heavy work, or thousands of
	// agents reconnecting to small servers at once) at the price of slower
	// failover, which takes about 2 to 3 times the heartbeat timeout.
	RaftMultiplier int
}

// MaxRaftMultiplier is the highest cluster.raft_multiplier.
const MaxRaftMultiplier = 10

// CAConfig shapes this node's authorities (see ca.Config for the defaults).
type CAConfig struct {
	TTL          time.Duration
	KeyType      string
	JWTAlgorithm string
	JWTIssuer    string
	X509SVIDTTL  time.Duration
	JWTSVIDTTL   time.Duration
	AgentSVIDTTL time.Duration
	Upstream     *ca.UpstreamConfig
}

// Server is a running server node.
type Server struct {
	cfg     Config
	work    *cpuslots.Slots
	log     *slog.Logger
	store   *state.Store
	node    *cluster.Node
	metrics *prometheus.Registry
	// memReleased counts the memory follower's returns of free memory.
	memReleased prometheus.Counter

	readyOnce sync.Once
	ready     chan struct{}
	serving   chan struct{}
	caughtUp  chan struct{}
	// signing is closed once the node has caught up and its CA can sign
	// (ca.CA.Signing): listeners that present a server SVID accept from
	// then on. authority is set before ready is closed.
	signing   chan struct{}
	authority *ca.CA
	started   time.Time
}

// New validates cfg and prepares a server; Run starts it.
func New(cfg Config) (*Server, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("node", cfg.NodeID)
	store, err := state.New(state.Config{Logger: log.With("component", "state")})
	if err != nil {
		return nil, err
	}
	return &Server{cfg: cfg, log: log, store: store, metrics: prometheus.NewRegistry(),
		memReleased: prometheus.NewCounter(prometheus.CounterOpts{Name: "ferry_memory_released_total",
			Help: "Times the server returned free memory to the system after a burst of writes (see server/memory.go)."}),
		ready: make(chan struct{}), serving: make(chan struct{}), caughtUp: make(chan struct{}), signing: make(chan struct{}), started: time.Now()}, nil
}

func (s *Server) listen(network, address string) (net.Listener, error) {
	if s.cfg.Listen != nil {
		return s.cfg.Listen(network, address)
	}
	return net.Listen(network, address)
}

// Store is the node's replicated state (read-only use).
func (s *Server) Store() *state.Store { return s.store }

// Ready is closed once the admin API is listening. The node may still be
// catching up with the cluster's log then: see CaughtUp.
func (s *Server) Ready() <-chan struct{} { return s.ready }

// Serving is closed the first time the node is what /ready reports
// (readiness): every listener up, caught up with the cluster's log, a
// leader known and the CA able to sign, so writes and agent attestation can
// be served. A node that joins a cluster later becomes serving when it has
// joined.
func (s *Server) Serving() <-chan struct{} { return s.serving }

// watchServing closes Serving once readiness holds.
func (s *Server) watchServing(ctx context.Context) {
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for s.readiness() != nil {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
	close(s.serving)
}

// Run starts the node and serves until ctx ends.
func (s *Server) Run(ctx context.Context) error {
	if err := s.setGC(); err != nil {
		return fmt.Errorf("server: memory_limit: %w", err)
	}
	go func() {
		t := time.NewTicker(memorySampleInterval)
		defer t.Stop()
		memoryFollower{applied: s.store.AppliedBytes, now: time.Now, release: func() {
			before := heapHeld()
			releaseMemory()
			s.memReleased.Inc()
			s.log.Debug("writes stopped: free memory returned", "heap_before", before, "heap_after", heapHeld())
		}}.run(ctx, t.C)
	}()
	// The data dir holds this node's keys and the admin socket's directory
	// decides who may command the trust domain: refuse to start when another
	// user could change either, before anything is read or served.
	if err := securedir.MkdirAll(s.cfg.DataDir, 0o700); err != nil {
		return fmt.Errorf("server: data dir: %w", err)
	}
	if err := os.Chmod(s.cfg.DataDir, 0o700); err != nil {
		return fmt.Errorf("server: data dir: %w", err)
	}
	if err := securedir.MkdirAll(filepath.Dir(s.cfg.AdminSocket), 0o700); err != nil {
		return fmt.Errorf("server: admin socket directory: %w", err)
	}
	node, err := cluster.New(cluster.Config{
		NodeID:             s.cfg.NodeID,
		DataDir:            filepath.Join(s.cfg.DataDir, "raft"),
		BindAddr:           s.cfg.Cluster.BindAddr,
		AdvertiseAddr:      s.cfg.Cluster.AdvertiseAddr,
		TLS:                s.cfg.Cluster.TLS,
		Bootstrap:          s.cfg.Cluster.Bootstrap,
		FSM:                s.store,
		LogStore:           s.cfg.Cluster.LogStore,
		Logger:             s.log.With("component", "cluster"),
		Listen:             s.cfg.Listen,
		SnapshotThreshold:  s.cfg.Cluster.SnapshotThreshold,
		TrailingLogs:       s.cfg.Cluster.TrailingLogs,
		SnapshotInterval:   s.cfg.Cluster.SnapshotInterval,
		HeartbeatTimeout:   raftTimeout(cluster.DefaultHeartbeatTimeout, s.cfg.Cluster.RaftMultiplier),
		ElectionTimeout:    raftTimeout(cluster.DefaultElectionTimeout, s.cfg.Cluster.RaftMultiplier),
		LeaderLeaseTimeout: raftTimeout(cluster.DefaultLeaderLease, s.cfg.Cluster.RaftMultiplier),
	})
	if err != nil {
		return fmt.Errorf("server: %w", err)
	}
	s.node = node
	defer node.Close()
	// Work started below (CA rotation, the federation refresher, joining)
	// ends before the node closes and Run returns: none of it may write to
	// the data dir after Run has returned.
	var bg sync.WaitGroup
	defer bg.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-node.CaughtUp():
			close(s.caughtUp)
		case <-ctx.Done():
		}
	}()
	s.registerMetrics()

	// One set of work slots bounds the agent API's CPU-heavy work: TLS
	// handshakes and computing agents' entry sets (see cpuslots).
	s.work = cpuslots.Default()
	authority, agentAPI, err := s.startAuthority(ctx, node, &bg)
	if err != nil {
		return err
	}
	s.authority = authority
	go func() {
		for _, ch := range []<-chan struct{}{s.caughtUp, authority.Signing()} {
			select {
			case <-ch:
			case <-ctx.Done():
				return
			}
		}
		close(s.signing)
	}()
	admin, err := api.NewAdmin(api.Config{Cluster: clusterAPI{node, s.store}, Store: s.store, Logger: s.log.With("component", "admin"),
		Authority: authority, TrustDomain: s.cfg.TrustDomain, JWTIssuer: s.cfg.CA.JWTIssuer,
		Selectors: catalog.Selectors().Enable(selector.Node, agentAPI.Attestors()...),
		Info:      func() *ferrypb.ServerInfo { return s.info(agentAPI.Attestors()) }, LogLevel: s.cfg.Level})
	if err != nil {
		return err
	}
	lis, err := listenUnix(s.cfg.AdminSocket)
	if err != nil {
		return err
	}
	// The admin services answer on the unix socket (file permissions guard it)
	// and, when admin_addr is set, over mutual TLS to admin workloads.
	tlsCfg := &svidTLS{store: s.store, td: s.cfg.TrustDomain.String(),
		svid: &serverSVID{ca: authority, dnsNames: []string{"localhost"}, log: s.log.With("component", "server-svid")}}
	gs := grpc.NewServer(grpc.Creds(adminCreds{tls: tlsCfg}), s.catchUpGate(), s.catchUpStreamGate(), s.admission(),
		grpc.ChainUnaryInterceptor(s.unaryInterceptor, s.adminUnaryAuth), grpc.ChainStreamInterceptor(s.streamInterceptor, s.adminStreamAuth))
	ferrypb.RegisterAdminServer(gs, admin)
	healthpb.RegisterHealthServer(gs, grpchealth.New(s.readiness))
	issuers := map[string]string{}
	if s.cfg.CA.JWTIssuer != "" {
		issuers[s.cfg.CA.JWTIssuer] = s.cfg.TrustDomain.Name()
	}
	directory, err := api.NewDirectory(api.DirectoryConfig{Cluster: clusterAPI{node, s.store}, Store: s.store, TrustDomain: s.cfg.TrustDomain,
		Logger: s.log.With("component", "directory"), Issuers: issuers})
	if err != nil {
		return err
	}
	ferrypb.RegisterDirectoryServer(gs, directory)
	// --- federation (server/federation) ---
	refresher, err := s.registerFederation(gs, node)
	if err != nil {
		return err
	}
	// --- end federation ---

	agentLis, err := s.listen("tcp", s.cfg.AgentAddr)
	if err != nil {
		return fmt.Errorf("server: agent listener: %w", err)
	}
	ags := grpc.NewServer(append(agentConnBuffers(), grpc.Creds(withHandshakeSlots(tlsCfg.config(), s.work)), s.admission(),
		grpc.ChainUnaryInterceptor(s.unaryInterceptor), grpc.ChainStreamInterceptor(s.streamInterceptor))...)
	ferrypb.RegisterAgentServer(ags, agentAPI)
	defer ags.Stop()

	errc := make(chan error, 5)
	go func() { errc <- gs.Serve(lis) }()
	go func() { errc <- ags.Serve(gate(agentLis, s.signing)) }()
	oidcSrv, err := s.startOIDC(authority, errc)
	if err != nil {
		gs.Stop()
		return err
	}
	defer oidcShutdown(oidcSrv)
	// --- federation: bundle endpoint and leader-only refresher ---
	if err := s.startFederation(ctx, refresher, tlsCfg, errc, &bg); err != nil {
		gs.Stop()
		return err
	}
	// --- end federation ---
	if s.cfg.AdminAddr != "" {
		adminLis, err := s.listen("tcp", s.cfg.AdminAddr)
		if err != nil {
			gs.Stop()
			return fmt.Errorf("server: admin listener: %w", err)
		}
		go func() { errc <- gs.Serve(adminLis) }()
		s.log.Info("admin API over mutual TLS", "addr", adminLis.Addr().String())
	}
	var hs *http.Server
	if s.cfg.HealthAddr != "" {
		hl, err := s.listen("tcp", s.cfg.HealthAddr)
		if err != nil {
			gs.Stop()
			return fmt.Errorf("server: health listener: %w", err)
		}
		hs = &http.Server{Handler: s.healthHandler(), ReadHeaderTimeout: 5 * time.Second}
		go func() { errc <- hs.Serve(hl) }()
		s.log.Info("health and metrics", "addr", hl.Addr().String())
	}
	if len(s.cfg.Cluster.RetryJoin) > 0 {
		bg.Add(1)
		go func() { defer bg.Done(); s.retryJoin(ctx) }()
	}
	s.log.Info("server running", "trust_domain", s.cfg.TrustDomain.String(), "cluster_addr", node.Addr(), "agent_addr", agentLis.Addr().String(), "admin_socket", s.cfg.AdminSocket)
	s.readyOnce.Do(func() { close(s.ready) })
	go s.watchServing(ctx)

	select {
	case <-ctx.Done():
	case err = <-errc:
		s.log.Error("listener failed", "error", err)
	}
	stopped := make(chan struct{})
	go func() { gs.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		gs.Stop()
	}
	if hs != nil {
		_ = hs.Close()
	}
	_ = os.Remove(s.cfg.AdminSocket)
	s.log.Info("server stopped")
	return err
}

// startAuthority opens this node's CA (keys on its own disk), starts its rotation
// loop once the cluster has a leader to publish through, and builds the agent API.
func (s *Server) startAuthority(ctx context.Context, node *cluster.Node, bg *sync.WaitGroup) (*ca.CA, *api.Agent, error) {
	cl := clusterAPI{node, s.store}
	authority, err := ca.New(ca.Config{
		TrustDomain:  s.cfg.TrustDomain,
		DataDir:      filepath.Join(s.cfg.DataDir, "ca"),
		NodeID:       s.cfg.NodeID,
		Publisher:    api.BundlePublisher{Cluster: cl, TrustDomain: s.cfg.TrustDomain},
		Logger:       s.log.With("component", "ca"),
		CATTL:        s.cfg.CA.TTL,
		CAKeyType:    ca.KeyType(s.cfg.CA.KeyType),
		JWTAlgorithm: ca.JWTAlgorithm(s.cfg.CA.JWTAlgorithm),
		JWTIssuer:    s.cfg.CA.JWTIssuer,
		X509SVIDTTL:  s.cfg.CA.X509SVIDTTL,
		JWTSVIDTTL:   s.cfg.CA.JWTSVIDTTL,
		Upstream:     s.cfg.CA.Upstream,
	})
	if err != nil {
		return nil, nil, fmt.Errorf("server: %w", err)
	}
	bg.Add(1)
	go func() {
		defer bg.Done()
		// The CA publishes through the log, and what it finds there must be
		// the cluster's current state, not this node's last snapshot.
		select {
		case <-ctx.Done():
			return
		case <-s.caughtUp:
		}
		if err := authority.Run(ctx); err != nil && ctx.Err() == nil {
			s.log.Error("CA rotation stopped", "error", err)
		}
	}()
	attestors := []nodeattestor.ServerAttestor{}
	jt, err := jointoken.NewServer(jointoken.ServerConfig{TrustDomain: s.cfg.TrustDomain, Tokens: api.ClusterTokens{Cluster: cl, Store: s.store}, Log: s.log.With("attestor", "join_token")})
	if err != nil {
		return nil, nil, err
	}
	attestors = append(attestors, jt)
	if s.cfg.X509PoPBundle != "" {
		roots, err := x509pop.LoadCertificates(s.cfg.X509PoPBundle)
		if err != nil {
			return nil, nil, fmt.Errorf("server: x509pop: %w", err)
		}
		xp, err := x509pop.NewServer(x509pop.ServerConfig{TrustDomain: s.cfg.TrustDomain, Roots: roots, Log: s.log.With("attestor", "x509pop")})
		if err != nil {
			return nil, nil, err
		}
		attestors = append(attestors, xp)
	}
	for _, build := range s.cfg.NodeAttestors {
		at, err := build(s.log)
		if err != nil {
			return nil, nil, fmt.Errorf("server: %w", err)
		}
		attestors = append(attestors, at)
	}
	agentAPI, err := api.NewAgent(api.AgentConfig{
		Cluster: cl, Store: s.store, Signer: authority, TrustDomain: s.cfg.TrustDomain,
		Attestors: attestors, Logger: s.log.With("component", "agent-api"), AgentSVIDTTL: s.cfg.CA.AgentSVIDTTL,
		JWTIssuer: s.cfg.CA.JWTIssuer, Work: s.work,
	})
	if err != nil {
		return nil, nil, err
	}
	return authority, agentAPI, nil
}

// retryJoin joins the cluster through the configured members while this node is
// in no cluster: not a leader, no known leader, and a configuration of itself at most.
func (s *Server) retryJoin(ctx context.Context) {
	for attempt := 0; ; attempt++ {
		if s.inCluster(ctx) {
			return
		}
		for _, addr := range s.cfg.Cluster.RetryJoin {
			jctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			err := s.node.Join(jctx, addr)
			cancel()
			if err == nil {
				s.log.Info("joined cluster", "via", addr)
				return
			}
			if attempt%10 == 0 {
				s.log.Warn("join failed; retrying", "via", addr, "error", err)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(2 * time.Second):
		}
	}
}

func (s *Server) inCluster(ctx context.Context) bool {
	members, err := s.node.Members(ctx)
	if err != nil {
		return false
	}
	return len(members) > 1 || (len(members) == 1 && members[0].ID == s.cfg.NodeID && s.node.IsLeader())
}

// listenUnix creates the admin socket at path, mode 0600: only this
// server's user (and root) may connect, in a directory (created 0700 when
// missing) no other user can change.
func listenUnix(path string) (net.Listener, error) {
	if err := securedir.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("server: admin socket directory: %w", err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("server: admin socket: %s exists and is not a socket", path)
		}
		// A socket nobody answers on is left over from a stopped server.
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("server: admin socket: %s is in use by another process", path)
		}
		_ = os.Remove(path)
	}
	lis, err := listenPrivate(path)
	if err != nil {
		return nil, fmt.Errorf("server: admin socket: %w", err)
	}
	// Already 0600 (listenPrivate); set again in case the file system
	// ignored the socket's own mode.
	if err := os.Chmod(path, 0o600); err != nil {
		lis.Close()
		return nil, fmt.Errorf("server: admin socket: %w", err)
	}
	return lis, nil
}

// listenPrivate listens on the unix socket path, created with mode 0600
// whatever the process's umask: the socket's mode is set before it is bound
// (bind takes the new file's mode from the socket), so there is no moment in
// which another user may connect to it.
func listenPrivate(path string) (net.Listener, error) {
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var err error
		if cerr := c.Control(func(fd uintptr) { err = unix.Fchmod(int(fd), 0o600) }); cerr != nil {
			return cerr
		}
		return err
	}}
	return lc.Listen(context.Background(), "unix", path)
}

// unaryInterceptor keeps a panic from reaching the client or killing the server,
// and counts requests.
func (s *Server) unaryInterceptor(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (resp any, err error) {
	defer func() {
		if r := recover(); r != nil {
			s.log.Error("panic in handler", "method", info.FullMethod, "panic", r, "stack", string(debug.Stack()))
			err = status.Error(codes.Internal, "internal error")
		}
		adminRequests.WithLabelValues(info.FullMethod, status.Code(err).String()).Inc()
	}()
	return h(ctx, req)
}

func (s *Server) streamInterceptor(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) (err error) {
	defer func() {
		if r := recover(); r != nil {
			s.log.Error("panic in handler", "method", info.FullMethod, "panic", r, "stack", string(debug.Stack()))
			err = status.Error(codes.Internal, "internal error")
		}
		adminRequests.WithLabelValues(info.FullMethod, status.Code(err).String()).Inc()
	}()
	return h(srv, ss)
}

var adminRequests = prometheus.NewCounterVec(prometheus.CounterOpts{
	Name: "ferry_admin_requests_total",
	Help: "Admin API requests by method and gRPC code.",
}, []string{"method", "code"})

func (s *Server) registerMetrics() {
	s.metrics.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		adminRequests,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "ferry_raft_applied_index", Help: "Last Raft index applied by this node's state machine."},
			func() float64 { return float64(s.store.AppliedIndex()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "ferry_raft_leader", Help: "1 if this node is the Raft leader."},
			func() float64 {
				if s.node.IsLeader() {
					return 1
				}
				return 0
			}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "ferry_raft_term", Help: "Current Raft term."},
			func() float64 { v, _ := strconv.ParseFloat(s.node.Stats()["term"], 64); return v }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "ferry_entries", Help: "Registration entries in the state."},
			func() float64 { return float64(s.store.View().CountEntries()) }),
		s.memReleased,
	)
}

// agentConnBuffers keeps an idle agent connection small: every agent holds
// one open for its entry stream, so a server with 10,000 agents holds 10,000.
// gRPC's default 32 KiB read buffer and 32 KiB write buffer per connection
// were two thirds of the server's memory per agent (test/scale: 85 KiB of
// live heap per connected agent). Reads need no buffer of their own: the
// HTTP/2 framer reads from the TLS connection, which holds a whole decrypted
// record. The write buffer is taken from a pool for each flush and given back.
// It is 16 KiB, one TLS record's payload, not gRPC's 32 KiB: a 32 KiB buffer
// is a large object to Go's allocator (over 32 KiB less its 8-byte header),
// and once a collection has emptied the pool, a fan-out of one change to
// 10,000 streams spent a third of its CPU allocating, zeroing and returning
// such buffers to the OS one by one (test/scale cpu-fanout profile).
func agentConnBuffers() []grpc.ServerOption {
	return []grpc.ServerOption{grpc.ReadBufferSize(0), grpc.SharedWriteBuffer(true), grpc.WriteBufferSize(agentWriteBuffer)}
}

// agentWriteBuffer is the agent API's HTTP/2 write batch (see agentConnBuffers).
const agentWriteBuffer = 16 << 10

// raftTimeout is one of Raft's timeouts scaled by cluster.raft_multiplier.
func raftTimeout(d time.Duration, multiplier int) time.Duration {
	return d * time.Duration(max(multiplier, 1))
}

func (s *Server) healthHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /live", func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusOK)
		_, _ = io.WriteString(w, "ok\n")
	})
	mux.HandleFunc("GET /ready", func(w http.ResponseWriter, _ *http.Request) {
		if err := s.readiness(); err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		_, _ = io.WriteString(w, "ok\n")
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(s.metrics, promhttp.HandlerOpts{}))
	if s.cfg.Profiling {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	return mux
}

// readiness is nil when this node serves requests: what /ready, the admin
// socket's gRPC health service and `ferry server info` report.
func (s *Server) readiness() error {
	select {
	case <-s.ready:
	default:
		return errors.New("starting")
	}
	if !s.isCaughtUp() {
		return errors.New("catching up with the cluster log")
	}
	if id, _ := s.node.Leader(); id == "" {
		return errors.New("no cluster leader known")
	}
	if err := s.authority.SigningErr(); err != nil {
		return fmt.Errorf("the CA cannot sign yet: %w", err)
	}
	return nil
}

// info describes this node for `ferry server info`.
func (s *Server) info(attestors []string) *ferrypb.ServerInfo {
	b := buildinfo.Get()
	leader, _ := s.node.Leader()
	info := &ferrypb.ServerInfo{
		NodeId: s.cfg.NodeID, TrustDomain: s.cfg.TrustDomain.Name(),
		Version: b.Version, VcsRevision: b.Revision, GoVersion: b.GoVersion,
		StartedAt: s.started.Unix(), RaftState: s.node.State().String(), LeaderId: leader,
		AppliedIndex: s.store.AppliedIndex(), NodeAttestors: attestors,
	}
	if err := s.readiness(); err != nil {
		info.NotReadyReason = err.Error()
	} else {
		info.Ready = true
	}
	return info
}

// clusterAPI adapts cluster.Node to what the Admin API needs.
type clusterAPI struct {
	n     *cluster.Node
	store *state.Store
}

func (c clusterAPI) Apply(ctx context.Context, cmd *ferrypb.Command) (*ferrypb.CommandResult, error) {
	return c.n.Apply(ctx, cmd)
}
func (c clusterAPI) VerifyRead(ctx context.Context) error        { return c.n.VerifyRead(ctx) }
func (c clusterAPI) Join(ctx context.Context, addr string) error { return c.n.Join(ctx, addr) }
func (c clusterAPI) Remove(ctx context.Context, id string) error { return c.n.Remove(ctx, id) }

func (c clusterAPI) Members(ctx context.Context) (*ferrypb.ClusterListResponse, error) {
	ms, err := c.n.Members(ctx)
	if err != nil {
		return nil, err
	}
	stats := c.n.Stats()
	resp := &ferrypb.ClusterListResponse{}
	resp.Term, _ = strconv.ParseUint(stats["term"], 10, 64)
	resp.CommitIndex, _ = strconv.ParseUint(stats["commit_index"], 10, 64)
	// Raft's own applied_index moves when entries are handed to the FSM; the
	// store's moves when they are applied, which is what readers care about.
	resp.AppliedIndex = c.store.AppliedIndex()
	for _, m := range ms {
		resp.Members = append(resp.Members, &ferrypb.ClusterMember{Id: m.ID, Address: m.Address, Voter: m.Voter, Leader: m.Leader, LastIndex: m.LastIndex})
	}
	return resp, nil
}

func (c clusterAPI) SnapshotSave(ctx context.Context, w io.Writer) error {
	return c.n.SnapshotSave(ctx, w)
}

func (c clusterAPI) SnapshotRestore(ctx context.Context, r io.Reader) (uint64, error) {
	if err := c.n.SnapshotRestore(ctx, r); err != nil {
		if errors.Is(err, cluster.ErrSnapshotCorrupt) {
			return 0, status.Error(codes.InvalidArgument, err.Error())
		}
		return 0, err
	}
	return c.store.AppliedIndex(), nil
}

// --- federation (server/federation) -------------------------------------------

// leaderTaskRefreshBundle is the leader task (cluster.Node.RunOnLeader) that
// fetches a federated bundle now; its argument is the trust domain's name.
const leaderTaskRefreshBundle = "federation.refresh"

// registerFederation builds the bundle refresher and registers the Federation
// admin service, and the leader task that serves a refresh sent to a
// follower.
func (s *Server) registerFederation(gs *grpc.Server, node *cluster.Node) (*federation.Refresher, error) {
	var roots *x509.CertPool
	if f := s.cfg.Federation.WebPKICAFile; f != "" {
		pem, err := os.ReadFile(f)
		if err != nil {
			return nil, fmt.Errorf("server: federation.web_pki_ca_file: %w", err)
		}
		roots = x509.NewCertPool()
		if !roots.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("server: federation.web_pki_ca_file %s: no certificates", f)
		}
	}
	refresher, err := federation.NewRefresher(federation.RefresherConfig{TrustDomain: s.cfg.TrustDomain, State: s.store, Cluster: node,
		WebPKIRoots: roots, Metrics: s.metrics, Logger: s.log.With("component", "federation")})
	if err != nil {
		return nil, err
	}
	forward := func(ctx context.Context, td spiffeid.TrustDomain) error {
		return node.RunOnLeader(ctx, leaderTaskRefreshBundle, []byte(td.Name()))
	}
	svc, err := api.NewFederation(api.FederationConfig{Cluster: clusterAPI{node, s.store}, Store: s.store, TrustDomain: s.cfg.TrustDomain,
		Refresher: refresher, Leader: node.Leader, Forward: forward, Logger: s.log.With("component", "federation-api")})
	if err != nil {
		return nil, err
	}
	node.HandleLeaderTask(leaderTaskRefreshBundle, func(ctx context.Context, arg []byte) error {
		td, err := spiffeid.TrustDomainFromString(string(arg))
		if err != nil {
			return status.Errorf(codes.InvalidArgument, "trust domain %q: %v", arg, err)
		}
		return svc.RefreshHere(ctx, td)
	})
	ferrypb.RegisterFederationServer(gs, svc)
	return refresher, nil
}

// startFederation runs the refresher and, when configured, the bundle
// endpoint (https_spiffe serves this node's server X509-SVID).
func (s *Server) startFederation(ctx context.Context, refresher *federation.Refresher, tlsCfg *svidTLS, errc chan<- error, bg *sync.WaitGroup) error {
	bg.Add(1)
	go func() { defer bg.Done(); _ = refresher.Run(ctx) }()
	be := s.cfg.Federation.BundleEndpoint
	if be == nil {
		return nil
	}
	hint := federation.RefreshHint(be.RefreshHint, s.cfg.CA.TTL)
	if be.RefreshHint > hint {
		s.log.Warn("federation: bundle endpoint refresh hint lowered so peers see new keys before they sign",
			"configured", be.RefreshHint, "served", hint, "ca_ttl", s.cfg.CA.TTL)
	}
	ep, err := federation.NewEndpoint(federation.EndpointConfig{TrustDomain: s.cfg.TrustDomain, Store: s.store, Profile: be.Profile,
		CertFile: be.CertFile, KeyFile: be.KeyFile, GetCertificate: tlsCfg.getCertificate, RefreshHint: hint,
		Logger: s.log.With("component", "bundle-endpoint")})
	if err != nil {
		return err
	}
	lis, err := s.listen("tcp", be.Addr)
	if err != nil {
		return fmt.Errorf("server: bundle endpoint listener: %w", err)
	}
	go func() {
		if err := ep.Serve(ctx, gate(lis, s.signing)); err != nil {
			errc <- err
		}
	}()
	return nil
}
