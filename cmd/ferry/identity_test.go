package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"

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
	c.index++
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

// directoryServer serves the Directory on a unix socket and returns its path.
func directoryServer(t *testing.T) (string, *state.Store) {
	t.Helper()
	store, err := state.New(state.Config{})
	require.NoError(t, err)
	svc, err := api.NewDirectory(api.DirectoryConfig{Cluster: &oneNode{store: store}, Store: store})
	require.NoError(t, err)
	sock := filepath.Join(t.TempDir(), "admin.sock")
	lis, err := net.Listen("unix", sock)
	require.NoError(t, err)
	gs := grpc.NewServer()
	ferrypb.RegisterDirectoryServer(gs, svc)
	go func() { _ = gs.Serve(lis) }()
	t.Cleanup(gs.Stop)
	return sock, store
}

// ferry runs the CLI in-process and returns what it printed.
func ferry(t *testing.T, sock string, args ...string) (string, error) {
	t.Helper()
	app := newApp()
	var out, errOut bytes.Buffer
	app.Writer, app.ErrWriter = &out, &errOut
	t.Setenv("FERRY_ADMIN_SOCKET", sock)
	err := app.Run(append([]string{"ferry"}, args...))
	return out.String(), err
}

func mustFerry(t *testing.T, sock string, args ...string) string {
	t.Helper()
	out, err := ferry(t, sock, args...)
	require.NoError(t, err, strings.Join(args, " "))
	return out
}

func TestDirectoryCommands(t *testing.T) {
	sock, store := directoryServer(t)

	// az-style flow: identity, federated credential, resource, role.
	var ident struct {
		ObjectID string `json:"object_id"`
		ClientID string `json:"client_id"`
		TenantID string `json:"tenant_id"`
		Name     string `json:"name"`
	}
	out := mustFerry(t, sock, "identity", "create", "--name", "web", "--output", "json")
	require.NoError(t, json.Unmarshal([]byte(out), &ident))
	require.Equal(t, "web", ident.Name)
	require.True(t, state.ValidGUID(ident.ClientID), out)

	out = mustFerry(t, sock, "identity", "federated-credential", "create",
		"--identity-name", "web", "--name", "spiffe-web",
		"--issuer", "https://oidc.example.org", "--subject", "spiffe://example.org/web", "--description", "the web tier")
	require.Contains(t, out, "spiffe://example.org/web")
	require.Contains(t, out, "api://AzureADTokenExchange", "the default audience")

	_, err := ferry(t, sock, "identity", "federated-credential", "create",
		"--identity-name", "web", "--name", "again", "--issuer", "https://oidc.example.org", "--subject", "spiffe://example.org/web")
	require.ErrorContains(t, err, "AlreadyExists")

	// update keeps what is not given.
	out = mustFerry(t, sock, "identity", "federated-credential", "update",
		"--identity-name", "web", "--name", "spiffe-web", "--subject", "spiffe://example.org/web/v2", "--output", "json")
	var fc struct {
		Subject     string   `json:"subject"`
		Issuer      string   `json:"issuer"`
		Description string   `json:"description"`
		Audiences   []string `json:"audiences"`
	}
	require.NoError(t, json.Unmarshal([]byte(out), &fc))
	require.Equal(t, "spiffe://example.org/web/v2", fc.Subject)
	require.Equal(t, "https://oidc.example.org", fc.Issuer)
	require.Equal(t, "the web tier", fc.Description)
	_, err = ferry(t, sock, "identity", "federated-credential", "update", "--identity-name", "web", "--name", "missing", "--subject", "x")
	require.ErrorContains(t, err, "NotFound")

	out = mustFerry(t, sock, "identity", "federated-credential", "list", "--identity-name", "web", "--output", "json")
	var fcs struct {
		Credentials []json.RawMessage `json:"credentials"`
	}
	require.NoError(t, json.Unmarshal([]byte(out), &fcs))
	require.Len(t, fcs.Credentials, 1)
	out = mustFerry(t, sock, "identity", "federated-credential", "show", "--identity-client-id", ident.ClientID, "--name", "spiffe-web")
	require.Contains(t, out, "spiffe://example.org/web/v2")

	out = mustFerry(t, sock, "resource", "create", "--name", "orders",
		"--identifier-uri", "api://orders", "--app-role", "Orders.Read", "--app-role", "Orders.Write")
	require.Contains(t, out, "api://orders")
	require.Contains(t, out, "Orders.Write")
	out = mustFerry(t, sock, "role", "assign", "--identity-name", "web", "--resource", "api://orders", "--role", "Orders.Read", "--output", "json")
	require.Contains(t, out, ident.ObjectID)
	_, err = ferry(t, sock, "role", "assign", "--identity-name", "web", "--resource", "api://orders", "--role", "Orders.Admin")
	require.ErrorContains(t, err, "NotFound")

	v := store.View()
	res := v.ResourceByIdentifier(ident.TenantID, "api://orders")
	require.NotNil(t, res)
	require.Len(t, v.RoleAssignments(res.ObjectId, ident.ObjectID), 1)

	out = mustFerry(t, sock, "identity", "list")
	require.Contains(t, out, ident.ClientID)
	out = mustFerry(t, sock, "identity", "show", "--name", "web")
	require.Contains(t, out, "Principal ID")
	require.Contains(t, out, ident.ObjectID)
	out = mustFerry(t, sock, "tenant", "list", "--output", "json")
	require.Contains(t, out, ident.TenantID)
	out = mustFerry(t, sock, "resource", "list", "--output", "json")
	require.Contains(t, out, res.AppId)
	out = mustFerry(t, sock, "role", "list", "--resource", "orders", "--output", "json")
	require.Contains(t, out, res.AppRoles[0].Id)

	// A second tenant: requests must now say which.
	mustFerry(t, sock, "tenant", "create", "--name", "fabrikam", "--tenant-id", "11111111-2222-3333-4444-555555555555")
	_, err = ferry(t, sock, "identity", "show", "--name", "web")
	require.ErrorContains(t, err, "InvalidArgument")
	mustFerry(t, sock, "identity", "show", "--name", "web", "--tenant", ident.TenantID)

	mustFerry(t, sock, "identity", "federated-credential", "delete", "--identity-object-id", ident.ObjectID, "--name", "spiffe-web")
	out = mustFerry(t, sock, "identity", "delete", "--object-id", ident.ObjectID)
	require.Contains(t, out, "Deleted identity web")
	require.Empty(t, store.View().RoleAssignments("", ""), "the identity's assignments went with it")

	_, err = ferry(t, sock, "identity", "show")
	require.ErrorContains(t, err, "--name, --object-id or --client-id is required")
	_, err = ferry(t, "/nonexistent/admin.sock", "identity", "list")
	require.ErrorContains(t, err, "is the server running")
}

// lifecycleServer serves Admin and Directory on one unix socket, as the
// server does, with a JWT issuer for system-assigned identities.
func lifecycleServer(t *testing.T) (string, *state.Store, *oneNode) {
	t.Helper()
	store, err := state.New(state.Config{})
	require.NoError(t, err)
	cl := &oneNode{store: store}
	const issuer = "https://oidc.example.org"
	dir, err := api.NewDirectory(api.DirectoryConfig{Cluster: cl, Store: store, Issuers: map[string]string{issuer: "example.org"}})
	require.NoError(t, err)
	adm, err := api.NewAdmin(api.Config{Cluster: cl, Store: store, JWTIssuer: issuer})
	require.NoError(t, err)
	sock := filepath.Join(t.TempDir(), "admin.sock")
	lis, err := net.Listen("unix", sock)
	require.NoError(t, err)
	gs := grpc.NewServer()
	ferrypb.RegisterDirectoryServer(gs, dir)
	ferrypb.RegisterAdminServer(gs, adm)
	go func() { _ = gs.Serve(lis) }()
	t.Cleanup(gs.Stop)
	return sock, store, cl
}

func TestSystemAssignedIdentityCommands(t *testing.T) {
	sock, store, cl := lifecycleServer(t)
	out := mustFerry(t, sock, "entry", "create", "--entry-id", "vm-web", "--spiffe-id", "spiffe://example.org/web",
		"--parent-id", "spiffe://example.org/spire/agent/n1", "--selector", "unix:uid:1000", "--system-assigned-identity")
	require.Contains(t, out, "System-assigned identity vm-web of entry vm-web")
	require.Contains(t, out, "System-assigned identity : enabled")
	idn := store.View().SystemAssignedIdentity("vm-web", "")
	require.NotNil(t, idn)

	mustFerry(t, sock, "resource", "create", "--name", "demo", "--identifier-uri", "api://demo", "--app-role", "reader")
	mustFerry(t, sock, "role", "assign", "--identity-object-id", idn.ObjectId, "--resource", "api://demo", "--role", "reader")
	out = mustFerry(t, sock, "identity", "show", "--name", "vm-web", "--output", "json")
	var u struct {
		Identity struct {
			Kind string `json:"kind"`
		} `json:"identity"`
		Workloads []struct {
			Entry struct {
				ID       string `json:"id"`
				SpiffeID string `json:"spiffe_id"`
				ParentID string `json:"parent_id"`
			} `json:"entry"`
			Credential string `json:"credential"`
			Reason     string `json:"reason"`
		} `json:"workloads"`
		RoleAssignments []struct {
			Role         string `json:"role"`
			ResourceName string `json:"resource_name"`
		} `json:"role_assignments"`
		OwnerEntry struct {
			ID string `json:"id"`
		} `json:"owner_entry"`
	}
	require.NoError(t, json.Unmarshal([]byte(out), &u), out)
	require.Equal(t, "system-assigned", u.Identity.Kind)
	require.Equal(t, "vm-web", u.OwnerEntry.ID)
	require.Len(t, u.Workloads, 1)
	require.Equal(t, "spiffe://example.org/web", u.Workloads[0].Entry.SpiffeID)
	require.Equal(t, "spiffe://example.org/spire/agent/n1", u.Workloads[0].Entry.ParentID)
	require.Equal(t, state.SystemCredentialName, u.Workloads[0].Credential)
	require.Len(t, u.RoleAssignments, 1)
	require.Equal(t, "reader", u.RoleAssignments[0].Role)
	out = mustFerry(t, sock, "identity", "show", "--name", "vm-web")
	for _, want := range []string{"Owner: registration entry vm-web", "Workloads that can use it (1)", "entry vm-web: spiffe://example.org/web", "role reader on demo (api://demo)"} {
		require.Contains(t, out, want)
	}

	_, err := ferry(t, sock, "identity", "federated-credential", "create", "--identity-name", "vm-web", "--name", "share",
		"--issuer", "https://oidc.example.org", "--subject", "spiffe://example.org/other")
	require.ErrorContains(t, err, "FailedPrecondition")
	_, err = ferry(t, sock, "identity", "create", "--name", "sys", "--kind", "system-assigned")
	require.ErrorContains(t, err, "a system-assigned identity is enabled on its owner, not created")

	// An update from flags keeps the identity unless told; =false deletes it.
	mustFerry(t, sock, "entry", "update", "--entry-id", "vm-web", "--spiffe-id", "spiffe://example.org/web",
		"--parent-id", "spiffe://example.org/spire/agent/n1", "--selector", "unix:uid:1001")
	require.Equal(t, idn.ObjectId, store.View().SystemAssignedIdentity("vm-web", "").GetObjectId())
	mustFerry(t, sock, "entry", "update", "--entry-id", "vm-web", "--spiffe-id", "spiffe://example.org/web",
		"--parent-id", "spiffe://example.org/spire/agent/n1", "--selector", "unix:uid:1001", "--system-assigned-identity=false")
	require.Nil(t, store.View().Identity(idn.ObjectId))
	require.Empty(t, store.View().RoleAssignments("", ""))
	mustFerry(t, sock, "entry", "update", "--entry-id", "vm-web", "--spiffe-id", "spiffe://example.org/web",
		"--parent-id", "spiffe://example.org/spire/agent/n1", "--selector", "unix:uid:1001", "--system-assigned-identity")
	idn = store.View().SystemAssignedIdentity("vm-web", "")
	require.NotNil(t, idn)
	mustFerry(t, sock, "entry", "delete", "--entry-id", "vm-web")
	require.Nil(t, store.View().Identity(idn.ObjectId))

	// Agents.
	const agentID = "spiffe://example.org/spire/agent/n1"
	_, err = cl.Apply(context.Background(), &ferrypb.Command{Op: &ferrypb.Command_NodePut{NodePut: &ferrypb.NodePut{Node: &ferrypb.AttestedNode{SpiffeId: agentID}}}})
	require.NoError(t, err)
	out = mustFerry(t, sock, "agent", "identity", "enable", agentID)
	require.Contains(t, out, "System-assigned identity example-org-spire-agent-n1 of agent "+agentID)
	require.Contains(t, mustFerry(t, sock, "agent", "show", "--spiffe-id", agentID), "System-assigned identity : enabled")
	out = mustFerry(t, sock, "agent", "identity", "disable", "--spiffe-id", agentID)
	require.Contains(t, out, "Deleted the system-assigned identity")
	_, err = ferry(t, sock, "agent", "identity", "enable")
	require.ErrorContains(t, err, "name the agent")
}
