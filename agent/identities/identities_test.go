package identities_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"

	"github.com/ferry-id/ferry/agent/cache"
	"github.com/ferry-id/ferry/agent/identities"
	"github.com/ferry-id/ferry/agent/imds"
	"github.com/ferry-id/ferry/agent/peer"
	"github.com/ferry-id/ferry/agent/tokens"
	"github.com/ferry-id/ferry/attestors/workload"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

// attestor gives each PID the selector unix:pid:<pid> so workloads can tell
// callers apart.
type attestor struct{ err error }

func (a attestor) Attest(_ context.Context, pid int32) ([]*ferrypb.Selector, error) {
	if a.err != nil {
		return nil, a.err
	}
	return []*ferrypb.Selector{{Type: "unix", Value: "pid:" + strconv.Itoa(int(pid))}}, nil
}

// workloads grants entries by the selector value "pid:N".
type workloads struct {
	byPID map[string][]*ferrypb.Entry

	mu   sync.Mutex
	jwts []string // "spiffeID aud"
}

func (w *workloads) FetchWorkloadUpdate(_ context.Context, sels []*ferrypb.Selector) (*cache.WorkloadUpdate, error) {
	u := &cache.WorkloadUpdate{}
	for _, s := range sels {
		for _, e := range w.byPID[s.Value] {
			u.Identities = append(u.Identities, cache.Identity{Entry: e})
		}
	}
	return u, nil
}

func (w *workloads) FetchJWTSVID(_ context.Context, e *ferrypb.Entry, aud []string) (*cache.JWTSVID, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.jwts = append(w.jwts, e.SpiffeId+" "+aud[0])
	return &cache.JWTSVID{Token: "jwt-for-" + e.SpiffeId}, nil
}

// directory answers from a fixed list, counting calls.
type directory struct {
	mu    sync.Mutex
	ids   []*ferrypb.AgentIdentity
	calls [][]string
	err   error
}

func (d *directory) ListAgentIdentities(_ context.Context, in *ferrypb.ListAgentIdentitiesRequest, _ ...grpc.CallOption) (*ferrypb.ListAgentIdentitiesResponse, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.calls = append(d.calls, in.SpiffeIds)
	if d.err != nil {
		return nil, d.err
	}
	out := &ferrypb.ListAgentIdentitiesResponse{}
	for _, id := range d.ids {
		for _, s := range in.SpiffeIds {
			if id.SpiffeId == s {
				out.Identities = append(out.Identities, id)
			}
		}
	}
	return out, nil
}

func (d *directory) numCalls() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.calls)
}

// processes attests without a process of its own: the process's ids are
// its UID and GID, checked with the real credential rule; err, when set, is
// what the liveness check found.
type processes struct{ err error }

func (p processes) Attest(ctx context.Context, proc peer.Process, want workload.Peer, attest workload.AttestFunc) ([]*ferrypb.Selector, error) {
	sels, err := attest(ctx, proc.PID)
	if p.err != nil {
		return nil, p.err
	}
	uid := workload.IDs{Real: proc.UID, Effective: proc.UID, Saved: proc.UID, FS: proc.UID}
	gid := workload.IDs{Real: proc.GID, Effective: proc.GID, Saved: proc.GID, FS: proc.GID}
	if cerr := want.Check(workload.Creds{UID: uid, GID: gid}, false); cerr != nil {
		return nil, cerr
	}
	return sels, err
}

const (
	web   = "spiffe://example.org/web"
	batch = "spiffe://example.org/batch"
	other = "spiffe://example.org/other"
)

var (
	webUA = &ferrypb.AgentIdentity{SpiffeId: web, ClientId: "11111111-aaaa-4000-8000-000000000001", ObjectId: "21111111-aaaa-4000-8000-000000000001",
		ResourceId: "/subscriptions/s/resourceGroups/g/providers/Microsoft.ManagedIdentity/userAssignedIdentities/web", TenantId: "t-web", Kind: "user-assigned"}
	webUA2  = &ferrypb.AgentIdentity{SpiffeId: web, ClientId: "11111111-aaaa-4000-8000-000000000002", ObjectId: "21111111-aaaa-4000-8000-000000000002", TenantId: "t-web", Kind: "user-assigned"}
	batchSA = &ferrypb.AgentIdentity{SpiffeId: batch, ClientId: "11111111-aaaa-4000-8000-000000000003", ObjectId: "21111111-aaaa-4000-8000-000000000003", TenantId: "t-batch", Kind: "system-assigned"}
	otherUA = &ferrypb.AgentIdentity{SpiffeId: other, ClientId: "11111111-aaaa-4000-8000-000000000004", ObjectId: "21111111-aaaa-4000-8000-000000000004", TenantId: "t-other", Kind: "user-assigned"}
)

type fixture struct {
	r   *identities.Resolver
	w   *workloads
	d   *directory
	now time.Time
	mu  sync.Mutex
}

func (f *fixture) advance(d time.Duration) {
	f.mu.Lock()
	f.now = f.now.Add(d)
	f.mu.Unlock()
}

func newFixture(t *testing.T, mod func(*identities.Config)) *fixture {
	t.Helper()
	f := &fixture{now: time.Unix(1_800_000_000, 0)}
	f.w = &workloads{byPID: map[string][]*ferrypb.Entry{
		"pid:10": {{Id: "e-web", SpiffeId: web}},                                    // one SPIFFE ID, two identities
		"pid:20": {{Id: "e-batch", SpiffeId: batch}, {Id: "e-web2", SpiffeId: web}}, // a system-assigned one among three
		"pid:30": {{Id: "e-other", SpiffeId: other}},                                // exactly one
		"pid:40": {{Id: "e-none", SpiffeId: "spiffe://example.org/none"}},           // federated to nothing
	}}
	f.d = &directory{ids: []*ferrypb.AgentIdentity{webUA, webUA2, batchSA, otherUA}}
	cfg := identities.Config{
		Attestor: attestor{}, Workloads: f.w, Directory: f.d, Processes: processes{},
		Now: func() time.Time { f.mu.Lock(); defer f.mu.Unlock(); return f.now },
	}
	if mod != nil {
		mod(&cfg)
	}
	r, err := identities.New(cfg)
	require.NoError(t, err)
	f.r = r
	return f
}

func caller(pid int32) imds.Caller { return imds.Caller{UID: 1000, GID: 1000, PID: pid, StartTime: 7} }

// selectionCase is one request: the caller's pid, its selector, and the
// identity (or error) it gets.
type selectionCase struct {
	name string
	pid  int32
	sel  imds.Selector
	want *ferrypb.AgentIdentity
	err  error
}

func runSelections(t *testing.T, f *fixture, cases []selectionCase) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := f.r.Identity(context.Background(), caller(tc.pid), tc.sel)
			if tc.err != nil {
				require.ErrorIs(t, err, tc.err)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tokens.Identity{TenantID: tc.want.TenantId, ClientID: tc.want.ClientId, ObjectID: tc.want.ObjectId, SPIFFEID: tc.want.SpiffeId}, got)
		})
	}
}

func TestSelection(t *testing.T) {
	f := newFixture(t, nil)
	runSelections(t, f, []selectionCase{
		{"only identity without selector", 30, imds.Selector{}, otherUA, nil},
		{"several without selector", 10, imds.Selector{}, nil, imds.ErrAmbiguousIdentity},
		{"system-assigned preferred without selector", 20, imds.Selector{}, batchSA, nil},
		{"none federated", 40, imds.Selector{}, nil, imds.ErrIdentityNotFound},
		{"no entry for the caller", 50, imds.Selector{}, nil, imds.ErrIdentityNotFound},
		{"client_id", 10, imds.Selector{Kind: imds.SelectorClientID, Value: webUA2.ClientId}, webUA2, nil},
		{"client_id upper case", 10, imds.Selector{Kind: imds.SelectorClientID, Value: "11111111-AAAA-4000-8000-000000000001"}, webUA, nil},
		{"object_id", 10, imds.Selector{Kind: imds.SelectorObjectID, Value: webUA.ObjectId}, webUA, nil},
		{"principal_id", 10, imds.Selector{Kind: imds.SelectorPrincipalID, Value: webUA2.ObjectId}, webUA2, nil},
		{"msi_res_id", 10, imds.Selector{Kind: imds.SelectorMSIResID, Value: webUA.ResourceId}, webUA, nil},
		{"mi_res_id", 10, imds.Selector{Kind: imds.SelectorMIResID, Value: webUA.ResourceId}, webUA, nil},
		{"another SPIFFE ID's identity", 10, imds.Selector{Kind: imds.SelectorClientID, Value: otherUA.ClientId}, nil, imds.ErrIdentityNotFound},
		{"an identity of the second SPIFFE ID", 20, imds.Selector{Kind: imds.SelectorClientID, Value: webUA.ClientId}, webUA, nil},
		{"unknown client_id", 30, imds.Selector{Kind: imds.SelectorClientID, Value: "11111111-aaaa-4000-8000-00000000ffff"}, nil, imds.ErrIdentityNotFound},
		{"empty resource ID never matches", 10, imds.Selector{Kind: imds.SelectorMSIResID, Value: ""}, nil, imds.ErrIdentityNotFound},
	})
}

func TestAssertionUsesTheGrantingEntry(t *testing.T) {
	f := newFixture(t, func(c *identities.Config) { c.TenantID = "override" })
	ctx := context.Background()
	_, err := f.r.Assertion(ctx, tokens.Identity{SPIFFEID: other})
	require.Error(t, err, "no entry recorded before Identity chose it")

	id, err := f.r.Identity(ctx, caller(30), imds.Selector{})
	require.NoError(t, err)
	require.Equal(t, "override", id.TenantID)
	tok, err := f.r.Assertion(ctx, id)
	require.NoError(t, err)
	require.Equal(t, "jwt-for-"+other, tok)
	require.Equal(t, []string{other + " api://AzureADTokenExchange"}, f.w.jwts)
}

func TestCallerChecks(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t, func(c *identities.Config) { c.Processes = processes{err: workload.ErrProcessChanged} })
	_, err := f.r.Identity(ctx, caller(30), imds.Selector{})
	require.ErrorIs(t, err, imds.ErrForbidden, "a replaced process lends no selectors")

	f = newFixture(t, func(c *identities.Config) { c.Processes = processes{err: workload.ErrCredentialsChanged} })
	_, err = f.r.Identity(ctx, caller(30), imds.Selector{})
	require.ErrorIs(t, err, imds.ErrForbidden, "a process whose ids changed gets nothing")

	f = newFixture(t, func(c *identities.Config) { c.Attestor = attestor{err: errors.New("boom")} })
	_, err = f.r.Identity(ctx, caller(30), imds.Selector{})
	require.ErrorContains(t, err, "boom")

	f = newFixture(t, nil)
	_, err = f.r.Identity(ctx, imds.Caller{UID: 1000}, imds.Selector{})
	require.ErrorContains(t, err, "process is unknown")
	require.Zero(t, f.d.numCalls())
}

func TestDirectoryAnswersAreCached(t *testing.T) {
	f := newFixture(t, func(c *identities.Config) { c.TTL = 10 * time.Second })
	ctx := context.Background()
	for range 3 {
		_, err := f.r.Identity(ctx, caller(30), imds.Selector{})
		require.NoError(t, err)
	}
	require.Equal(t, 1, f.d.numCalls())

	// A caller with a known and an unknown ID asks only about the unknown one.
	_, err := f.r.Identity(ctx, caller(20), imds.Selector{})
	require.NoError(t, err)
	_, err = f.r.Identity(ctx, caller(10), imds.Selector{Kind: imds.SelectorClientID, Value: webUA.ClientId})
	require.NoError(t, err)
	require.Equal(t, [][]string{{other}, {batch, web}}, f.d.calls)

	// After the TTL the servers are asked again; a change is seen.
	f.d.mu.Lock()
	f.d.ids = []*ferrypb.AgentIdentity{webUA, webUA2, batchSA}
	f.d.mu.Unlock()
	f.advance(11 * time.Second)
	_, err = f.r.Identity(ctx, caller(30), imds.Selector{})
	require.ErrorIs(t, err, imds.ErrIdentityNotFound, "the credential was removed")

	// No identities is an answer kept only NegativeTTL (TTL/2 here): a new
	// credential shows up soon.
	f.d.mu.Lock()
	f.d.ids = []*ferrypb.AgentIdentity{webUA, webUA2, batchSA, otherUA}
	f.d.mu.Unlock()
	f.advance(4 * time.Second)
	_, err = f.r.Identity(ctx, caller(30), imds.Selector{})
	require.ErrorIs(t, err, imds.ErrIdentityNotFound, "still the cached answer")
	f.advance(2 * time.Second)
	_, err = f.r.Identity(ctx, caller(30), imds.Selector{})
	require.NoError(t, err)

	// Servers unreachable: the last answer serves until StaleTTL (10 × TTL).
	f.d.mu.Lock()
	f.d.err = errors.New("unavailable")
	f.d.mu.Unlock()
	f.advance(30 * time.Second)
	_, err = f.r.Identity(ctx, caller(20), imds.Selector{})
	require.NoError(t, err)
	f.advance(2 * time.Minute)
	_, err = f.r.Identity(ctx, caller(20), imds.Selector{})
	require.ErrorContains(t, err, "unavailable")
}

func TestConcurrentMissesShareACall(t *testing.T) {
	f := newFixture(t, nil)
	var wg sync.WaitGroup
	for range 16 {
		wg.Go(func() {
			_, err := f.r.Identity(context.Background(), caller(30), imds.Selector{})
			require.NoError(t, err)
		})
	}
	wg.Wait()
	require.Equal(t, 1, f.d.numCalls())
}

// peers reports every loopback socket as held by one process.
type peers struct {
	proc    peer.Process
	lookups atomic.Int32
}

func (p *peers) Lookup(local, remote netip.AddrPort) (peer.Socket, error) {
	p.lookups.Add(1)
	if !remote.Addr().IsLoopback() {
		return peer.Socket{}, peer.ErrNotFound
	}
	return peer.Socket{UID: p.proc.UID, Inode: uint64(remote.Port())}, nil
}

func (p *peers) FindProcess(uint64) (peer.Process, error) { return p.proc, nil }

func TestConnsFindTheCallingProcess(t *testing.T) {
	ps := &peers{proc: peer.Process{PID: 30, UID: 1000, GID: 1000, StartTime: 7}}
	conns := identities.NewConns(ps)
	f := newFixture(t, func(c *identities.Config) { c.Conns = conns })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// The endpoint knows only the socket's uid.
		uid, _ := strconv.Atoi(r.URL.Query().Get("uid"))
		id, err := f.r.Identity(r.Context(), imds.Caller{UID: uint32(uid), GID: imds.NoGID}, imds.Selector{})
		if err != nil {
			http.Error(w, err.Error(), http.StatusForbidden)
			return
		}
		_, _ = w.Write([]byte(id.ClientID))
	})}
	go func() { _ = srv.Serve(conns.Listen(ln)) }()
	t.Cleanup(func() { _ = srv.Close() })

	get := func(c *http.Client, uid int) (int, string) {
		resp, err := c.Get(fmt.Sprintf("http://%s/?uid=%d", ln.Addr(), uid))
		require.NoError(t, err)
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	c := &http.Client{Transport: &http.Transport{}}
	for range 3 {
		code, body := get(c, 1000)
		require.Equal(t, http.StatusOK, code, body)
		require.Equal(t, otherUA.ClientId, body, "pid 30's only identity")
	}
	require.EqualValues(t, 1, ps.lookups.Load(), "one lookup per connection, not per request")
	require.Equal(t, 1, conns.Len())

	code, body := get(c, 1001)
	require.Equal(t, http.StatusForbidden, code)
	require.Contains(t, body, "uid")

	c.CloseIdleConnections()
	require.Eventually(t, func() bool { return conns.Len() == 0 }, 5*time.Second, 10*time.Millisecond, "closed connections are forgotten")

	// A request that did not come through the tracked listener is refused.
	_, err = f.r.Identity(context.Background(), imds.Caller{UID: 1000}, imds.Selector{})
	require.ErrorIs(t, err, imds.ErrForbidden)
}

// countingAttestor is attestor, counting calls.
type countingAttestor struct {
	attestor
	n atomic.Int32
}

func (a *countingAttestor) Attest(ctx context.Context, pid int32) ([]*ferrypb.Selector, error) {
	a.n.Add(1)
	return a.attestor.Attest(ctx, pid)
}

// switchable is Processes whose answer the test changes.
type switchable struct {
	mu  sync.Mutex
	err error
}

func (p *switchable) Attest(ctx context.Context, proc peer.Process, want workload.Peer, attest workload.AttestFunc) ([]*ferrypb.Selector, error) {
	p.mu.Lock()
	err := p.err
	p.mu.Unlock()
	return processes{err: err}.Attest(ctx, proc, want, attest)
}
func (p *switchable) set(err error) { p.mu.Lock(); p.err = err; p.mu.Unlock() }

// revWorkloads is workloads with the cache's Revision.
type revWorkloads struct {
	*workloads
	rev atomic.Uint64
}

func (w *revWorkloads) Revision() uint64 { return w.rev.Load() }

// connPeers gives each client port its own process: the test binds a
// connection's port to a PID before its first request.
type connPeers struct {
	mu    sync.Mutex
	procs map[uint16]peer.Process
}

func (p *connPeers) Lookup(_, remote netip.AddrPort) (peer.Socket, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	pr, ok := p.procs[remote.Port()]
	if !ok {
		return peer.Socket{}, peer.ErrNotFound
	}
	return peer.Socket{UID: pr.UID, Inode: uint64(remote.Port())}, nil
}

func (p *connPeers) FindProcess(inode uint64) (peer.Process, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.procs[uint16(inode)], nil
}

// grantServer serves Resolver.Identity over real loopback connections
// tracked by conns: the caller is the connection's process (uid only, as the
// endpoint passes it), the selector ?client_id=.
func grantServer(t *testing.T, r *identities.Resolver, conns *identities.Conns) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		uid, _ := strconv.Atoi(req.URL.Query().Get("uid"))
		var sel imds.Selector
		if v := req.URL.Query().Get("client_id"); v != "" {
			sel = imds.Selector{Kind: imds.SelectorClientID, Value: v}
		}
		id, err := r.Identity(req.Context(), imds.Caller{UID: uint32(uid), GID: imds.NoGID}, sel)
		if err != nil {
			http.Error(w, err.Error(), http.StatusForbidden)
			return
		}
		_, _ = w.Write([]byte(id.ClientID))
	})}
	go func() { _ = srv.Serve(conns.Listen(ln)) }()
	t.Cleanup(func() { _ = srv.Close() })
	return ln.Addr().String()
}

// pinnedClient is an HTTP client with one keep-alive connection whose
// client port is bound to proc in ps before it is used.
func pinnedClient(ps *connPeers, proc peer.Process) *http.Client {
	d := &net.Dialer{}
	return &http.Client{Transport: &http.Transport{MaxConnsPerHost: 1, DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := d.DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		ps.mu.Lock()
		ps.procs[uint16(c.LocalAddr().(*net.TCPAddr).Port)] = proc
		ps.mu.Unlock()
		return c, nil
	}}}
}

func getIdentity(t *testing.T, c *http.Client, addr string, uid uint32, clientID string) (int, string) {
	t.Helper()
	resp, err := c.Get(fmt.Sprintf("http://%s/?uid=%d&client_id=%s", addr, uid, clientID))
	require.NoError(t, err)
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// A keep-alive connection is attested once per ReattestAfter; after that
// the process is checked again, and a process that has been replaced (its
// PID reused) gets nothing, however recent its connection's last grant.
func TestGrantsAreReattestedAfterTheBound(t *testing.T) {
	att := &countingAttestor{}
	procs := &switchable{}
	ps := &connPeers{procs: map[uint16]peer.Process{}}
	conns := identities.NewConns(ps)
	f := newFixture(t, func(c *identities.Config) {
		c.Attestor, c.Processes, c.Conns, c.ReattestAfter = att, procs, conns, 10*time.Second
	})
	addr := grantServer(t, f.r, conns)
	c := pinnedClient(ps, peer.Process{PID: 30, UID: 1000, GID: 1000, StartTime: 7})

	for range 5 {
		code, body := getIdentity(t, c, addr, 1000, "")
		require.Equal(t, http.StatusOK, code, body)
		require.Equal(t, otherUA.ClientId, body)
	}
	require.EqualValues(t, 1, att.n.Load(), "one attestation for five requests on one connection")

	f.advance(9 * time.Second)
	code, _ := getIdentity(t, c, addr, 1000, "")
	require.Equal(t, http.StatusOK, code)
	require.EqualValues(t, 1, att.n.Load())

	// Past the bound the process is attested and checked again; it has
	// been replaced by another process with its PID.
	procs.set(workload.ErrProcessChanged)
	f.advance(2 * time.Second)
	code, body := getIdentity(t, c, addr, 1000, "")
	require.Equal(t, http.StatusForbidden, code, body)
	require.EqualValues(t, 2, att.n.Load())
	// A refusal is not remembered, and does not restore the old grant.
	code, _ = getIdentity(t, c, addr, 1000, "")
	require.Equal(t, http.StatusForbidden, code)
	require.EqualValues(t, 3, att.n.Load())

	// A clock stepped back does not make an old grant current again.
	procs.set(nil)
	code, _ = getIdentity(t, c, addr, 1000, "")
	require.Equal(t, http.StatusOK, code)
	f.advance(-time.Hour)
	code, _ = getIdentity(t, c, addr, 1000, "")
	require.Equal(t, http.StatusOK, code)
	require.EqualValues(t, 5, att.n.Load())
}

// Grants belong to one connection, caller and selector: another connection
// (another process, another uid) or another selector is decided afresh, and
// never gets what was granted elsewhere.
func TestGrantsArePerConnectionCallerAndSelector(t *testing.T) {
	att := &countingAttestor{}
	ps := &connPeers{procs: map[uint16]peer.Process{}}
	conns := identities.NewConns(ps)
	f := newFixture(t, func(c *identities.Config) { c.Attestor, c.Conns = att, conns })
	addr := grantServer(t, f.r, conns)
	web := pinnedClient(ps, peer.Process{PID: 10, UID: 1000, GID: 1000, StartTime: 7})
	other := pinnedClient(ps, peer.Process{PID: 30, UID: 2000, GID: 2000, StartTime: 7})

	code, body := getIdentity(t, web, addr, 1000, webUA.ClientId)
	require.Equal(t, http.StatusOK, code, body)
	require.Equal(t, webUA.ClientId, body)

	// The other process asks for web's identity on its own connection.
	code, body = getIdentity(t, other, addr, 2000, webUA.ClientId)
	require.Equal(t, http.StatusForbidden, code, body)
	require.Contains(t, body, "identity not found")
	code, body = getIdentity(t, other, addr, 2000, "")
	require.Equal(t, http.StatusOK, code, body)
	require.Equal(t, otherUA.ClientId, body)

	// On web's connection, a caller of another uid (as the endpoint would
	// pass it) is not the caller the grant was made for.
	code, body = getIdentity(t, web, addr, 2000, webUA.ClientId)
	require.Equal(t, http.StatusForbidden, code, body)
	// Another selector on the same connection is decided afresh.
	n := att.n.Load()
	code, body = getIdentity(t, web, addr, 1000, webUA2.ClientId)
	require.Equal(t, http.StatusOK, code, body)
	require.Equal(t, webUA2.ClientId, body)
	require.Equal(t, n+1, att.n.Load())

	// A new connection of the same process starts unattested.
	web.CloseIdleConnections()
	n = att.n.Load()
	code, _ = getIdentity(t, web, addr, 1000, webUA.ClientId)
	require.Equal(t, http.StatusOK, code)
	require.Equal(t, n+1, att.n.Load())
}

// Any change to the agent's entries ends every grant: an entry removed is
// not served from a connection's memory.
func TestGrantsEndWhenEntriesChange(t *testing.T) {
	att := &countingAttestor{}
	ps := &connPeers{procs: map[uint16]peer.Process{}}
	conns := identities.NewConns(ps)
	var rw *revWorkloads
	f := newFixture(t, func(c *identities.Config) {
		rw = &revWorkloads{workloads: c.Workloads.(*workloads)}
		c.Attestor, c.Conns, c.Workloads = att, conns, rw
	})
	addr := grantServer(t, f.r, conns)
	c := pinnedClient(ps, peer.Process{PID: 30, UID: 1000, GID: 1000, StartTime: 7})
	code, _ := getIdentity(t, c, addr, 1000, "")
	require.Equal(t, http.StatusOK, code)
	code, _ = getIdentity(t, c, addr, 1000, "")
	require.Equal(t, http.StatusOK, code)
	require.EqualValues(t, 1, att.n.Load())

	rw.workloads.mu.Lock()
	delete(rw.workloads.byPID, "pid:30")
	rw.workloads.mu.Unlock()
	rw.rev.Add(1)
	code, body := getIdentity(t, c, addr, 1000, "")
	require.Equal(t, http.StatusForbidden, code, body)
	require.Contains(t, body, "identity not found")
}

// TestDirectoryAnswersEndWhenEntriesChange: an answer taken before the
// agent's entries changed is not used again, however fresh: disabling an
// entry's system-assigned identity changes the entry in the same command
// that deletes the identity, so the deleted identity must not be granted.
func TestDirectoryAnswersEndWhenEntriesChange(t *testing.T) {
	var rw *revWorkloads
	f := newFixture(t, func(c *identities.Config) {
		c.TTL = time.Hour
		rw = &revWorkloads{workloads: c.Workloads.(*workloads)}
		c.Workloads = rw
	})
	ctx := context.Background()
	_, err := f.r.Identity(ctx, caller(30), imds.Selector{})
	require.NoError(t, err)
	_, err = f.r.Identity(ctx, caller(30), imds.Selector{})
	require.NoError(t, err)
	require.Equal(t, 1, f.d.numCalls(), "unchanged entries: the answer is reused")

	f.d.mu.Lock()
	f.d.ids = nil
	f.d.mu.Unlock()
	rw.rev.Add(1)
	_, err = f.r.Identity(ctx, caller(30), imds.Selector{})
	require.ErrorIs(t, err, imds.ErrIdentityNotFound)
	require.Equal(t, 2, f.d.numCalls(), "changed entries: the servers are asked again")
}

// self is the agent itself: its SPIFFE ID, and the audiences of the JWT-SVIDs
// asked of it.
type self struct {
	mu   sync.Mutex
	id   string
	auds []string
}

func (s *self) SPIFFEID() string { s.mu.Lock(); defer s.mu.Unlock(); return s.id }

func (s *self) JWTSVID(_ context.Context, agentID string, aud []string) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if agentID != s.id {
		return "", fmt.Errorf("asked for %s, agent is %s", agentID, s.id)
	}
	s.auds = append(s.auds, aud...)
	return "agent-jwt-for-" + agentID, nil
}

const agentID = "spiffe://example.org/spire/agent/x509pop/node-1"

var (
	agentSA = &ferrypb.AgentIdentity{SpiffeId: agentID, ClientId: "11111111-aaaa-4000-8000-0000000000a1", ObjectId: "21111111-aaaa-4000-8000-0000000000a1", TenantId: "t-node", Kind: "system-assigned"}
	agentUA = &ferrypb.AgentIdentity{SpiffeId: agentID, ClientId: "11111111-aaaa-4000-8000-0000000000a2", ObjectId: "21111111-aaaa-4000-8000-0000000000a2", TenantId: "t-node", Kind: "user-assigned"}
)

func TestAgentIdentities(t *testing.T) {
	me := &self{id: agentID}
	f := newFixture(t, func(c *identities.Config) { c.Agent = me })
	f.d.ids = append(f.d.ids, agentSA, agentUA)
	ctx := context.Background()
	runSelections(t, f, []selectionCase{
		{"no entry: the agent's system-assigned", 50, imds.Selector{}, agentSA, nil},
		{"entries federated to nothing: the agent's", 40, imds.Selector{}, agentSA, nil},
		{"the caller's only identity before the agent's", 30, imds.Selector{}, otherUA, nil},
		{"the caller's system-assigned before the agent's", 20, imds.Selector{}, batchSA, nil},
		{"the caller's own stay ambiguous", 10, imds.Selector{}, nil, imds.ErrAmbiguousIdentity},
		{"the agent's user-assigned by client_id", 10, imds.Selector{Kind: imds.SelectorClientID, Value: agentUA.ClientId}, agentUA, nil},
		{"the agent's system-assigned by object_id", 30, imds.Selector{Kind: imds.SelectorObjectID, Value: agentSA.ObjectId}, agentSA, nil},
		{"the caller's own by client_id", 50, imds.Selector{Kind: imds.SelectorClientID, Value: otherUA.ClientId}, nil, imds.ErrIdentityNotFound},
	})

	// The assertion for an agent identity is the agent's own JWT-SVID, for
	// the exchange audience; a caller's is its entry's.
	id, err := f.r.Identity(ctx, caller(50), imds.Selector{})
	require.NoError(t, err)
	tok, err := f.r.Assertion(ctx, id)
	require.NoError(t, err)
	require.Equal(t, "agent-jwt-for-"+agentID, tok)
	require.Equal(t, []string{identities.Audience}, me.auds)
	id, err = f.r.Identity(ctx, caller(30), imds.Selector{})
	require.NoError(t, err)
	tok, err = f.r.Assertion(ctx, id)
	require.NoError(t, err)
	require.Equal(t, "jwt-for-"+other, tok)

	// The agent's ID is asked about with the caller's own, in one call, and
	// its answer cached like theirs.
	f.d.mu.Lock()
	calls := f.d.calls
	f.d.mu.Unlock()
	require.Equal(t, []string{agentID}, calls[0], "a caller without entries")
	require.Equal(t, []string{"spiffe://example.org/none"}, calls[1])

	// Before the agent is attested there is no agent identity; after it
	// attests anew under another ID, the old ID's identities are gone.
	me.mu.Lock()
	me.id = ""
	me.mu.Unlock()
	_, err = f.r.Identity(ctx, caller(50), imds.Selector{})
	require.ErrorIs(t, err, imds.ErrIdentityNotFound)
	me.mu.Lock()
	me.id = "spiffe://example.org/spire/agent/join_token/new"
	me.mu.Unlock()
	_, err = f.r.Identity(ctx, caller(50), imds.Selector{})
	require.ErrorIs(t, err, imds.ErrIdentityNotFound)
	_, err = f.r.Assertion(ctx, tokens.Identity{SPIFFEID: agentID})
	require.Error(t, err, "no assertion for an ID the agent no longer has")
}

func TestAgentIdentitiesOff(t *testing.T) {
	f := newFixture(t, nil)
	f.d.ids = append(f.d.ids, agentSA, agentUA)
	ctx := context.Background()
	_, err := f.r.Identity(ctx, caller(50), imds.Selector{})
	require.ErrorIs(t, err, imds.ErrIdentityNotFound)
	_, err = f.r.Identity(ctx, caller(30), imds.Selector{Kind: imds.SelectorClientID, Value: agentUA.ClientId})
	require.ErrorIs(t, err, imds.ErrIdentityNotFound)
	for _, c := range f.d.calls {
		require.NotContains(t, c, agentID)
	}
}
