package replica_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/ferry-id/ferry/bridge"
	"github.com/ferry-id/ferry/bridge/replica"
	"github.com/ferry-id/ferry/bridge/signing"
	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/api"
	"github.com/ferry-id/ferry/server/state"
)

// oneNode applies commands straight to a store, as a one-node raft would.
type oneNode struct {
	mu    sync.Mutex
	store *state.Store
	index uint64
}

func (c *oneNode) Apply(_ context.Context, cmd *ferrypb.Command) (*ferrypb.CommandResult, error) {
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

var errNotCluster = errors.New("not a cluster")

func (c *oneNode) VerifyRead(context.Context) error              { return nil }
func (c *oneNode) Join(context.Context, string) error            { return errNotCluster }
func (c *oneNode) Remove(context.Context, string) error          { return errNotCluster }
func (c *oneNode) SnapshotSave(context.Context, io.Writer) error { return errNotCluster }
func (c *oneNode) SnapshotRestore(context.Context, io.Reader) (uint64, error) {
	return 0, errNotCluster
}
func (c *oneNode) Members(context.Context) (*ferrypb.ClusterListResponse, error) {
	return nil, errNotCluster
}

type tlog struct{ t testing.TB }

func (l tlog) Write(p []byte) (int, error) {
	l.t.Log(string(bytes.TrimRight(p, "\n")))
	return len(p), nil
}

// server is a Directory service on a unix socket that can be stopped and
// started again at the same path.
type server struct {
	t     testing.TB
	sock  string
	store *state.Store
	node  *oneNode
	svc   *api.Directory
	admin ferrypb.DirectoryClient // for arranging rows
	mu    sync.Mutex
	gs    *grpc.Server
}

const localIssuer = "https://oidc.example.org"

func newServer(t testing.TB, storeCfg state.Config) *server {
	t.Helper()
	store, err := state.New(storeCfg)
	require.NoError(t, err)
	node := &oneNode{store: store}
	svc, err := api.NewDirectory(api.DirectoryConfig{Cluster: node, Store: store, Issuers: map[string]string{localIssuer: "example.org"}})
	require.NoError(t, err)
	s := &server{t: t, sock: filepath.Join(t.TempDir(), "admin.sock"), store: store, node: node, svc: svc}
	s.start()
	t.Cleanup(s.stop)
	s.admin = ferrypb.NewDirectoryClient(s.dial())
	return s
}

func (s *server) start() {
	s.t.Helper()
	lis, err := net.Listen("unix", s.sock)
	require.NoError(s.t, err)
	gs := grpc.NewServer()
	ferrypb.RegisterDirectoryServer(gs, s.svc)
	s.mu.Lock()
	s.gs = gs
	s.mu.Unlock()
	go func() { _ = gs.Serve(lis) }()
}

func (s *server) stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.gs.Stop()
}

func (s *server) dial() *grpc.ClientConn {
	s.t.Helper()
	// The channel's own reconnect backoff (1 s at first by default) would
	// dominate the reconnect tests.
	conn, err := grpc.NewClient("unix://"+s.sock, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoff.Config{BaseDelay: 10 * time.Millisecond, Multiplier: 1.6, MaxDelay: 100 * time.Millisecond}, MinConnectTimeout: time.Second}))
	require.NoError(s.t, err)
	s.t.Cleanup(func() { conn.Close() })
	return conn
}

// recorder remembers the revision each Watch resumes from.
type recorder struct {
	replica.Source
	mu    sync.Mutex
	since []uint64
}

func (r *recorder) Watch(ctx context.Context, in *ferrypb.WatchRequest, opts ...grpc.CallOption) (grpc.ServerStreamingClient[ferrypb.WatchResponse], error) {
	r.mu.Lock()
	r.since = append(r.since, in.SinceRevision)
	r.mu.Unlock()
	return r.Source.Watch(ctx, in, opts...)
}

func (r *recorder) watches() []uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]uint64(nil), r.since...)
}

// start runs a replica against s until the test ends.
func start(t testing.TB, s *server, key *ferrypb.SigningKey) (*replica.Replica, *recorder) {
	t.Helper()
	rec := &recorder{Source: ferrypb.NewDirectoryClient(s.dial())}
	rep, err := replica.New(replica.Config{
		Source:     rec,
		Key:        key,
		Issuers:    map[string]string{"https://oidc.other.example": "other.example"},
		Logger:     slog.New(slog.NewTextHandler(tlog{t}, nil)),
		MinBackoff: 10 * time.Millisecond,
		MaxBackoff: 50 * time.Millisecond,
	})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- rep.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		require.NoError(t, <-done)
	})
	select {
	case <-rep.Ready():
	case <-time.After(10 * time.Second):
		t.Fatal("replica never became ready")
	}
	return rep, rec
}

func publicKey(t testing.TB, kid string) *ferrypb.SigningKey {
	t.Helper()
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	spki, err := x509.MarshalPKIXPublicKey(&priv.PublicKey)
	require.NoError(t, err)
	return &ferrypb.SigningKey{Kid: kid, Owner: "bridge-" + kid, PublicKey: spki}
}

func eventually(t testing.TB, cond func() bool, msg string) {
	t.Helper()
	require.Eventually(t, cond, 10*time.Second, 5*time.Millisecond, msg)
}

// fixture fills the directory: identity web with one credential, resource
// orders with two roles (Read assigned to web), a JWT authority of the local
// trust domain and another replica's key.
type fixture struct {
	web *ferrypb.Identity
	res *ferrypb.Resource
}

func (s *server) fill(ctx context.Context) fixture {
	t := s.t
	web, err := s.admin.CreateIdentity(ctx, &ferrypb.CreateIdentityRequest{Name: "web"})
	require.NoError(t, err)
	_, err = s.admin.PutFederatedCredential(ctx, &ferrypb.PutFederatedCredentialRequest{Identity: &ferrypb.IdentityRef{Name: "web"},
		Credential: &ferrypb.FederatedCredential{Name: "spiffe", Issuer: localIssuer, Subject: "spiffe://example.org/web"}})
	require.NoError(t, err)
	res, err := s.admin.CreateResource(ctx, &ferrypb.CreateResourceRequest{Name: "orders", IdentifierUris: []string{"api://orders"},
		AppRoles: []*ferrypb.AppRole{{Value: "Orders.Read"}, {Value: "Orders.Write"}}})
	require.NoError(t, err)
	_, err = s.admin.AssignRole(ctx, &ferrypb.AssignRoleRequest{Principal: &ferrypb.IdentityRef{Name: "web"}, Resource: "api://orders", Role: "Orders.Read"})
	require.NoError(t, err)
	_, err = s.node.Apply(ctx, &ferrypb.Command{Op: &ferrypb.Command_BundleJwtAuthorityPut{BundleJwtAuthorityPut: &ferrypb.BundleJWTAuthorityPut{
		TrustDomain: "example.org", Authority: &ferrypb.JWTAuthority{KeyId: "jwt-1", PublicKey: publicKey(t, "x").PublicKey},
	}}})
	require.NoError(t, err)
	_, err = s.admin.PublishSigningKey(ctx, publicKey(t, "other"))
	require.NoError(t, err)
	return fixture{web: web, res: res}
}

func TestFollow(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	s := newServer(t, state.Config{})
	f := s.fill(ctx)
	own := publicKey(t, "own")
	rep, _ := start(t, s, own)

	// The snapshot.
	_, ok := rep.Tenant(f.web.TenantId)
	require.True(t, ok)
	_, ok = rep.Tenant("00000000-0000-0000-0000-000000000000")
	require.False(t, ok)
	got, ok := rep.IdentityByClientID(f.web.TenantId, f.web.ClientId)
	require.True(t, ok)
	require.Equal(t, f.web.ObjectId, got.ObjectId)
	_, ok = rep.IdentityByClientID("00000000-0000-0000-0000-000000000000", f.web.ClientId)
	require.False(t, ok, "a client ID is looked up within its tenant")
	require.Len(t, rep.FederatedCredentials(f.web.ObjectId), 1)
	for _, id := range []string{"api://orders", f.res.AppId} {
		r, ok := rep.ResourceByIdentifier(f.web.TenantId, id)
		require.True(t, ok, id)
		require.Equal(t, f.res.ObjectId, r.ObjectId)
	}
	ras := rep.RoleAssignments(f.res.ObjectId, f.web.ObjectId)
	require.Len(t, ras, 1)
	require.Equal(t, f.res.AppRoles[0].Id, ras[0].AppRoleId)
	li, ok := rep.LocalIssuer(localIssuer)
	require.True(t, ok, "issuers come from the server")
	require.Equal(t, "example.org", li.TrustDomain)
	require.Len(t, li.Authorities, 1)
	li, ok = rep.LocalIssuer("https://oidc.other.example")
	require.True(t, ok, "and from the replica's config")
	require.Empty(t, li.Authorities, "no bundle yet: no keys, and nothing fetched")
	_, ok = rep.LocalIssuer("https://token.actions.githubusercontent.com")
	require.False(t, ok)

	// The replica publishes its own key and then sees it come back.
	eventually(t, func() bool { return len(rep.SigningKeys()) == 2 }, "own key published")
	require.NotNil(t, s.store.View().SigningKeys())

	// Changes.
	_, err := s.admin.PutFederatedCredential(ctx, &ferrypb.PutFederatedCredentialRequest{Identity: &ferrypb.IdentityRef{Name: "web"},
		Credential: &ferrypb.FederatedCredential{Name: "second", Issuer: localIssuer, Subject: "spiffe://example.org/web2"}})
	require.NoError(t, err)
	eventually(t, func() bool { return len(rep.FederatedCredentials(f.web.ObjectId)) == 2 }, "new credential")
	_, err = s.admin.DeleteIdentity(ctx, &ferrypb.DeleteIdentityRequest{Identity: &ferrypb.IdentityRef{Name: "web"}})
	require.NoError(t, err)
	eventually(t, func() bool {
		_, ok := rep.IdentityByClientID(f.web.TenantId, f.web.ClientId)
		return !ok
	}, "identity deleted")
	require.Empty(t, rep.FederatedCredentials(f.web.ObjectId), "credentials went with it, in the same message")
	require.Empty(t, rep.RoleAssignments(f.res.ObjectId, f.web.ObjectId))
	require.Equal(t, s.store.AppliedIndex(), rep.Revision())
}

func TestReconnectResumes(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	s := newServer(t, state.Config{})
	f := s.fill(ctx)
	rep, rec := start(t, s, nil)
	before := rep.Revision()
	require.Equal(t, s.store.AppliedIndex(), before)

	s.stop()
	// While the server is away, lookups are still answered from memory.
	_, ok := rep.IdentityByClientID(f.web.TenantId, f.web.ClientId)
	require.True(t, ok)
	_, err := s.svc.CreateIdentity(ctx, &ferrypb.CreateIdentityRequest{Name: "api"})
	require.NoError(t, err)
	_, err = s.svc.DeleteFederatedCredential(ctx, &ferrypb.DeleteFederatedCredentialRequest{Identity: &ferrypb.IdentityRef{Name: "web"}, Name: "spiffe"})
	require.NoError(t, err)
	time.Sleep(30 * time.Millisecond) // let a reconnect attempt fail
	s.start()

	eventually(t, func() bool { return rep.Revision() == s.store.AppliedIndex() }, "caught up")
	require.Empty(t, rep.FederatedCredentials(f.web.ObjectId))
	api, err := s.svc.GetIdentity(ctx, &ferrypb.GetIdentityRequest{Identity: &ferrypb.IdentityRef{Name: "api"}})
	require.NoError(t, err)
	_, ok = rep.IdentityByClientID(api.TenantId, api.ClientId)
	require.True(t, ok)
	w := rec.watches()
	require.Equal(t, uint64(0), w[0])
	require.Equal(t, before, w[len(w)-1], "the replica resumed from its revision")
}

func TestResyncAfterCompaction(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	s := newServer(t, state.Config{FeedWindow: 2})
	f := s.fill(ctx)
	rep, rec := start(t, s, nil)
	before := rep.Revision()

	s.stop()
	_, err := s.svc.DeleteIdentity(ctx, &ferrypb.DeleteIdentityRequest{Identity: &ferrypb.IdentityRef{Name: "web"}})
	require.NoError(t, err)
	for i := range 3 {
		_, err := s.svc.CreateIdentity(ctx, &ferrypb.CreateIdentityRequest{Name: fmt.Sprint("id-", i)})
		require.NoError(t, err)
	}
	s.start()

	eventually(t, func() bool { return rep.Revision() == s.store.AppliedIndex() }, "resynced")
	_, ok := rep.IdentityByClientID(f.web.TenantId, f.web.ClientId)
	require.False(t, ok, "a delete the feed no longer holds is carried by the new snapshot")
	require.Empty(t, rep.FederatedCredentials(f.web.ObjectId))
	require.Len(t, s.store.View().Identities(""), 3)
	for _, i := range s.store.View().Identities("") {
		_, ok := rep.IdentityByClientID(i.TenantId, i.ClientId)
		require.True(t, ok, i.Name)
	}
	require.Equal(t, before, rec.watches()[len(rec.watches())-1])
}

func TestConcurrentReads(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	s := newServer(t, state.Config{})
	f := s.fill(ctx)
	rep, _ := start(t, s, nil)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				rep.Tenant(f.web.TenantId)
				rep.IdentityByClientID(f.web.TenantId, f.web.ClientId)
				rep.FederatedCredentials(f.web.ObjectId)
				rep.ResourceByIdentifier(f.web.TenantId, "api://orders")
				rep.RoleAssignments(f.res.ObjectId, f.web.ObjectId)
				rep.LocalIssuer(localIssuer)
				rep.SigningKeys()
			}
		}()
	}
	for i := range 20 {
		_, err := s.admin.PutFederatedCredential(ctx, &ferrypb.PutFederatedCredentialRequest{Identity: &ferrypb.IdentityRef{Name: "web"},
			Credential: &ferrypb.FederatedCredential{Name: "spiffe", Issuer: localIssuer, Subject: fmt.Sprint("spiffe://example.org/web/", i)}})
		require.NoError(t, err)
	}
	eventually(t, func() bool {
		fcs := rep.FederatedCredentials(f.web.ObjectId)
		return len(fcs) == 1 && fcs[0].Subject == "spiffe://example.org/web/19"
	}, "last update seen")
	close(stop)
	wg.Wait()
}

// TestBridgeJWKS runs a bridge on a replica: its JWKS lists its own key and the
// key another replica published.
func TestBridgeJWKS(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	s := newServer(t, state.Config{})
	f := s.fill(ctx)
	key, err := signing.Generate("bridge-a", time.Now(), 0)
	require.NoError(t, err)
	other, err := signing.Generate("bridge-b", time.Now(), 0)
	require.NoError(t, err)
	_, err = s.admin.PublishSigningKey(ctx, other.Public())
	require.NoError(t, err)
	rep, _ := start(t, s, key.Public())
	eventually(t, func() bool { return len(rep.SigningKeys()) == 3 }, "own key published")
	b, err := bridge.New(bridge.Config{Directory: rep, Key: key, BaseURL: "https://bridge.example"})
	require.NoError(t, err)

	rr := httptest.NewRecorder()
	b.Handler().ServeHTTP(rr, httptest.NewRequest(http.MethodGet, "/"+f.web.TenantId+"/discovery/v2.0/keys", nil))
	require.Equal(t, http.StatusOK, rr.Code, rr.Body.String())
	var jwks struct {
		Keys []struct{ Kid string } `json:"keys"`
	}
	require.NoError(t, json.Unmarshal(rr.Body.Bytes(), &jwks))
	// RSA keys only: the fixture's ECDSA key is not listed.
	var kids []string
	for _, k := range jwks.Keys {
		kids = append(kids, k.Kid)
	}
	require.ElementsMatch(t, []string{key.KID(), other.KID()}, kids)

	rr = httptest.NewRecorder()
	b.Handler().ServeHTTP(rr, httptest.NewRequest(http.MethodGet, "/00000000-0000-0000-0000-000000000000/v2.0/.well-known/openid-configuration", nil))
	require.Equal(t, http.StatusBadRequest, rr.Code, "an unknown tenant is refused")
}

// BenchmarkLookups measures what a token request asks of the directory, with
// readers on every core.
func BenchmarkLookups(b *testing.B) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	s := newServer(b, state.Config{})
	f := s.fill(ctx)
	for i := range 1000 {
		_, err := s.admin.CreateIdentity(ctx, &ferrypb.CreateIdentityRequest{Name: fmt.Sprint("id-", i)})
		require.NoError(b, err)
	}
	rep, _ := start(b, s, nil)
	eventually(b, func() bool { return rep.Revision() == s.store.AppliedIndex() }, "caught up")
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			rep.Tenant(f.web.TenantId)
			rep.IdentityByClientID(f.web.TenantId, f.web.ClientId)
			rep.FederatedCredentials(f.web.ObjectId)
			rep.ResourceByIdentifier(f.web.TenantId, "api://orders")
			rep.RoleAssignments(f.res.ObjectId, f.web.ObjectId)
			rep.LocalIssuer(localIssuer)
		}
	})
}
