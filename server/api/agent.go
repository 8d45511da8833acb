package api

import (
	"context"
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"golang.org/x/time/rate"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/ferry-id/ferry/attestors/node"
	"github.com/ferry-id/ferry/attestors/node/jointoken"
	"github.com/ferry-id/ferry/internal/cpuslots"
	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/ca"
	"github.com/ferry-id/ferry/server/state"
)

// Signer is the part of the node's CA the agent service uses.
type Signer interface {
	SignAgentX509SVID(pub crypto.PublicKey, id spiffeid.ID, ttl time.Duration) ([]*x509.Certificate, error)
	SignWorkloadX509SVIDs(ctx context.Context, reqs []ca.X509SVIDRequest) []ca.X509SVIDResult
	MintJWTSVID(id spiffeid.ID, audience []string, ttl time.Duration, extra map[string]any) (*ca.JWTSVID, error)
}

// AgentConfig configures the Agent service.
type AgentConfig struct {
	Cluster     Cluster
	Store       *state.Store
	Signer      Signer
	TrustDomain spiffeid.TrustDomain
	Attestors   []node.ServerAttestor
	Logger      *slog.Logger
	// AgentSVIDTTL is the lifetime of agent X509-SVIDs (default 1h).
	AgentSVIDTTL time.Duration
	// Limits on signing: per agent and for the whole server, in signatures per
	// second (burst = rate). Over the limit a call gets ResourceExhausted and
	// the agent retries later. Defaults: DefaultPerAgentRate, DefaultGlobalRate.
	PerAgentRate, GlobalRate float64
	// Now is the signing limits' clock (default time.Now).
	Now func() time.Time
	// MaxBatch is the most CSRs one BatchNewX509SVID call may carry (default 500).
	MaxBatch int
	// JWTIssuer is the `iss` of the trust domain's JWT-SVIDs; ListAgentIdentities
	// matches federated credentials against it (any issuer when empty).
	JWTIssuer string
	// Work bounds the entry streams computing an agent's entries at once
	// (default cpuslots.Default()): after a cluster restart every agent
	// reconnects and asks for its whole set, and unbounded that work queues
	// the server's Raft goroutines behind thousands of runnable streams.
	Work *cpuslots.Slots
}

// Default signing limits, in signatures per second (see AgentConfig).
const (
	DefaultPerAgentRate = 500
	DefaultGlobalRate   = 5000
)

// Agent implements ferrypb.AgentServer.
type Agent struct {
	ferrypb.UnimplementedAgentServer
	cfg       AgentConfig
	log       *slog.Logger
	serverID  string
	attestors map[string]node.ServerAttestor
	global    *rate.Limiter

	hub *syncHub

	mu      sync.Mutex
	limiter map[string]*rate.Limiter
}

var _ ferrypb.AgentServer = (*Agent)(nil)

// NewAgent returns the Agent service.
func NewAgent(cfg AgentConfig) (*Agent, error) {
	if cfg.Cluster == nil || cfg.Store == nil || cfg.Signer == nil || cfg.TrustDomain.IsZero() {
		return nil, errors.New("api: agent service needs cluster, store, signer and trust domain")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.AgentSVIDTTL <= 0 {
		cfg.AgentSVIDTTL = time.Hour
	}
	if cfg.PerAgentRate <= 0 {
		cfg.PerAgentRate = DefaultPerAgentRate
	}
	if cfg.GlobalRate <= 0 {
		cfg.GlobalRate = DefaultGlobalRate
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.MaxBatch <= 0 {
		cfg.MaxBatch = 500
	}
	if cfg.Work == nil {
		cfg.Work = cpuslots.Default()
	}
	a := &Agent{
		cfg:       cfg,
		log:       cfg.Logger,
		serverID:  ServerID(cfg.TrustDomain).String(),
		attestors: map[string]node.ServerAttestor{},
		global:    rate.NewLimiter(rate.Limit(cfg.GlobalRate), int(cfg.GlobalRate)),
		limiter:   map[string]*rate.Limiter{},
	}
	a.hub = newSyncHub(cfg.Store, a.serverID)
	for _, at := range cfg.Attestors {
		a.attestors[at.Name()] = at
	}
	return a, nil
}

// Attestors returns the names of the node attestors this server runs, sorted.
func (a *Agent) Attestors() []string {
	out := make([]string, 0, len(a.attestors))
	for name := range a.attestors {
		out = append(out, name)
	}
	slices.Sort(out)
	return out
}

// ServerID is the SPIFFE ID of the trust domain's servers (node-alias entries
// are parented on it).
func ServerID(td spiffeid.TrustDomain) spiffeid.ID {
	return spiffeid.RequireFromPath(td, ca.ServerPath)
}

// ClusterTokens looks join tokens up in the replicated state. A token this
// node does not hold yet is looked up again after a read barrier, so one just
// created through another server is found. Tokens are spent by the NodePut
// that records the attested agent (see node.Result.JoinTokenHash).
type ClusterTokens struct {
	Cluster Cluster
	Store   *state.Store
}

func (t ClusterTokens) Lookup(ctx context.Context, hash string) (*ferrypb.JoinToken, error) {
	if jt := t.Store.View().JoinToken(hash); jt != nil {
		return jt, nil
	}
	if err := t.Cluster.VerifyRead(ctx); err != nil {
		return nil, err
	}
	if jt := t.Store.View().JoinToken(hash); jt != nil {
		return jt, nil
	}
	return nil, jointoken.ErrUnknown
}

// AttestAgent runs one node attestation: params, then any challenges, then the
// agent's SVID.
func (a *Agent) AttestAgent(stream ferrypb.Agent_AttestAgentServer) error {
	ctx := stream.Context()
	req, err := stream.Recv()
	if err != nil {
		return err
	}
	params := req.GetParams()
	if params == nil {
		return status.Error(codes.InvalidArgument, "the first message must carry attestation params")
	}
	if len(params.Payload) > node.MaxPayloadSize {
		return status.Errorf(codes.InvalidArgument, "attestation payload over %d bytes", node.MaxPayloadSize)
	}
	at, ok := a.attestors[params.Attestor]
	if !ok {
		return status.Errorf(codes.InvalidArgument, "node attestor %q is not enabled on this server", params.Attestor)
	}
	pub, err := ca.ParseCSR(params.Csr)
	if err != nil {
		return status.Errorf(codes.InvalidArgument, "agent CSR: %v", err)
	}
	challenge := func(ctx context.Context, c []byte) ([]byte, error) {
		if err := stream.Send(&ferrypb.AttestAgentResponse{Step: &ferrypb.AttestAgentResponse_Challenge{Challenge: c}}); err != nil {
			return nil, err
		}
		resp, err := stream.Recv()
		if err != nil {
			return nil, err
		}
		if resp.GetChallengeResponse() == nil {
			return nil, errors.New("expected a challenge response")
		}
		return resp.GetChallengeResponse(), nil
	}
	res, err := at.Attest(ctx, params.Payload, challenge)
	if err != nil {
		a.log.Warn("node attestation failed", "attestor", params.Attestor, "error", err)
		if st, ok := status.FromError(err); ok && st.Code() != codes.Unknown {
			return err
		}
		return status.Errorf(codes.PermissionDenied, "node attestation failed: %v", err)
	}
	if res.AgentID.String() == a.serverID {
		return status.Error(codes.PermissionDenied, "an agent cannot be issued the server's SPIFFE ID")
	}
	if res.AgentID.TrustDomain() != a.cfg.TrustDomain {
		return status.Errorf(codes.PermissionDenied, "agent ID %s is not in trust domain %s", res.AgentID, a.cfg.TrustDomain)
	}
	if n := a.cfg.Store.View().Node(res.AgentID.String()); n != nil && n.Banned {
		return status.Errorf(codes.PermissionDenied, "agent %s is banned", res.AgentID)
	}
	// The log decides (NodePut.RefuseActive), so two agents racing on two
	// servers cannot both win; this read only spares a signature.
	if n := a.cfg.Store.View().Node(res.AgentID.String()); res.SingleAgent && n != nil && max(n.CertNotAfter, n.NewCertNotAfter) > time.Now().Unix() {
		a.log.Warn("node attestation refused: instance already has an active agent", "attestor", params.Attestor, "agent_id", res.AgentID.String())
		return status.Errorf(codes.PermissionDenied, "agent %s is already attested and its SVID is still valid; evict it first, or allow re-attestation in the %s configuration", res.AgentID, params.Attestor)
	}
	var chain []*x509.Certificate
	if err := a.compute(ctx, func() { chain, err = a.cfg.Signer.SignAgentX509SVID(pub, res.AgentID, a.cfg.AgentSVIDTTL) }); err != nil {
		return err
	}
	if err != nil {
		return status.Errorf(codes.Unavailable, "signing agent SVID: %v", err)
	}
	// The join token, if any, is spent by this write and only by it: every
	// refusal above left it usable.
	put, err := a.cfg.Cluster.Apply(ctx, &ferrypb.Command{Op: &ferrypb.Command_NodePut{NodePut: &ferrypb.NodePut{Node: &ferrypb.AttestedNode{
		SpiffeId:        res.AgentID.String(),
		AttestationType: params.Attestor,
		CertSerial:      chain[0].SerialNumber.String(),
		CertNotAfter:    chain[0].NotAfter.Unix(),
		Selectors:       res.Selectors,
	}, RefuseActive: res.SingleAgent, ConsumeJoinToken: res.JoinTokenHash}}})
	if err != nil {
		return toStatus(err)
	}
	if st := put.GetStatus(); res.JoinTokenHash != "" && codes.Code(st.GetCode()) != codes.OK {
		// Another attestation spent the token first, or it expired meanwhile.
		a.log.Warn("node attestation failed", "attestor", params.Attestor, "token_hash", res.JoinTokenHash, "error", st.GetMessage())
		return status.Errorf(codes.PermissionDenied, "node attestation failed: %s", st.GetMessage())
	}
	if err := resultError(put); err != nil {
		return err
	}
	a.log.Info("agent attested", "agent_id", res.AgentID.String(), "attestor", params.Attestor, "serial", chain[0].SerialNumber.String())
	return stream.Send(&ferrypb.AttestAgentResponse{Step: &ferrypb.AttestAgentResponse_Result{Result: &ferrypb.AttestResult{
		SpiffeId:  res.AgentID.String(),
		SvidChain: derChain(chain),
		Bundle:    a.cfg.Store.View().Bundle(a.cfg.TrustDomain.String()),
	}}})
}

// caller authenticates the calling agent from its client certificate: a valid
// X509-SVID (the TLS layer verified the chain against the bundle) of a known,
// unbanned agent, whose serial is the one on record.
func (a *Agent) caller(ctx context.Context) (*ferrypb.AttestedNode, *x509.Certificate, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return nil, nil, status.Error(codes.Unauthenticated, "no peer")
	}
	ti, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(ti.State.VerifiedChains) == 0 || len(ti.State.PeerCertificates) == 0 {
		return nil, nil, status.Error(codes.Unauthenticated, "an agent X509-SVID is required")
	}
	leaf := ti.State.PeerCertificates[0]
	id, err := x509svid.IDFromCert(leaf)
	if err != nil {
		return nil, nil, status.Errorf(codes.Unauthenticated, "client certificate is not an X509-SVID: %v", err)
	}
	n := a.cfg.Store.View().Node(id.String())
	if n == nil {
		return nil, nil, status.Errorf(codes.PermissionDenied, "%s is not an attested agent", id)
	}
	if n.Banned {
		return nil, nil, status.Errorf(codes.PermissionDenied, "agent %s is banned", id)
	}
	serial := leaf.SerialNumber.String()
	if serial != n.CertSerial && serial != n.NewCertSerial {
		return nil, nil, status.Errorf(codes.PermissionDenied, "agent %s presented an SVID that is no longer current", id)
	}
	if serial == n.CertSerial && n.NewCertSerial != "" {
		// The agent uses its renewed SVID: the one it renewed with retires.
		upd := proto.Clone(n).(*ferrypb.AttestedNode)
		upd.NewCertSerial, upd.NewCertNotAfter = "", 0
		res, err := a.cfg.Cluster.Apply(ctx, &ferrypb.Command{Op: &ferrypb.Command_NodePut{NodePut: &ferrypb.NodePut{Node: upd, ExpectSerial: serial}}})
		if err != nil {
			return nil, nil, toStatus(err)
		}
		if err := resultError(res); err != nil {
			return nil, nil, err
		}
		n = upd
	}
	return n, leaf, nil
}

// RenewAgent signs a new agent SVID for the caller's current identity.
func (a *Agent) RenewAgent(ctx context.Context, req *ferrypb.RenewAgentRequest) (*ferrypb.RenewAgentResponse, error) {
	n, leaf, err := a.caller(ctx)
	if err != nil {
		return nil, err
	}
	var pub crypto.PublicKey
	var chain []*x509.Certificate
	if err := a.compute(ctx, func() {
		if pub, err = ca.ParseCSR(req.Csr); err != nil {
			return
		}
		id, _ := spiffeid.FromString(n.SpiffeId)
		chain, err = a.cfg.Signer.SignAgentX509SVID(pub, id, a.cfg.AgentSVIDTTL)
	}); err != nil {
		return nil, err
	}
	if pub == nil {
		return nil, status.Errorf(codes.InvalidArgument, "agent CSR: %v", err)
	}
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "signing agent SVID: %v", err)
	}
	upd := proto.Clone(n).(*ferrypb.AttestedNode)
	upd.CertSerial, upd.CertNotAfter = chain[0].SerialNumber.String(), chain[0].NotAfter.Unix()
	// The SVID the agent renewed with stays acceptable until the agent uses the
	// new one, so a lost response does not lock it out.
	upd.NewCertSerial, upd.NewCertNotAfter = leaf.SerialNumber.String(), leaf.NotAfter.Unix()
	res, err := a.cfg.Cluster.Apply(ctx, &ferrypb.Command{Op: &ferrypb.Command_NodePut{NodePut: &ferrypb.NodePut{Node: upd, ExpectSerial: n.CertSerial}}})
	if err != nil {
		return nil, toStatus(err)
	}
	if err := resultError(res); err != nil {
		return nil, err
	}
	return &ferrypb.RenewAgentResponse{SvidChain: derChain(chain)}, nil
}

func (a *Agent) allow(agentID string, n int) error {
	a.mu.Lock()
	l, ok := a.limiter[agentID]
	if !ok {
		l = rate.NewLimiter(rate.Limit(a.cfg.PerAgentRate), int(a.cfg.PerAgentRate))
		a.limiter[agentID] = l
	}
	a.mu.Unlock()
	now := a.cfg.Now()
	if !l.AllowN(now, n) {
		return status.Errorf(codes.ResourceExhausted, "agent %s is over its signing rate (%.0f/s); retry later", agentID, a.cfg.PerAgentRate)
	}
	if !a.global.AllowN(now, n) {
		return status.Errorf(codes.ResourceExhausted, "server is over its signing rate (%.0f/s); retry later", a.cfg.GlobalRate)
	}
	return nil
}

// compute runs f, pure CPU work (signing, parsing a CSR), holding one of
// the server's work slots (AgentConfig.Work); the error is the call's
// status when ctx ends first.
func (a *Agent) compute(ctx context.Context, f func()) error {
	if err := a.cfg.Work.Do(ctx, f); err != nil {
		return status.FromContextError(err).Err()
	}
	return nil
}

// authorized returns the entries the agent may serve, by ID.
func (a *Agent) authorized(v *state.View, n *ferrypb.AttestedNode) map[string]*ferrypb.Entry {
	out := map[string]*ferrypb.Entry{}
	for _, e := range v.AuthorizedEntries(n.SpiffeId, a.serverID, n.Selectors) {
		out[e.Id] = e
	}
	return out
}

// authorizedEntry returns entry id if agent n may serve it, else nil; its
// cost does not grow with the agent's other entries (see authorized).
func (a *Agent) authorizedEntry(v *state.View, n *ferrypb.AttestedNode, id string) *ferrypb.Entry {
	return v.AuthorizedEntry(id, n.SpiffeId, a.serverID, n.Selectors)
}

// BatchNewX509SVID signs CSRs for authorized entries. The SPIFFE ID always comes
// from the entry, never from the CSR.
func (a *Agent) BatchNewX509SVID(ctx context.Context, req *ferrypb.BatchNewX509SVIDRequest) (*ferrypb.BatchNewX509SVIDResponse, error) {
	n, _, err := a.caller(ctx)
	if err != nil {
		return nil, err
	}
	if len(req.Params) > a.cfg.MaxBatch {
		return nil, status.Errorf(codes.InvalidArgument, "at most %d CSRs per call", a.cfg.MaxBatch)
	}
	if err := a.allow(n.SpiffeId, len(req.Params)); err != nil {
		return nil, err
	}
	v := a.cfg.Store.View()
	resp := &ferrypb.BatchNewX509SVIDResponse{Results: make([]*ferrypb.X509SVIDResult, len(req.Params))}
	var reqs []ca.X509SVIDRequest
	var pos []int
	for i, p := range req.Params {
		e := a.authorizedEntry(v, n, p.EntryId)
		if e == nil {
			resp.Results[i] = &ferrypb.X509SVIDResult{Status: &ferrypb.Status{Code: int32(codes.PermissionDenied), Message: fmt.Sprintf("agent is not authorized for entry %q", p.EntryId)}}
			continue
		}
		id, err := spiffeid.FromString(e.SpiffeId)
		if err != nil {
			resp.Results[i] = &ferrypb.X509SVIDResult{Status: &ferrypb.Status{Code: int32(codes.Internal), Message: err.Error()}}
			continue
		}
		if id == ServerID(a.cfg.TrustDomain) {
			resp.Results[i] = &ferrypb.X509SVIDResult{Status: &ferrypb.Status{Code: int32(codes.PermissionDenied), Message: "the server's SPIFFE ID is never issued to workloads"}}
			continue
		}
		reqs = append(reqs, ca.X509SVIDRequest{CSR: p.Csr, SPIFFEID: id, DNSNames: e.DnsNames, TTL: time.Duration(e.X509SvidTtl) * time.Second})
		pos = append(pos, i)
	}
	var results []ca.X509SVIDResult
	if err := a.compute(ctx, func() { results = a.cfg.Signer.SignWorkloadX509SVIDs(ctx, reqs) }); err != nil {
		return nil, err
	}
	for j, r := range results {
		i := pos[j]
		if r.Err != nil {
			code := codes.Internal
			if errors.Is(r.Err, ca.ErrInvalidCSR) || errors.Is(r.Err, ca.ErrUnsupportedKey) || errors.Is(r.Err, ca.ErrInvalidRequest) {
				code = codes.InvalidArgument
			} else if errors.Is(r.Err, ca.ErrNoAuthority) {
				code = codes.Unavailable
			}
			resp.Results[i] = &ferrypb.X509SVIDResult{Status: &ferrypb.Status{Code: int32(code), Message: r.Err.Error()}}
			continue
		}
		resp.Results[i] = &ferrypb.X509SVIDResult{Status: &ferrypb.Status{}, CertChain: derChain(r.Certificates)}
	}
	return resp, nil
}

// NewJWTSVID mints a JWT-SVID for an authorized entry.
func (a *Agent) NewJWTSVID(ctx context.Context, req *ferrypb.NewJWTSVIDRequest) (*ferrypb.NewJWTSVIDResponse, error) {
	n, _, err := a.caller(ctx)
	if err != nil {
		return nil, err
	}
	if len(req.Audience) == 0 {
		return nil, status.Error(codes.InvalidArgument, "audience is required")
	}
	if err := a.allow(n.SpiffeId, 1); err != nil {
		return nil, err
	}
	v := a.cfg.Store.View()
	var subject string
	var ttl time.Duration
	if req.Agent {
		if err := a.agentMayExchange(v, n, a.authorized(v, n), req); err != nil {
			return nil, err
		}
		subject = n.SpiffeId
	} else {
		e := a.authorizedEntry(v, n, req.EntryId)
		if e == nil {
			return nil, status.Errorf(codes.PermissionDenied, "agent is not authorized for entry %q", req.EntryId)
		}
		subject, ttl = e.SpiffeId, time.Duration(e.JwtSvidTtl)*time.Second
	}
	id, err := spiffeid.FromString(subject)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	var svid *ca.JWTSVID
	if err := a.compute(ctx, func() { svid, err = a.cfg.Signer.MintJWTSVID(id, req.Audience, ttl, nil) }); err != nil {
		return nil, err
	}
	if err != nil {
		if errors.Is(err, ca.ErrNoAuthority) {
			return nil, status.Error(codes.Unavailable, err.Error())
		}
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	return &ferrypb.NewJWTSVIDResponse{Token: svid.Token, IssuedAt: svid.IssuedAt.Unix(), ExpiresAt: svid.ExpiresAt.Unix()}, nil
}

// agentMayExchange checks a request for a JWT-SVID of agent n's own SPIFFE ID:
// it serves the token exchange only (audience exactly TokenExchangeAudience),
// and only while some managed identity accepts the agent's ID, so an agent's
// own JWT-SVID is never minted for another use.
func (a *Agent) agentMayExchange(v *state.View, n *ferrypb.AttestedNode, auth map[string]*ferrypb.Entry, req *ferrypb.NewJWTSVIDRequest) error {
	if req.EntryId != "" {
		return status.Error(codes.InvalidArgument, "entry_id must be empty when agent is set")
	}
	if len(req.Audience) != 1 || req.Audience[0] != TokenExchangeAudience {
		return status.Errorf(codes.InvalidArgument, "an agent's own JWT-SVID has the audience %s only", TokenExchangeAudience)
	}
	if len(a.identitiesFor(v, exchangeRules(v, a.cfg.JWTIssuer), n.SpiffeId, n, auth)) == 0 {
		return status.Errorf(codes.PermissionDenied, "no managed identity accepts agent %s", n.SpiffeId)
	}
	return nil
}

// SyncEntries streams the caller's authorized entries: everything first, then the
// difference after every committed change to entries, nodes or bundles that
// may concern the agent. Nothing is polled: the server's sync hub follows the
// change feed and wakes the streams a change concerns (see syncHub).
func (a *Agent) SyncEntries(_ *ferrypb.SyncEntriesRequest, stream ferrypb.Agent_SyncEntriesServer) error {
	ctx := stream.Context()
	n, _, err := a.caller(ctx)
	if err != nil {
		return err
	}
	// Registered before the first view: a change to the agent's node from
	// here on wakes the stream.
	box := a.hub.register(n.SpiffeId)
	defer a.hub.unregister(box)
	// The whole set is computed holding a work slot, and sent after.
	if err := a.cfg.Work.Acquire(ctx); err != nil {
		return status.FromContextError(err).Err()
	}
	v := a.cfg.Store.View()
	if cur := v.Node(n.SpiffeId); cur != nil {
		n = cur
	}
	st := &syncState{a: a, agentID: n.SpiffeId, selectors: n.Selectors, sent: a.authorized(v, n)}
	st.bundles = a.bundlesFor(v, st.sent)
	st.agentIdentity = n.GetSystemAssignedIdentity()
	first := &ferrypb.SyncEntriesResponse{Full: true, Bundles: st.bundles, Revision: v.Index(), AgentIdentity: st.agentIdentity}
	first.Entries = make([]*ferrypb.Entry, 0, len(st.sent))
	for _, e := range st.sent {
		first.Entries = append(first.Entries, e)
	}
	if a.hub.setParents(box, st.parents(v), v.Index()) {
		box.post(func() { box.full = true })
	}
	a.cfg.Work.Release()
	if err := sendSync(stream, first); err != nil {
		return err
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-box.wake:
		}
		if err := a.cfg.Work.Acquire(ctx); err != nil {
			return nil
		}
		msg, err := a.syncChange(box, st, n.SpiffeId)
		a.cfg.Work.Release()
		if err != nil {
			return err
		}
		if msg == nil {
			continue
		}
		if err := sendSync(stream, msg); err != nil {
			if errors.Is(err, io.EOF) || ctx.Err() != nil {
				return nil
			}
			return err
		}
	}
}

// syncChange computes what a stream sends for the changes in its mailbox:
// nil when there is nothing to send.
func (a *Agent) syncChange(box *syncStream, st *syncState, agentID string) (*ferrypb.SyncEntriesResponse, error) {
	keys, full, nodeChanged, bundlesChanged := box.take()
	v := a.cfg.Store.View()
	cur := v.Node(agentID)
	if cur == nil || cur.Banned {
		return nil, status.Errorf(codes.PermissionDenied, "agent %s was evicted or banned", agentID)
	}
	if nodeChanged && !slices.EqualFunc(cur.Selectors, st.selectors, func(x, y *ferrypb.Selector) bool { return proto.Equal(x, y) }) {
		full = true
	}
	st.selectors = cur.Selectors
	msg := &ferrypb.SyncEntriesResponse{Revision: v.Index(), AgentIdentity: cur.GetSystemAssignedIdentity()}
	reparent := full
	if !full {
		ok, moved := st.apply(v, cur, keys, msg)
		full, reparent = !ok, !ok || moved
	}
	if full {
		msg.Entries, msg.DeletedIds = nil, nil
		st.recompute(v, cur, msg)
		bundlesChanged = true
	}
	if bundlesChanged || st.federated {
		if nb := a.bundlesFor(v, st.sent); !sameBundles(nb, st.bundles) {
			msg.Bundles = nb
			st.bundles = nb
		}
	}
	st.federated = false
	if reparent {
		if a.hub.setParents(box, st.parents(v), v.Index()) {
			box.post(func() { box.full = true })
		}
	}
	identityChanged := msg.AgentIdentity != st.agentIdentity
	st.agentIdentity = msg.AgentIdentity
	if len(msg.Entries) == 0 && len(msg.DeletedIds) == 0 && msg.Bundles == nil && !identityChanged {
		return nil, nil
	}
	return msg, nil
}

// syncState is what one SyncEntries stream has sent its agent.
type syncState struct {
	a             *Agent
	agentID       string
	selectors     []*ferrypb.Selector // the agent's node selectors sent against
	sent          map[string]*ferrypb.Entry
	bundles       []*ferrypb.Bundle
	agentIdentity bool
	// federated: a change touched an entry that federates, so the bundles
	// the agent needs may have changed.
	federated bool
}

// recompute diffs the agent's whole authorized set against what was sent.
func (st *syncState) recompute(v *state.View, n *ferrypb.AttestedNode, msg *ferrypb.SyncEntriesResponse) {
	now := st.a.authorized(v, n)
	for id, e := range now {
		if old, ok := st.sent[id]; !ok || old.Revision != e.Revision {
			msg.Entries = append(msg.Entries, e)
		}
	}
	for id := range st.sent {
		if _, ok := now[id]; !ok {
			msg.DeletedIds = append(msg.DeletedIds, id)
		}
	}
	st.sent = now
}

// apply brings the changed entries keys up to date, each decided on its own
// by walking up its parents (View.AuthorizedEntry). It returns ok false,
// having changed nothing, when a change may also change whether other
// entries are authorized (an entry that issues a SPIFFE ID other entries are
// parented on came, went or changed its SPIFFE ID): the caller then
// recomputes. moved reports that the SPIFFE IDs of the sent entries changed,
// so the stream's registrations must follow (an entry that only changed
// otherwise, the common case, leaves them as they are).
func (st *syncState) apply(v *state.View, n *ferrypb.AttestedNode, keys map[string]struct{}, msg *ferrypb.SyncEntriesResponse) (ok, moved bool) {
	type update struct {
		id  string
		now *ferrypb.Entry
	}
	var updates []update
	for id := range keys {
		now := v.AuthorizedEntry(id, n.SpiffeId, st.a.serverID, n.Selectors)
		old, had := st.sent[id]
		if now == nil && !had || now != nil && had && old.Revision == now.Revision {
			continue
		}
		if had != (now != nil) || had && old.SpiffeId != now.SpiffeId {
			if had && hasChildren(v, old.SpiffeId) || now != nil && hasChildren(v, now.SpiffeId) {
				return false, false
			}
			moved = true
		}
		updates = append(updates, update{id, now})
	}
	for _, u := range updates {
		if old := st.sent[u.id]; old != nil && len(old.FederatesWith) > 0 {
			st.federated = true
		}
		if u.now == nil {
			delete(st.sent, u.id)
			msg.DeletedIds = append(msg.DeletedIds, u.id)
			continue
		}
		if len(u.now.FederatesWith) > 0 {
			st.federated = true
		}
		st.sent[u.id] = u.now
		msg.Entries = append(msg.Entries, u.now)
	}
	return true, moved
}

// hasChildren reports whether any entry is parented on SPIFFE ID id.
func hasChildren(v *state.View, id string) bool {
	children, _ := v.ListEntries(state.EntryFilter{ParentID: id}, "", 1)
	return len(children) > 0
}

// parents returns what the stream registers on: the agent's ID, the node
// aliases it belongs to and the SPIFFE IDs of the entries it was sent.
func (st *syncState) parents(v *state.View) map[string]int {
	out := map[string]int{st.agentID: 1}
	for _, alias := range v.NodeAliases(st.a.serverID, st.selectors) {
		out[alias]++
	}
	for _, e := range st.sent {
		out[e.SpiffeId]++
	}
	return out
}

// syncMessageBytes bounds the entries and deleted IDs of one SyncEntries
// message, well under the 4 MiB an agent's gRPC client accepts.
const syncMessageBytes = 1 << 20

// sendSync sends msg in parts of at most syncMessageBytes (see splitSync).
func sendSync(stream ferrypb.Agent_SyncEntriesServer, msg *ferrypb.SyncEntriesResponse) error {
	for _, part := range splitSync(msg, syncMessageBytes) {
		if err := stream.Send(part); err != nil {
			return err
		}
	}
	return nil
}

// splitSync splits msg into parts whose entries and deleted IDs take at most
// budget bytes each (one entry larger than that goes alone). Every part carries
// msg's revision and agent identity; the first also its full flag and bundles;
// every part but the last has More set. A msg within budget is returned as is.
func splitSync(msg *ferrypb.SyncEntriesResponse, budget int) []*ferrypb.SyncEntriesResponse {
	var parts []*ferrypb.SyncEntriesResponse
	part := &ferrypb.SyncEntriesResponse{Full: msg.Full, Bundles: msg.Bundles, Revision: msg.Revision, AgentIdentity: msg.AgentIdentity}
	size := 0
	flush := func() {
		parts = append(parts, part)
		part = &ferrypb.SyncEntriesResponse{Revision: msg.Revision, AgentIdentity: msg.AgentIdentity}
		size = 0
	}
	// Field tag and length prefix: at most 1 + 4 bytes for what fits a part.
	const overhead = 5
	for _, e := range msg.Entries {
		n := proto.Size(e) + overhead
		if size > 0 && size+n > budget {
			flush()
		}
		part.Entries = append(part.Entries, e)
		size += n
	}
	for _, id := range msg.DeletedIds {
		n := len(id) + overhead
		if size > 0 && size+n > budget {
			flush()
		}
		part.DeletedIds = append(part.DeletedIds, id)
		size += n
	}
	if len(parts) == 0 {
		return []*ferrypb.SyncEntriesResponse{msg}
	}
	parts = append(parts, part)
	for _, p := range parts[:len(parts)-1] {
		p.More = true
	}
	return parts
}

// bundlesFor returns our own bundle and those the entries federate with.
func (a *Agent) bundlesFor(v *state.View, entries map[string]*ferrypb.Entry) []*ferrypb.Bundle {
	tds := map[string]bool{a.cfg.TrustDomain.String(): true}
	for _, e := range entries {
		for _, td := range e.FederatesWith {
			tds[td] = true
		}
	}
	var out []*ferrypb.Bundle
	for td := range tds {
		if b := v.Bundle(td); b != nil {
			out = append(out, b)
		}
	}
	slices.SortFunc(out, func(x, y *ferrypb.Bundle) int {
		switch {
		case x.TrustDomain < y.TrustDomain:
			return -1
		case x.TrustDomain > y.TrustDomain:
			return 1
		}
		return 0
	})
	return out
}

func sameBundles(x, y []*ferrypb.Bundle) bool {
	if len(x) != len(y) {
		return false
	}
	for i := range x {
		if x[i].TrustDomain != y[i].TrustDomain || x[i].Revision != y[i].Revision {
			return false
		}
	}
	return true
}

func derChain(certs []*x509.Certificate) [][]byte {
	out := make([][]byte, len(certs))
	for i, c := range certs {
		out[i] = c.Raw
	}
	return out
}

// WITSigner mints WIT-SVIDs; the Agent service's Signer implements it when
// the servers issue them (ca.CA does).
type WITSigner interface {
	MintWITSVID(id spiffeid.ID, pub crypto.PublicKey, ttl time.Duration) (*ca.WITSVID, error)
}

// NewWITSVID mints a WIT-SVID for an authorized entry, bound to the public key
// the agent generated for it. Its lifetime is the entry's JWT-SVID TTL (0 =
// the CA's WIT default).
func (a *Agent) NewWITSVID(ctx context.Context, req *ferrypb.NewWITSVIDRequest) (*ferrypb.NewWITSVIDResponse, error) {
	n, _, err := a.caller(ctx)
	if err != nil {
		return nil, err
	}
	signer, ok := a.cfg.Signer.(WITSigner)
	if !ok {
		return nil, status.Error(codes.Unimplemented, "this server does not issue WIT-SVIDs")
	}
	pub, err := x509.ParsePKIXPublicKey(req.PublicKey)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "public key: %v", err)
	}
	if err := a.allow(n.SpiffeId, 1); err != nil {
		return nil, err
	}
	e := a.authorizedEntry(a.cfg.Store.View(), n, req.EntryId)
	if e == nil {
		return nil, status.Errorf(codes.PermissionDenied, "agent is not authorized for entry %q", req.EntryId)
	}
	id, err := spiffeid.FromString(e.SpiffeId)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	svid, err := signer.MintWITSVID(id, pub, time.Duration(e.JwtSvidTtl)*time.Second)
	if err != nil {
		if errors.Is(err, ca.ErrNoAuthority) {
			return nil, status.Error(codes.Unavailable, err.Error())
		}
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	return &ferrypb.NewWITSVIDResponse{Token: svid.Token, IssuedAt: svid.IssuedAt.Unix(), ExpiresAt: svid.ExpiresAt.Unix()}, nil
}

// ReportAuthorities records which of the trust domain's authorities the
// calling agent holds unexpired SVIDs from, replacing its last report.
func (a *Agent) ReportAuthorities(ctx context.Context, req *ferrypb.ReportAuthoritiesRequest) (*ferrypb.ReportAuthoritiesResponse, error) {
	n, _, err := a.caller(ctx)
	if err != nil {
		return nil, err
	}
	if err := state.ValidateAgentReport(req.Authorities); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "report: %v", err)
	}
	res, err := a.cfg.Cluster.Apply(ctx, &ferrypb.Command{Op: &ferrypb.Command_AgentReportPut{AgentReportPut: &ferrypb.AgentReportPut{
		Report: &ferrypb.AgentReport{SpiffeId: n.SpiffeId, Authorities: req.Authorities, ReportedAt: time.Now().Unix()}}}})
	if err != nil {
		return nil, toStatus(err)
	}
	if err := resultError(res); err != nil {
		return nil, err
	}
	return &ferrypb.ReportAuthoritiesResponse{}, nil
}
