package api

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"math/big"
	mrand "math/rand/v2"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/ferry-id/ferry/internal/cpuslots"
	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/ca"
	"github.com/ferry-id/ferry/server/state"
)

// storeCluster applies commands straight to a store, as one node would.
type storeCluster struct {
	mu    sync.Mutex
	store *state.Store
	index uint64
}

func (c *storeCluster) Apply(_ context.Context, cmd *ferrypb.Command) (*ferrypb.CommandResult, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	cmd.TimeUnixNano = time.Now().UnixNano()
	data, err := state.EncodeCommand(cmd)
	if err != nil {
		return nil, err
	}
	c.index = max(c.index, c.store.AppliedIndex()) + 1
	return c.store.Apply(&raft.Log{Index: c.index, Term: 1, Type: raft.LogCommand, Data: data}).(*ferrypb.CommandResult), nil
}

func (c *storeCluster) VerifyRead(context.Context) error { return nil }
func (c *storeCluster) Join(context.Context, string) error {
	return fmt.Errorf("not a cluster")
}
func (c *storeCluster) Members(context.Context) (*ferrypb.ClusterListResponse, error) {
	return nil, fmt.Errorf("not a cluster")
}
func (c *storeCluster) Remove(context.Context, string) error { return fmt.Errorf("not a cluster") }
func (c *storeCluster) SnapshotSave(context.Context, io.Writer) error {
	return fmt.Errorf("not a cluster")
}
func (c *storeCluster) SnapshotRestore(context.Context, io.Reader) (uint64, error) {
	return 0, fmt.Errorf("not a cluster")
}

// noSigner: the entry stream signs nothing.
type noSigner struct{}

func (noSigner) SignAgentX509SVID(crypto.PublicKey, spiffeid.ID, time.Duration) ([]*x509.Certificate, error) {
	return nil, fmt.Errorf("no signer")
}
func (noSigner) SignWorkloadX509SVIDs(context.Context, []ca.X509SVIDRequest) []ca.X509SVIDResult {
	return nil
}
func (noSigner) MintJWTSVID(spiffeid.ID, []string, time.Duration, map[string]any) (*ca.JWTSVID, error) {
	return nil, fmt.Errorf("no signer")
}

// recordedStream is a SyncEntries stream whose peer presents an agent
// certificate; it applies what it is sent as the agent does.
type recordedStream struct {
	grpc.ServerStream
	ctx context.Context

	mu      sync.Mutex
	held    map[string]uint64 // entry ID -> revision
	pending *ferrypb.SyncEntriesResponse
	msgs    int
}

func (s *recordedStream) Context() context.Context { return s.ctx }

func (s *recordedStream) Send(m *ferrypb.SyncEntriesResponse) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.msgs++
	if s.pending != nil {
		s.pending.Entries = append(s.pending.Entries, m.Entries...)
		if m.More {
			return nil
		}
		m, s.pending = s.pending, nil
	} else if m.Full && m.More {
		s.pending = proto.Clone(m).(*ferrypb.SyncEntriesResponse)
		return nil
	}
	if m.Full {
		s.held = map[string]uint64{}
	}
	for _, e := range m.Entries {
		s.held[e.Id] = e.Revision
	}
	for _, id := range m.DeletedIds {
		delete(s.held, id)
	}
	return nil
}

func (s *recordedStream) holds(want map[string]uint64) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.held) != len(want) {
		return fmt.Sprintf("holds %d entries, want %d", len(s.held), len(want))
	}
	for id, rev := range want {
		if s.held[id] != rev {
			return fmt.Sprintf("entry %s at revision %d, want %d", id, s.held[id], rev)
		}
	}
	return ""
}

func agentPeer(t *testing.T, id string, serial int64) context.Context {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	u, _ := url.Parse(id)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), URIs: []*url.URL{u}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	require.NoError(t, err)
	leaf, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	return peer.NewContext(context.Background(), &peer.Peer{AuthInfo: credentials.TLSInfo{State: tls.ConnectionState{
		PeerCertificates: []*x509.Certificate{leaf}, VerifiedChains: [][]*x509.Certificate{{leaf}}}}})
}

// TestSyncStreamsFollowRandomChanges drives random changes to entries (node
// aliases, nested entries, moves between parents, SPIFFE ID changes,
// deletes) and to the agents' node selectors through a real store, with a
// SyncEntries stream per agent, and checks after each round that every
// stream's agent holds exactly what View.AuthorizedEntries gives, at the
// same revisions. The hub wakes only the streams a change may concern and
// streams apply most changes one entry at a time: a missed wake-up or a
// wrong incremental decision leaves an agent with a stale set.
func TestSyncStreamsFollowRandomChanges(t *testing.T) {
	store, err := state.New(state.Config{})
	require.NoError(t, err)
	cl := &storeCluster{store: store}
	td := spiffeid.RequireTrustDomainFromString("example.org")
	a, err := NewAgent(AgentConfig{Cluster: cl, Store: store, Signer: noSigner{}, TrustDomain: td})
	require.NoError(t, err)
	server := a.serverID
	apply := func(cmd *ferrypb.Command) {
		res, err := cl.Apply(context.Background(), cmd)
		require.NoError(t, err)
		require.EqualValues(t, codes.OK, res.GetStatus().GetCode(), res.GetStatus().GetMessage())
	}
	rng := mrand.New(mrand.NewPCG(uint64(time.Now().UnixNano()), 18))
	kinds := []string{"a", "b", "c"}
	randSelectors := func() []*ferrypb.Selector {
		var out []*ferrypb.Selector
		for _, k := range kinds {
			if rng.IntN(2) == 0 {
				out = append(out, &ferrypb.Selector{Type: "t", Value: k})
			}
		}
		return out
	}
	const agents = 4
	agentID := func(i int) string { return fmt.Sprintf("spiffe://example.org/spire/agent/a%d", i) }
	putNode := func(i int) {
		apply(&ferrypb.Command{Op: &ferrypb.Command_NodePut{NodePut: &ferrypb.NodePut{Node: &ferrypb.AttestedNode{
			SpiffeId: agentID(i), AttestationType: "test", CertSerial: fmt.Sprint(100 + i), CertNotAfter: time.Now().Add(time.Hour).Unix(),
			Selectors: randSelectors()}}}})
	}
	for i := range agents {
		putNode(i)
	}
	spiffeIDs := func() string { return fmt.Sprintf("spiffe://example.org/w/%d", rng.IntN(8)) }
	parent := func() string {
		switch r := rng.IntN(10); {
		case r < 4:
			return agentID(rng.IntN(agents))
		case r < 6:
			return server
		default:
			return spiffeIDs()
		}
	}
	randEntry := func(id string) *ferrypb.Entry {
		e := &ferrypb.Entry{Id: id, SpiffeId: spiffeIDs(), ParentId: parent(), Selectors: randSelectors()}
		if len(e.Selectors) == 0 {
			e.Selectors = []*ferrypb.Selector{{Type: "t", Value: "a"}}
		}
		return e
	}
	for i := range 12 {
		apply(&ferrypb.Command{Op: &ferrypb.Command_EntriesCreate{EntriesCreate: &ferrypb.EntriesCreate{Entries: []*ferrypb.Entry{randEntry(fmt.Sprintf("e%02d", i))}}}})
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	streams := make([]*recordedStream, agents)
	var wg sync.WaitGroup
	for i := range agents {
		sctx := agentPeer(t, agentID(i), int64(100+i))
		s := &recordedStream{ctx: sctx}
		streams[i] = s
		sctx, stop := context.WithCancel(sctx)
		go func() { <-ctx.Done(); stop() }()
		s.ctx = sctx
		wg.Add(1)
		go func() { defer wg.Done(); _ = a.SyncEntries(&ferrypb.SyncEntriesRequest{}, s) }()
	}
	defer wg.Wait()
	defer cancel()

	check := func(round int) {
		t.Helper()
		for i, s := range streams {
			require.Eventually(t, func() bool {
				v := store.View()
				n := v.Node(agentID(i))
				want := map[string]uint64{}
				for _, e := range v.AuthorizedEntries(n.SpiffeId, server, n.Selectors) {
					want[e.Id] = e.Revision
				}
				return s.holds(want) == ""
			}, 30*time.Second, 5*time.Millisecond, "round %d, agent %d", round, i)
		}
	}
	check(0)
	// An entry the agent gets one change at a time, then an entry parented
	// on its SPIFFE ID: the stream must have registered on that ID.
	apply(&ferrypb.Command{Op: &ferrypb.Command_EntriesCreate{EntriesCreate: &ferrypb.EntriesCreate{Entries: []*ferrypb.Entry{
		{Id: "issuer", SpiffeId: "spiffe://example.org/issuer", ParentId: agentID(0), Selectors: []*ferrypb.Selector{{Type: "t", Value: "a"}}}}}}})
	check(0)
	apply(&ferrypb.Command{Op: &ferrypb.Command_EntriesCreate{EntriesCreate: &ferrypb.EntriesCreate{Entries: []*ferrypb.Entry{
		{Id: "nested", SpiffeId: "spiffe://example.org/nested", ParentId: "spiffe://example.org/issuer", Selectors: []*ferrypb.Selector{{Type: "t", Value: "a"}}}}}}})
	check(0)
	next := 12
	for round := 1; round <= 300; round++ {
		for range 1 + rng.IntN(3) {
			v := store.View()
			existing, _ := v.ListEntries(state.EntryFilter{}, "", 0)
			switch r := rng.IntN(10); {
			case r < 3 || len(existing) < 4:
				apply(&ferrypb.Command{Op: &ferrypb.Command_EntriesCreate{EntriesCreate: &ferrypb.EntriesCreate{Entries: []*ferrypb.Entry{randEntry(fmt.Sprintf("e%02d", next))}}}})
				next++
			case r < 7:
				old := existing[rng.IntN(len(existing))]
				upd := proto.Clone(old).(*ferrypb.Entry)
				switch rng.IntN(4) {
				case 0:
					upd.ParentId = parent()
				case 1:
					upd.SpiffeId = spiffeIDs()
				case 2:
					upd.Selectors = randSelectors()
					if len(upd.Selectors) == 0 {
						upd.Selectors = old.Selectors
					}
				default:
					upd.Hint = fmt.Sprint(round)
				}
				apply(&ferrypb.Command{Op: &ferrypb.Command_EntriesUpdate{EntriesUpdate: &ferrypb.EntriesUpdate{Entries: []*ferrypb.Entry{upd}}}})
			case r < 9:
				old := existing[rng.IntN(len(existing))]
				apply(&ferrypb.Command{Op: &ferrypb.Command_EntriesDelete{EntriesDelete: &ferrypb.EntriesDelete{Ids: []string{old.Id}}}})
			default:
				putNode(rng.IntN(agents))
			}
		}
		check(round)
	}
	// A renewal-style node change that keeps the selectors sends nothing.
	before := make([]int, agents)
	for i, s := range streams {
		s.mu.Lock()
		before[i] = s.msgs
		s.mu.Unlock()
	}
	n := store.View().Node(agentID(0))
	upd := proto.Clone(n).(*ferrypb.AttestedNode)
	upd.CertNotAfter++
	apply(&ferrypb.Command{Op: &ferrypb.Command_NodePut{NodePut: &ferrypb.NodePut{Node: upd}}})
	// An entry change after it is what a stream sends next.
	apply(&ferrypb.Command{Op: &ferrypb.Command_EntriesCreate{EntriesCreate: &ferrypb.EntriesCreate{Entries: []*ferrypb.Entry{
		{Id: "last", SpiffeId: "spiffe://example.org/last", ParentId: agentID(0), Selectors: []*ferrypb.Selector{{Type: "t", Value: "a"}}}}}}})
	check(301)
	streams[0].mu.Lock()
	require.Equal(t, before[0]+1, streams[0].msgs, "agent 0 was sent only the new entry")
	streams[0].mu.Unlock()
	for i, s := range streams[1:] {
		s.mu.Lock()
		require.Equal(t, before[i+1], s.msgs, "agent %d was sent nothing", i+1)
		s.mu.Unlock()
	}
}

// TestSyncStreamWaitsForWorkSlot: a stream computes its agent's whole set
// only holding one of the server's work slots, so a reconnect storm cannot
// put thousands of streams on the run queue at once.
func TestSyncStreamWaitsForWorkSlot(t *testing.T) {
	store, err := state.New(state.Config{})
	require.NoError(t, err)
	cl := &storeCluster{store: store}
	td := spiffeid.RequireTrustDomainFromString("example.org")
	work := cpuslots.New(1)
	a, err := NewAgent(AgentConfig{Cluster: cl, Store: store, Signer: noSigner{}, TrustDomain: td, Work: work})
	require.NoError(t, err)
	agent := "spiffe://example.org/spire/agent/a"
	for _, cmd := range []*ferrypb.Command{
		{Op: &ferrypb.Command_NodePut{NodePut: &ferrypb.NodePut{Node: &ferrypb.AttestedNode{
			SpiffeId: agent, AttestationType: "test", CertSerial: "7", CertNotAfter: time.Now().Add(time.Hour).Unix()}}}},
		{Op: &ferrypb.Command_EntriesCreate{EntriesCreate: &ferrypb.EntriesCreate{Entries: []*ferrypb.Entry{
			{Id: "w", SpiffeId: "spiffe://example.org/w", ParentId: agent, Selectors: []*ferrypb.Selector{{Type: "t", Value: "a"}}}}}}},
	} {
		res, err := cl.Apply(context.Background(), cmd)
		require.NoError(t, err)
		require.EqualValues(t, codes.OK, res.GetStatus().GetCode())
	}
	require.NoError(t, work.Acquire(context.Background()))
	ctx, cancel := context.WithCancel(agentPeer(t, agent, 7))
	defer cancel()
	s := &recordedStream{ctx: ctx}
	done := make(chan error, 1)
	go func() { done <- a.SyncEntries(&ferrypb.SyncEntriesRequest{}, s) }()
	require.Eventually(t, func() bool { return work.Waiting() == 1 }, 30*time.Second, time.Millisecond, "the stream never waited for the slot")
	s.mu.Lock()
	sent := s.msgs
	s.mu.Unlock()
	require.Zero(t, sent, "the stream sent before it had a slot")
	work.Release()
	require.Eventually(t, func() bool { return s.holds(map[string]uint64{"w": store.View().Entry("w").Revision}) == "" }, 30*time.Second, time.Millisecond)
	cancel()
	require.NoError(t, <-done)
}

// TestSigningWaitsForWorkSlot: an agent's CSR is parsed and signed only
// holding a work slot; a caller that gives up while waiting gets its
// context's status.
func TestSigningWaitsForWorkSlot(t *testing.T) {
	store, err := state.New(state.Config{})
	require.NoError(t, err)
	cl := &storeCluster{store: store}
	work := cpuslots.New(1)
	a, err := NewAgent(AgentConfig{Cluster: cl, Store: store, Signer: noSigner{}, TrustDomain: spiffeid.RequireTrustDomainFromString("example.org"), Work: work})
	require.NoError(t, err)
	agent := "spiffe://example.org/spire/agent/a"
	res, err := cl.Apply(context.Background(), &ferrypb.Command{Op: &ferrypb.Command_NodePut{NodePut: &ferrypb.NodePut{Node: &ferrypb.AttestedNode{
		SpiffeId: agent, AttestationType: "test", CertSerial: "7", CertNotAfter: time.Now().Add(time.Hour).Unix()}}}})
	require.NoError(t, err)
	require.EqualValues(t, codes.OK, res.GetStatus().GetCode())

	require.NoError(t, work.Acquire(context.Background()))
	ctx, cancel := context.WithCancel(agentPeer(t, agent, 7))
	defer cancel()
	done := make(chan error, 1)
	go func() {
		_, err := a.RenewAgent(ctx, &ferrypb.RenewAgentRequest{Csr: []byte("not a CSR")})
		done <- err
	}()
	require.Eventually(t, func() bool { return work.Waiting() == 1 }, 30*time.Second, time.Millisecond, "the renewal never waited for a work slot")
	work.Release()
	require.Equal(t, codes.InvalidArgument, status.Code(<-done), "the CSR is parsed once the slot is free")

	require.NoError(t, work.Acquire(context.Background()))
	go func() {
		_, err := a.RenewAgent(ctx, &ferrypb.RenewAgentRequest{Csr: []byte("not a CSR")})
		done <- err
	}()
	require.Eventually(t, func() bool { return work.Waiting() == 1 }, 30*time.Second, time.Millisecond)
	cancel()
	require.Equal(t, codes.Canceled, status.Code(<-done))
	work.Release()
}
