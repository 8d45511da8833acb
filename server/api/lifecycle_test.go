package api_test

import (
	"context"
	"log/slog"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/api"
	"github.com/ferry-id/ferry/server/state"
)

const testJWTIssuer = "https://oidc.example.org"

type lifecycleEnv struct {
	*env
	admin ferrypb.AdminClient
}

// newLifecycleEnv serves Admin and Directory on one real unix socket, as the
// server does, over one store.
func newLifecycleEnv(t *testing.T, jwtIssuer string) *lifecycleEnv {
	t.Helper()
	store, err := state.New(state.Config{})
	require.NoError(t, err)
	fc := &fakeCluster{store: store}
	log := slog.New(slog.NewTextHandler(tlog{t}, nil))
	issuers := map[string]string{}
	if jwtIssuer != "" {
		issuers[jwtIssuer] = "example.org"
	}
	dir, err := api.NewDirectory(api.DirectoryConfig{Cluster: fc, Store: store, Logger: log, Issuers: issuers})
	require.NoError(t, err)
	adm, err := api.NewAdmin(api.Config{Cluster: fc, Store: store, Logger: log, JWTIssuer: jwtIssuer})
	require.NoError(t, err)
	sock := filepath.Join(t.TempDir(), "admin.sock")
	lis, err := net.Listen("unix", sock)
	require.NoError(t, err)
	gs := grpc.NewServer()
	ferrypb.RegisterDirectoryServer(gs, dir)
	ferrypb.RegisterAdminServer(gs, adm)
	go func() { _ = gs.Serve(lis) }()
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(func() {
		cancel()
		conn.Close()
		gs.Stop()
	})
	return &lifecycleEnv{
		env:   &env{store: store, cluster: fc, client: ferrypb.NewDirectoryClient(conn), ctx: ctx},
		admin: ferrypb.NewAdminClient(conn),
	}
}

func workload(id, spiffeID string, sys bool) *ferrypb.Entry {
	return &ferrypb.Entry{Id: id, SpiffeId: spiffeID, ParentId: "spiffe://example.org/spire/agent/n1",
		Selectors: []*ferrypb.Selector{{Type: "unix", Value: "uid:1000"}}, SystemAssignedIdentity: sys}
}

func workloadIDs(u *ferrypb.IdentityUsage) map[string]string {
	out := map[string]string{}
	for _, w := range u.Workloads {
		out[w.Entry.Id] = w.Credential
	}
	return out
}

// TestIdentityLifecycle drives both kinds of managed identity through the
// Admin and Directory services: a user-assigned identity pre-authorised
// before any workload exists and outliving them, and an entry's
// system-assigned identity created and deleted with it.
func TestIdentityLifecycle(t *testing.T) {
	e := newLifecycleEnv(t, testJWTIssuer)
	ctx := e.ctx

	// User-assigned, with a role before any workload exists.
	shared, err := e.client.CreateIdentity(ctx, &ferrypb.CreateIdentityRequest{Name: "shared"})
	require.NoError(t, err)
	_, err = e.client.PutFederatedCredential(ctx, &ferrypb.PutFederatedCredentialRequest{Identity: byName("shared"), Mode: ferrypb.PutMode_PUT_CREATE,
		Credential: &ferrypb.FederatedCredential{Name: "vm-cred", Issuer: testJWTIssuer, Subject: "spiffe://example.org/vm"}})
	require.NoError(t, err)
	_, err = e.client.PutFederatedCredential(ctx, &ferrypb.PutFederatedCredentialRequest{Identity: byName("shared"), Mode: ferrypb.PutMode_PUT_CREATE,
		Credential: &ferrypb.FederatedCredential{Name: "batch", Issuer: testJWTIssuer, ClaimsMatchingExpression: "claims['sub'] matches 'spiffe://example.org/batch/*'"}})
	require.NoError(t, err)
	_, err = e.client.PutFederatedCredential(ctx, &ferrypb.PutFederatedCredentialRequest{Identity: byName("shared"), Mode: ferrypb.PutMode_PUT_CREATE,
		Credential: &ferrypb.FederatedCredential{Name: "elsewhere", Issuer: "https://token.actions.githubusercontent.com", Subject: "spiffe://example.org/vm"}})
	require.NoError(t, err)
	_, err = e.client.CreateResource(ctx, &ferrypb.CreateResourceRequest{Name: "demo", IdentifierUris: []string{"api://demo"}, AppRoles: []*ferrypb.AppRole{{Value: "reader"}}})
	require.NoError(t, err)
	sharedRA, err := e.client.AssignRole(ctx, &ferrypb.AssignRoleRequest{Principal: byName("shared"), Resource: "api://demo", Role: "reader"})
	require.NoError(t, err)
	u, err := e.client.ShowIdentity(ctx, &ferrypb.ShowIdentityRequest{Identity: byName("shared")})
	require.NoError(t, err)
	require.Empty(t, u.Workloads, "no workload yet")
	require.Len(t, u.RoleAssignments, 1, "pre-authorised")
	require.Equal(t, "reader", u.RoleAssignments[0].Role)
	require.Equal(t, "demo", u.RoleAssignments[0].ResourceName)
	require.Equal(t, []string{"api://demo"}, u.RoleAssignments[0].ResourceIdentifierUris)

	// Workloads: a VM entry with a system-assigned identity, batch jobs, and
	// one nothing accepts.
	resp, err := e.admin.BatchCreateEntry(ctx, &ferrypb.BatchCreateEntryRequest{Entries: []*ferrypb.Entry{
		workload("vm-1", "spiffe://example.org/vm", true),
		workload("job-1", "spiffe://example.org/batch/1", false),
		workload("job-2", "spiffe://example.org/batch/2", false),
		workload("other", "spiffe://example.org/other", false),
		workload("bad.id", "spiffe://example.org/bad", true),
	}})
	require.NoError(t, err)
	for i, want := range []codes.Code{codes.OK, codes.OK, codes.OK, codes.OK, codes.InvalidArgument} {
		require.Equal(t, want, codes.Code(resp.Results[i].Code), resp.Results[i].Message)
	}
	require.Len(t, resp.Identities, 1)
	sys := resp.Identities[0]
	require.Equal(t, state.KindSystemAssigned, sys.Kind)
	require.Equal(t, "vm-1", sys.Name)
	require.Equal(t, state.EntryResourceID(shared.TenantId, "vm-1"), sys.ResourceId)

	u, err = e.client.ShowIdentity(ctx, &ferrypb.ShowIdentityRequest{Identity: byName("shared")})
	require.NoError(t, err)
	require.Equal(t, map[string]string{"vm-1": "vm-cred", "job-1": "batch", "job-2": "batch"}, workloadIDs(u),
		"the credential of another issuer accepts no local JWT-SVID")
	require.Contains(t, u.Workloads[0].Reason, "federated credential batch")
	require.Equal(t, "spiffe://example.org/spire/agent/n1", u.Workloads[0].Entry.ParentId)
	require.NotEmpty(t, u.Workloads[0].Entry.Selectors)

	u, err = e.client.ShowIdentity(ctx, &ferrypb.ShowIdentityRequest{Identity: &ferrypb.IdentityRef{ObjectId: sys.ObjectId}})
	require.NoError(t, err)
	require.Equal(t, "vm-1", u.OwnerEntry.GetId())
	require.Equal(t, map[string]string{"vm-1": state.SystemCredentialName}, workloadIDs(u))
	require.Contains(t, u.Workloads[0].Reason, "owner")
	require.Len(t, u.Credentials, 1)
	require.Equal(t, testJWTIssuer, u.Credentials[0].Issuer)
	require.Equal(t, "spiffe://example.org/vm", u.Credentials[0].Subject)

	// Not shareable, not deletable, not creatable by hand.
	_, err = e.client.PutFederatedCredential(ctx, &ferrypb.PutFederatedCredentialRequest{Identity: &ferrypb.IdentityRef{ObjectId: sys.ObjectId}, Mode: ferrypb.PutMode_PUT_CREATE,
		Credential: &ferrypb.FederatedCredential{Name: "share", Issuer: testJWTIssuer, Subject: "spiffe://example.org/other"}})
	requireCode(t, codes.FailedPrecondition, err)
	_, err = e.client.DeleteFederatedCredential(ctx, &ferrypb.DeleteFederatedCredentialRequest{Identity: &ferrypb.IdentityRef{ObjectId: sys.ObjectId}, Name: state.SystemCredentialName})
	requireCode(t, codes.FailedPrecondition, err)
	_, err = e.client.DeleteIdentity(ctx, &ferrypb.DeleteIdentityRequest{Identity: &ferrypb.IdentityRef{ObjectId: sys.ObjectId}})
	requireCode(t, codes.FailedPrecondition, err)
	sysRA, err := e.client.AssignRole(ctx, &ferrypb.AssignRoleRequest{Principal: &ferrypb.IdentityRef{ObjectId: sys.ObjectId}, Resource: "api://demo", Role: "reader"})
	require.NoError(t, err)

	// Deleting the entries (one batch) takes the system-assigned identity and
	// its role; the user-assigned identity keeps its credentials and role.
	del, err := e.admin.BatchDeleteEntry(ctx, &ferrypb.BatchDeleteEntryRequest{Ids: []string{"vm-1", "job-1", "job-2", "other"}})
	require.NoError(t, err)
	require.Len(t, del.Identities, 1)
	require.Equal(t, sys.ObjectId, del.Identities[0].ObjectId)
	v := e.store.View()
	require.Nil(t, v.Identity(sys.ObjectId))
	require.Nil(t, v.RoleAssignment(sysRA.Id))
	require.NotNil(t, v.RoleAssignment(sharedRA.Id))
	require.Len(t, v.FederatedCredentials(shared.ObjectId), 3)
	u, err = e.client.ShowIdentity(ctx, &ferrypb.ShowIdentityRequest{Identity: byName("shared")})
	require.NoError(t, err)
	require.Empty(t, u.Workloads)
	require.Len(t, u.RoleAssignments, 1)

	// Enabling on update, disabling on update.
	_, err = e.admin.BatchCreateEntry(ctx, &ferrypb.BatchCreateEntryRequest{Entries: []*ferrypb.Entry{workload("vm-1", "spiffe://example.org/vm", false)}})
	require.NoError(t, err)
	up, err := e.admin.BatchUpdateEntry(ctx, &ferrypb.BatchUpdateEntryRequest{Entries: []*ferrypb.Entry{workload("vm-1", "spiffe://example.org/vm", true)}})
	require.NoError(t, err)
	require.Equal(t, codes.OK, codes.Code(up.Results[0].Code), up.Results[0].Message)
	require.Len(t, up.Identities, 1)
	require.NotNil(t, e.store.View().SystemAssignedIdentity("vm-1", ""))
	up, err = e.admin.BatchUpdateEntry(ctx, &ferrypb.BatchUpdateEntryRequest{Entries: []*ferrypb.Entry{workload("vm-1", "spiffe://example.org/vm", false)}})
	require.NoError(t, err)
	require.Equal(t, codes.OK, codes.Code(up.Results[0].Code), up.Results[0].Message)
	require.Nil(t, e.store.View().SystemAssignedIdentity("vm-1", ""))
}

func TestAgentSystemAssignedIdentity(t *testing.T) {
	e := newLifecycleEnv(t, testJWTIssuer)
	ctx := e.ctx
	const agentID = "spiffe://example.org/spire/agent/n1"
	_, err := e.admin.SetAgentIdentity(ctx, &ferrypb.SetAgentIdentityRequest{SpiffeId: agentID, Enabled: true})
	requireCode(t, codes.NotFound, err)
	_, err = e.cluster.Apply(ctx, &ferrypb.Command{Op: &ferrypb.Command_NodePut{NodePut: &ferrypb.NodePut{Node: &ferrypb.AttestedNode{SpiffeId: agentID, AttestationType: "join_token"}}}})
	require.NoError(t, err)
	on, err := e.admin.SetAgentIdentity(ctx, &ferrypb.SetAgentIdentityRequest{SpiffeId: agentID, Enabled: true})
	require.NoError(t, err)
	require.True(t, on.Agent.SystemAssignedIdentity)
	require.Equal(t, agentID, on.Identity.OwnerSpiffeId)
	require.Equal(t, state.AgentIdentityName(agentID), on.Identity.Name)
	u, err := e.client.ShowIdentity(ctx, &ferrypb.ShowIdentityRequest{Identity: &ferrypb.IdentityRef{ObjectId: on.Identity.ObjectId}})
	require.NoError(t, err)
	require.Equal(t, agentID, u.OwnerAgent.GetSpiffeId())
	_, err = e.client.AssignRole(ctx, &ferrypb.AssignRoleRequest{Principal: &ferrypb.IdentityRef{ObjectId: on.Identity.ObjectId}, Resource: "api://x", Role: "r"})
	requireCode(t, codes.NotFound, err)

	off, err := e.admin.SetAgentIdentity(ctx, &ferrypb.SetAgentIdentityRequest{SpiffeId: agentID})
	require.NoError(t, err)
	require.False(t, off.Agent.SystemAssignedIdentity)
	require.Nil(t, e.store.View().Identity(on.Identity.ObjectId))
	on, err = e.admin.SetAgentIdentity(ctx, &ferrypb.SetAgentIdentityRequest{SpiffeId: agentID, Enabled: true})
	require.NoError(t, err)
	_, err = e.admin.EvictAgent(ctx, &ferrypb.EvictAgentRequest{SpiffeId: agentID})
	require.NoError(t, err)
	require.Nil(t, e.store.View().Identity(on.Identity.ObjectId), "evicting the agent deletes its identity")
}

func TestSystemAssignedNeedsIssuer(t *testing.T) {
	e := newLifecycleEnv(t, "")
	_, err := e.admin.BatchCreateEntry(e.ctx, &ferrypb.BatchCreateEntryRequest{Entries: []*ferrypb.Entry{workload("vm-1", "spiffe://example.org/vm", true)}})
	requireCode(t, codes.FailedPrecondition, err)
	require.Equal(t, 0, e.store.View().CountEntries())
}
