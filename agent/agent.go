// Package agent is the ferry agent role: it attests its node to the servers,
// keeps an SVID cache filled from the server's stream of authorized entries, and
// serves the SPIFFE Workload API to local processes.
package agent

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ferry-id/ferry/agent/cache"
	"github.com/ferry-id/ferry/agent/session"
	"github.com/ferry-id/ferry/agent/workloadapi"
	"github.com/ferry-id/ferry/attestors/node"
	"github.com/ferry-id/ferry/attestors/workload"
	"github.com/ferry-id/ferry/attestors/workload/systemd"
	"github.com/ferry-id/ferry/attestors/workload/unix"
	"github.com/ferry-id/ferry/internal/securedir"
)

// Config configures an agent.
type Config struct {
	TrustDomain spiffeid.TrustDomain
	// Servers are agent API addresses of the servers (any number; the agent
	// fails over between them).
	Servers []string
	// TrustBundle is what the agent trusts for its first connection.
	TrustBundle []*x509.Certificate
	DataDir     string
	// SocketPath is the Workload API's unix socket.
	SocketPath string
	// NodeAttestor proves the node's identity (join_token, x509pop, or one
	// of the platform attestors of docs/attestors.md).
	NodeAttestor node.AgentAttestor
	// WorkloadAPILimits bound what local callers may hold of the Workload
	// API; zero fields take workloadapi.DefaultLimits.
	WorkloadAPILimits workloadapi.Limits
	// Systemd enables the systemd workload attestor (unix is always on).
	Systemd bool
	// IMDS, when set, enables the managed-identity token endpoint.
	IMDS   *IMDSConfig
	Logger *slog.Logger
}

// Agent is a running agent.
type Agent struct {
	cfg     Config
	log     *slog.Logger
	cache   *cache.Cache
	session *session.Session
	ready   chan struct{}
}

// New prepares an agent; Run starts it.
func New(cfg Config) (*Agent, error) {
	if cfg.SocketPath == "" {
		return nil, errors.New("agent: socket path is required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	// The data dir holds the agent's key; the socket's directory decides who
	// answers workloads. Both refuse to start the agent when another user
	// could change them, before it attests or serves anything.
	if err := securedir.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("agent: data dir: %w", err)
	}
	if err := securedir.MkdirAll(filepath.Dir(cfg.SocketPath), 0o755); err != nil {
		return nil, fmt.Errorf("agent: Workload API socket directory: %w", err)
	}
	a := &Agent{cfg: cfg, log: cfg.Logger, ready: make(chan struct{})}
	// The cache signs through the session and the session feeds the cache:
	// tie the knot with a forwarding signer.
	fwd := &signer{}
	// A signing call that hangs (a server dying mid-call) is abandoned and retried
	// well before a workload waiting for its first SVID gives up.
	c, err := cache.New(cache.Config{Signer: fwd, Logger: a.log.With("component", "cache"), SignTimeout: 5 * time.Second})
	if err != nil {
		return nil, err
	}
	s, err := session.New(session.Config{
		TrustDomain: cfg.TrustDomain,
		Servers:     cfg.Servers,
		TrustBundle: cfg.TrustBundle,
		DataDir:     filepath.Join(cfg.DataDir, "session"),
		Attestor:    cfg.NodeAttestor,
		Sink:        c,
		Logger:      a.log.With("component", "session"),
	})
	if err != nil {
		return nil, err
	}
	fwd.Session = s
	a.cache, a.session = c, s
	return a, nil
}

// signer lets the cache be built before the session it signs through.
type signer struct{ *session.Session }

// Cache is the agent's SVID cache (the Workload API and the token endpoint read it).
func (a *Agent) Cache() *cache.Cache { return a.cache }

// Session is the agent's server session.
func (a *Agent) Session() *session.Session { return a.session }

// Ready is closed once the agent serves: attested, with the Workload API
// socket (and the managed-identity endpoints, when enabled) listening.
func (a *Agent) Ready() <-chan struct{} { return a.ready }

// health is nil while the agent holds an unexpired agent SVID: it can then
// serve what it has cached and renew it.
func (a *Agent) health() error {
	svid, err := a.session.GetX509SVID()
	if err != nil {
		return err
	}
	if !time.Now().Before(svid.Certificates[0].NotAfter) {
		return errors.New("agent SVID expired")
	}
	return nil
}

// Run attests the node and serves until ctx ends.
func (a *Agent) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer a.session.Close()

	attestors := []workload.Attestor{}
	ux, err := unix.New(unix.Config{Log: a.log.With("attestor", "unix")})
	if err != nil {
		return err
	}
	attestors = append(attestors, ux)
	if a.cfg.Systemd {
		sd, err := systemd.New(systemd.Config{Log: a.log.With("attestor", "systemd")})
		if err != nil {
			return err
		}
		attestors = append(attestors, sd)
	}
	wlAttestor := workloadapi.WorkloadAttestors(a.cache, attestors...)
	api, err := workloadapi.New(workloadapi.Config{
		SocketPath: a.cfg.SocketPath,
		Manager:    a.cache,
		Attestor:   wlAttestor,
		Log:        a.log.With("component", "workloadapi"),
		Limits:     a.cfg.WorkloadAPILimits,
		Health:     a.health,
	})
	if err != nil {
		return err
	}

	// Bound before the session dials anything (bindIMDS says why).
	lns, err := a.bindIMDS()
	if err != nil {
		return err
	}
	handed := false
	defer func() {
		if !handed {
			lns.close()
		}
	}()

	errc := make(chan error, 5)
	go func() { errc <- a.session.Run(ctx) }()
	go func() { errc <- a.cache.Run(ctx) }()
	select {
	case <-a.session.Ready():
	case err := <-errc:
		return fmt.Errorf("agent: %w", err)
	}
	a.log.Info("agent attested", "agent_id", a.session.SpiffeID().String())
	lis, err := workloadapi.Listen(a.cfg.SocketPath)
	if err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	// The Workload API stops (streams ended, unary calls drained, socket
	// removed) before Run returns.
	apiDone := make(chan error, 1)
	go func() { apiDone <- api.Serve(lis) }()
	defer func() {
		api.Stop()
		<-apiDone
	}()
	a.log.Info("workload API listening", "socket", a.cfg.SocketPath)
	if a.cfg.IMDS != nil {
		// After attestation: the endpoint asks the servers with the agent SVID.
		handed = true
		servers, conn, err := a.startIMDS(wlAttestor, lns)
		if err != nil {
			return err
		}
		defer conn.Close()
		runIMDS(ctx, servers, errc)
	}
	close(a.ready)
	select {
	case <-ctx.Done():
		a.log.Info("agent stopped")
		return nil
	case err := <-apiDone:
		apiDone <- err // for the deferred wait
		if ctx.Err() != nil {
			return nil
		}
		if err == nil {
			err = errors.New("workload API stopped")
		}
		return fmt.Errorf("agent: %w", err)
	case err := <-errc:
		if ctx.Err() != nil {
			a.log.Info("agent stopped")
			return nil
		}
		return fmt.Errorf("agent: %w", err)
	}
}
