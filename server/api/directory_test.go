package api_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/ferry-id/ferry/bridge/fic"
	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/api"
	"github.com/ferry-id/ferry/server/state"
)

// fakeCluster applies commands straight to a store, as a one-node raft would:
// encoded, one at a time, with rising indexes.
type fakeCluster struct {
	mu    sync.Mutex
	store *state.Store
	index uint64
}

func (c *fakeCluster) Apply(_ context.Context, cmd *ferrypb.Command) (*ferrypb.CommandResult, error) {
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

func (c *fakeCluster) VerifyRead(context.Context) error     { return nil }
func (c *fakeCluster) Join(context.Context, string) error   { return errors.New("not a cluster") }
func (c *fakeCluster) Remove(context.Context, string) error { return errors.New("not a cluster") }
func (c *fakeCluster) SnapshotSave(context.Context, io.Writer) error {
	return errors.New("not a cluster")
}
func (c *fakeCluster) Members(context.Context) (*ferrypb.ClusterListResponse, error) {
	return nil, errors.New("not a cluster")
}
func (c *fakeCluster) SnapshotRestore(context.Context, io.Reader) (uint64, error) {
	return 0, errors.New("not a cluster")
}

type env struct {
	store   *state.Store
	cluster *fakeCluster
	dir     *api.Directory
	client  ferrypb.DirectoryClient
	ctx     context.Context
}

// newEnv serves a Directory on a real unix socket and dials it.
func newEnv(t *testing.T, storeCfg state.Config, cfg api.DirectoryConfig) *env {
	t.Helper()
	store, err := state.New(storeCfg)
	require.NoError(t, err)
	fc := &fakeCluster{store: store}
	cfg.Cluster, cfg.Store = fc, store
	cfg.Logger = slog.New(slog.NewTextHandler(tlog{t}, nil))
	dir, err := api.NewDirectory(cfg)
	require.NoError(t, err)
	sock := filepath.Join(t.TempDir(), "admin.sock")
	lis, err := net.Listen("unix", sock)
	require.NoError(t, err)
	gs := grpc.NewServer()
	ferrypb.RegisterDirectoryServer(gs, dir)
	go func() { _ = gs.Serve(lis) }()
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(func() {
		cancel()
		conn.Close()
		gs.Stop()
	})
	return &env{store: store, cluster: fc, dir: dir, client: ferrypb.NewDirectoryClient(conn), ctx: ctx}
}

type tlog struct{ t *testing.T }

func (l tlog) Write(p []byte) (int, error) {
	l.t.Log(string(bytes.TrimRight(p, "\n")))
	return len(p), nil
}

func requireCode(t *testing.T, want codes.Code, err error, msgAndArgs ...any) {
	t.Helper()
	require.Error(t, err, msgAndArgs...)
	require.Equal(t, want, status.Code(err), append([]any{err.Error()}, msgAndArgs...)...)
}

func byName(name string) *ferrypb.IdentityRef { return &ferrypb.IdentityRef{Name: name} }

func TestDefaultTenant(t *testing.T) {
	e := newEnv(t, state.Config{}, api.DirectoryConfig{})
	_, err := e.client.GetIdentity(e.ctx, &ferrypb.GetIdentityRequest{Identity: byName("web")})
	requireCode(t, codes.NotFound, err, "no tenant yet")

	// Concurrent first uses create exactly one default tenant.
	var wg sync.WaitGroup
	errs := make([]error, 8)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[i] = e.client.CreateIdentity(e.ctx, &ferrypb.CreateIdentityRequest{Name: fmt.Sprint("web-", i)})
		}()
	}
	wg.Wait()
	for _, err := range errs {
		require.NoError(t, err)
	}
	ts, err := e.client.ListTenants(e.ctx, &ferrypb.ListTenantsRequest{})
	require.NoError(t, err)
	require.Len(t, ts.Tenants, 1)
	require.Equal(t, api.DefaultTenantName, ts.Tenants[0].Name)
	require.Equal(t, api.DefaultTenantID(""), ts.Tenants[0].Id, "the default tenant's ID is derived, so every creator names the same one")
	require.NotEqual(t, api.DefaultTenantID("example.org"), api.DefaultTenantID("other.example"))
	ids, err := e.client.ListIdentities(e.ctx, &ferrypb.ListIdentitiesRequest{TenantId: ts.Tenants[0].Id})
	require.NoError(t, err)
	require.Len(t, ids.Identities, 8)

	// With two tenants, a request must name one.
	other, err := e.client.CreateTenant(e.ctx, &ferrypb.CreateTenantRequest{Name: "fabrikam"})
	require.NoError(t, err)
	_, err = e.client.CreateIdentity(e.ctx, &ferrypb.CreateIdentityRequest{Name: "api"})
	requireCode(t, codes.InvalidArgument, err)
	_, err = e.client.GetIdentity(e.ctx, &ferrypb.GetIdentityRequest{Identity: byName("web-1")})
	requireCode(t, codes.InvalidArgument, err)
	in, err := e.client.CreateIdentity(e.ctx, &ferrypb.CreateIdentityRequest{Name: "web-1", TenantId: other.Id})
	require.NoError(t, err, "names are per tenant")
	got, err := e.client.GetIdentity(e.ctx, &ferrypb.GetIdentityRequest{Identity: &ferrypb.IdentityRef{Name: "WEB-1", TenantId: other.Id}})
	require.NoError(t, err)
	require.True(t, proto.Equal(in, got))
	_, err = e.client.CreateTenant(e.ctx, &ferrypb.CreateTenantRequest{Id: other.Id, Name: "again"})
	requireCode(t, codes.AlreadyExists, err)
	_, err = e.client.CreateTenant(e.ctx, &ferrypb.CreateTenantRequest{Id: "nope", Name: "x"})
	requireCode(t, codes.InvalidArgument, err)
}

func TestIdentitiesAndCredentials(t *testing.T) {
	e := newEnv(t, state.Config{}, api.DirectoryConfig{})
	web, err := e.client.CreateIdentity(e.ctx, &ferrypb.CreateIdentityRequest{Name: "web"})
	require.NoError(t, err)
	require.True(t, state.ValidGUID(web.ObjectId) && state.ValidGUID(web.ClientId))
	require.NotEqual(t, web.ObjectId, web.ClientId)
	require.Equal(t, state.KindUserAssigned, web.Kind)
	require.Equal(t, fmt.Sprintf("/subscriptions/%s/resourceGroups/ferry/providers/Microsoft.ManagedIdentity/userAssignedIdentities/web", web.TenantId), web.ResourceId)

	_, err = e.client.CreateIdentity(e.ctx, &ferrypb.CreateIdentityRequest{Name: "Web"})
	requireCode(t, codes.AlreadyExists, err)
	_, err = e.client.CreateIdentity(e.ctx, &ferrypb.CreateIdentityRequest{Name: "w"})
	requireCode(t, codes.InvalidArgument, err)
	_, err = e.client.CreateIdentity(e.ctx, &ferrypb.CreateIdentityRequest{Name: "sys", Kind: state.KindSystemAssigned, OwnerSpiffeId: "spiffe://example.org/w"})
	requireCode(t, codes.FailedPrecondition, err, "a system-assigned identity is enabled on its owner, not created")

	for _, ref := range []*ferrypb.IdentityRef{{ObjectId: web.ObjectId}, {ClientId: web.ClientId}, {Name: "web"}, {ObjectId: "{" + web.ObjectId + "}"}} {
		got, err := e.client.GetIdentity(e.ctx, &ferrypb.GetIdentityRequest{Identity: ref})
		require.NoError(t, err, ref)
		require.True(t, proto.Equal(web, got))
	}
	_, err = e.client.GetIdentity(e.ctx, &ferrypb.GetIdentityRequest{Identity: &ferrypb.IdentityRef{}})
	requireCode(t, codes.InvalidArgument, err)

	put := func(mode ferrypb.PutMode, name, subject string) (*ferrypb.FederatedCredential, error) {
		return e.client.PutFederatedCredential(e.ctx, &ferrypb.PutFederatedCredentialRequest{
			Identity: byName("web"), Mode: mode,
			Credential: &ferrypb.FederatedCredential{Name: name, Issuer: "https://oidc.example.org", Subject: subject},
		})
	}
	fc, err := put(ferrypb.PutMode_PUT_CREATE, "spiffe-web", "spiffe://example.org/web")
	require.NoError(t, err)
	require.Equal(t, web.ObjectId, fc.IdentityObjectId)
	require.Equal(t, []string{fic.DefaultAudience}, fc.Audiences)
	_, err = put(ferrypb.PutMode_PUT_CREATE, "spiffe-web", "spiffe://example.org/other")
	requireCode(t, codes.AlreadyExists, err)
	_, err = put(ferrypb.PutMode_PUT_CREATE, "dup", "spiffe://example.org/web")
	requireCode(t, codes.AlreadyExists, err, "issuer+subject is unique per identity")
	_, err = put(ferrypb.PutMode_PUT_UPDATE, "missing", "spiffe://example.org/x")
	requireCode(t, codes.NotFound, err)
	upd, err := put(ferrypb.PutMode_PUT_UPDATE, "spiffe-web", "spiffe://example.org/web/v2")
	require.NoError(t, err)
	require.Greater(t, upd.Revision, fc.Revision)
	_, err = put(ferrypb.PutMode_PUT_UPSERT, "upserted", "spiffe://example.org/u")
	require.NoError(t, err)
	for i := 2; i < fic.MaxPerIdentity; i++ {
		_, err = put(ferrypb.PutMode_PUT_CREATE, fmt.Sprint("fic-", i), fmt.Sprint("spiffe://example.org/", i))
		require.NoError(t, err)
	}
	_, err = put(ferrypb.PutMode_PUT_CREATE, "fic-21", "spiffe://example.org/21")
	requireCode(t, codes.FailedPrecondition, err)

	got, err := e.client.GetFederatedCredential(e.ctx, &ferrypb.GetFederatedCredentialRequest{Identity: byName("web"), Name: "spiffe-web"})
	require.NoError(t, err)
	require.Equal(t, "spiffe://example.org/web/v2", got.Subject)
	list, err := e.client.ListFederatedCredentials(e.ctx, &ferrypb.ListFederatedCredentialsRequest{Identity: &ferrypb.IdentityRef{ClientId: web.ClientId}})
	require.NoError(t, err)
	require.Len(t, list.Credentials, fic.MaxPerIdentity)
	_, err = e.client.DeleteFederatedCredential(e.ctx, &ferrypb.DeleteFederatedCredentialRequest{Identity: byName("web"), Name: "upserted"})
	require.NoError(t, err)
	_, err = e.client.DeleteFederatedCredential(e.ctx, &ferrypb.DeleteFederatedCredentialRequest{Identity: byName("web"), Name: "upserted"})
	requireCode(t, codes.NotFound, err)

	// Resources and roles.
	res, err := e.client.CreateResource(e.ctx, &ferrypb.CreateResourceRequest{
		Name: "orders", IdentifierUris: []string{"api://orders"},
		AppRoles: []*ferrypb.AppRole{{Value: "Orders.Read"}, {Value: "Orders.Write", DisplayName: "Write orders"}},
	})
	require.NoError(t, err)
	require.Len(t, res.AppRoles, 2)
	require.True(t, state.ValidGUID(res.AppRoles[0].Id))
	require.Equal(t, "Orders.Read", res.AppRoles[0].DisplayName)
	_, err = e.client.CreateResource(e.ctx, &ferrypb.CreateResourceRequest{Name: "orders2", IdentifierUris: []string{"api://orders"}})
	requireCode(t, codes.AlreadyExists, err)
	_, err = e.client.CreateResource(e.ctx, &ferrypb.CreateResourceRequest{Name: "bad", AppRoles: []*ferrypb.AppRole{{Value: "has space"}}})
	requireCode(t, codes.InvalidArgument, err)

	for _, ref := range []string{"api://orders", "orders", res.AppId, res.ObjectId} {
		_, err := e.client.AssignRole(e.ctx, &ferrypb.AssignRoleRequest{Principal: byName("web"), Resource: ref, Role: "Orders.Read"})
		if ref == "api://orders" {
			require.NoError(t, err)
		} else {
			requireCode(t, codes.AlreadyExists, err, "resource named by %s", ref)
		}
	}
	ra, err := e.client.AssignRole(e.ctx, &ferrypb.AssignRoleRequest{Principal: byName("web"), Resource: "orders", Role: res.AppRoles[1].Id})
	require.NoError(t, err)
	_, err = e.client.AssignRole(e.ctx, &ferrypb.AssignRoleRequest{Principal: byName("web"), Resource: "orders", Role: "Orders.Delete"})
	requireCode(t, codes.NotFound, err)
	_, err = e.client.AssignRole(e.ctx, &ferrypb.AssignRoleRequest{Principal: byName("web"), Resource: "api://nope", Role: "Orders.Read"})
	requireCode(t, codes.NotFound, err)
	ras, err := e.client.ListRoleAssignments(e.ctx, &ferrypb.ListRoleAssignmentsRequest{Resource: "api://orders"})
	require.NoError(t, err)
	require.Len(t, ras.Assignments, 2)
	_, err = e.client.DeleteRoleAssignment(e.ctx, &ferrypb.DeleteRoleAssignmentRequest{Id: ra.Id})
	require.NoError(t, err)
	ras, err = e.client.ListRoleAssignments(e.ctx, &ferrypb.ListRoleAssignmentsRequest{Principal: byName("web")})
	require.NoError(t, err)
	require.Len(t, ras.Assignments, 1)

	// Deleting the identity takes its credentials and assignments along.
	del, err := e.client.DeleteIdentity(e.ctx, &ferrypb.DeleteIdentityRequest{Identity: byName("web")})
	require.NoError(t, err)
	require.Equal(t, web.ObjectId, del.Identity.ObjectId)
	v := e.store.View()
	require.Empty(t, v.FederatedCredentials(web.ObjectId))
	require.Empty(t, v.RoleAssignments("", ""))
	_, err = e.client.DeleteIdentity(e.ctx, &ferrypb.DeleteIdentityRequest{Identity: byName("web")})
	requireCode(t, codes.NotFound, err)
}

func publicKey(t *testing.T, kid string) *ferrypb.SigningKey {
	t.Helper()
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	spki, err := x509.MarshalPKIXPublicKey(&priv.PublicKey)
	require.NoError(t, err)
	return &ferrypb.SigningKey{Kid: kid, Owner: "bridge-a", PublicKey: spki}
}

// watch opens a Watch stream; msgs delivers its messages.
func (e *env) watch(t *testing.T, since uint64) (msgs <-chan *ferrypb.WatchResponse, cancel func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(e.ctx)
	stream, err := e.client.Watch(ctx, &ferrypb.WatchRequest{SinceRevision: since})
	require.NoError(t, err)
	ch := make(chan *ferrypb.WatchResponse, 64)
	go func() {
		defer close(ch)
		for {
			m, err := stream.Recv()
			if err != nil {
				return
			}
			ch <- m
		}
	}()
	return ch, cancel
}

func next(t *testing.T, ch <-chan *ferrypb.WatchResponse) *ferrypb.WatchResponse {
	t.Helper()
	select {
	case m, ok := <-ch:
		require.True(t, ok, "stream ended")
		return m
	case <-time.After(10 * time.Second):
		t.Fatal("no watch message")
		return nil
	}
}

func TestWatch(t *testing.T) {
	// A replica ahead of the node is waited for as long as the test needs
	// (the case where the wait runs out is TestWatchFarAhead).
	e := newEnv(t, state.Config{}, api.DirectoryConfig{Issuers: map[string]string{"https://oidc.example.org": "example.org"}, ResumeWait: time.Hour})
	web, err := e.client.CreateIdentity(e.ctx, &ferrypb.CreateIdentityRequest{Name: "web"})
	require.NoError(t, err)
	_, err = e.client.PutFederatedCredential(e.ctx, &ferrypb.PutFederatedCredentialRequest{Identity: byName("web"),
		Credential: &ferrypb.FederatedCredential{Name: "one", Issuer: "https://oidc.example.org", Subject: "spiffe://example.org/web"}})
	require.NoError(t, err)
	_, err = e.client.PublishSigningKey(e.ctx, publicKey(t, "kid-a"))
	require.NoError(t, err)
	_, err = e.cluster.Apply(e.ctx, &ferrypb.Command{Op: &ferrypb.Command_BundleJwtAuthorityPut{BundleJwtAuthorityPut: &ferrypb.BundleJWTAuthorityPut{
		TrustDomain: "example.org", Authority: &ferrypb.JWTAuthority{KeyId: "jwt-1", PublicKey: publicKey(t, "x").PublicKey},
	}}})
	require.NoError(t, err)

	ch, stop := e.watch(t, 0)
	snap := next(t, ch)
	require.NotNil(t, snap.Snapshot)
	require.False(t, snap.More)
	require.Equal(t, e.store.AppliedIndex(), snap.Revision)
	require.Len(t, snap.Snapshot.Tenants, 1)
	require.Len(t, snap.Snapshot.Identities, 1)
	require.Len(t, snap.Snapshot.FederatedCredentials, 1)
	require.Len(t, snap.Snapshot.SigningKeys, 1)
	require.Len(t, snap.Snapshot.Bundles, 1)
	require.Equal(t, []*ferrypb.DirectoryIssuer{{Issuer: "https://oidc.example.org", TrustDomain: "example.org"}}, snap.Snapshot.Issuers)

	// Incremental (and nothing before it: the next message is this change):
	// an upsert, then a delete with its cascade in one message.
	api2, err := e.client.CreateIdentity(e.ctx, &ferrypb.CreateIdentityRequest{Name: "api"})
	require.NoError(t, err)
	m := next(t, ch)
	require.Nil(t, m.Snapshot)
	require.Len(t, m.Changes, 1)
	require.False(t, m.Changes[0].Deleted)
	require.True(t, proto.Equal(api2, m.Changes[0].GetIdentity()))
	require.Equal(t, api2.Revision, m.Revision)

	_, err = e.client.DeleteIdentity(e.ctx, &ferrypb.DeleteIdentityRequest{Identity: byName("web")})
	require.NoError(t, err)
	m = next(t, ch)
	require.Len(t, m.Changes, 2)
	for _, c := range m.Changes {
		require.True(t, c.Deleted)
	}
	require.Equal(t, "one", m.Changes[0].GetFederatedCredential().GetName())
	require.Equal(t, web.ObjectId, m.Changes[1].GetIdentity().GetObjectId())
	afterDelete := m.Revision
	require.Equal(t, e.store.AppliedIndex(), afterDelete)

	// Commands outside the directory do not reach the stream: the next
	// message is the directory change made after the entry.
	_, err = e.cluster.Apply(e.ctx, &ferrypb.Command{Op: &ferrypb.Command_EntriesCreate{EntriesCreate: &ferrypb.EntriesCreate{
		Entries: []*ferrypb.Entry{{Id: "e1", SpiffeId: "spiffe://example.org/w", ParentId: "spiffe://example.org/a", Selectors: []*ferrypb.Selector{{Type: "unix", Value: "uid:1"}}}},
	}}})
	require.NoError(t, err)
	_, err = e.client.RetireSigningKey(e.ctx, &ferrypb.RetireSigningKeyRequest{Kid: "kid-a"})
	require.NoError(t, err)
	m = next(t, ch)
	require.Len(t, m.Changes, 1, "only the directory change: %v", m)
	require.Equal(t, "kid-a", m.Changes[0].GetSigningKey().GetKid())
	afterRetire := m.Revision
	stop()

	// Resume: nothing new yields an empty message at the same revision...
	ch, stop = e.watch(t, afterRetire)
	m = next(t, ch)
	require.Nil(t, m.Snapshot)
	require.Empty(t, m.Changes)
	require.Equal(t, afterRetire, m.Revision)
	stop()
	// ...and a replica behind by some changes gets just those (not the
	// entry in between).
	ch, stop = e.watch(t, afterDelete)
	m = next(t, ch)
	require.Nil(t, m.Snapshot)
	require.Len(t, m.Changes, 1)
	require.True(t, m.Changes[0].Deleted)
	require.Equal(t, "kid-a", m.Changes[0].GetSigningKey().GetKid())
	stop()

	// A replica ahead of this node (a lagging follower) is resumed once the
	// node catches up: the watch waits for it (it has started waiting when
	// the node moves on).
	ahead := e.store.AppliedIndex() + 1
	waiting := make(chan uint64, 1)
	api.OnResumeWait(e.dir, func(rev uint64) { waiting <- rev })
	ch, stop = e.watch(t, ahead)
	require.Equal(t, ahead, <-waiting)
	_, err = e.client.CreateTenant(e.ctx, &ferrypb.CreateTenantRequest{Name: "fabrikam"})
	require.NoError(t, err)
	m = next(t, ch)
	require.Nil(t, m.Snapshot, "no snapshot older than the replica")
	require.Equal(t, ahead, m.Revision)
	stop()
}

// TestWatchFarAhead: a replica from another history (far ahead of anything
// the node will reach within ResumeWait) gets a full snapshot once the wait
// runs out.
func TestWatchFarAhead(t *testing.T) {
	e := newEnv(t, state.Config{}, api.DirectoryConfig{ResumeWait: 100 * time.Millisecond})
	_, err := e.client.CreateIdentity(e.ctx, &ferrypb.CreateIdentityRequest{Name: "web"})
	require.NoError(t, err)
	waiting := make(chan uint64, 1)
	api.OnResumeWait(e.dir, func(rev uint64) { waiting <- rev })
	far := e.store.AppliedIndex() + 100
	ch, stop := e.watch(t, far)
	defer stop()
	require.Equal(t, far, <-waiting, "the watch first waits for the node")
	m := next(t, ch)
	require.NotNil(t, m.Snapshot)
	require.Len(t, m.Snapshot.Identities, 1)
	require.Len(t, m.Snapshot.Tenants, 1)
	require.Equal(t, e.store.AppliedIndex(), m.Revision)
}

func TestWatchCompactionAndChunks(t *testing.T) {
	e := newEnv(t, state.Config{FeedWindow: 2}, api.DirectoryConfig{SnapshotRows: 2})
	for i := range 3 {
		_, err := e.client.CreateIdentity(e.ctx, &ferrypb.CreateIdentityRequest{Name: fmt.Sprint("id-", i)})
		require.NoError(t, err)
	}
	// Four rows (a tenant, three identities) in parts of two.
	ch, stop := e.watch(t, 0)
	defer stop()
	p1, p2 := next(t, ch), next(t, ch)
	require.True(t, p1.More)
	require.False(t, p2.More)
	require.Equal(t, p1.Revision, p2.Revision)
	require.Len(t, append(p1.Snapshot.Identities, p2.Snapshot.Identities...), 3)

	// A replica resuming from before the feed's window gets a snapshot.
	ch2, stop2 := e.watch(t, 1)
	defer stop2()
	m := next(t, ch2)
	require.NotNil(t, m.Snapshot)

	// Restoring the state from a snapshot resyncs every watcher.
	var buf bytes.Buffer
	require.NoError(t, e.store.WriteSnapshot(&buf))
	_, err := e.client.CreateIdentity(e.ctx, &ferrypb.CreateIdentityRequest{Name: "later"})
	require.NoError(t, err)
	m = next(t, ch)
	require.Equal(t, "later", m.Changes[0].GetIdentity().GetName())
	require.NoError(t, e.store.Restore(io.NopCloser(&buf)))
	p1, p2 = next(t, ch), next(t, ch)
	require.True(t, p1.More)
	require.NotNil(t, p2.Snapshot)
	var names []string
	for _, i := range append(p1.Snapshot.Identities, p2.Snapshot.Identities...) {
		names = append(names, i.Name)
	}
	require.ElementsMatch(t, []string{"id-0", "id-1", "id-2"}, names, "the restored state, without the later identity")
}
