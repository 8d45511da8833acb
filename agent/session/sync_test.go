package session

// White-box: the entry stream's catch-up rule needs a server that is behind,
// which a real cluster shows only in a narrow window (test/e2e
// TestAgentFailover provokes it).

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"

	"github.com/ferry-id/ferry/proto/ferrypb"
)

type recordingSink struct {
	full    [][]*ferrypb.Entry
	changes int
	bundles []*spiffebundle.Bundle
	taints  []taint
	calls   []string // "full", "change", "bundles" in call order
}

func (r *recordingSink) SetEntries(all []*ferrypb.Entry, _ uint64) {
	r.full = append(r.full, all)
	r.calls = append(r.calls, "full")
}
func (r *recordingSink) ApplyEntryChanges([]*ferrypb.Entry, []string, uint64) {
	r.changes++
	r.calls = append(r.calls, "change")
}
func (r *recordingSink) SetBundles(own *spiffebundle.Bundle, _ map[spiffeid.TrustDomain]*spiffebundle.Bundle) {
	r.bundles = append(r.bundles, own)
	r.calls = append(r.calls, "bundles")
}
func (r *recordingSink) TaintAuthorities(x509s []*x509.Certificate, kids []string) {
	r.taints = append(r.taints, taint{x509s, kids})
}

type taint struct {
	x509 []*x509.Certificate
	jwt  []string
}

// scriptedStream replays messages, then io.EOF.
type scriptedStream struct {
	grpc.ClientStream
	msgs []*ferrypb.SyncEntriesResponse
}

// Context carries no peer: the stream comes from no server.
func (s *scriptedStream) Context() context.Context { return context.Background() }

func (s *scriptedStream) Recv() (*ferrypb.SyncEntriesResponse, error) {
	if len(s.msgs) == 0 {
		return nil, io.EOF
	}
	m := s.msgs[0]
	s.msgs = s.msgs[1:]
	return m, nil
}

type scriptedClient struct {
	ferrypb.AgentClient
	msgs    []*ferrypb.SyncEntriesResponse
	witKeys [][]byte
}

func (c *scriptedClient) SyncEntries(context.Context, *ferrypb.SyncEntriesRequest, ...grpc.CallOption) (grpc.ServerStreamingClient[ferrypb.SyncEntriesResponse], error) {
	return &scriptedStream{msgs: c.msgs}, nil
}

func (c *scriptedClient) NewWITSVID(_ context.Context, req *ferrypb.NewWITSVIDRequest, _ ...grpc.CallOption) (*ferrypb.NewWITSVIDResponse, error) {
	c.witKeys = append(c.witKeys, req.PublicKey)
	return &ferrypb.NewWITSVIDResponse{Token: "tok-" + req.EntryId}, nil
}

func newScripted(t *testing.T, msgs ...*ferrypb.SyncEntriesResponse) (*Session, *recordingSink, *scriptedClient) {
	t.Helper()
	sink := &recordingSink{}
	cl := &scriptedClient{msgs: msgs}
	s := &Session{
		cfg:    Config{TrustDomain: spiffeid.RequireTrustDomainFromString("example.org"), DataDir: t.TempDir(), Sink: sink},
		log:    slog.New(slog.DiscardHandler),
		client: cl,
	}
	return s, sink, cl
}

func full(rev uint64, ids ...string) *ferrypb.SyncEntriesResponse {
	m := &ferrypb.SyncEntriesResponse{Full: true, Revision: rev}
	for _, id := range ids {
		m.Entries = append(m.Entries, &ferrypb.Entry{Id: id})
	}
	return m
}

func TestFullSetFromBehindServerIsRefused(t *testing.T) {
	s, sink, cl := newScripted(t, full(10, "a", "b"), &ferrypb.SyncEntriesResponse{Revision: 12, Entries: []*ferrypb.Entry{{Id: "c"}}})
	_, err := s.syncOnce(t.Context())
	require.ErrorIs(t, err, io.EOF)
	require.Len(t, sink.full, 1)
	assert.Equal(t, 1, sink.changes)
	assert.EqualValues(t, 12, s.revision)

	// A server that has not seen revision 12 yet: its full set would drop c.
	cl.msgs = []*ferrypb.SyncEntriesResponse{full(11, "a", "b")}
	got, err := s.syncOnce(t.Context())
	require.ErrorIs(t, err, errBehind)
	assert.False(t, got)
	assert.Len(t, sink.full, 1, "a stale full set must not reach the cache")

	// Caught up: taken.
	cl.msgs = []*ferrypb.SyncEntriesResponse{full(12, "a", "b", "c")}
	_, err = s.syncOnce(t.Context())
	require.ErrorIs(t, err, io.EOF)
	require.Len(t, sink.full, 2)
	assert.Len(t, sink.full[1], 3)
	assert.True(t, s.behindSince.IsZero())
}

func TestFullSetFromBehindServerTakenAfterMaxWait(t *testing.T) {
	s, sink, cl := newScripted(t, full(10, "a"))
	_, err := s.syncOnce(t.Context())
	require.ErrorIs(t, err, io.EOF)

	cl.msgs = []*ferrypb.SyncEntriesResponse{full(3)}
	_, err = s.syncOnce(t.Context())
	require.ErrorIs(t, err, errBehind)
	require.False(t, s.behindSince.IsZero())

	// The servers stay behind (e.g. restored from an older snapshot): after
	// maxBehindWait their state wins.
	s.behindSince = time.Now().Add(-maxBehindWait - time.Second)
	cl.msgs = []*ferrypb.SyncEntriesResponse{full(3)}
	_, err = s.syncOnce(t.Context())
	require.ErrorIs(t, err, io.EOF)
	require.Len(t, sink.full, 2)
	assert.Empty(t, sink.full[1])
	assert.EqualValues(t, 3, s.revision)
}

func TestBundlesCarryWITAuthorities(t *testing.T) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	der, err := x509.MarshalPKIXPublicKey(key.Public())
	require.NoError(t, err)
	msg := full(1)
	msg.Bundles = []*ferrypb.Bundle{{TrustDomain: "example.org", JwtAuthorities: []*ferrypb.JWTAuthority{{KeyId: "k1", PublicKey: der}}}}
	s, sink, _ := newScripted(t, msg)
	_, err = s.syncOnce(t.Context())
	require.ErrorIs(t, err, io.EOF)
	require.Len(t, sink.bundles, 1)
	wit, ok := sink.bundles[0].FindWITAuthority("k1")
	require.True(t, ok, "the JWT key signs WIT-SVIDs, so it is a WIT authority")
	assert.True(t, key.PublicKey.Equal(wit))
}

// ownBundle is a bundle of the agent's trust domain with one JWT key.
func ownBundle(t *testing.T) *ferrypb.Bundle {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	der, err := x509.MarshalPKIXPublicKey(key.Public())
	require.NoError(t, err)
	return &ferrypb.Bundle{TrustDomain: "example.org", JwtAuthorities: []*ferrypb.JWTAuthority{{KeyId: "k1", PublicKey: der}}}
}

// The cache learns a message's entries before its bundles: the first bundle
// lets it answer workloads, which must not be told they have no identity
// because their entries came a moment later.
func TestEntriesBeforeBundles(t *testing.T) {
	first := full(1, "a")
	first.Bundles = []*ferrypb.Bundle{ownBundle(t)}
	change := &ferrypb.SyncEntriesResponse{Revision: 2, Entries: []*ferrypb.Entry{{Id: "b"}}, Bundles: first.Bundles}
	s, sink, _ := newScripted(t, first, change)
	_, err := s.syncOnce(t.Context())
	require.ErrorIs(t, err, io.EOF)
	assert.Equal(t, []string{"full", "bundles", "change", "bundles"}, sink.calls)
}

// A full set in parts reaches the cache once, whole, after its last part;
// the changes that follow as they come.
func TestFullSetInParts(t *testing.T) {
	p1 := full(7, "a", "b")
	p1.Bundles = []*ferrypb.Bundle{ownBundle(t)}
	p1.More = true
	p2 := &ferrypb.SyncEntriesResponse{Revision: 7, Entries: []*ferrypb.Entry{{Id: "c"}}, More: true}
	p3 := &ferrypb.SyncEntriesResponse{Revision: 7, Entries: []*ferrypb.Entry{{Id: "d"}}, AgentIdentity: true}
	c1 := &ferrypb.SyncEntriesResponse{Revision: 8, Entries: []*ferrypb.Entry{{Id: "e"}}, More: true, AgentIdentity: true}
	c2 := &ferrypb.SyncEntriesResponse{Revision: 8, DeletedIds: []string{"a"}, AgentIdentity: true}
	s, sink, _ := newScripted(t, p1, p2, p3, c1, c2)
	_, err := s.syncOnce(t.Context())
	require.ErrorIs(t, err, io.EOF)
	assert.Equal(t, []string{"full", "bundles", "change", "change"}, sink.calls)
	require.Len(t, sink.full, 1)
	var got []string
	for _, e := range sink.full[0] {
		got = append(got, e.Id)
	}
	assert.Equal(t, []string{"a", "b", "c", "d"}, got)
	assert.True(t, s.agentIdentity, "the last part's agent identity holds")
	assert.EqualValues(t, 8, s.revision)
}

// A part that does not continue the full set under way ends the stream
// without applying anything of that set.
func TestFullSetPartsMismatch(t *testing.T) {
	for name, next := range map[string]*ferrypb.SyncEntriesResponse{
		"other revision": {Revision: 8, Entries: []*ferrypb.Entry{{Id: "c"}}},
		"another full":   full(7, "c"),
	} {
		t.Run(name, func(t *testing.T) {
			p1 := full(7, "a", "b")
			p1.More = true
			s, sink, _ := newScripted(t, p1, next)
			_, err := s.syncOnce(t.Context())
			require.Error(t, err)
			assert.NotErrorIs(t, err, io.EOF)
			assert.Empty(t, sink.calls)
		})
	}
}

func TestMintWITSVIDSendsPKIXKey(t *testing.T) {
	s, _, cl := newScripted(t)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tok, err := s.MintWITSVID(t.Context(), "e1", key.Public())
	require.NoError(t, err)
	assert.Equal(t, "tok-e1", tok)
	require.Len(t, cl.witKeys, 1)
	pub, err := x509.ParsePKIXPublicKey(cl.witKeys[0])
	require.NoError(t, err)
	assert.True(t, key.PublicKey.Equal(pub))

	_, err = s.MintWITSVID(t.Context(), "e1", crypto.PublicKey(struct{}{}))
	require.Error(t, err)
	assert.Len(t, cl.witKeys, 1, "an unusable key is not sent")
}
