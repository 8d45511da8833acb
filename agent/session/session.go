// Package session is the agent's connection to the servers: it attests the node,
// keeps the agent X509-SVID renewed (and on disk, so a restart needs no new
// attestation), follows the server's stream of authorized entries and bundles,
// and signs workload CSRs and JWT-SVIDs through the servers for the SVID cache.
// It acts on the tainted authorities the bundle names (the agent SVID is
// replaced, the cache replaces the rest) and reports to the servers which
// authorities the agent holds SVIDs from, so none is revoked under it.
package session

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math"
	mathrand "math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	grpcbackoff "google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"
	"google.golang.org/grpc/status"

	"github.com/ferry-id/ferry/agent/cache"
	"github.com/ferry-id/ferry/attestors/node"
	"github.com/ferry-id/ferry/internal/securedir"
	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/ca"
)

// Sink receives what the server streams: the cache implements it.
type Sink interface {
	SetEntries(all []*ferrypb.Entry, revision uint64)
	ApplyEntryChanges(upserts []*ferrypb.Entry, deletes []string, revision uint64)
	SetBundles(own *spiffebundle.Bundle, federated map[spiffeid.TrustDomain]*spiffebundle.Bundle)
	// TaintAuthorities gets the own trust domain's tainted authorities, all
	// of them, whenever its bundle arrives.
	TaintAuthorities(x509Authorities []*x509.Certificate, jwtKeyIDs []string)
}

// Config configures a Session.
type Config struct {
	TrustDomain spiffeid.TrustDomain
	// Servers are the servers' agent API addresses; the session fails over
	// between them.
	Servers []string
	// TrustBundle holds the CAs the first connection trusts (the trust
	// domain's bundle, as `ferry bundle show` prints it). Later connections
	// use the bundle the server streams.
	TrustBundle []*x509.Certificate
	// DataDir keeps the agent SVID, its key (0600) and the last bundle.
	DataDir  string
	Attestor node.AgentAttestor
	Sink     Sink
	// Holder, when set, tells what the agent holds from its trust domain's
	// authorities; the session reports it to the servers (ReportAuthorities)
	// with its own SVID added.
	Holder Holder
	// TaintJitter is the window in which the agent replaces its own SVID
	// once its authority is tainted (default cache.DefaultTaintJitter).
	TaintJitter time.Duration
	Logger      *slog.Logger
}

// Session is the agent's identity and server connection. It is safe for
// concurrent use.
type Session struct {
	cfg      Config
	log      *slog.Logger
	serverID spiffeid.ID

	mu     sync.RWMutex
	conn   *grpc.ClientConn // mutual TLS with the agent SVID; replaced on renewal
	client ferrypb.AgentClient
	svid   *x509svid.SVID
	svidAt time.Time // when svid was received; zero if loaded from disk
	bundle *x509bundle.Bundle
	ready  chan struct{}
	once   sync.Once

	// Used by the sync loop only: the highest entry revision applied,
	// since when servers have offered only older full sets, and whether
	// the agent's own system-assigned identity was last said enabled.
	revision      uint64
	behindSince   time.Time
	agentIdentity bool

	// tainted are the trust domain's tainted X.509 authorities (by hex
	// subject key ID) and renewBy, when set, is when the agent SVID must be
	// replaced because one of them signed it; both guarded by mu.
	tainted    map[string]*x509.Certificate
	taintedJWT map[string]bool
	renewBy    time.Time
	// renewKick wakes the renewal loop when renewBy moves; reportKick
	// wakes the report loop (own SVID changed, or a taint to report at once).
	renewKick   chan struct{}
	reportKick  chan struct{}
	forceReport atomic.Bool
}

// maxBehindWait bounds how long the agent refuses a full entry set older than
// what it holds. A follower that has not yet learnt of the latest commits
// (its leader just died) catches up within an election; waiting spares
// workloads entries vanishing and coming back. After this long the servers'
// state is taken as it is (e.g. a cluster restored from an older snapshot).
const maxBehindWait = 10 * time.Second

// behindRetry is how soon the agent asks a server that was behind again.
const behindRetry = 100 * time.Millisecond

var errBehind = errors.New("session: server is behind the agent")

var _ cache.Signer = (*Session)(nil)

// New prepares a session; Run attests (or loads the saved SVID) and runs it.
func New(cfg Config) (*Session, error) {
	if cfg.TrustDomain.IsZero() || len(cfg.Servers) == 0 || cfg.DataDir == "" || cfg.Attestor == nil || cfg.Sink == nil {
		return nil, errors.New("session: trust domain, servers, data dir, attestor and sink are required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.TaintJitter <= 0 {
		cfg.TaintJitter = cache.DefaultTaintJitter
	}
	s := &Session{
		cfg:        cfg,
		log:        cfg.Logger,
		serverID:   spiffeid.RequireFromPath(cfg.TrustDomain, ca.ServerPath),
		bundle:     x509bundle.FromX509Authorities(cfg.TrustDomain, cfg.TrustBundle),
		ready:      make(chan struct{}),
		renewKick:  make(chan struct{}, 1),
		reportKick: make(chan struct{}, 1),
	}
	conn, err := s.dial(true)
	if err != nil {
		return nil, err
	}
	s.conn, s.client = conn, ferrypb.NewAgentClient(conn)
	if err := securedir.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("session: data dir: %w", err)
	}
	if b, err := x509bundle.Load(cfg.TrustDomain, s.path("bundle.pem")); err == nil && len(b.X509Authorities()) > 0 {
		s.bundle = b
	}
	return s, nil
}

// Ready is closed once the agent has an SVID.
func (s *Session) Ready() <-chan struct{} { return s.ready }

// SpiffeID is the agent's SPIFFE ID (zero before attestation).
func (s *Session) SpiffeID() spiffeid.ID {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.svid == nil {
		return spiffeid.ID{}
	}
	return s.svid.ID
}

// GetX509SVID implements x509svid.Source for the TLS client.
func (s *Session) GetX509SVID() (*x509svid.SVID, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.svid == nil {
		return nil, errors.New("session: not attested yet")
	}
	return s.svid, nil
}

// GetX509BundleForTrustDomain implements x509bundle.Source for the TLS client.
func (s *Session) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if td != s.cfg.TrustDomain {
		return nil, fmt.Errorf("session: no bundle for %s", td)
	}
	return s.bundle, nil
}

func (s *Session) clientCertificate(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.svid == nil {
		return &tls.Certificate{}, nil
	}
	c := &tls.Certificate{PrivateKey: s.svid.PrivateKey, Leaf: s.svid.Certificates[0]}
	for _, x := range s.svid.Certificates {
		c.Certificate = append(c.Certificate, x.Raw)
	}
	return c, nil
}

// reconnect is how the connection comes back after the servers went away.
// gRPC's default waits up to 120 s between attempts, and after a restart of
// every server 1,000 agents took 38 s to stream again (test/scale): most
// were waiting out a backoff long after the servers were back. An attempt on
// a server that is down costs it nothing (the connection is refused), so the
// wait is capped at 5 s; the jitter spreads the agents' handshakes.
var reconnect = grpc.ConnectParams{
	Backoff:           grpcbackoff.Config{BaseDelay: 500 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 5 * time.Second},
	MinConnectTimeout: 20 * time.Second,
}

// shuffledPickFirst is the connection's service config (see dial).
const shuffledPickFirst = `{"loadBalancingConfig":[{"pick_first":{"shuffleAddressList":true}}]}`

// dial connects to the servers; withSVID presents the agent SVID (every call but
// attestation needs it). Connections are lazy: nothing is dialled until a call.
func (s *Session) dial(withSVID bool) (*grpc.ClientConn, error) {
	var tlsCfg *tls.Config
	if withSVID {
		tlsCfg = tlsconfig.MTLSClientConfig(s, s, tlsconfig.AuthorizeID(s.serverID))
		tlsCfg.GetClientCertificate = s.clientCertificate
	} else {
		tlsCfg = tlsconfig.TLSClientConfig(s, tlsconfig.AuthorizeID(s.serverID))
	}
	// One connection over every server: pick_first moves to the next address
	// when the current one fails. It shuffles the list first (gRFC A62), so
	// a fleet whose agents all list the same servers spreads over them, and
	// the agents of a server that fails spread over the others instead of
	// all moving to the next in the list. A manual resolver serves one
	// connection only.
	res := manual.NewBuilderWithScheme("ferry-servers")
	var addrs []resolver.Address
	for _, a := range s.cfg.Servers {
		addrs = append(addrs, resolver.Address{Addr: a})
	}
	res.InitialState(resolver.State{Addresses: addrs})
	conn, err := grpc.NewClient(res.Scheme()+":///servers",
		grpc.WithResolvers(res),
		grpc.WithTransportCredentials(credentials.NewTLS(tlsCfg)),
		grpc.WithConnectParams(reconnect),
		grpc.WithDefaultServiceConfig(shuffledPickFirst))
	if err != nil {
		return nil, fmt.Errorf("session: %w", err)
	}
	return conn, nil
}

func (s *Session) agentClient() ferrypb.AgentClient {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.client
}

// reconnect replaces the authenticated connection, so the next calls present
// the current SVID; calls on the old one finish (streams end and reconnect).
func (s *Session) reconnect() {
	conn, err := s.dial(true)
	if err != nil {
		s.log.Warn("reconnecting", "error", err)
		return
	}
	s.mu.Lock()
	old := s.conn
	s.conn, s.client = conn, ferrypb.NewAgentClient(conn)
	s.mu.Unlock()
	go func() {
		time.Sleep(30 * time.Second)
		old.Close()
	}()
}

func (s *Session) path(name string) string { return filepath.Join(s.cfg.DataDir, name) }

// Close releases the connection.
func (s *Session) Close() error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.conn.Close()
}

// Run attests (unless a saved SVID is still valid), then renews the SVID and
// follows the entry stream until ctx ends.
func (s *Session) Run(ctx context.Context) error {
	if err := s.loadSVID(); err != nil {
		s.log.Info("no usable saved agent SVID; attesting", "reason", err)
		if err := s.attestWithRetry(ctx); err != nil {
			return err
		}
	}
	s.once.Do(func() { close(s.ready) })
	go s.renewLoop(ctx)
	go s.reportLoop(ctx)
	s.syncLoop(ctx)
	return ctx.Err()
}

func (s *Session) attestWithRetry(ctx context.Context) error {
	for attempt := 0; ; attempt++ {
		err := s.attest(ctx)
		if err == nil {
			return nil
		}
		// A refused attestation (a used token, a banned node) will not succeed
		// by retrying; an unreachable server might.
		if c := status.Code(err); c == codes.PermissionDenied || c == codes.InvalidArgument {
			return fmt.Errorf("session: attestation refused: %w", err)
		}
		s.log.Warn("attestation failed; retrying", "error", err)
		if err := sleep(ctx, backoff(attempt)); err != nil {
			return err
		}
	}
}

func (s *Session) attest(ctx context.Context) error {
	key, csr, err := newKeyAndCSR()
	if err != nil {
		return err
	}
	payload, err := s.cfg.Attestor.Payload(ctx)
	if err != nil {
		return fmt.Errorf("session: attestor: %w", err)
	}
	actx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	conn, err := s.dial(false)
	if err != nil {
		return err
	}
	defer conn.Close()
	stream, err := ferrypb.NewAgentClient(conn).AttestAgent(actx)
	if err != nil {
		return err
	}
	if err := stream.Send(&ferrypb.AttestAgentRequest{Step: &ferrypb.AttestAgentRequest_Params{Params: &ferrypb.AttestParams{
		Attestor: s.cfg.Attestor.Name(), Payload: payload, Csr: csr,
	}}}); err != nil {
		return err
	}
	for {
		resp, err := stream.Recv()
		if err != nil {
			return err
		}
		if c := resp.GetChallenge(); c != nil {
			answer, err := s.cfg.Attestor.Respond(ctx, c)
			if err != nil {
				return fmt.Errorf("session: attestor challenge: %w", err)
			}
			if err := stream.Send(&ferrypb.AttestAgentRequest{Step: &ferrypb.AttestAgentRequest_ChallengeResponse{ChallengeResponse: answer}}); err != nil {
				return err
			}
			continue
		}
		r := resp.GetResult()
		if r == nil {
			return errors.New("session: empty attestation response")
		}
		if err := s.setSVID(r.SvidChain, key); err != nil {
			return err
		}
		if r.Bundle != nil {
			s.setBundle(r.Bundle)
		}
		s.reconnect()
		s.log.Info("node attested", "agent_id", s.SpiffeID().String())
		return nil
	}
}

func (s *Session) setSVID(chain [][]byte, key crypto.Signer) error {
	var certs []*x509.Certificate
	var pemOut []byte
	for _, der := range chain {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return fmt.Errorf("session: server sent a bad certificate: %w", err)
		}
		certs = append(certs, c)
		pemOut = append(pemOut, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
	}
	if len(certs) == 0 {
		return errors.New("session: server sent no SVID")
	}
	id, err := x509svid.IDFromCert(certs[0])
	if err != nil {
		return fmt.Errorf("session: server sent a bad SVID: %w", err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	if err := writeFile(s.path("agent-key.pem"), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		return err
	}
	if err := writeFile(s.path("agent-svid.pem"), pemOut, 0o600); err != nil {
		return err
	}
	s.mu.Lock()
	s.svid = &x509svid.SVID{ID: id, Certificates: certs, PrivateKey: key}
	s.svidAt = time.Now()
	s.renewBy = time.Time{}
	s.mu.Unlock()
	s.checkOwnTaint()
	kick(s.reportKick)
	return nil
}

func (s *Session) loadSVID() error {
	svid, err := x509svid.Load(s.path("agent-svid.pem"), s.path("agent-key.pem"))
	if err != nil {
		return err
	}
	if time.Now().After(svid.Certificates[0].NotAfter.Add(-time.Minute)) {
		return errors.New("saved agent SVID expired")
	}
	if svid.ID.TrustDomain() != s.cfg.TrustDomain {
		return errors.New("saved agent SVID is for another trust domain")
	}
	s.mu.Lock()
	s.svid = svid
	s.mu.Unlock()
	return nil
}

func (s *Session) setBundle(b *ferrypb.Bundle) {
	var roots []*x509.Certificate
	var pemOut []byte
	for _, a := range b.X509Authorities {
		if c, err := x509.ParseCertificate(a.Certificate); err == nil {
			roots = append(roots, c)
			pemOut = append(pemOut, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: a.Certificate})...)
		}
	}
	if len(roots) == 0 {
		return
	}
	s.mu.Lock()
	s.bundle = x509bundle.FromX509Authorities(s.cfg.TrustDomain, roots)
	s.mu.Unlock()
	if err := writeFile(s.path("bundle.pem"), pemOut, 0o600); err != nil {
		s.log.Warn("saving bundle", "error", err)
	}
}

// renewLoop renews the agent SVID at half of its lifetime, or sooner when
// its authority is tainted.
func (s *Session) renewLoop(ctx context.Context) {
	for attempt := 0; ; {
		s.mu.RLock()
		leaf, at := s.svid.Certificates[0], renewAt(s.svid.Certificates[0], s.svidAt)
		if !s.renewBy.IsZero() && s.renewBy.Before(at) {
			at = s.renewBy
		}
		s.mu.RUnlock()
		wait := time.Until(at)
		if attempt > 0 {
			wait = backoff(attempt)
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-s.renewKick:
			t.Stop()
			continue // a taint moved the deadline
		case <-t.C:
		}
		if err := s.renew(ctx); err != nil {
			attempt++
			s.log.Warn("agent SVID renewal failed", "error", err)
			if status.Code(err) == codes.PermissionDenied && time.Now().After(leaf.NotAfter) {
				s.log.Error("agent SVID expired and renewal is refused; re-attesting")
				if err := s.attestWithRetry(ctx); err != nil {
					s.log.Error("re-attestation failed", "error", err)
					return
				}
				attempt = 0
			}
			continue
		}
		attempt = 0
	}
}

// renewAt is half-way through the life of leaf, received at received (zero
// if unknown). Its life starts when it was received if that is later than
// its NotBefore: servers backdate NotBefore for clock skew (ferry's by 10 s),
// which for a short-lived SVID would put the half-way point in the past and
// renew it again at once, and again.
func renewAt(leaf *x509.Certificate, received time.Time) time.Time {
	start := leaf.NotBefore
	if received.After(start) && received.Before(leaf.NotAfter) {
		start = received
	}
	return start.Add(leaf.NotAfter.Sub(start) / 2)
}

func (s *Session) renew(ctx context.Context) error {
	key, csr, err := newKeyAndCSR()
	if err != nil {
		return err
	}
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	resp, err := s.agentClient().RenewAgent(rctx, &ferrypb.RenewAgentRequest{Csr: csr})
	if err != nil {
		return err
	}
	if err := s.setSVID(resp.SvidChain, key); err != nil {
		return err
	}
	s.reconnect()
	s.log.Info("agent SVID renewed", "expires", s.svid.Certificates[0].NotAfter)
	return nil
}

// syncLoop follows the server's entry stream, reconnecting with backoff. The
// cache keeps serving what it has while no server answers.
func (s *Session) syncLoop(ctx context.Context) {
	for attempt := 0; ctx.Err() == nil; attempt++ {
		got, err := s.syncOnce(ctx)
		if ctx.Err() != nil {
			return
		}
		if got {
			attempt = 0
		}
		wait := backoff(attempt)
		if errors.Is(err, errBehind) {
			// Catching up takes a heartbeat or an election: ask again soon.
			s.log.Debug("server behind; asking again", "error", err)
			wait, attempt = behindRetry, 0
		} else {
			s.log.Warn("entry stream ended; reconnecting", "error", err)
		}
		if err := sleep(ctx, wait); err != nil {
			return
		}
	}
}

func (s *Session) syncOnce(ctx context.Context) (gotAny bool, err error) {
	// The stream waits for a connection instead of failing at once while
	// none is up: it starts as soon as a server answers again, rather than
	// after the loop's backoff, which grows with every failed attempt.
	stream, err := s.agentClient().SyncEntries(ctx, &ferrypb.SyncEntriesRequest{}, grpc.WaitForReady(true))
	if err != nil {
		return false, err
	}
	if p, ok := peer.FromContext(stream.Context()); ok {
		// Which server an agent follows is not always the first it lists:
		// a server slow to answer is passed over for the next.
		s.log.Debug("entry stream open", "server", p.Addr.String())
	}
	var pending *ferrypb.SyncEntriesResponse // a full set arriving in parts
	for {
		msg, err := stream.Recv()
		if err != nil {
			return gotAny, err
		}
		switch {
		case pending != nil:
			if msg.Full || msg.Revision != pending.Revision {
				return gotAny, fmt.Errorf("session: entry stream: part of revision %d (full %v) within the full set of revision %d", msg.Revision, msg.Full, pending.Revision)
			}
			pending.Entries = append(pending.Entries, msg.Entries...)
			pending.AgentIdentity = msg.AgentIdentity
			if msg.More {
				continue
			}
			msg, pending = pending, nil
		case msg.Full && msg.More:
			pending = msg
			continue
		}
		if msg.Full && msg.Revision < s.revision {
			if s.behindSince.IsZero() {
				s.behindSince = time.Now()
			}
			if time.Since(s.behindSince) < maxBehindWait {
				return false, fmt.Errorf("%w: entry revision %d, agent has %d", errBehind, msg.Revision, s.revision)
			}
			s.log.Warn("servers stay behind the agent's entries; taking their state", "revision", msg.Revision, "had", s.revision)
		}
		if msg.Full {
			s.behindSince = time.Time{}
			s.revision = msg.Revision
		} else if msg.Revision > s.revision {
			s.revision = msg.Revision
		}
		gotAny = true
		// A change of the agent's own identity alone is applied as an
		// empty change: it moves the entry revision, which ends every
		// cached decision about which identities callers may use.
		identityChanged := !msg.Full && msg.AgentIdentity != s.agentIdentity
		s.agentIdentity = msg.AgentIdentity
		if msg.Full {
			s.cfg.Sink.SetEntries(msg.Entries, msg.Revision)
		} else if len(msg.Entries) > 0 || len(msg.DeletedIds) > 0 || identityChanged {
			s.cfg.Sink.ApplyEntryChanges(msg.Entries, msg.DeletedIds, msg.Revision)
		}
		// Bundles after entries: the cache answers a waiting workload once
		// it has the bundle, so on a (re)started agent the first message's
		// entries must be there by then, or a workload with an identity is
		// told it has none.
		if msg.Bundles != nil {
			s.applyBundles(msg.Bundles)
		}
	}
}

func (s *Session) applyBundles(bs []*ferrypb.Bundle) {
	var own *spiffebundle.Bundle
	fed := map[spiffeid.TrustDomain]*spiffebundle.Bundle{}
	for _, b := range bs {
		sb, err := ca.ToSPIFFEBundle(b)
		if err != nil {
			s.log.Warn("bad bundle from server", "trust_domain", b.TrustDomain, "error", err)
			continue
		}
		// ferry signs WIT-SVIDs with its JWT authorities.
		sb = ca.WithWITAuthorities(sb)
		if b.TrustDomain == s.cfg.TrustDomain.String() {
			own = sb
			s.setBundle(b)
			s.applyTaint(b)
		} else {
			fed[sb.TrustDomain()] = sb
		}
	}
	if own != nil {
		s.cfg.Sink.SetBundles(own, fed)
	}
}

// SignX509SVIDs implements cache.Signer through BatchNewX509SVID.
func (s *Session) SignX509SVIDs(ctx context.Context, reqs []cache.SignRequest) ([]cache.SignResult, error) {
	params := make([]*ferrypb.X509SVIDParams, len(reqs))
	for i, r := range reqs {
		params[i] = &ferrypb.X509SVIDParams{EntryId: r.EntryID, Csr: r.CSR}
	}
	resp, err := s.agentClient().BatchNewX509SVID(ctx, &ferrypb.BatchNewX509SVIDRequest{Params: params})
	if err != nil {
		return nil, err
	}
	if len(resp.Results) != len(reqs) {
		return nil, fmt.Errorf("session: %d results for %d CSRs", len(resp.Results), len(reqs))
	}
	out := make([]cache.SignResult, len(reqs))
	for i, r := range resp.Results {
		if c := codes.Code(r.GetStatus().GetCode()); c != codes.OK {
			out[i].Err = status.Error(c, r.Status.Message)
			continue
		}
		for _, der := range r.CertChain {
			cert, err := x509.ParseCertificate(der)
			if err != nil {
				out[i].Err = err
				break
			}
			out[i].Chain = append(out[i].Chain, cert)
		}
	}
	return out, nil
}

// MintJWTSVID implements cache.Signer through NewJWTSVID.
func (s *Session) MintJWTSVID(ctx context.Context, entryID string, audience []string) (string, error) {
	resp, err := s.agentClient().NewJWTSVID(ctx, &ferrypb.NewJWTSVIDRequest{EntryId: entryID, Audience: audience})
	if err != nil {
		return "", err
	}
	return resp.Token, nil
}

// MintAgentJWTSVID implements cache.AgentSigner through NewJWTSVID: a
// JWT-SVID for the agent's own SPIFFE ID, which the servers mint for the
// token exchange audience only.
func (s *Session) MintAgentJWTSVID(ctx context.Context, audience []string) (string, error) {
	resp, err := s.agentClient().NewJWTSVID(ctx, &ferrypb.NewJWTSVIDRequest{Agent: true, Audience: audience})
	if err != nil {
		return "", err
	}
	return resp.Token, nil
}

// MintWITSVID implements cache.Signer through NewWITSVID: the server binds the
// token to publicKey; the private key never leaves the agent.
func (s *Session) MintWITSVID(ctx context.Context, entryID string, publicKey crypto.PublicKey) (string, error) {
	der, err := x509.MarshalPKIXPublicKey(publicKey)
	if err != nil {
		return "", fmt.Errorf("session: WIT-SVID key: %w", err)
	}
	resp, err := s.agentClient().NewWITSVID(ctx, &ferrypb.NewWITSVIDRequest{EntryId: entryID, PublicKey: der})
	if err != nil {
		return "", err
	}
	return resp.Token, nil
}

func newKeyAndCSR() (crypto.Signer, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		return nil, nil, err
	}
	return key, csr, nil
}

// writeFile replaces path with data, mode set before the first byte is
// written: the file is new (a leftover temporary file is removed, never
// reused with its old mode) and chmodded whatever the umask.
func writeFile(path string, data []byte, mode os.FileMode) error {
	tmp := path + ".tmp"
	if err := os.Remove(tmp); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("session: %w", err)
	}
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, mode)
	if err != nil {
		return fmt.Errorf("session: %w", err)
	}
	if err := f.Chmod(mode); err != nil {
		f.Close()
		return fmt.Errorf("session: %w", err)
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("session: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("session: %w", err)
	}
	return os.Rename(tmp, path)
}

// backoff is exponential with jitter, from 200 ms to 30 s.
func backoff(attempt int) time.Duration {
	d := 200 * time.Millisecond * time.Duration(math.Pow(2, float64(min(attempt, 8))))
	d = min(d, 30*time.Second)
	return d/2 + time.Duration(mathrand.Int64N(int64(d/2)+1))
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
