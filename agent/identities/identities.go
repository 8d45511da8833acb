// Package identities decides which managed identities a caller of the agent's
// token endpoint may use, and signs the client assertions for them.
//
// A caller (a local process found by agent/peer) is attested with the same
// workload attestors as the Workload API and matched against the agent's
// cached entries, which gives its SPIFFE IDs. An identity is usable by a
// SPIFFE ID when one of its federated identity credentials accepts a JWT-SVID
// for that ID; the servers answer that from the replicated directory
// (Agent.ListAgentIdentities), and the answer is cached here briefly. The
// assertion is a JWT-SVID for the SPIFFE ID with audience
// api://AzureADTokenExchange, from the agent's SVID cache.
//
// Resolver implements tokens.Identities and tokens.Assertions.
package identities

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"

	"github.com/ferry-id/ferry/agent/cache"
	"github.com/ferry-id/ferry/agent/imds"
	"github.com/ferry-id/ferry/agent/peer"
	"github.com/ferry-id/ferry/agent/tokens"
	"github.com/ferry-id/ferry/attestors/workload"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

// Audience is the audience of the client assertions.
const Audience = "api://AzureADTokenExchange"

// KindSystemAssigned is the kind of a system-assigned identity, chosen when a
// request names no identity.
const KindSystemAssigned = "system-assigned"

// Attestor turns a PID into its selectors; workloadapi.WorkloadAttestors
// returns one. Safe for concurrent use.
type Attestor interface {
	Attest(ctx context.Context, pid int32) ([]*ferrypb.Selector, error)
}

// Workloads is the agent's SVID cache (*cache.Cache). Safe for concurrent use.
type Workloads interface {
	FetchWorkloadUpdate(ctx context.Context, selectors []*ferrypb.Selector) (*cache.WorkloadUpdate, error)
	FetchJWTSVID(ctx context.Context, entry *ferrypb.Entry, audience []string) (*cache.JWTSVID, error)
}

// Directory asks the servers which identities SPIFFE IDs may use
// (ferrypb.AgentClient). Safe for concurrent use.
type Directory interface {
	ListAgentIdentities(ctx context.Context, in *ferrypb.ListAgentIdentitiesRequest, opts ...grpc.CallOption) (*ferrypb.ListAgentIdentitiesResponse, error)
}

// Processes attests the calling process under the agent's credential rule
// (*peer.Finder): attest runs against the process pinned with p's PID and
// start time, its ids are read once and must pass want.Check, and it must
// still be that process afterwards (workload.AttestCaller). Refusals wrap
// workload.ErrProcessChanged or workload.ErrCredentialsChanged.
type Processes interface {
	Attest(ctx context.Context, p peer.Process, want workload.Peer, attest workload.AttestFunc) ([]*ferrypb.Selector, error)
}

// Agent is the agent itself, whose identities callers may also use
// (Config.Agent). Safe for concurrent use.
type Agent interface {
	// SPIFFEID is the agent's current SPIFFE ID; "" before it is attested.
	SPIFFEID() string
	// JWTSVID returns a JWT-SVID for the agent's own SPIFFE ID agentID and
	// audience.
	JWTSVID(ctx context.Context, agentID string, audience []string) (string, error)
}

// Config configures a Resolver.
type Config struct {
	Attestor  Attestor
	Workloads Workloads
	Directory Directory
	// Agent, when set, lets every caller also use the agent's own
	// identities: its system-assigned identity and the user-assigned ones
	// whose credentials accept the agent's SPIFFE ID, as every process on
	// an Azure VM may use the VM's. A caller's own identities (those of its
	// entries' SPIFFE IDs) come first: a request naming no identity gets
	// the agent's only when the caller's entries grant none.
	Agent Agent
	// Processes; default peer.New(peer.Config{}).
	Processes Processes
	// Conns, when set, finds the calling process of requests whose Caller
	// has no PID (the endpoint resolves uids only), and remembers per
	// connection the identities granted on it.
	Conns *Conns
	// ReattestAfter bounds how long an identity granted on a connection is
	// granted again without attesting the caller anew; default 1 s. Any
	// change to the agent's entries (Workloads with a Revision method) ends
	// it sooner. Only requests on the same tracked connection, from the same
	// caller with the same selector, reuse a decision.
	ReattestAfter time.Duration
	// TenantID, when set, is the tenant of every exchange; by default the
	// identity's own tenant.
	TenantID string
	// TTL is how long the servers' answer for a SPIFFE ID is reused; default
	// 30 s. An answer of no identities is reused for NegativeTTL (default
	// 5 s, at most TTL), so a credential just created is soon usable. When
	// the servers cannot be reached an answer is reused up to StaleTTL
	// (default 10 × TTL).
	TTL, NegativeTTL, StaleTTL time.Duration
	// Now; default time.Now.
	Now func() time.Time
	// Logger; default slog.Default().
	Logger *slog.Logger
}

// Resolver implements tokens.Identities and tokens.Assertions.
type Resolver struct {
	cfg Config
	log *slog.Logger
	rev revisioner // nil when Workloads has no Revision

	mu      sync.Mutex
	dir     map[string]dirItem        // by SPIFFE ID
	entries map[string]*ferrypb.Entry // by SPIFFE ID: the entry last seen granting it
	fetch   sync.Mutex                // one directory call at a time
}

type dirItem struct {
	ids []*ferrypb.AgentIdentity
	at  time.Time
	rev uint64 // the agent's entry revision read before asking
}

var (
	_ tokens.Identities = (*Resolver)(nil)
	_ tokens.Granted    = (*Resolver)(nil)
	_ tokens.Assertions = (*Resolver)(nil)
)

// New returns a Resolver.
func New(c Config) (*Resolver, error) {
	if c.Attestor == nil || c.Workloads == nil || c.Directory == nil {
		return nil, errors.New("identities: Attestor, Workloads and Directory are required")
	}
	if c.Processes == nil {
		c.Processes = peer.New(peer.Config{})
	}
	if c.TTL <= 0 {
		c.TTL = 30 * time.Second
	}
	if c.NegativeTTL <= 0 {
		c.NegativeTTL = 5 * time.Second
	}
	c.NegativeTTL = min(c.NegativeTTL, c.TTL)
	if c.StaleTTL < c.TTL {
		c.StaleTTL = 10 * c.TTL
	}
	if c.ReattestAfter <= 0 {
		c.ReattestAfter = time.Second
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	rev, _ := c.Workloads.(revisioner)
	return &Resolver{
		rev:     rev,
		cfg:     c,
		log:     c.Logger.With("component", "identities"),
		dir:     map[string]dirItem{},
		entries: map[string]*ferrypb.Entry{},
	}, nil
}

// revisioner is implemented by *cache.Cache: its revision changes whenever
// an entry is added, changed or removed.
type revisioner interface{ Revision() uint64 }

// Identity attests the caller, finds the identities its SPIFFE IDs may use and
// picks the one the selector names (or the only one, preferring a
// system-assigned identity, when none is named).
//
// On a tracked connection (Config.Conns) a granted identity is remembered
// and granted again to the same caller and selector on that connection for
// up to ReattestAfter, or until the agent's entries change. This is safe
// because what attestation proves cannot change underneath a connection:
//   - The caller's uid is the owner of the client socket, fixed when the
//     socket was created; the endpoint found it by the connection's exact
//     4-tuple. No process of another uid can send on that connection unless
//     a holder of the socket hands it over (fd passing, fork), which a
//     process entitled to the identity can equally do with the token itself.
//     The Workload API trusts SO_PEERCRED, fixed at connect, the same way.
//   - The process is pinned per connection (PID and start time) and was
//     alive, with that start time, after its selectors were read. A process
//     that later takes over its PID does not hold this connection's socket,
//     and when the decision is next renewed the liveness check fails and the
//     connection is refused: a recycled PID never borrows an identity.
//   - Decisions live in the connection's own record, dropped when it
//     closes; nothing is shared between connections, callers or selectors.
//   - Errors are not remembered: a refused request is decided anew.
func (r *Resolver) Identity(ctx context.Context, c imds.Caller, s imds.Selector) (tokens.Identity, error) {
	ci := r.cfg.Conns.info(ctx)
	if ci == nil {
		return r.identity(ctx, c, s)
	}
	// Read the time and revision before attesting: a decision is never
	// dated later than the state it was made from.
	now := r.cfg.Now()
	rev := r.revision()
	if id, ok := ci.granted(c, s, now, r.cfg.ReattestAfter, rev); ok {
		return id, nil
	}
	id, err := r.identity(ctx, c, s)
	if err != nil {
		return tokens.Identity{}, err
	}
	ci.remember(grant{caller: c, sel: s, id: id, at: now, revision: rev})
	return id, nil
}

// Granted returns the identity granted earlier on the connection of the
// request in ctx to the same caller and selector, if that decision still
// holds (see Identity); it never attests and never blocks.
func (r *Resolver) Granted(ctx context.Context, c imds.Caller, s imds.Selector) (tokens.Identity, bool) {
	ci := r.cfg.Conns.info(ctx)
	if ci == nil {
		return tokens.Identity{}, false
	}
	rev := r.revision()
	return ci.granted(c, s, r.cfg.Now(), r.cfg.ReattestAfter, rev)
}

// process returns the calling process: the one the endpoint found for the
// request (imds.ProcessFrom), else the caller's own PID and start time, else
// the one Conns finds for the request's connection.
func (r *Resolver) process(ctx context.Context, c imds.Caller) (peer.Process, error) {
	if p, ok := imds.ProcessFrom(ctx); ok {
		return p, nil
	}
	if c.PID > 0 {
		return peer.Process{PID: c.PID, UID: c.UID, GID: c.GID, StartTime: c.StartTime}, nil
	}
	if r.cfg.Conns != nil {
		p, err := r.cfg.Conns.process(ctx)
		if err != nil {
			return peer.Process{}, fmt.Errorf("identities: %w: %w", imds.ErrForbidden, err)
		}
		return p, nil
	}
	return peer.Process{}, errors.New("identities: the calling process is unknown")
}

func (r *Resolver) identity(ctx context.Context, c imds.Caller, s imds.Selector) (tokens.Identity, error) {
	proc, err := r.process(ctx, c)
	if err != nil {
		return tokens.Identity{}, err
	}
	c.PID, c.StartTime = proc.PID, proc.StartTime
	// Attested as the endpoint and the Workload API attest: through the
	// pinned process, the ids the selectors describe checked against the
	// uid owning the caller's socket, and the process still the one that
	// called once the selectors are read (a PID reused in between would
	// lend its selectors).
	sels, err := r.cfg.Processes.Attest(ctx, proc, imds.CallerPeer(c.UID), r.cfg.Attestor.Attest)
	if errors.Is(err, workload.ErrProcessChanged) || errors.Is(err, workload.ErrCredentialsChanged) {
		return tokens.Identity{}, fmt.Errorf("identities: %w: %w", imds.ErrForbidden, err)
	}
	if err != nil {
		return tokens.Identity{}, fmt.Errorf("identities: attest pid %d: %w", c.PID, err)
	}
	upd, err := r.cfg.Workloads.FetchWorkloadUpdate(ctx, sels)
	if err != nil {
		return tokens.Identity{}, fmt.Errorf("identities: %w", err)
	}
	var spiffeIDs []string
	granted := map[string]*ferrypb.Entry{}
	for _, id := range upd.Identities {
		sid := id.Entry.GetSpiffeId()
		if _, dup := granted[sid]; dup {
			continue
		}
		granted[sid] = id.Entry
		spiffeIDs = append(spiffeIDs, sid)
	}
	// The agent's own ID is asked about too, unless an entry of the
	// caller's has it already.
	agentID := r.agentID()
	if _, dup := granted[agentID]; dup {
		agentID = ""
	}
	ask := spiffeIDs
	if agentID != "" {
		ask = append(slices.Clip(spiffeIDs), agentID)
	}
	if len(ask) == 0 {
		return tokens.Identity{}, fmt.Errorf("identities: %w: no entry matches uid %d pid %d", imds.ErrIdentityNotFound, c.UID, c.PID)
	}
	usable, err := r.usable(ctx, ask)
	if err != nil {
		return tokens.Identity{}, err
	}
	var own, agents []*ferrypb.AgentIdentity
	for _, u := range usable {
		if agentID != "" && u.GetSpiffeId() == agentID {
			agents = append(agents, u)
		} else {
			own = append(own, u)
		}
	}
	pick, err := choose(own, agents, s)
	if err != nil {
		return tokens.Identity{}, err
	}
	if e := granted[pick.GetSpiffeId()]; e != nil {
		r.mu.Lock()
		r.entries[pick.GetSpiffeId()] = e
		r.mu.Unlock()
	}
	tenant := pick.GetTenantId()
	if r.cfg.TenantID != "" {
		tenant = r.cfg.TenantID
	}
	return tokens.Identity{
		TenantID: tenant,
		ClientID: pick.GetClientId(),
		ObjectID: pick.GetObjectId(),
		SPIFFEID: pick.GetSpiffeId(),
	}, nil
}

// choose applies the IMDS selection rules to the identities usable by the
// caller: its own (own, in the order of its SPIFFE IDs, default identity
// first), then the agent's. A request naming no identity is answered from
// the caller's own identities when it has any, else from the agent's; a
// named identity is looked for in both, the caller's first.
func choose(own, agents []*ferrypb.AgentIdentity, s imds.Selector) (*ferrypb.AgentIdentity, error) {
	if s.Kind == imds.SelectorNone {
		if len(own) == 0 {
			return chooseDefault(agents)
		}
		return chooseDefault(own)
	}
	return chooseNamed(append(slices.Clip(own), agents...), s)
}

// chooseDefault picks the identity for a request that names none: the only
// system-assigned one, else the only one.
func chooseDefault(usable []*ferrypb.AgentIdentity) (*ferrypb.AgentIdentity, error) {
	var system, distinct []*ferrypb.AgentIdentity
	seen := map[string]bool{}
	for _, u := range usable {
		if seen[u.GetObjectId()] {
			continue
		}
		seen[u.GetObjectId()] = true
		distinct = append(distinct, u)
		if u.GetKind() == KindSystemAssigned {
			system = append(system, u)
		}
	}
	switch {
	case len(system) == 1:
		return system[0], nil
	case len(distinct) == 1:
		return distinct[0], nil
	case len(distinct) == 0:
		return nil, fmt.Errorf("identities: %w: the caller may use no identity", imds.ErrIdentityNotFound)
	}
	return nil, fmt.Errorf("identities: %w: %d identities", imds.ErrAmbiguousIdentity, len(distinct))
}

// chooseNamed picks the first identity the selector names.
func chooseNamed(usable []*ferrypb.AgentIdentity, s imds.Selector) (*ferrypb.AgentIdentity, error) {
	for _, u := range usable {
		var v string
		switch s.Kind {
		case imds.SelectorClientID:
			v = u.GetClientId()
		case imds.SelectorObjectID, imds.SelectorPrincipalID:
			v = u.GetObjectId()
		case imds.SelectorMSIResID, imds.SelectorMIResID:
			v = u.GetResourceId()
		default:
			return nil, fmt.Errorf("identities: %w: unknown selector %q", imds.ErrIdentityNotFound, s.Kind)
		}
		// GUIDs and ARM resource IDs compare case-insensitively in Azure.
		if v != "" && strings.EqualFold(v, s.Value) {
			return u, nil
		}
	}
	return nil, fmt.Errorf("identities: %w: %s not usable by the caller", imds.ErrIdentityNotFound, s.Kind)
}

// usable returns the identities the SPIFFE IDs may use, in their order,
// asking the servers about IDs whose answer is missing or older than TTL.
func (r *Resolver) usable(ctx context.Context, spiffeIDs []string) ([]*ferrypb.AgentIdentity, error) {
	if out, ok := r.cached(spiffeIDs, false); ok {
		return out, nil
	}
	r.fetch.Lock()
	defer r.fetch.Unlock()
	// Another request may have fetched them while this one waited.
	if out, ok := r.cached(spiffeIDs, false); ok {
		return out, nil
	}
	now := r.cfg.Now()
	// Read the revision before asking: an answer is never dated later than
	// the entries it was given for.
	rev := r.revision()
	var missing []string
	r.mu.Lock()
	for _, id := range spiffeIDs {
		if it, ok := r.dir[id]; !ok || !r.usableLocked(it, now, rev, false) {
			missing = append(missing, id)
		}
	}
	r.mu.Unlock()
	resp, err := r.cfg.Directory.ListAgentIdentities(ctx, &ferrypb.ListAgentIdentitiesRequest{SpiffeIds: missing})
	if err != nil {
		if out, ok := r.cached(spiffeIDs, true); ok {
			r.log.Warn("listing identities failed; using the last answer", "error", err)
			return out, nil
		}
		return nil, fmt.Errorf("identities: list identities: %w", err)
	}
	fresh := make(map[string][]*ferrypb.AgentIdentity, len(missing))
	for _, id := range missing {
		fresh[id] = nil
	}
	for _, ai := range resp.GetIdentities() {
		if _, asked := fresh[ai.GetSpiffeId()]; asked {
			fresh[ai.GetSpiffeId()] = append(fresh[ai.GetSpiffeId()], ai)
		}
	}
	r.mu.Lock()
	for id, ids := range fresh {
		r.dir[id] = dirItem{ids: ids, at: now, rev: rev}
	}
	r.sweepLocked(now)
	r.mu.Unlock()
	out, _ := r.cached(spiffeIDs, true)
	return out, nil
}

// cached returns the cached answers for every ID if all are fresh (or, with
// stale, not older than StaleTTL).
func (r *Resolver) cached(spiffeIDs []string, stale bool) ([]*ferrypb.AgentIdentity, bool) {
	now, rev := r.cfg.Now(), r.revision()
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []*ferrypb.AgentIdentity
	for _, id := range spiffeIDs {
		it, ok := r.dir[id]
		if !ok || !r.usableLocked(it, now, rev, stale) {
			return nil, false
		}
		out = append(out, it.ids...)
	}
	return out, true
}

// usableLocked reports whether an answer may be used now. A fresh answer
// also needs the agent's entries unchanged since it was taken: disabling an
// entry's system-assigned identity, or replacing the entry, changes them in
// the same server command that deletes the identity, so the next request
// asks again instead of being granted a deleted identity for up to TTL.
// Only when the servers cannot be reached (stale) is an older answer used.
func (r *Resolver) usableLocked(it dirItem, now time.Time, rev uint64, stale bool) bool {
	ttl := r.cfg.TTL
	switch {
	case stale:
		ttl = r.cfg.StaleTTL
	case it.rev != rev:
		return false
	case len(it.ids) == 0:
		ttl = r.cfg.NegativeTTL
	}
	return now.Sub(it.at) < ttl
}

// agentID is the agent's SPIFFE ID when its identities may be used, else "".
func (r *Resolver) agentID() string {
	if r.cfg.Agent == nil {
		return ""
	}
	return r.cfg.Agent.SPIFFEID()
}

// revision is the agent's entry revision, or 0 without a revisioner.
func (r *Resolver) revision() uint64 {
	if r.rev == nil {
		return 0
	}
	return r.rev.Revision()
}

// sweepLocked forgets answers too old to be used even when stale.
func (r *Resolver) sweepLocked(now time.Time) {
	for id, it := range r.dir {
		if now.Sub(it.at) >= r.cfg.StaleTTL {
			delete(r.dir, id)
			delete(r.entries, id)
		}
	}
}

// Assertion returns a JWT-SVID for id.SPIFFEID with audience Audience, from
// the agent's cache. Identity must have chosen id first: it records the entry
// that grants the SPIFFE ID.
func (r *Resolver) Assertion(ctx context.Context, id tokens.Identity) (string, error) {
	r.mu.Lock()
	e := r.entries[id.SPIFFEID]
	r.mu.Unlock()
	if e == nil {
		if agentID := r.agentID(); agentID != "" && id.SPIFFEID == agentID {
			tok, err := r.cfg.Agent.JWTSVID(ctx, agentID, []string{Audience})
			if err != nil {
				return "", fmt.Errorf("identities: the agent's JWT-SVID: %w", err)
			}
			return tok, nil
		}
		return "", fmt.Errorf("identities: no entry known for %s", id.SPIFFEID)
	}
	svid, err := r.cfg.Workloads.FetchJWTSVID(ctx, e, []string{Audience})
	if err != nil {
		return "", fmt.Errorf("identities: JWT-SVID for %s: %w", id.SPIFFEID, err)
	}
	return svid.Token, nil
}
