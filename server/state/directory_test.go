package state_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"io"
	"math/big"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	"github.com/ferry-id/ferry/bridge/fic"
	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/state"
)

// guid returns a distinct canonical GUID per n.
func guid(n int) string { return fmt.Sprintf("00000000-0000-4000-8000-%012x", n) }

var (
	tenantA = guid(0xa)
	tenantB = guid(0xb)
)

func cmd(op any) *ferrypb.Command {
	c := &ferrypb.Command{}
	switch o := op.(type) {
	case *ferrypb.TenantPut:
		c.Op = &ferrypb.Command_TenantPut{TenantPut: o}
	case *ferrypb.TenantDelete:
		c.Op = &ferrypb.Command_TenantDelete{TenantDelete: o}
	case *ferrypb.IdentityPut:
		c.Op = &ferrypb.Command_IdentityPut{IdentityPut: o}
	case *ferrypb.IdentityDelete:
		c.Op = &ferrypb.Command_IdentityDelete{IdentityDelete: o}
	case *ferrypb.FederatedCredentialPut:
		c.Op = &ferrypb.Command_FederatedCredentialPut{FederatedCredentialPut: o}
	case *ferrypb.FederatedCredentialDelete:
		c.Op = &ferrypb.Command_FederatedCredentialDelete{FederatedCredentialDelete: o}
	case *ferrypb.ResourcePut:
		c.Op = &ferrypb.Command_ResourcePut{ResourcePut: o}
	case *ferrypb.ResourceDelete:
		c.Op = &ferrypb.Command_ResourceDelete{ResourceDelete: o}
	case *ferrypb.RoleAssignmentPut:
		c.Op = &ferrypb.Command_RoleAssignmentPut{RoleAssignmentPut: o}
	case *ferrypb.RoleAssignmentDelete:
		c.Op = &ferrypb.Command_RoleAssignmentDelete{RoleAssignmentDelete: o}
	case *ferrypb.SigningKeyPut:
		c.Op = &ferrypb.Command_SigningKeyPut{SigningKeyPut: o}
	case *ferrypb.SigningKeyDelete:
		c.Op = &ferrypb.Command_SigningKeyDelete{SigningKeyDelete: o}
	default:
		panic(fmt.Sprintf("no command for %T", op))
	}
	return c
}

// do applies a directory command and returns its whole-command status code.
func (h *harness) do(op any) (*ferrypb.CommandResult, codes.Code) {
	h.t.Helper()
	res := h.apply(cmd(op))
	return res, codeOf(res.Status)
}

// ok applies a command that must succeed.
func (h *harness) ok(op any) *ferrypb.CommandResult {
	h.t.Helper()
	res, code := h.do(op)
	require.Equal(h.t, codes.OK, code, res.GetStatus().GetMessage())
	return res
}

func ident(n int, tenant, name string) *ferrypb.Identity {
	return &ferrypb.Identity{ObjectId: guid(0x1000 + n), ClientId: guid(0x2000 + n), TenantId: tenant, Name: name, Kind: state.KindUserAssigned}
}

func cred(identity *ferrypb.Identity, name, subject string) *ferrypb.FederatedCredential {
	return &ferrypb.FederatedCredential{IdentityObjectId: identity.ObjectId, Name: name, Issuer: "https://issuer.example.org", Subject: subject}
}

func resource(n int, tenant string, uris []string, roles ...string) *ferrypb.Resource {
	r := &ferrypb.Resource{ObjectId: guid(0x3000 + n), AppId: guid(0x4000 + n), TenantId: tenant, Name: fmt.Sprint("api ", n), IdentifierUris: uris}
	for i, v := range roles {
		r.AppRoles = append(r.AppRoles, &ferrypb.AppRole{Id: guid(0x5000 + n*100 + i), Value: v})
	}
	return r
}

// directoryHarness has tenant A with identity "web" (1) and resource 1 with
// roles Read and Write, and tenant B with identity "dbsvc" (2).
func directoryHarness(t *testing.T, cfg state.Config) (*harness, *ferrypb.Identity, *ferrypb.Resource) {
	h := newHarness(t, cfg)
	h.ok(&ferrypb.TenantPut{Tenant: &ferrypb.Tenant{Id: tenantA, Name: "contoso"}})
	h.ok(&ferrypb.TenantPut{Tenant: &ferrypb.Tenant{Id: tenantB, Name: "fabrikam"}})
	web := h.ok(&ferrypb.IdentityPut{Identity: ident(1, tenantA, "web"), CreateOnly: true}).Identity
	h.ok(&ferrypb.IdentityPut{Identity: ident(2, tenantB, "dbsvc"), CreateOnly: true})
	res := h.ok(&ferrypb.ResourcePut{Resource: resource(1, tenantA, []string{"api://orders"}, "Orders.Read", "Orders.Write"), CreateOnly: true}).Resource
	return h, web, res
}

func TestGUIDs(t *testing.T) {
	for _, good := range []string{"00000000-0000-0000-0000-000000000000", "0f8fad5b-d9cb-469f-a165-70867728950e"} {
		require.True(t, state.ValidGUID(good), good)
	}
	for _, bad := range []string{
		"", "0F8FAD5B-D9CB-469F-A165-70867728950E", "{0f8fad5b-d9cb-469f-a165-70867728950e}",
		"0f8fad5bd9cb469fa16570867728950e", "0f8fad5b-d9cb-469f-a165-70867728950", "0f8fad5b-d9cb-469f-a165-70867728950g",
		"urn:uuid:0f8fad5b-d9cb-469f-a165-70867728950e", "0f8fad5b_d9cb-469f-a165-70867728950e",
	} {
		require.False(t, state.ValidGUID(bad), bad)
	}
}

func TestTenants(t *testing.T) {
	h := newHarness(t, state.Config{})
	for name, tn := range map[string]*ferrypb.Tenant{
		"upper-case id": {Id: strings.ToUpper(tenantA), Name: "x"},
		"not a guid":    {Id: "contoso.example", Name: "x"},
		"no name":       {Id: tenantA},
		"control char":  {Id: tenantA, Name: "a\nb"},
	} {
		_, code := h.do(&ferrypb.TenantPut{Tenant: tn})
		require.Equal(t, codes.InvalidArgument, code, name)
	}
	first := h.ok(&ferrypb.TenantPut{Tenant: &ferrypb.Tenant{Id: tenantA, Name: "contoso"}}).Tenant
	again := h.ok(&ferrypb.TenantPut{Tenant: &ferrypb.Tenant{Id: tenantA, Name: "contoso"}}).Tenant
	require.Equal(t, first.Revision, again.Revision, "an unchanged tenant is not rewritten")
	renamed := h.ok(&ferrypb.TenantPut{Tenant: &ferrypb.Tenant{Id: tenantA, Name: "Contoso Ltd"}}).Tenant
	require.Greater(t, renamed.Revision, first.Revision)
	require.Equal(t, "Contoso Ltd", h.s.View().Tenant(tenantA).Name)
	// A create-only put of an existing tenant answers with it, unrenamed.
	kept := h.ok(&ferrypb.TenantPut{Tenant: &ferrypb.Tenant{Id: tenantA, Name: "default"}, CreateOnly: true}).Tenant
	require.Equal(t, renamed.Revision, kept.Revision)
	require.Equal(t, "Contoso Ltd", kept.Name)

	// A tenant holding an identity cannot be deleted.
	h.ok(&ferrypb.IdentityPut{Identity: ident(1, tenantA, "web")})
	_, code := h.do(&ferrypb.TenantDelete{Id: tenantA})
	require.Equal(t, codes.FailedPrecondition, code)
	h.ok(&ferrypb.IdentityDelete{ObjectId: ident(1, "", "").ObjectId})
	h.ok(&ferrypb.TenantDelete{Id: tenantA})
	_, code = h.do(&ferrypb.TenantDelete{Id: tenantA})
	require.Equal(t, codes.NotFound, code)
	require.Empty(t, h.s.View().Tenants())
}

func TestIdentityValidation(t *testing.T) {
	h, web, res := directoryHarness(t, state.Config{})
	mod := func(f func(i *ferrypb.Identity)) *ferrypb.Identity {
		i := ident(9, tenantA, "api")
		f(i)
		return i
	}
	cases := []struct {
		name string
		id   *ferrypb.Identity
		want codes.Code
	}{
		{"bad object id", mod(func(i *ferrypb.Identity) { i.ObjectId = "1" }), codes.InvalidArgument},
		{"upper-case client id", mod(func(i *ferrypb.Identity) { i.ClientId = "ABCDEF00-0000-4000-8000-000000002009" }), codes.InvalidArgument},
		{"bad tenant id", mod(func(i *ferrypb.Identity) { i.TenantId = "contoso" }), codes.InvalidArgument},
		{"short name", mod(func(i *ferrypb.Identity) { i.Name = "ab" }), codes.InvalidArgument},
		{"name starts with dash", mod(func(i *ferrypb.Identity) { i.Name = "-web" }), codes.InvalidArgument},
		{"name with dot", mod(func(i *ferrypb.Identity) { i.Name = "web.api" }), codes.InvalidArgument},
		{"long name", mod(func(i *ferrypb.Identity) { i.Name = strings.Repeat("a", 129) }), codes.InvalidArgument},
		{"unknown kind", mod(func(i *ferrypb.Identity) { i.Kind = "group" }), codes.InvalidArgument},
		{"owner on user-assigned", mod(func(i *ferrypb.Identity) { i.OwnerSpiffeId = "spiffe://example.org/w" }), codes.InvalidArgument},
		{"system-assigned without owner", mod(func(i *ferrypb.Identity) { i.Kind = state.KindSystemAssigned }), codes.InvalidArgument},
		{"resource id not a path", mod(func(i *ferrypb.Identity) { i.ResourceId = "subscriptions/x" }), codes.InvalidArgument},
		{"unknown tenant", mod(func(i *ferrypb.Identity) { i.TenantId = guid(0xc) }), codes.NotFound},
		{"client id taken", mod(func(i *ferrypb.Identity) { i.ClientId = web.ClientId }), codes.AlreadyExists},
		{"client id is an app id", mod(func(i *ferrypb.Identity) { i.ClientId = res.AppId }), codes.AlreadyExists},
		{"name taken, other case", mod(func(i *ferrypb.Identity) { i.Name = "WEB" }), codes.AlreadyExists},
		{"revision of a missing identity", mod(func(i *ferrypb.Identity) { i.Revision = 3 }), codes.NotFound},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r, code := h.do(&ferrypb.IdentityPut{Identity: c.id, CreateOnly: true})
			require.Equal(t, c.want, code, r.GetStatus().GetMessage())
		})
	}
	require.Len(t, h.s.View().Identities(""), 2, "nothing refused was stored")

	// The same name in another tenant is fine. A system-assigned identity is
	// no object of its own: it comes only with its entry or agent.
	h.ok(&ferrypb.IdentityPut{Identity: ident(3, tenantB, "web"), CreateOnly: true})
	sys := ident(4, tenantA, "node-1")
	sys.Kind, sys.OwnerSpiffeId, sys.ResourceId = state.KindSystemAssigned, "spiffe://example.org/agent/node-1", "/subscriptions/x/resourceGroups/RG/providers/Microsoft.Compute/virtualMachines/node-1"
	_, code := h.do(&ferrypb.IdentityPut{Identity: sys, CreateOnly: true})
	require.Equal(t, codes.FailedPrecondition, code, "a system-assigned identity cannot be created on its own")
	sys.Kind, sys.OwnerSpiffeId = state.KindUserAssigned, ""
	h.ok(&ferrypb.IdentityPut{Identity: sys, CreateOnly: true})
	dup := ident(5, tenantA, "node-2")
	dup.ResourceId = strings.ToLower(sys.ResourceId)
	_, code = h.do(&ferrypb.IdentityPut{Identity: dup})
	require.Equal(t, codes.AlreadyExists, code, "ARM resource IDs compare case-insensitively")

	// create_only refuses an existing identity; an update keeps what is immutable.
	_, code = h.do(&ferrypb.IdentityPut{Identity: ident(1, tenantA, "web"), CreateOnly: true})
	require.Equal(t, codes.AlreadyExists, code)
	for field, f := range map[string]func(i *ferrypb.Identity){
		"name":      func(i *ferrypb.Identity) { i.Name = "web2" },
		"client_id": func(i *ferrypb.Identity) { i.ClientId = guid(0x2999) },
		"kind":      func(i *ferrypb.Identity) { i.Kind = state.KindApplication },
	} {
		i := ident(1, tenantA, "web")
		f(i)
		r, code := h.do(&ferrypb.IdentityPut{Identity: i})
		require.Equal(t, codes.InvalidArgument, code, field)
		require.Contains(t, r.Status.Message, "immutable")
	}
	upd := ident(1, tenantA, "web")
	upd.ResourceId = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/web"
	upd.Revision = web.Revision + 100
	_, code = h.do(&ferrypb.IdentityPut{Identity: upd})
	require.Equal(t, codes.Aborted, code)
	upd.Revision = web.Revision
	got := h.ok(&ferrypb.IdentityPut{Identity: upd}).Identity
	require.Equal(t, web.CreatedIndex, got.CreatedIndex)
	require.Equal(t, web.CreatedAt, got.CreatedAt)

	v := h.s.View()
	require.True(t, proto.Equal(got, v.IdentityByResourceID(strings.ToUpper(upd.ResourceId))))
	require.True(t, proto.Equal(got, v.IdentityByClientID(web.ClientId)))
	require.True(t, proto.Equal(got, v.IdentityByName(tenantA, "Web")))
	require.Nil(t, v.IdentityByName(tenantB, "node-1"))
	require.Len(t, v.Identities(tenantA), 2)
	require.Len(t, v.Identities(tenantB), 2)
}

func TestFederatedCredentialRules(t *testing.T) {
	h, web, _ := directoryHarness(t, state.Config{})

	first := h.ok(&ferrypb.FederatedCredentialPut{Credential: cred(web, "fic-0", "spiffe://example.org/w/0"), CreateOnly: true}).FederatedCredential
	require.Equal(t, []string{fic.DefaultAudience}, first.Audiences, "the default audience is filled in")

	for name, c := range map[string]struct {
		fc   *ferrypb.FederatedCredential
		want codes.Code
	}{
		"duplicate issuer+subject": {cred(web, "other", "spiffe://example.org/w/0"), codes.AlreadyExists},
		"duplicate name":           {cred(web, "FIC-0", "spiffe://example.org/w/x"), codes.AlreadyExists},
		"short name":               {cred(web, "ab", "spiffe://example.org/w/x"), codes.InvalidArgument},
		"http issuer":              {&ferrypb.FederatedCredential{IdentityObjectId: web.ObjectId, Name: "abc", Issuer: "http://x", Subject: "s"}, codes.InvalidArgument},
		"two audiences":            {&ferrypb.FederatedCredential{IdentityObjectId: web.ObjectId, Name: "abc", Issuer: "https://x", Subject: "s", Audiences: []string{"a", "b"}}, codes.InvalidArgument},
		"subject and expression":   {&ferrypb.FederatedCredential{IdentityObjectId: web.ObjectId, Name: "abc", Issuer: "https://x", Subject: "s", ClaimsMatchingExpression: "claims['sub'] eq 's'"}, codes.InvalidArgument},
		"bad expression":           {&ferrypb.FederatedCredential{IdentityObjectId: web.ObjectId, Name: "abc", Issuer: "https://x", ClaimsMatchingExpression: "claims[sub] eq 's'"}, codes.InvalidArgument},
		"unknown identity":         {&ferrypb.FederatedCredential{IdentityObjectId: guid(0x1999), Name: "abc", Issuer: "https://x", Subject: "s"}, codes.NotFound},
		"no identity":              {&ferrypb.FederatedCredential{Name: "abc", Issuer: "https://x", Subject: "s"}, codes.NotFound},
	} {
		r, code := h.do(&ferrypb.FederatedCredentialPut{Credential: c.fc, CreateOnly: true})
		require.Equal(t, c.want, code, "%s: %s", name, r.GetStatus().GetMessage())
	}

	expr := &ferrypb.FederatedCredential{IdentityObjectId: web.ObjectId, Name: "ns-any", Issuer: "https://issuer.example.org", ClaimsMatchingExpression: "claims['sub'] matches 'spiffe://example.org/ns/*'"}
	h.ok(&ferrypb.FederatedCredentialPut{Credential: expr, CreateOnly: true})
	for i := 2; i < fic.MaxPerIdentity; i++ {
		h.ok(&ferrypb.FederatedCredentialPut{Credential: cred(web, fmt.Sprint("fic-", i), fmt.Sprint("spiffe://example.org/w/", i)), CreateOnly: true})
	}
	require.Len(t, h.s.View().FederatedCredentials(web.ObjectId), fic.MaxPerIdentity)
	r, code := h.do(&ferrypb.FederatedCredentialPut{Credential: cred(web, "fic-21", "spiffe://example.org/w/21"), CreateOnly: true})
	require.Equal(t, codes.FailedPrecondition, code, "the 21st credential is refused")
	require.Contains(t, r.Status.Message, "maximum")
	r, code = h.do(&ferrypb.FederatedCredentialPut{Credential: cred(web, "fic-21", "spiffe://example.org/w/21")})
	require.Equal(t, codes.FailedPrecondition, code, "an upsert of a new name is a create: %s", r.Status.GetMessage())

	// Update: the subject may change, the name is the key.
	upd := cred(web, "fic-0", "spiffe://example.org/w/new")
	upd.Description = "moved"
	got := h.ok(&ferrypb.FederatedCredentialPut{Credential: upd}).FederatedCredential
	require.Equal(t, "spiffe://example.org/w/new", got.Subject)
	require.Len(t, h.s.View().FederatedCredentials(web.ObjectId), fic.MaxPerIdentity, "an update adds nothing")
	// Updating onto a sibling's issuer+subject is refused.
	_, code = h.do(&ferrypb.FederatedCredentialPut{Credential: cred(web, "fic-0", "spiffe://example.org/w/3")})
	require.Equal(t, codes.AlreadyExists, code)
	// A name differing only in case names the same credential, but names are
	// immutable, so it cannot be renamed that way.
	r, code = h.do(&ferrypb.FederatedCredentialPut{Credential: cred(web, "FIC-0", "spiffe://example.org/w/new2")})
	require.Equal(t, codes.InvalidArgument, code)
	require.Contains(t, r.Status.Message, "immutable")
	// Compare-and-set on revision.
	stale := cred(web, "fic-0", "spiffe://example.org/w/cas")
	stale.Revision = first.Revision
	_, code = h.do(&ferrypb.FederatedCredentialPut{Credential: stale})
	require.Equal(t, codes.Aborted, code)
	stale.Revision = got.Revision
	h.ok(&ferrypb.FederatedCredentialPut{Credential: stale})
	missing := cred(web, "nope-1", "spiffe://example.org/w/cas2")
	missing.Revision = 1
	_, code = h.do(&ferrypb.FederatedCredentialPut{Credential: missing})
	require.Equal(t, codes.NotFound, code, "an update of a missing credential")

	require.Equal(t, "spiffe://example.org/w/cas", h.s.View().FederatedCredential(web.ObjectId, "FIC-0").Subject, "lookups by name ignore case")
	h.ok(&ferrypb.FederatedCredentialDelete{IdentityObjectId: web.ObjectId, Name: "fic-0"})
	_, code = h.do(&ferrypb.FederatedCredentialDelete{IdentityObjectId: web.ObjectId, Name: "fic-0"})
	require.Equal(t, codes.NotFound, code)
	h.ok(&ferrypb.FederatedCredentialPut{Credential: cred(web, "fic-21", "spiffe://example.org/w/21"), CreateOnly: true})
}

func TestResourceValidation(t *testing.T) {
	h, web, res := directoryHarness(t, state.Config{})
	cases := map[string]struct {
		r    *ferrypb.Resource
		want codes.Code
	}{
		"bad app id":              {func() *ferrypb.Resource { r := resource(2, tenantA, nil); r.AppId = "x"; return r }(), codes.InvalidArgument},
		"no name":                 {func() *ferrypb.Resource { r := resource(2, tenantA, nil); r.Name = ""; return r }(), codes.InvalidArgument},
		"http uri":                {resource(2, tenantA, []string{"http://orders"}), codes.InvalidArgument},
		"wildcard uri":            {resource(2, tenantA, []string{"api://orders/*"}), codes.InvalidArgument},
		"uri with query":          {resource(2, tenantA, []string{"https://orders.example?x=1"}), codes.InvalidArgument},
		"uri twice":               {resource(2, tenantA, []string{"api://x", "api://x"}), codes.InvalidArgument},
		"role with space":         {resource(2, tenantA, nil, "Orders Read"), codes.InvalidArgument},
		"role starting with dot":  {resource(2, tenantA, nil, ".Read"), codes.InvalidArgument},
		"role value twice":        {resource(2, tenantA, nil, "Read", "Read"), codes.InvalidArgument},
		"bad role id":             {func() *ferrypb.Resource { r := resource(2, tenantA, nil, "Read"); r.AppRoles[0].Id = "1"; return r }(), codes.InvalidArgument},
		"unknown tenant":          {resource(2, guid(0xc), nil), codes.NotFound},
		"uri taken in tenant":     {resource(2, tenantA, []string{"api://orders"}), codes.AlreadyExists},
		"app id taken":            {func() *ferrypb.Resource { r := resource(2, tenantA, nil); r.AppId = res.AppId; return r }(), codes.AlreadyExists},
		"app id is a client id":   {func() *ferrypb.Resource { r := resource(2, tenantA, nil); r.AppId = web.ClientId; return r }(), codes.AlreadyExists},
		"object id exists":        {resource(1, tenantA, nil), codes.AlreadyExists},
		"revision of missing one": {func() *ferrypb.Resource { r := resource(2, tenantA, nil); r.Revision = 2; return r }(), codes.NotFound},
	}
	for name, c := range cases {
		r, code := h.do(&ferrypb.ResourcePut{Resource: c.r, CreateOnly: true})
		require.Equal(t, c.want, code, "%s: %s", name, r.GetStatus().GetMessage())
	}
	require.Len(t, h.s.View().Resources(""), 1)

	// The same URI in another tenant is another resource.
	other := h.ok(&ferrypb.ResourcePut{Resource: resource(3, tenantB, []string{"api://orders", "urn:example:orders"}), CreateOnly: true}).Resource
	v := h.s.View()
	require.True(t, proto.Equal(res, v.ResourceByIdentifier(tenantA, "api://orders")))
	require.True(t, proto.Equal(other, v.ResourceByIdentifier(tenantB, "api://orders")))
	require.True(t, proto.Equal(other, v.ResourceByIdentifier(tenantB, "urn:example:orders")))
	require.True(t, proto.Equal(res, v.ResourceByIdentifier(tenantA, res.AppId)), "the app ID is an identifier too")
	require.Nil(t, v.ResourceByIdentifier(tenantA, other.AppId))
	require.Nil(t, v.ResourceByIdentifier(tenantA, "api://Orders"), "identifiers match exactly")
	require.Len(t, v.Resources(tenantB), 1)

	// Update: URIs may change, app ID and tenant may not.
	upd := proto.Clone(res).(*ferrypb.Resource)
	upd.IdentifierUris = []string{"api://orders-v2"}
	upd.Revision = 0
	h.ok(&ferrypb.ResourcePut{Resource: upd})
	require.Nil(t, h.s.View().ResourceByIdentifier(tenantA, "api://orders"), "the old URI is unindexed")
	require.NotNil(t, h.s.View().ResourceByIdentifier(tenantA, "api://orders-v2"))
	upd.AppId = guid(0x4999)
	_, code := h.do(&ferrypb.ResourcePut{Resource: upd})
	require.Equal(t, codes.InvalidArgument, code)
}

func TestRoleAssignments(t *testing.T) {
	h, web, res := directoryHarness(t, state.Config{})
	read, write := res.AppRoles[0].Id, res.AppRoles[1].Id
	db := ident(2, "", "")
	ra := func(n int, resource, role, principal string) *ferrypb.RoleAssignmentPut {
		return &ferrypb.RoleAssignmentPut{Assignment: &ferrypb.RoleAssignment{Id: guid(0x6000 + n), ResourceObjectId: resource, AppRoleId: role, PrincipalObjectId: principal}}
	}
	first := h.ok(ra(1, res.ObjectId, read, web.ObjectId)).RoleAssignment
	for name, c := range map[string]struct {
		put  *ferrypb.RoleAssignmentPut
		want codes.Code
	}{
		"bad id":             {&ferrypb.RoleAssignmentPut{Assignment: &ferrypb.RoleAssignment{Id: "1", ResourceObjectId: res.ObjectId, AppRoleId: read, PrincipalObjectId: web.ObjectId}}, codes.InvalidArgument},
		"bad role id":        {ra(2, res.ObjectId, "Orders.Read", web.ObjectId), codes.InvalidArgument},
		"id exists":          {ra(1, res.ObjectId, write, web.ObjectId), codes.AlreadyExists},
		"unknown resource":   {ra(2, guid(0x3999), read, web.ObjectId), codes.NotFound},
		"unknown role":       {ra(2, res.ObjectId, guid(0x5999), web.ObjectId), codes.NotFound},
		"unknown principal":  {ra(2, res.ObjectId, read, guid(0x1999)), codes.NotFound},
		"other tenant":       {ra(2, res.ObjectId, read, db.ObjectId), codes.FailedPrecondition},
		"already assigned":   {ra(2, res.ObjectId, read, web.ObjectId), codes.AlreadyExists},
		"missing assignment": {&ferrypb.RoleAssignmentPut{}, codes.InvalidArgument},
	} {
		r, code := h.do(c.put)
		require.Equal(t, c.want, code, "%s: %s", name, r.GetStatus().GetMessage())
	}
	second := h.ok(ra(3, res.ObjectId, write, web.ObjectId)).RoleAssignment
	v := h.s.View()
	require.Len(t, v.RoleAssignments(res.ObjectId, web.ObjectId), 2)
	require.Len(t, v.RoleAssignments("", web.ObjectId), 2)
	require.Len(t, v.RoleAssignments(res.ObjectId, ""), 2)
	require.Empty(t, v.RoleAssignments(res.ObjectId, db.ObjectId))
	require.True(t, proto.Equal(first, v.RoleAssignment(first.Id)))

	// An assigned app role cannot be removed from its resource.
	upd := proto.Clone(res).(*ferrypb.Resource)
	upd.AppRoles = upd.AppRoles[:1]
	_, code := h.do(&ferrypb.ResourcePut{Resource: upd})
	require.Equal(t, codes.FailedPrecondition, code)
	h.ok(&ferrypb.RoleAssignmentDelete{Id: second.Id})
	h.ok(&ferrypb.ResourcePut{Resource: upd})
	_, code = h.do(&ferrypb.RoleAssignmentDelete{Id: second.Id})
	require.Equal(t, codes.NotFound, code)
}

func TestCascadeDeletes(t *testing.T) {
	h, web, res := directoryHarness(t, state.Config{})
	api := h.ok(&ferrypb.IdentityPut{Identity: ident(3, tenantA, "api")}).Identity
	h.ok(&ferrypb.FederatedCredentialPut{Credential: cred(web, "one", "spiffe://example.org/1")})
	h.ok(&ferrypb.FederatedCredentialPut{Credential: cred(web, "two", "spiffe://example.org/2")})
	h.ok(&ferrypb.FederatedCredentialPut{Credential: cred(api, "one", "spiffe://example.org/1")})
	assign := func(n int, principal *ferrypb.Identity) {
		h.ok(&ferrypb.RoleAssignmentPut{Assignment: &ferrypb.RoleAssignment{Id: guid(0x6000 + n), ResourceObjectId: res.ObjectId, AppRoleId: res.AppRoles[0].Id, PrincipalObjectId: principal.ObjectId}})
	}
	assign(1, web)
	assign(2, api)
	before := h.s.AppliedIndex()

	res1 := h.ok(&ferrypb.IdentityDelete{ObjectId: web.ObjectId})
	require.True(t, proto.Equal(web, res1.Identity))
	v := h.s.View()
	require.Nil(t, v.Identity(web.ObjectId))
	require.Empty(t, v.FederatedCredentials(web.ObjectId))
	require.Empty(t, v.RoleAssignments("", web.ObjectId))
	require.Len(t, v.FederatedCredentials(api.ObjectId), 1, "another identity's credentials stay")
	require.Len(t, v.RoleAssignments("", api.ObjectId), 1)

	// Watchers see every cascaded row go, in the delete's one index.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	cs, err := h.s.ChangesSince(ctx, before, state.DirectoryTables...)
	require.NoError(t, err)
	deleted := map[string]int{}
	for _, c := range cs {
		require.Equal(t, state.OpDelete, c.Op)
		require.Equal(t, h.s.AppliedIndex(), c.Index)
		deleted[c.Table]++
	}
	require.Equal(t, map[string]int{state.TableIdentities: 1, state.TableFederatedCredentials: 2, state.TableRoleAssignments: 1}, deleted)

	h.ok(&ferrypb.ResourceDelete{ObjectId: res.ObjectId})
	v = h.s.View()
	require.Empty(t, v.RoleAssignments("", ""))
	require.Nil(t, v.ResourceByIdentifier(tenantA, "api://orders"))
	require.NotNil(t, v.Identity(api.ObjectId), "a resource's delete leaves principals alone")
	_, code := h.do(&ferrypb.ResourceDelete{ObjectId: res.ObjectId})
	require.Equal(t, codes.NotFound, code)
	_, code = h.do(&ferrypb.IdentityDelete{ObjectId: web.ObjectId})
	require.Equal(t, codes.NotFound, code)
}

// signingKey returns a published key: a self-signed certificate's public half.
func signingKey(t *testing.T, kid string) *ferrypb.SigningKey {
	t.Helper()
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: kid}, NotBefore: time.Unix(0, 0), NotAfter: time.Unix(2_000_000_000, 0)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &priv.PublicKey, priv)
	require.NoError(t, err)
	spki, err := x509.MarshalPKIXPublicKey(&priv.PublicKey)
	require.NoError(t, err)
	return &ferrypb.SigningKey{Kid: kid, Owner: "bridge-1", PublicKey: spki, Certificate: der, NotAfter: 2_000_000_000}
}

func TestSigningKeys(t *testing.T) {
	h := newHarness(t, state.Config{})
	k := signingKey(t, "kid-1")
	first := h.ok(&ferrypb.SigningKeyPut{Key: k}).SigningKey
	again := h.ok(&ferrypb.SigningKeyPut{Key: k}).SigningKey
	require.Equal(t, first.Revision, again.Revision, "republishing an unchanged key writes nothing")
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := h.s.ChangesSince(ctx, first.Revision, state.TableSigningKeys)
	require.ErrorIs(t, err, context.Canceled, "no change after the first publish")

	other := signingKey(t, "kid-1")
	_, code := h.do(&ferrypb.SigningKeyPut{Key: other})
	require.Equal(t, codes.AlreadyExists, code, "a kid cannot be taken over by another key")
	mismatch := signingKey(t, "kid-2")
	mismatch.Certificate = k.Certificate
	for name, bad := range map[string]*ferrypb.SigningKey{
		"no kid":               {PublicKey: k.PublicKey},
		"kid with space":       {Kid: "a b", PublicKey: k.PublicKey},
		"garbage key":          {Kid: "kid-3", PublicKey: []byte("nope")},
		"certificate mismatch": mismatch,
	} {
		_, code := h.do(&ferrypb.SigningKeyPut{Key: bad})
		require.Equal(t, codes.InvalidArgument, code, name)
	}
	renewed := proto.Clone(k).(*ferrypb.SigningKey)
	renewed.Owner = "bridge-1b"
	require.Greater(t, h.ok(&ferrypb.SigningKeyPut{Key: renewed}).SigningKey.Revision, first.Revision)
	h.ok(&ferrypb.SigningKeyPut{Key: signingKey(t, "kid-2")})
	keys := h.s.View().SigningKeys()
	require.Len(t, keys, 2)
	require.Equal(t, "kid-1", keys[0].Kid)
	h.ok(&ferrypb.SigningKeyDelete{Kid: "kid-1"})
	_, code = h.do(&ferrypb.SigningKeyDelete{Kid: "kid-1"})
	require.Equal(t, codes.NotFound, code)
	require.Len(t, h.s.View().SigningKeys(), 1)
}

func TestDirectorySnapshotRoundTrip(t *testing.T) {
	h, web, res := directoryHarness(t, state.Config{})
	h.ok(&ferrypb.FederatedCredentialPut{Credential: cred(web, "one", "spiffe://example.org/1"), CreateOnly: true})
	h.ok(&ferrypb.FederatedCredentialPut{Credential: &ferrypb.FederatedCredential{IdentityObjectId: web.ObjectId, Name: "Two", Issuer: "https://issuer.example.org", ClaimsMatchingExpression: "claims['sub'] matches 'spiffe://example.org/ns/*'", Description: "namespace"}, CreateOnly: true})
	h.ok(&ferrypb.RoleAssignmentPut{Assignment: &ferrypb.RoleAssignment{Id: guid(0x6001), ResourceObjectId: res.ObjectId, AppRoleId: res.AppRoles[1].Id, PrincipalObjectId: web.ObjectId}})
	h.ok(&ferrypb.SigningKeyPut{Key: signingKey(t, "kid-1")})
	h.apply(create("e", entry("e1", "spiffe://example.org/web", "uid:1")))
	// System-assigned identities of an entry and an agent.
	requireItems(t, h.apply(entriesCreate([]*ferrypb.Entry{withSystem(entry("e-sys", "spiffe://example.org/vm", "uid:2"))}, sysID(1, "e-sys"))), codes.OK)
	const agentID = "spiffe://example.org/spire/agent/n1"
	h.apply(&ferrypb.Command{Op: &ferrypb.Command_NodePut{NodePut: &ferrypb.NodePut{Node: &ferrypb.AttestedNode{SpiffeId: agentID}}}})
	require.Equal(t, codes.OK, codeOf(h.apply(nodeIdentity(agentID, true, sysID(2, agentID))).Status))

	var buf bytes.Buffer
	require.NoError(t, h.s.WriteSnapshot(&buf))
	other, err := state.New(state.Config{})
	require.NoError(t, err)
	require.NoError(t, other.Restore(io.NopCloser(bytes.NewReader(buf.Bytes()))))

	a, b := h.s.View(), other.View()
	require.Equal(t, a.Index(), b.Index())
	requireSame(t, a.Tenants(), b.Tenants(), 2)
	requireSame(t, a.Identities(""), b.Identities(""), 4)
	requireSame(t, a.AllFederatedCredentials(), b.AllFederatedCredentials(), 4)
	requireSame(t, a.Resources(""), b.Resources(""), 1)
	requireSame(t, a.Nodes(), b.Nodes(), 1)
	require.True(t, b.Node(agentID).SystemAssignedIdentity)
	require.True(t, b.Entry("e-sys").SystemAssignedIdentity)
	require.Equal(t, guid(0x7001), b.SystemAssignedIdentity("e-sys", "").GetObjectId(), "the owner index is rebuilt")
	require.Equal(t, guid(0x7002), b.SystemAssignedIdentity("", agentID).GetObjectId())
	requireSame(t, a.RoleAssignments("", ""), b.RoleAssignments("", ""), 1)
	requireSame(t, a.SigningKeys(), b.SigningKeys(), 1)
	require.NotNil(t, b.Entry("e1"))

	// Secondary indexes are rebuilt by the restore.
	require.Equal(t, web.ObjectId, b.IdentityByClientID(web.ClientId).GetObjectId())
	require.Equal(t, web.ObjectId, b.IdentityByName(tenantA, "WEB").GetObjectId())
	require.Equal(t, res.ObjectId, b.ResourceByIdentifier(tenantA, "api://orders").GetObjectId())
	require.Len(t, b.FederatedCredentials(web.ObjectId), 2)
	require.Len(t, b.RoleAssignments(res.ObjectId, web.ObjectId), 1)

	var again bytes.Buffer
	require.NoError(t, other.WriteSnapshot(&again))
	require.Equal(t, buf.Bytes(), again.Bytes(), "same state, same bytes")

	// The restored store keeps enforcing the rules against restored rows.
	oh := &harness{t: t, s: other, index: other.AppliedIndex(), now: h.now}
	_, code := oh.do(&ferrypb.FederatedCredentialPut{Credential: cred(web, "three", "spiffe://example.org/1"), CreateOnly: true})
	require.Equal(t, codes.AlreadyExists, code)
}

func requireSame[T proto.Message](t *testing.T, want, got []T, n int) {
	t.Helper()
	require.Len(t, want, n)
	require.Len(t, got, n)
	for i := range want {
		require.True(t, proto.Equal(want[i], got[i]), "row %d: %v != %v", i, want[i], got[i])
	}
}

const testIssuer = "https://oidc.example.org"

// sysID is what the API adds to a command for a system-assigned identity.
func sysID(n int, owner string) *ferrypb.SystemIdentity {
	return &ferrypb.SystemIdentity{Owner: owner, ObjectId: guid(0x7000 + n), ClientId: guid(0x8000 + n), TenantId: tenantA, Issuer: testIssuer}
}

func withSystem(e *ferrypb.Entry) *ferrypb.Entry {
	e.SystemAssignedIdentity = true
	return e
}

func entriesCreate(es []*ferrypb.Entry, sys ...*ferrypb.SystemIdentity) *ferrypb.Command {
	return &ferrypb.Command{Op: &ferrypb.Command_EntriesCreate{EntriesCreate: &ferrypb.EntriesCreate{Entries: es, SystemIdentities: sys}}}
}

func entriesUpdate(es []*ferrypb.Entry, sys ...*ferrypb.SystemIdentity) *ferrypb.Command {
	return &ferrypb.Command{Op: &ferrypb.Command_EntriesUpdate{EntriesUpdate: &ferrypb.EntriesUpdate{Entries: es, SystemIdentities: sys}}}
}

func entriesDelete(ids ...string) *ferrypb.Command {
	return &ferrypb.Command{Op: &ferrypb.Command_EntriesDelete{EntriesDelete: &ferrypb.EntriesDelete{Ids: ids}}}
}

func nodeIdentity(id string, enabled bool, si *ferrypb.SystemIdentity) *ferrypb.Command {
	return &ferrypb.Command{Op: &ferrypb.Command_NodeIdentitySet{NodeIdentitySet: &ferrypb.NodeIdentitySet{SpiffeId: id, Enabled: enabled, Identity: si}}}
}

// requireItems checks the per-entry codes of an entries command.
func requireItems(t *testing.T, res *ferrypb.CommandResult, want ...codes.Code) {
	t.Helper()
	require.Equal(t, codes.OK, codeOf(res.Status), res.GetStatus().GetMessage())
	require.Len(t, res.Items, len(want))
	for i, c := range want {
		require.Equal(t, c, codeOf(res.Items[i]), "item %d: %s", i, res.Items[i].GetMessage())
	}
}

func assignRole(h *harness, n int, res *ferrypb.Resource, principal string) *ferrypb.RoleAssignment {
	h.t.Helper()
	return h.ok(&ferrypb.RoleAssignmentPut{Assignment: &ferrypb.RoleAssignment{Id: guid(0x6000 + n), ResourceObjectId: res.ObjectId, AppRoleId: res.AppRoles[0].Id, PrincipalObjectId: principal}}).RoleAssignment
}

// TestSystemAssignedEntryIdentity follows an entry's system-assigned identity
// through Azure's rules: created with the entry, named and identified after
// it, bound to its SPIFFE ID only, never shareable, gone with the entry.
func TestSystemAssignedEntryIdentity(t *testing.T) {
	h, web, res := directoryHarness(t, state.Config{})

	// Refused creations store neither the entry nor an identity.
	requireItems(t, h.apply(entriesCreate([]*ferrypb.Entry{withSystem(entry("no-details", "spiffe://example.org/a", "uid:1"))})), codes.InvalidArgument)
	requireItems(t, h.apply(entriesCreate([]*ferrypb.Entry{withSystem(entry("bad.name", "spiffe://example.org/a", "uid:1"))}, sysID(1, "bad.name"))), codes.InvalidArgument)
	taken := sysID(1, "taken")
	taken.ClientId = web.ClientId
	requireItems(t, h.apply(entriesCreate([]*ferrypb.Entry{withSystem(entry("taken", "spiffe://example.org/a", "uid:1"))}, taken)), codes.AlreadyExists)
	noTenant := sysID(1, "no-tenant")
	noTenant.TenantId = guid(0xc)
	requireItems(t, h.apply(entriesCreate([]*ferrypb.Entry{withSystem(entry("no-tenant", "spiffe://example.org/a", "uid:1"))}, noTenant)), codes.NotFound)
	noIssuer := sysID(1, "no-issuer")
	noIssuer.Issuer = ""
	requireItems(t, h.apply(entriesCreate([]*ferrypb.Entry{withSystem(entry("no-issuer", "spiffe://example.org/a", "uid:1"))}, noIssuer)), codes.InvalidArgument)
	v := h.s.View()
	require.Equal(t, 0, v.CountEntries())
	require.Len(t, v.Identities(tenantA), 1, "only web")

	// A batch: two entries with identities, one without, one refused.
	out := h.apply(entriesCreate([]*ferrypb.Entry{
		withSystem(entry("vm-1", "spiffe://example.org/vm1", "uid:1")),
		entry("plain", "spiffe://example.org/plain", "uid:2"),
		withSystem(entry("vm-2", "spiffe://example.org/vm2", "uid:3")),
		withSystem(entry("vm-3", "spiffe://example.org/vm3", "uid:4")),
	}, sysID(1, "vm-1"), sysID(2, "vm-2"), sysID(1, "vm-3")))
	requireItems(t, out, codes.OK, codes.OK, codes.OK, codes.AlreadyExists)
	require.Len(t, out.Identities, 2)
	v = h.s.View()
	require.Nil(t, v.Entry("vm-3"), "the entry whose identity was refused is not stored")
	vm1 := v.SystemAssignedIdentity("vm-1", "")
	require.NotNil(t, vm1)
	require.True(t, proto.Equal(vm1, out.Identities[0]))
	require.Equal(t, "vm-1", vm1.Name, "named after its resource")
	require.Equal(t, state.EntryResourceID(tenantA, "vm-1"), vm1.ResourceId, "the resource's own ID")
	require.Equal(t, state.KindSystemAssigned, vm1.Kind)
	require.Equal(t, "spiffe://example.org/vm1", vm1.OwnerSpiffeId)
	require.Equal(t, out.Index, vm1.CreatedIndex, "created in the entry's command")
	require.Nil(t, v.SystemAssignedIdentity("plain", ""))
	fcs := v.FederatedCredentials(vm1.ObjectId)
	require.Len(t, fcs, 1)
	require.Equal(t, state.SystemCredentialName, fcs[0].Name)
	require.Equal(t, testIssuer, fcs[0].Issuer)
	require.Equal(t, "spiffe://example.org/vm1", fcs[0].Subject)
	require.Equal(t, []string{state.TokenExchangeAudience}, fcs[0].Audiences)

	// Never shareable, never deleted on its own.
	_, code := h.do(&ferrypb.FederatedCredentialPut{Credential: cred(vm1, "share", "spiffe://example.org/other"), CreateOnly: true})
	require.Equal(t, codes.FailedPrecondition, code)
	_, code = h.do(&ferrypb.FederatedCredentialPut{Credential: &ferrypb.FederatedCredential{IdentityObjectId: vm1.ObjectId, Name: state.SystemCredentialName, Issuer: testIssuer, Subject: "spiffe://example.org/other", Audiences: []string{state.TokenExchangeAudience}}})
	require.Equal(t, codes.FailedPrecondition, code, "the managed credential cannot be repointed")
	_, code = h.do(&ferrypb.FederatedCredentialDelete{IdentityObjectId: vm1.ObjectId, Name: state.SystemCredentialName})
	require.Equal(t, codes.FailedPrecondition, code)
	_, code = h.do(&ferrypb.IdentityDelete{ObjectId: vm1.ObjectId})
	require.Equal(t, codes.FailedPrecondition, code)
	_, code = h.do(&ferrypb.IdentityPut{Identity: vm1})
	require.Equal(t, codes.FailedPrecondition, code)
	require.True(t, proto.Equal(vm1, h.s.View().Identity(vm1.ObjectId)), "unchanged")

	// Role assignments work as for any identity.
	ra := assignRole(h, 1, res, vm1.ObjectId)

	// A new SPIFFE ID moves the identity's binding with it; the identity and
	// its roles stay.
	moved := withSystem(entry("vm-1", "spiffe://example.org/vm1b", "uid:1"))
	out = h.apply(entriesUpdate([]*ferrypb.Entry{moved}, sysID(9, "vm-1")))
	requireItems(t, out, codes.OK)
	v = h.s.View()
	got := v.SystemAssignedIdentity("vm-1", "")
	require.Equal(t, vm1.ObjectId, got.ObjectId, "the details of a new identity are not used when one exists")
	require.Equal(t, "spiffe://example.org/vm1b", got.OwnerSpiffeId)
	require.Equal(t, "spiffe://example.org/vm1b", v.FederatedCredentials(vm1.ObjectId)[0].Subject)
	require.NotNil(t, v.RoleAssignment(ra.Id))

	// Disabling deletes it with its credential and role assignments.
	before := h.s.AppliedIndex()
	out = h.apply(entriesUpdate([]*ferrypb.Entry{entry("vm-1", "spiffe://example.org/vm1b", "uid:1")}))
	requireItems(t, out, codes.OK)
	require.Len(t, out.Identities, 1)
	v = h.s.View()
	require.Nil(t, v.Identity(vm1.ObjectId))
	require.Empty(t, v.FederatedCredentials(vm1.ObjectId))
	require.Nil(t, v.RoleAssignment(ra.Id))
	require.False(t, v.Entry("vm-1").SystemAssignedIdentity)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	cs, err := h.s.ChangesSince(ctx, before)
	require.NoError(t, err)
	for _, c := range cs {
		require.Equal(t, h.s.AppliedIndex(), c.Index, "entry and identity change in one command")
	}

	// Enabling on update needs the details, and creates a new identity.
	requireItems(t, h.apply(entriesUpdate([]*ferrypb.Entry{withSystem(entry("vm-1", "spiffe://example.org/vm1b", "uid:1"))})), codes.InvalidArgument)
	require.False(t, h.s.View().Entry("vm-1").SystemAssignedIdentity, "refused: the entry is unchanged")
	requireItems(t, h.apply(entriesUpdate([]*ferrypb.Entry{withSystem(entry("vm-1", "spiffe://example.org/vm1b", "uid:1"))}, sysID(3, "vm-1"))), codes.OK)
	vm1 = h.s.View().SystemAssignedIdentity("vm-1", "")
	require.Equal(t, guid(0x7003), vm1.ObjectId)

	// A user-assigned identity used by both workloads, pre-authorised.
	shared := h.ok(&ferrypb.IdentityPut{Identity: ident(5, tenantA, "shared"), CreateOnly: true}).Identity
	h.ok(&ferrypb.FederatedCredentialPut{Credential: cred(shared, "vm1", "spiffe://example.org/vm1b"), CreateOnly: true})
	h.ok(&ferrypb.FederatedCredentialPut{Credential: cred(shared, "vm2", "spiffe://example.org/vm2"), CreateOnly: true})
	sharedRA := assignRole(h, 2, res, shared.ObjectId)
	vm1RA := assignRole(h, 3, res, vm1.ObjectId)
	vm2 := h.s.View().SystemAssignedIdentity("vm-2", "")
	vm2RA := assignRole(h, 4, res, vm2.ObjectId)

	// Batch delete: every entry goes with its identity and roles.
	out = h.apply(entriesDelete("vm-1", "vm-2", "missing"))
	requireItems(t, out, codes.OK, codes.OK, codes.NotFound)
	require.Len(t, out.Identities, 2)
	v = h.s.View()
	for _, id := range []string{vm1.ObjectId, vm2.ObjectId} {
		require.Nil(t, v.Identity(id))
		require.Empty(t, v.FederatedCredentials(id))
	}
	require.Nil(t, v.RoleAssignment(vm1RA.Id))
	require.Nil(t, v.RoleAssignment(vm2RA.Id))
	require.NotNil(t, v.Identity(shared.ObjectId), "a user-assigned identity outlives its workloads")
	require.Len(t, v.FederatedCredentials(shared.ObjectId), 2)
	require.NotNil(t, v.RoleAssignment(sharedRA.Id))
	require.NotNil(t, v.Entry("plain"))
}

// TestSystemAssignedAgentIdentity: an attested agent's identity is enabled and
// disabled by command, survives re-attestation and goes with eviction.
func TestSystemAssignedAgentIdentity(t *testing.T) {
	h, _, res := directoryHarness(t, state.Config{})
	const agentID = "spiffe://example.org/spire/agent/node.1"
	put := func() *ferrypb.AttestedNode {
		res := h.apply(&ferrypb.Command{Op: &ferrypb.Command_NodePut{NodePut: &ferrypb.NodePut{Node: &ferrypb.AttestedNode{SpiffeId: agentID, AttestationType: "join_token", CertSerial: fmt.Sprint(h.index)}}}})
		require.Equal(t, codes.OK, codeOf(res.Status), res.GetStatus().GetMessage())
		return res.Node
	}
	r := h.apply(nodeIdentity(agentID, true, sysID(1, agentID)))
	require.Equal(t, codes.NotFound, codeOf(r.Status))
	put()
	r = h.apply(nodeIdentity(agentID, true, sysID(1, "spiffe://example.org/other")))
	require.Equal(t, codes.InvalidArgument, codeOf(r.Status), "details for another owner")
	r = h.apply(nodeIdentity(agentID, true, sysID(1, agentID)))
	require.Equal(t, codes.OK, codeOf(r.Status), r.Status.GetMessage())
	require.True(t, r.Node.SystemAssignedIdentity)
	idn := h.s.View().SystemAssignedIdentity("", agentID)
	require.NotNil(t, idn)
	require.Equal(t, "example-org-spire-agent-node-1", idn.Name)
	require.Equal(t, state.AgentResourceID(tenantA, agentID), idn.ResourceId)
	require.Equal(t, agentID, idn.OwnerSpiffeId)
	require.Empty(t, idn.OwnerEntryId)
	require.Equal(t, agentID, h.s.View().FederatedCredentials(idn.ObjectId)[0].Subject)

	// Enabling again changes nothing; re-attestation keeps it.
	again := h.apply(nodeIdentity(agentID, true, sysID(2, agentID)))
	require.Equal(t, idn.ObjectId, again.Identities[0].ObjectId)
	require.True(t, put().SystemAssignedIdentity)
	ra := assignRole(h, 1, res, idn.ObjectId)

	// Disable, enable, evict.
	r = h.apply(nodeIdentity(agentID, false, nil))
	require.Equal(t, codes.OK, codeOf(r.Status))
	require.False(t, r.Node.SystemAssignedIdentity)
	require.Nil(t, h.s.View().Identity(idn.ObjectId))
	require.Nil(t, h.s.View().RoleAssignment(ra.Id))
	require.False(t, put().SystemAssignedIdentity, "attestation does not grant one")
	h.apply(nodeIdentity(agentID, true, sysID(3, agentID)))
	idn = h.s.View().SystemAssignedIdentity("", agentID)
	ra = assignRole(h, 2, res, idn.ObjectId)
	r = h.apply(&ferrypb.Command{Op: &ferrypb.Command_NodeDelete{NodeDelete: &ferrypb.NodeDelete{SpiffeId: agentID}}})
	require.Equal(t, codes.OK, codeOf(r.Status))
	require.Len(t, r.Identities, 1)
	v := h.s.View()
	require.Nil(t, v.Identity(idn.ObjectId))
	require.Empty(t, v.FederatedCredentials(idn.ObjectId))
	require.Nil(t, v.RoleAssignment(ra.Id))
	require.False(t, put().SystemAssignedIdentity, "an evicted agent that attests again starts without one")
}

func TestAgentIdentityName(t *testing.T) {
	require.Equal(t, "example-org-agent-n1", state.AgentIdentityName("spiffe://example.org/agent/n1"))
	long := state.AgentIdentityName("spiffe://example.org/" + strings.Repeat("a/", 100))
	require.LessOrEqual(t, len(long), state.MaxIdentityName)
	require.True(t, state.ValidIdentityName(long))
}
