package api

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/ferry-id/ferry/bridge/fic"
	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/state"
)

// DefaultTenantName is the name of the tenant the Directory creates when an
// identity or resource is created before any tenant exists.
const DefaultTenantName = "default"

// DefaultTenantID is the GUID of the default tenant of trust domain td. It is
// derived, not drawn, so that every "create the default tenant if there is
// none", on any node, at any time, names the same tenant: the log applies the
// first as a create and answers the others with what exists.
func DefaultTenantID(td string) string {
	return uuid.NewSHA1(uuid.NameSpaceURL, []byte("spiffe://"+td+"/ferry/default-tenant")).String()
}

// DefaultResourceGroup is the resource group in the ARM-style resource ID an
// identity gets when none is given: /subscriptions/{tenant}/resourceGroups/ferry/...
const DefaultResourceGroup = state.ResourceGroup

// DirectoryConfig configures the Directory service.
type DirectoryConfig struct {
	Cluster Cluster
	Store   *state.Store
	Logger  *slog.Logger
	// TrustDomain names the default tenant (DefaultTenantID).
	TrustDomain spiffeid.TrustDomain
	// Issuers maps the OIDC issuer URL of each local trust domain (the `iss` of
	// its JWT-SVIDs) to the trust domain. Replicas receive it with every
	// snapshot, to resolve assertion keys from the replicated bundle.
	Issuers map[string]string
	// SnapshotRows is the most rows one Watch snapshot message carries; a bigger
	// snapshot is split. Default 1,000.
	SnapshotRows int
	// ChangesPerMessage is the most changes one Watch message carries (whole
	// commands are never split). Default 1,000.
	ChangesPerMessage int
	// ResumeWait is how long Watch waits for this node to reach a replica's
	// since_revision (a lagging follower, or a node replaying its log after a
	// restart) before it sends a full snapshot instead. Default 5 s.
	ResumeWait time.Duration
}

// Directory implements ferrypb.DirectoryServer: the operator's management of the
// bridge's data, and the stream bridge replicas follow.
//
// Tenants: a request that names no tenant uses the only one. When there is none,
// creating an identity or a resource first creates a tenant named
// DefaultTenantName with a new GUID, so a fresh cluster needs no tenant setup;
// with several tenants the caller must name one.
type Directory struct {
	ferrypb.UnimplementedDirectoryServer
	cfg DirectoryConfig
	log *slog.Logger

	// resumeWaiting, when set, is called as a Watch starts waiting for this
	// node to reach the replica's revision (tests use it to know it waits).
	resumeWaiting atomic.Pointer[func(rev uint64)]
}

var _ ferrypb.DirectoryServer = (*Directory)(nil)

// NewDirectory returns the Directory service.
func NewDirectory(cfg DirectoryConfig) (*Directory, error) {
	if cfg.Cluster == nil || cfg.Store == nil {
		return nil, errors.New("api: cluster and store are required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.SnapshotRows <= 0 {
		cfg.SnapshotRows = 1000
	}
	if cfg.ChangesPerMessage <= 0 {
		cfg.ChangesPerMessage = 1000
	}
	if cfg.ResumeWait <= 0 {
		cfg.ResumeWait = 5 * time.Second
	}
	return &Directory{cfg: cfg, log: cfg.Logger}, nil
}

// apply commits a command and waits until this node's state reflects it, so a
// read that follows on this node sees the write.
func (d *Directory) apply(ctx context.Context, requestID string, cmd *ferrypb.Command) (*ferrypb.CommandResult, error) {
	return applyAndWait(ctx, d.cfg.Cluster, d.cfg.Store, requestID, cmd)
}

// applyAndWait commits a command under a request ID (a new one when empty),
// waits until store reflects it, and turns a whole-command failure into a
// gRPC status.
func applyAndWait(ctx context.Context, cl Cluster, store *state.Store, requestID string, cmd *ferrypb.Command) (*ferrypb.CommandResult, error) {
	cmd.RequestId = requestID
	if cmd.RequestId == "" {
		cmd.RequestId = uuid.NewString()
	}
	res, err := cl.Apply(ctx, cmd)
	if err != nil {
		return nil, toStatus(err)
	}
	if err := store.WaitForIndex(ctx, res.Index); err != nil {
		return nil, toStatus(err)
	}
	if err := resultError(res); err != nil {
		return nil, err
	}
	return res, nil
}

// guidArg normalises a GUID given by a caller (any case, optional braces) to the
// canonical lower-case form, or "" when it is not a GUID.
func guidArg(s string) string {
	u, err := uuid.Parse(strings.TrimSpace(s))
	if err != nil {
		return ""
	}
	return u.String()
}

func (d *Directory) tenant(ctx context.Context, id string, create bool) (string, error) {
	return resolveTenant(ctx, d.cfg.Cluster, d.cfg.Store, d.log, d.cfg.TrustDomain, id, create)
}

// resolveTenant names the tenant a request means: the one given, else the
// only one; with create, a tenant named DefaultTenantName when there is none.
func resolveTenant(ctx context.Context, cl Cluster, store *state.Store, log *slog.Logger, td spiffeid.TrustDomain, id string, create bool) (string, error) {
	v := store.View()
	if id != "" {
		g := guidArg(id)
		if g == "" {
			return "", status.Errorf(codes.InvalidArgument, "tenant %q is not a GUID", id)
		}
		if v.Tenant(g) == nil {
			return "", status.Errorf(codes.NotFound, "tenant %s not found", g)
		}
		return g, nil
	}
	switch ts := v.Tenants(); {
	case len(ts) == 1:
		return ts[0].Id, nil
	case len(ts) > 1:
		return "", status.Errorf(codes.InvalidArgument, "there are %d tenants: name one", len(ts))
	case !create:
		return "", status.Error(codes.NotFound, "no tenant exists")
	}
	res, err := applyAndWait(ctx, cl, store, "", &ferrypb.Command{Op: &ferrypb.Command_TenantPut{TenantPut: &ferrypb.TenantPut{
		Tenant: &ferrypb.Tenant{Id: DefaultTenantID(td.Name()), Name: DefaultTenantName}, CreateOnly: true,
	}}})
	if err != nil {
		return "", err
	}
	if res.Tenant.GetRevision() == res.Index {
		log.Info("created the default tenant", "tenant", res.Tenant.GetId())
	}
	return res.Tenant.GetId(), nil
}

// identity resolves a reference: object ID, else client ID, else name in a tenant.
func (d *Directory) identity(ctx context.Context, ref *ferrypb.IdentityRef) (*ferrypb.Identity, error) {
	v := d.cfg.Store.View()
	var i *ferrypb.Identity
	var what string
	switch {
	case ref.GetObjectId() != "":
		what = "object ID " + ref.ObjectId
		i = v.Identity(guidArg(ref.ObjectId))
	case ref.GetClientId() != "":
		what = "client ID " + ref.ClientId
		i = v.IdentityByClientID(guidArg(ref.ClientId))
	case ref.GetName() != "":
		tenant, err := d.tenant(ctx, ref.TenantId, false)
		if err != nil {
			return nil, err
		}
		what = "name " + ref.Name
		i = v.IdentityByName(tenant, ref.Name)
	default:
		return nil, status.Error(codes.InvalidArgument, "identity: object ID, client ID or name is required")
	}
	if i == nil {
		return nil, status.Errorf(codes.NotFound, "no identity with %s", what)
	}
	if ref.GetTenantId() != "" && guidArg(ref.TenantId) != i.TenantId {
		return nil, status.Errorf(codes.NotFound, "no identity with %s in tenant %s", what, ref.TenantId)
	}
	return i, nil
}

// CreateTenant creates a tenant; the ID is a new GUID unless given.
func (d *Directory) CreateTenant(ctx context.Context, req *ferrypb.CreateTenantRequest) (*ferrypb.Tenant, error) {
	id := uuid.NewString()
	if req.Id != "" {
		if id = guidArg(req.Id); id == "" {
			return nil, status.Errorf(codes.InvalidArgument, "tenant id %q is not a GUID", req.Id)
		}
	}
	if req.Name == "" {
		return nil, status.Error(codes.InvalidArgument, "tenant name is required")
	}
	if d.cfg.Store.View().Tenant(id) != nil {
		return nil, status.Errorf(codes.AlreadyExists, "tenant %s already exists", id)
	}
	res, err := d.apply(ctx, "", &ferrypb.Command{Op: &ferrypb.Command_TenantPut{TenantPut: &ferrypb.TenantPut{Tenant: &ferrypb.Tenant{Id: id, Name: req.Name}}}})
	if err != nil {
		return nil, err
	}
	return res.Tenant, nil
}

func (d *Directory) ListTenants(context.Context, *ferrypb.ListTenantsRequest) (*ferrypb.ListTenantsResponse, error) {
	return &ferrypb.ListTenantsResponse{Tenants: d.cfg.Store.View().Tenants()}, nil
}

// ErrEnabledOnOwner refuses creating a system-assigned identity.
var ErrEnabledOnOwner = fmt.Errorf("a %s identity is enabled on its owner, not created: ferry entry create|update --system-assigned-identity, or ferry agent identity enable", state.KindSystemAssigned)

// CheckCreateIdentity checks the name and kind of an identity to create (""
// is user-assigned).
func CheckCreateIdentity(name, kind string) error {
	if !state.ValidIdentityName(name) {
		return fmt.Errorf("identity name %q must be %d-%d characters of A-Z, a-z, 0-9, '-' and '_', starting with a letter or digit", name, state.MinIdentityName, state.MaxIdentityName)
	}
	switch kind {
	case "", state.KindUserAssigned, state.KindApplication:
		return nil
	case state.KindSystemAssigned:
		return ErrEnabledOnOwner
	}
	return fmt.Errorf("identity kind %q: want %s or %s", kind, state.KindUserAssigned, state.KindApplication)
}

// CreateIdentity creates an identity with new object and client IDs.
func (d *Directory) CreateIdentity(ctx context.Context, req *ferrypb.CreateIdentityRequest) (*ferrypb.Identity, error) {
	if err := CheckCreateIdentity(req.Name, req.Kind); err != nil {
		if errors.Is(err, ErrEnabledOnOwner) {
			return nil, status.Error(codes.FailedPrecondition, err.Error())
		}
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if req.OwnerSpiffeId != "" || req.OwnerEntryId != "" {
		return nil, status.Error(codes.FailedPrecondition, ErrEnabledOnOwner.Error())
	}
	tenant, err := d.tenant(ctx, req.TenantId, true)
	if err != nil {
		return nil, err
	}
	in := &ferrypb.Identity{
		ObjectId:      uuid.NewString(),
		ClientId:      uuid.NewString(),
		Name:          req.Name,
		TenantId:      tenant,
		Kind:          req.Kind,
		ResourceId:    req.ResourceId,
		OwnerSpiffeId: req.OwnerSpiffeId,
		OwnerEntryId:  req.OwnerEntryId,
	}
	if in.Kind == "" {
		in.Kind = state.KindUserAssigned
	}
	if in.ResourceId == "" && in.Kind == state.KindUserAssigned {
		in.ResourceId = fmt.Sprintf("/subscriptions/%s/resourceGroups/%s/providers/Microsoft.ManagedIdentity/userAssignedIdentities/%s", tenant, DefaultResourceGroup, req.Name)
	}
	res, err := d.apply(ctx, req.RequestId, &ferrypb.Command{Op: &ferrypb.Command_IdentityPut{IdentityPut: &ferrypb.IdentityPut{Identity: in, CreateOnly: true}}})
	if err != nil {
		return nil, err
	}
	d.log.Info("identity created", "object_id", res.Identity.ObjectId, "name", res.Identity.Name, "tenant", tenant)
	return res.Identity, nil
}

func (d *Directory) GetIdentity(ctx context.Context, req *ferrypb.GetIdentityRequest) (*ferrypb.Identity, error) {
	return d.identity(ctx, req.Identity)
}

func (d *Directory) ListIdentities(_ context.Context, req *ferrypb.ListIdentitiesRequest) (*ferrypb.ListIdentitiesResponse, error) {
	tenant := ""
	if req.TenantId != "" {
		if tenant = guidArg(req.TenantId); tenant == "" {
			return nil, status.Errorf(codes.InvalidArgument, "tenant %q is not a GUID", req.TenantId)
		}
	}
	return &ferrypb.ListIdentitiesResponse{Identities: d.cfg.Store.View().Identities(tenant)}, nil
}

// DeleteIdentity deletes an identity with its credentials and role assignments.
func (d *Directory) DeleteIdentity(ctx context.Context, req *ferrypb.DeleteIdentityRequest) (*ferrypb.DeleteIdentityResponse, error) {
	i, err := d.identity(ctx, req.Identity)
	if err != nil {
		return nil, err
	}
	res, err := d.apply(ctx, "", &ferrypb.Command{Op: &ferrypb.Command_IdentityDelete{IdentityDelete: &ferrypb.IdentityDelete{ObjectId: i.ObjectId}}})
	if err != nil {
		return nil, err
	}
	d.log.Info("identity deleted", "object_id", i.ObjectId, "name", i.Name)
	return &ferrypb.DeleteIdentityResponse{Identity: res.Identity}, nil
}

// ShowIdentity tells who can use an identity and why: the registration
// entries whose SPIFFE IDs its federated credentials accept (for a JWT-SVID of
// the trust domain's issuer, with the credential's audience), each with the
// credential that accepts it, and for a system-assigned identity its owner;
// and the roles it holds. It is computed from this server's replica.
func (d *Directory) ShowIdentity(ctx context.Context, req *ferrypb.ShowIdentityRequest) (*ferrypb.IdentityUsage, error) {
	i, err := d.identity(ctx, req.Identity)
	if err != nil {
		return nil, err
	}
	v := d.cfg.Store.View()
	out := &ferrypb.IdentityUsage{Identity: i, Credentials: v.FederatedCredentials(i.ObjectId)}
	seen := map[string]bool{}
	add := func(e *ferrypb.Entry, credential, reason string) {
		if seen[e.Id] {
			return
		}
		seen[e.Id] = true
		out.Workloads = append(out.Workloads, &ferrypb.IdentityWorkload{Entry: e, Credential: credential, Reason: reason})
	}
	if i.Kind == state.KindSystemAssigned {
		if i.OwnerEntryId != "" {
			out.OwnerEntry = v.Entry(i.OwnerEntryId)
		} else {
			out.OwnerAgent = v.Node(i.OwnerSpiffeId)
		}
	}
	if e := out.OwnerEntry; e != nil {
		add(e, state.SystemCredentialName, fmt.Sprintf("owner: the system-assigned identity of entry %s", e.Id))
	}
	var all []*ferrypb.Entry // loaded once, for claims-matching expressions
	for _, fc := range out.Credentials {
		r, err := fic.Compile(fc)
		if err != nil {
			continue
		}
		td, local := d.cfg.Issuers[fc.Issuer]
		if !local && len(d.cfg.Issuers) > 0 {
			continue // not the issuer of any local trust domain's JWT-SVIDs
		}
		var candidates []*ferrypb.Entry
		if fc.Subject != "" {
			candidates, _ = v.ListEntries(state.EntryFilter{SpiffeID: fc.Subject}, "", 0)
		} else {
			if all == nil {
				all, _ = v.ListEntries(state.EntryFilter{}, "", 0)
			}
			candidates = all
		}
		for _, e := range candidates {
			if td != "" && !inTrustDomain(e.SpiffeId, td) || !ruleAccepts(r, e.SpiffeId, fc.Issuer) {
				continue
			}
			reason := fmt.Sprintf("federated credential %s accepts %s (issuer %s, audience %s)", fc.Name, e.SpiffeId, fc.Issuer, r.Audience)
			if i.Kind == state.KindSystemAssigned {
				// The token service accepts any JWT-SVID for the owner's
				// SPIFFE ID; agents offer the identity to the owner entry only.
				reason = fmt.Sprintf("holds the owner's SPIFFE ID %s: its JWT-SVIDs are accepted by the token service, but agents' managed-identity endpoints offer the identity only to entry %s", e.SpiffeId, i.OwnerEntryId)
			}
			add(e, fc.Name, reason)
		}
	}
	slices.SortFunc(out.Workloads, func(a, b *ferrypb.IdentityWorkload) int { return strings.Compare(a.Entry.Id, b.Entry.Id) })
	for _, ra := range v.RoleAssignments("", i.ObjectId) {
		ira := &ferrypb.IdentityRoleAssignment{Assignment: ra}
		if r := v.Resource(ra.ResourceObjectId); r != nil {
			ira.ResourceName, ira.ResourceAppId, ira.ResourceIdentifierUris = r.Name, r.AppId, r.IdentifierUris
			for _, ar := range r.AppRoles {
				if ar.Id == ra.AppRoleId {
					ira.Role = ar.Value
				}
			}
		}
		out.RoleAssignments = append(out.RoleAssignments, ira)
	}
	return out, nil
}

// inTrustDomain reports whether a SPIFFE ID is in trust domain td.
func inTrustDomain(id, td string) bool {
	rest, ok := strings.CutPrefix(id, "spiffe://"+td)
	return ok && (rest == "" || rest[0] == '/')
}

// PutFederatedCredential creates or updates a credential on an identity.
// PUT_UPDATE updates the credential as it is now (compare-and-set on its
// revision, unless the request carries one).
func (d *Directory) PutFederatedCredential(ctx context.Context, req *ferrypb.PutFederatedCredentialRequest) (*ferrypb.FederatedCredential, error) {
	if req.Credential == nil {
		return nil, status.Error(codes.InvalidArgument, "credential is required")
	}
	i, err := d.identity(ctx, req.Identity)
	if err != nil {
		return nil, err
	}
	fc := proto.Clone(req.Credential).(*ferrypb.FederatedCredential)
	fc.IdentityObjectId = i.ObjectId
	put := &ferrypb.FederatedCredentialPut{Credential: fc}
	switch req.Mode {
	case ferrypb.PutMode_PUT_CREATE:
		put.CreateOnly = true
		fc.Revision = 0
	case ferrypb.PutMode_PUT_UPDATE:
		old := d.cfg.Store.View().FederatedCredential(i.ObjectId, fc.Name)
		if old == nil {
			return nil, status.Errorf(codes.NotFound, "identity %s has no federated credential %q", i.Name, fc.Name)
		}
		if fc.Revision == 0 {
			fc.Revision = old.Revision
		}
	}
	res, err := d.apply(ctx, req.RequestId, &ferrypb.Command{Op: &ferrypb.Command_FederatedCredentialPut{FederatedCredentialPut: put}})
	if err != nil {
		return nil, err
	}
	d.log.Info("federated credential written", "identity", i.ObjectId, "name", fc.Name, "issuer", fc.Issuer)
	return res.FederatedCredential, nil
}

func (d *Directory) GetFederatedCredential(ctx context.Context, req *ferrypb.GetFederatedCredentialRequest) (*ferrypb.FederatedCredential, error) {
	i, err := d.identity(ctx, req.Identity)
	if err != nil {
		return nil, err
	}
	fc := d.cfg.Store.View().FederatedCredential(i.ObjectId, req.Name)
	if fc == nil {
		return nil, status.Errorf(codes.NotFound, "identity %s has no federated credential %q", i.Name, req.Name)
	}
	return fc, nil
}

func (d *Directory) ListFederatedCredentials(ctx context.Context, req *ferrypb.ListFederatedCredentialsRequest) (*ferrypb.ListFederatedCredentialsResponse, error) {
	i, err := d.identity(ctx, req.Identity)
	if err != nil {
		return nil, err
	}
	return &ferrypb.ListFederatedCredentialsResponse{Credentials: d.cfg.Store.View().FederatedCredentials(i.ObjectId)}, nil
}

func (d *Directory) DeleteFederatedCredential(ctx context.Context, req *ferrypb.DeleteFederatedCredentialRequest) (*ferrypb.DeleteFederatedCredentialResponse, error) {
	i, err := d.identity(ctx, req.Identity)
	if err != nil {
		return nil, err
	}
	if _, err := d.apply(ctx, "", &ferrypb.Command{Op: &ferrypb.Command_FederatedCredentialDelete{FederatedCredentialDelete: &ferrypb.FederatedCredentialDelete{IdentityObjectId: i.ObjectId, Name: req.Name}}}); err != nil {
		return nil, err
	}
	d.log.Info("federated credential deleted", "identity", i.ObjectId, "name", req.Name)
	return &ferrypb.DeleteFederatedCredentialResponse{}, nil
}

// CreateResource creates a resource (an API tokens are issued for). App roles
// without an ID get a new GUID; without a display name, their value.
func (d *Directory) CreateResource(ctx context.Context, req *ferrypb.CreateResourceRequest) (*ferrypb.Resource, error) {
	if req.Name == "" {
		return nil, status.Error(codes.InvalidArgument, "resource name is required")
	}
	tenant, err := d.tenant(ctx, req.TenantId, true)
	if err != nil {
		return nil, err
	}
	appID := uuid.NewString()
	if req.AppId != "" {
		if appID = guidArg(req.AppId); appID == "" {
			return nil, status.Errorf(codes.InvalidArgument, "app id %q is not a GUID", req.AppId)
		}
	}
	r := &ferrypb.Resource{ObjectId: uuid.NewString(), AppId: appID, Name: req.Name, TenantId: tenant, IdentifierUris: req.IdentifierUris}
	for _, ar := range req.AppRoles {
		ar = proto.Clone(ar).(*ferrypb.AppRole)
		if ar.Id == "" {
			ar.Id = uuid.NewString()
		} else if g := guidArg(ar.Id); g != "" {
			ar.Id = g
		}
		if ar.DisplayName == "" {
			ar.DisplayName = ar.Value
		}
		r.AppRoles = append(r.AppRoles, ar)
	}
	res, err := d.apply(ctx, req.RequestId, &ferrypb.Command{Op: &ferrypb.Command_ResourcePut{ResourcePut: &ferrypb.ResourcePut{Resource: r, CreateOnly: true}}})
	if err != nil {
		return nil, err
	}
	d.log.Info("resource created", "object_id", res.Resource.ObjectId, "name", r.Name, "tenant", tenant)
	return res.Resource, nil
}

func (d *Directory) ListResources(_ context.Context, req *ferrypb.ListResourcesRequest) (*ferrypb.ListResourcesResponse, error) {
	tenant := ""
	if req.TenantId != "" {
		if tenant = guidArg(req.TenantId); tenant == "" {
			return nil, status.Errorf(codes.InvalidArgument, "tenant %q is not a GUID", req.TenantId)
		}
	}
	return &ferrypb.ListResourcesResponse{Resources: d.cfg.Store.View().Resources(tenant)}, nil
}

// GetResource finds a resource by object ID, app ID, identifier URI or name.
func (d *Directory) GetResource(ctx context.Context, req *ferrypb.GetResourceRequest) (*ferrypb.Resource, error) {
	tenant, err := d.tenant(ctx, req.TenantId, false)
	if err != nil {
		return nil, err
	}
	return d.resource(d.cfg.Store.View(), tenant, req.Resource)
}

// DeleteResource deletes a resource with every role assignment of its app
// roles: tokens for it are no longer issued.
func (d *Directory) DeleteResource(ctx context.Context, req *ferrypb.DeleteResourceRequest) (*ferrypb.DeleteResourceResponse, error) {
	tenant, err := d.tenant(ctx, req.TenantId, false)
	if err != nil {
		return nil, err
	}
	r, err := d.resource(d.cfg.Store.View(), tenant, req.Resource)
	if err != nil {
		return nil, err
	}
	res, err := d.apply(ctx, req.RequestId, &ferrypb.Command{Op: &ferrypb.Command_ResourceDelete{ResourceDelete: &ferrypb.ResourceDelete{ObjectId: r.ObjectId}}})
	if err != nil {
		return nil, err
	}
	d.log.Info("resource deleted", "object_id", r.ObjectId, "name", r.Name, "tenant", tenant)
	return &ferrypb.DeleteResourceResponse{Resource: res.Resource}, nil
}

// resource finds a resource of the tenant by object ID, app ID, identifier URI
// or (unique) name.
func (d *Directory) resource(v *state.View, tenant, ref string) (*ferrypb.Resource, error) {
	if ref == "" {
		return nil, status.Error(codes.InvalidArgument, "resource is required")
	}
	if g := guidArg(ref); g != "" {
		if r := v.Resource(g); r != nil && r.TenantId == tenant {
			return r, nil
		}
		ref = g
	}
	if r := v.ResourceByIdentifier(tenant, ref); r != nil {
		return r, nil
	}
	var found *ferrypb.Resource
	for _, r := range v.Resources(tenant) {
		if r.Name == ref {
			if found != nil {
				return nil, status.Errorf(codes.InvalidArgument, "several resources are named %q: use an identifier URI or app ID", ref)
			}
			found = r
		}
	}
	if found == nil {
		return nil, status.Errorf(codes.NotFound, "no resource %q in tenant %s", ref, tenant)
	}
	return found, nil
}

// AssignRole grants an app role of a resource to an identity.
func (d *Directory) AssignRole(ctx context.Context, req *ferrypb.AssignRoleRequest) (*ferrypb.RoleAssignment, error) {
	i, err := d.identity(ctx, req.Principal)
	if err != nil {
		return nil, err
	}
	r, err := d.resource(d.cfg.Store.View(), i.TenantId, req.Resource)
	if err != nil {
		return nil, err
	}
	roleID := ""
	for _, ar := range r.AppRoles {
		if ar.Value == req.Role || ar.Id == guidArg(req.Role) {
			roleID = ar.Id
			break
		}
	}
	if roleID == "" {
		return nil, status.Errorf(codes.NotFound, "resource %s has no app role %q", r.Name, req.Role)
	}
	res, err := d.apply(ctx, req.RequestId, &ferrypb.Command{Op: &ferrypb.Command_RoleAssignmentPut{RoleAssignmentPut: &ferrypb.RoleAssignmentPut{
		Assignment: &ferrypb.RoleAssignment{Id: uuid.NewString(), ResourceObjectId: r.ObjectId, AppRoleId: roleID, PrincipalObjectId: i.ObjectId},
	}}})
	if err != nil {
		return nil, err
	}
	d.log.Info("app role assigned", "identity", i.ObjectId, "resource", r.ObjectId, "app_role", req.Role)
	return res.RoleAssignment, nil
}

func (d *Directory) ListRoleAssignments(ctx context.Context, req *ferrypb.ListRoleAssignmentsRequest) (*ferrypb.ListRoleAssignmentsResponse, error) {
	v := d.cfg.Store.View()
	var principal, resource string
	tenant := ""
	if req.Principal != nil && proto.Size(req.Principal) > 0 {
		i, err := d.identity(ctx, req.Principal)
		if err != nil {
			return nil, err
		}
		principal, tenant = i.ObjectId, i.TenantId
	}
	if req.Resource != "" {
		if tenant == "" {
			var err error
			if tenant, err = d.tenant(ctx, "", false); err != nil {
				return nil, err
			}
		}
		r, err := d.resource(v, tenant, req.Resource)
		if err != nil {
			return nil, err
		}
		resource = r.ObjectId
	}
	return &ferrypb.ListRoleAssignmentsResponse{Assignments: v.RoleAssignments(resource, principal)}, nil
}

func (d *Directory) DeleteRoleAssignment(ctx context.Context, req *ferrypb.DeleteRoleAssignmentRequest) (*ferrypb.DeleteRoleAssignmentResponse, error) {
	id := guidArg(req.Id)
	if id == "" {
		return nil, status.Errorf(codes.InvalidArgument, "role assignment id %q is not a GUID", req.Id)
	}
	if _, err := d.apply(ctx, "", &ferrypb.Command{Op: &ferrypb.Command_RoleAssignmentDelete{RoleAssignmentDelete: &ferrypb.RoleAssignmentDelete{Id: id}}}); err != nil {
		return nil, err
	}
	return &ferrypb.DeleteRoleAssignmentResponse{}, nil
}

// PublishSigningKey adds the public half of a bridge replica's key, or refreshes
// it. Publishing an unchanged key changes nothing.
func (d *Directory) PublishSigningKey(ctx context.Context, k *ferrypb.SigningKey) (*ferrypb.SigningKey, error) {
	res, err := d.apply(ctx, "", &ferrypb.Command{Op: &ferrypb.Command_SigningKeyPut{SigningKeyPut: &ferrypb.SigningKeyPut{Key: k}}})
	if err != nil {
		return nil, err
	}
	if res.SigningKey.GetRevision() == res.Index {
		d.log.Info("bridge signing key published", "kid", k.GetKid(), "owner", k.GetOwner())
	}
	return res.SigningKey, nil
}

func (d *Directory) RetireSigningKey(ctx context.Context, req *ferrypb.RetireSigningKeyRequest) (*ferrypb.RetireSigningKeyResponse, error) {
	if _, err := d.apply(ctx, "", &ferrypb.Command{Op: &ferrypb.Command_SigningKeyDelete{SigningKeyDelete: &ferrypb.SigningKeyDelete{Kid: req.Kid}}}); err != nil {
		return nil, err
	}
	d.log.Info("bridge signing key retired", "kid", req.Kid)
	return &ferrypb.RetireSigningKeyResponse{}, nil
}

// watchTables are what a bridge replica follows: the directory and the trust
// bundles (for the keys of local issuers).
var watchTables = append(append([]string{}, state.DirectoryTables...), state.TableBundles)

// Watch streams the directory to a bridge replica. A request that can be
// resumed (since_revision still covered by the change feed) gets the changes
// after it, or an empty message at since_revision when there are none yet;
// any other request gets a full snapshot first. Whenever the replica falls
// behind the feed's window, or the state is restored from a snapshot, it gets a
// new full snapshot.
func (d *Directory) Watch(req *ferrypb.WatchRequest, stream ferrypb.Directory_WatchServer) error {
	ctx := stream.Context()
	rev := req.SinceRevision
	resumed := false
	if rev != 0 && rev > d.cfg.Store.AppliedIndex() {
		// Sending a snapshot older than what the replica holds would take it
		// back in time (a deleted credential reappearing), so first give this
		// node a chance to catch up.
		wctx, cancel := context.WithTimeout(ctx, d.cfg.ResumeWait)
		if f := d.resumeWaiting.Load(); f != nil {
			(*f)(rev)
		}
		_ = d.cfg.Store.WaitForIndex(wctx, rev)
		cancel()
	}
	if rev != 0 {
		// A done context makes ChangesSince answer at once: the changes, or
		// ErrCompacted, or the context's error when there are none yet.
		probe, cancel := context.WithCancel(ctx)
		cancel()
		cs, err := d.cfg.Store.ChangesSince(probe, rev, watchTables...)
		switch {
		case err == nil:
			if rev, err = d.sendChanges(stream, cs); err != nil {
				return err
			}
			resumed = true
		case errors.Is(err, context.Canceled) && ctx.Err() == nil:
			if err := stream.Send(&ferrypb.WatchResponse{Revision: rev}); err != nil {
				return err
			}
			resumed = true
		case errors.Is(err, state.ErrCompacted):
		default:
			return toStatus(err)
		}
	}
	if !resumed {
		var err error
		if rev, err = d.sendSnapshot(stream); err != nil {
			return err
		}
	}
	for {
		cs, err := d.cfg.Store.ChangesSince(ctx, rev, watchTables...)
		switch {
		case errors.Is(err, state.ErrCompacted):
			d.log.Info("directory watcher fell behind; sending a full snapshot", "revision", rev)
			rev, err = d.sendSnapshot(stream)
		case err != nil:
			return toStatus(err)
		default:
			rev, err = d.sendChanges(stream, cs)
		}
		if err != nil {
			return err
		}
	}
}

// sendSnapshot sends the whole directory as of one view, in parts of at most
// SnapshotRows rows, and returns the view's index.
func (d *Directory) sendSnapshot(stream ferrypb.Directory_WatchServer) (uint64, error) {
	v := d.cfg.Store.View()
	snap := &ferrypb.DirectorySnapshot{}
	for iss, td := range d.cfg.Issuers {
		snap.Issuers = append(snap.Issuers, &ferrypb.DirectoryIssuer{Issuer: iss, TrustDomain: td})
	}
	slices.SortFunc(snap.Issuers, func(a, b *ferrypb.DirectoryIssuer) int { return strings.Compare(a.Issuer, b.Issuer) })
	var parts []*ferrypb.DirectorySnapshot
	n := 0
	add := func(fill func(s *ferrypb.DirectorySnapshot)) {
		if n == d.cfg.SnapshotRows {
			parts = append(parts, snap)
			snap, n = &ferrypb.DirectorySnapshot{}, 0
		}
		fill(snap)
		n++
	}
	for _, r := range v.Tenants() {
		add(func(s *ferrypb.DirectorySnapshot) { s.Tenants = append(s.Tenants, r) })
	}
	for _, r := range v.Identities("") {
		add(func(s *ferrypb.DirectorySnapshot) { s.Identities = append(s.Identities, r) })
	}
	for _, r := range v.AllFederatedCredentials() {
		add(func(s *ferrypb.DirectorySnapshot) { s.FederatedCredentials = append(s.FederatedCredentials, r) })
	}
	for _, r := range v.Resources("") {
		add(func(s *ferrypb.DirectorySnapshot) { s.Resources = append(s.Resources, r) })
	}
	for _, r := range v.RoleAssignments("", "") {
		add(func(s *ferrypb.DirectorySnapshot) { s.RoleAssignments = append(s.RoleAssignments, r) })
	}
	for _, r := range v.SigningKeys() {
		add(func(s *ferrypb.DirectorySnapshot) { s.SigningKeys = append(s.SigningKeys, r) })
	}
	for _, r := range v.Bundles() {
		add(func(s *ferrypb.DirectorySnapshot) { s.Bundles = append(s.Bundles, r) })
	}
	parts = append(parts, snap)
	for i, p := range parts {
		if err := stream.Send(&ferrypb.WatchResponse{Revision: v.Index(), Snapshot: p, More: i < len(parts)-1}); err != nil {
			return 0, err
		}
	}
	return v.Index(), nil
}

// sendChanges sends changes in messages of whole commands and returns the
// index of the last one.
func (d *Directory) sendChanges(stream ferrypb.Directory_WatchServer, cs []state.Change) (uint64, error) {
	msg := &ferrypb.WatchResponse{}
	for i, c := range cs {
		dc := directoryChange(c)
		if dc == nil {
			continue
		}
		msg.Changes = append(msg.Changes, dc)
		msg.Revision = c.Index
		lastOfCommand := i == len(cs)-1 || cs[i+1].Index != c.Index
		if lastOfCommand && (len(msg.Changes) >= d.cfg.ChangesPerMessage || i == len(cs)-1) {
			if err := stream.Send(msg); err != nil {
				return 0, err
			}
			msg = &ferrypb.WatchResponse{}
		}
	}
	if len(msg.Changes) > 0 {
		if err := stream.Send(msg); err != nil {
			return 0, err
		}
	}
	return cs[len(cs)-1].Index, nil
}

func directoryChange(c state.Change) *ferrypb.DirectoryChange {
	dc := &ferrypb.DirectoryChange{Deleted: c.Op == state.OpDelete}
	switch r := c.Row.(type) {
	case *ferrypb.Tenant:
		dc.Row = &ferrypb.DirectoryChange_Tenant{Tenant: r}
	case *ferrypb.Identity:
		dc.Row = &ferrypb.DirectoryChange_Identity{Identity: r}
	case *ferrypb.FederatedCredential:
		dc.Row = &ferrypb.DirectoryChange_FederatedCredential{FederatedCredential: r}
	case *ferrypb.Resource:
		dc.Row = &ferrypb.DirectoryChange_Resource{Resource: r}
	case *ferrypb.RoleAssignment:
		dc.Row = &ferrypb.DirectoryChange_RoleAssignment{RoleAssignment: r}
	case *ferrypb.SigningKey:
		dc.Row = &ferrypb.DirectoryChange_SigningKey{SigningKey: r}
	case *ferrypb.Bundle:
		dc.Row = &ferrypb.DirectoryChange_Bundle{Bundle: r}
	default:
		return nil
	}
	return dc
}
