// Package memdir is an in-memory bridge.Directory for tests and for running a
// bridge without a server (interop suites, examples). Rows are added with the
// Put methods; it is safe for concurrent use.
package memdir

import (
	"sync"

	"github.com/ferry-id/ferry/bridge"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

// Dir is an in-memory directory. The zero value is ready to use.
type Dir struct {
	mu          sync.RWMutex
	tenants     map[string]*ferrypb.Tenant
	identities  map[string]*ferrypb.Identity // tenant/client ID -> identity
	fics        map[string][]*ferrypb.FederatedCredential
	resources   map[string]*ferrypb.Resource // tenant/identifier -> resource
	assignments []*ferrypb.RoleAssignment
	issuers     map[string]bridge.LocalIssuer
	keys        []*ferrypb.SigningKey
}

var _ bridge.Directory = (*Dir)(nil)

func (d *Dir) init() {
	if d.tenants == nil {
		d.tenants = map[string]*ferrypb.Tenant{}
		d.identities = map[string]*ferrypb.Identity{}
		d.fics = map[string][]*ferrypb.FederatedCredential{}
		d.resources = map[string]*ferrypb.Resource{}
		d.issuers = map[string]bridge.LocalIssuer{}
	}
}

// PutTenant adds or replaces a tenant.
func (d *Dir) PutTenant(t *ferrypb.Tenant) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.init()
	d.tenants[t.GetId()] = t
}

// PutIdentity adds or replaces an identity (keyed by tenant and client ID).
func (d *Dir) PutIdentity(i *ferrypb.Identity) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.init()
	d.identities[i.GetTenantId()+"/"+i.GetClientId()] = i
}

// SetFederatedCredentials replaces the credentials of an identity.
func (d *Dir) SetFederatedCredentials(identityObjectID string, fcs ...*ferrypb.FederatedCredential) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.init()
	d.fics[identityObjectID] = fcs
}

// PutResource adds a resource under its app ID and each identifier URI.
func (d *Dir) PutResource(r *ferrypb.Resource) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.init()
	d.resources[r.GetTenantId()+"/"+r.GetAppId()] = r
	for _, u := range r.GetIdentifierUris() {
		d.resources[r.GetTenantId()+"/"+u] = r
	}
}

// AddRoleAssignment records a role assignment.
func (d *Dir) AddRoleAssignment(a *ferrypb.RoleAssignment) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.assignments = append(d.assignments, a)
}

// PutLocalIssuer sets the keys of a local issuer.
func (d *Dir) PutLocalIssuer(iss string, li bridge.LocalIssuer) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.init()
	d.issuers[iss] = li
}

// SetSigningKeys replaces the published replica keys.
func (d *Dir) SetSigningKeys(keys ...*ferrypb.SigningKey) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.keys = keys
}

// Tenant implements bridge.Directory.
func (d *Dir) Tenant(id string) (*ferrypb.Tenant, bool) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	t, ok := d.tenants[id]
	return t, ok
}

// IdentityByClientID implements bridge.Directory.
func (d *Dir) IdentityByClientID(tenantID, clientID string) (*ferrypb.Identity, bool) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	i, ok := d.identities[tenantID+"/"+clientID]
	return i, ok
}

// FederatedCredentials implements bridge.Directory.
func (d *Dir) FederatedCredentials(identityObjectID string) []*ferrypb.FederatedCredential {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.fics[identityObjectID]
}

// ResourceByIdentifier implements bridge.Directory.
func (d *Dir) ResourceByIdentifier(tenantID, uriOrAppID string) (*ferrypb.Resource, bool) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	r, ok := d.resources[tenantID+"/"+uriOrAppID]
	return r, ok
}

// RoleAssignments implements bridge.Directory.
func (d *Dir) RoleAssignments(resourceObjectID, principalObjectID string) []*ferrypb.RoleAssignment {
	d.mu.RLock()
	defer d.mu.RUnlock()
	var out []*ferrypb.RoleAssignment
	for _, a := range d.assignments {
		if a.GetResourceObjectId() == resourceObjectID && a.GetPrincipalObjectId() == principalObjectID {
			out = append(out, a)
		}
	}
	return out
}

// LocalIssuer implements bridge.Directory.
func (d *Dir) LocalIssuer(iss string) (bridge.LocalIssuer, bool) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	li, ok := d.issuers[iss]
	return li, ok
}

// SigningKeys implements bridge.Directory.
func (d *Dir) SigningKeys() []*ferrypb.SigningKey {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.keys
}
