package state

// The directory: the bridge's tenants, identities, federated identity
// credentials, resources, role assignments and replica signing keys. Every
// check below runs inside the FSM from the command alone, so every node accepts
// and refuses the same commands.

import (
	"bytes"
	"crypto/x509"
	"errors"
	"fmt"
	"net/url"
	"slices"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/hashicorp/go-memdb"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	"github.com/ferry-id/ferry/bridge/fic"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

// Directory table names.
const (
	TableTenants              = "tenants"
	TableIdentities           = "identities"
	TableFederatedCredentials = "federated_credentials"
	TableResources            = "resources"
	TableRoleAssignments      = "role_assignments"
	TableSigningKeys          = "signing_keys"
)

// DirectoryTables lists the directory tables, for ChangesSince.
var DirectoryTables = []string{
	TableTenants, TableIdentities, TableFederatedCredentials,
	TableResources, TableRoleAssignments, TableSigningKeys,
}

// Identity kinds.
const (
	KindUserAssigned   = "user-assigned"
	KindSystemAssigned = "system-assigned"
	KindApplication    = "application"
)

// Limits of directory rows. Names follow Azure: a managed identity's name is an
// ARM resource name; a resource's name is an app registration's display name;
// app role values follow Microsoft Graph's appRole.value.
const (
	MinIdentityName     = 3
	MaxIdentityName     = 128
	MaxDisplayName      = 256
	MaxResourceIDLength = 1024
	MaxIdentifierURIs   = 50
	MaxIdentifierURI    = 255
	MaxAppRoles         = 100
	MaxAppRoleValue     = 120
	MaxKeyIDLength      = 128
)

func directorySchema(tables map[string]*memdb.TableSchema) {
	str := func(field string) *memdb.StringFieldIndex { return &memdb.StringFieldIndex{Field: field} }
	lower := func(field string) *memdb.StringFieldIndex {
		return &memdb.StringFieldIndex{Field: field, Lowercase: true}
	}
	tables[TableTenants] = &memdb.TableSchema{Name: TableTenants, Indexes: map[string]*memdb.IndexSchema{
		"id": {Name: "id", Unique: true, Indexer: str("Id")},
	}}
	tables[TableIdentities] = &memdb.TableSchema{Name: TableIdentities, Indexes: map[string]*memdb.IndexSchema{
		"id":        {Name: "id", Unique: true, Indexer: str("ObjectId")},
		"client_id": {Name: "client_id", Unique: true, Indexer: str("ClientId")},
		// Names are ARM resource names: case-insensitive.
		"name":        {Name: "name", Indexer: &memdb.CompoundIndex{Indexes: []memdb.Indexer{str("TenantId"), lower("Name")}}},
		"tenant":      {Name: "tenant", Indexer: str("TenantId")},
		"resource_id": {Name: "resource_id", AllowMissing: true, Indexer: lower("ResourceId")},
		"owner":       {Name: "owner", AllowMissing: true, Indexer: ownerIndexer{}},
	}}
	tables[TableFederatedCredentials] = &memdb.TableSchema{Name: TableFederatedCredentials, Indexes: map[string]*memdb.IndexSchema{
		// Graph uses the name as an alternate key, case-insensitively.
		"id":       {Name: "id", Unique: true, Indexer: &memdb.CompoundIndex{Indexes: []memdb.Indexer{str("IdentityObjectId"), lower("Name")}}},
		"identity": {Name: "identity", Indexer: str("IdentityObjectId")},
	}}
	tables[TableResources] = &memdb.TableSchema{Name: TableResources, Indexes: map[string]*memdb.IndexSchema{
		"id":         {Name: "id", Unique: true, Indexer: str("ObjectId")},
		"app_id":     {Name: "app_id", Unique: true, Indexer: str("AppId")},
		"tenant":     {Name: "tenant", Indexer: str("TenantId")},
		"identifier": {Name: "identifier", Indexer: identifierIndexer{}},
	}}
	tables[TableRoleAssignments] = &memdb.TableSchema{Name: TableRoleAssignments, Indexes: map[string]*memdb.IndexSchema{
		"id":                 {Name: "id", Unique: true, Indexer: str("Id")},
		"resource_principal": {Name: "resource_principal", Indexer: &memdb.CompoundIndex{Indexes: []memdb.Indexer{str("ResourceObjectId"), str("PrincipalObjectId")}}},
		"resource":           {Name: "resource", Indexer: str("ResourceObjectId")},
		"principal":          {Name: "principal", Indexer: str("PrincipalObjectId")},
	}}
	tables[TableSigningKeys] = &memdb.TableSchema{Name: TableSigningKeys, Indexes: map[string]*memdb.IndexSchema{
		"id": {Name: "id", Unique: true, Indexer: str("Kid")},
	}}
}

// identifierIndexer indexes a resource under "tenant\x00identifier" for its app
// ID and each identifier URI: what a token request names as its resource.
type identifierIndexer struct{}

func (identifierIndexer) FromObject(obj any) (bool, [][]byte, error) {
	r, ok := obj.(*ferrypb.Resource)
	if !ok {
		return false, nil, fmt.Errorf("state: identifier index on %T", obj)
	}
	vals := make([][]byte, 0, 1+len(r.IdentifierUris))
	vals = append(vals, identifierKey(r.TenantId, r.AppId))
	for _, u := range r.IdentifierUris {
		vals = append(vals, identifierKey(r.TenantId, u))
	}
	return true, vals, nil
}

func (identifierIndexer) FromArgs(args ...any) ([]byte, error) {
	if len(args) != 2 {
		return nil, errors.New("state: identifier index takes tenant and identifier")
	}
	t, ok1 := args[0].(string)
	id, ok2 := args[1].(string)
	if !ok1 || !ok2 {
		return nil, errors.New("state: identifier index arguments must be strings")
	}
	return identifierKey(t, id), nil
}

func identifierKey(tenant, id string) []byte { return []byte(tenant + "\x00" + id + "\x00") }

// ValidGUID reports whether s is a GUID in canonical form: 36 characters,
// lower-case hex in groups of 8-4-4-4-12.
func ValidGUID(s string) bool {
	if len(s) != 36 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch i {
		case 8, 13, 18, 23:
			if c != '-' {
				return false
			}
		default:
			if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
				return false
			}
		}
	}
	return true
}

// ValidIdentityName reports whether name is a valid managed identity name (an ARM
// resource name): 3-128 characters of A-Z, a-z, 0-9, '-' and '_', the first a
// letter or digit.
func ValidIdentityName(name string) bool {
	if len(name) < MinIdentityName || len(name) > MaxIdentityName {
		return false
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		alnum := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
		if !alnum && (i == 0 || c != '-' && c != '_') {
			return false
		}
	}
	return true
}

// ValidateDisplayName checks a tenant's or resource's display name as the
// FSM does.
func ValidateDisplayName(s string) error {
	if err := validDisplayName(s); err != nil {
		return fmt.Errorf("name %w", err)
	}
	return nil
}

// validDisplayName: 1-256 characters of valid UTF-8 without control characters
// or surrounding whitespace.
func validDisplayName(s string) error {
	switch {
	case s == "":
		return errors.New("is required")
	case len(s) > MaxDisplayName:
		return fmt.Errorf("is longer than %d bytes", MaxDisplayName)
	case !utf8.ValidString(s):
		return errors.New("is not valid UTF-8")
	case strings.ContainsFunc(s, unicode.IsControl):
		return errors.New("contains control characters")
	case strings.TrimSpace(s) != s:
		return errors.New("has leading or trailing whitespace")
	}
	return nil
}

// validAppRoleValue follows Graph: at most 120 characters, printable ASCII other
// than space, '"' and '\', not starting with '.'.
func validAppRoleValue(v string) bool {
	if v == "" || len(v) > MaxAppRoleValue || v[0] == '.' {
		return false
	}
	for i := 0; i < len(v); i++ {
		c := v[i]
		if c <= ' ' || c > '~' || c == '"' || c == '\\' {
			return false
		}
	}
	return true
}

// validIdentifierURI accepts an App ID URI: api://, https:// or urn:, no
// wildcard, query or fragment.
func validIdentifierURI(s string) error {
	if s == "" || len(s) > MaxIdentifierURI {
		return fmt.Errorf("must be 1-%d characters", MaxIdentifierURI)
	}
	if strings.ContainsAny(s, "*?# \t\r\n") || strings.ContainsFunc(s, unicode.IsControl) {
		return errors.New("must not contain wildcards, queries, fragments or whitespace")
	}
	u, err := url.Parse(s)
	if err != nil {
		return err
	}
	switch u.Scheme {
	case "api", "https":
		if u.Host == "" || u.User != nil {
			return fmt.Errorf("%s URI needs a host and no user info", u.Scheme)
		}
	case "urn":
		if u.Opaque == "" {
			return errors.New("urn needs a name")
		}
	default:
		return errors.New("scheme must be api, https or urn")
	}
	return nil
}

// first is txn.First that stops the FSM on a schema error (see must).
func (a *applier) first(table, index string, args ...any) any {
	raw, err := a.txn.First(table, index, args...)
	must(err)
	return raw
}

// Tenants ----------------------------------------------------------------------

func (a *applier) tenant(id string) *ferrypb.Tenant {
	raw, err := a.txn.First(TableTenants, "id", id)
	must(err)
	if raw == nil {
		return nil
	}
	return raw.(*ferrypb.Tenant)
}

// putTenant creates or renames a tenant; with createOnly an existing tenant
// is answered as it is.
func (a *applier) putTenant(t *ferrypb.Tenant, createOnly bool) *ferrypb.CommandResult {
	if t == nil {
		return &ferrypb.CommandResult{Status: status(codes.InvalidArgument, "tenant is required")}
	}
	if !ValidGUID(t.Id) {
		return &ferrypb.CommandResult{Status: status(codes.InvalidArgument, "tenant id %q is not a GUID", t.Id)}
	}
	if err := validDisplayName(t.Name); err != nil {
		return &ferrypb.CommandResult{Status: status(codes.InvalidArgument, "tenant name %v", err)}
	}
	if old := a.tenant(t.Id); old != nil && (old.Name == t.Name || createOnly) {
		return &ferrypb.CommandResult{Status: ok(), Tenant: old}
	}
	row := &ferrypb.Tenant{Id: t.Id, Name: t.Name, Revision: a.index}
	a.upsert(TableTenants, row.Id, row)
	return &ferrypb.CommandResult{Status: ok(), Tenant: row}
}

// deleteTenant refuses a tenant that still holds identities or resources:
// deleting them implicitly would be too easy a mistake.
func (a *applier) deleteTenant(id string) *ferrypb.CommandResult {
	old := a.tenant(id)
	if old == nil {
		return &ferrypb.CommandResult{Status: status(codes.NotFound, "tenant %s not found", id)}
	}
	for _, table := range []string{TableIdentities, TableResources} {
		raw, err := a.txn.First(table, "tenant", id)
		must(err)
		if raw != nil {
			return &ferrypb.CommandResult{Status: status(codes.FailedPrecondition, "tenant %s still holds %s; delete them first", id, table)}
		}
	}
	a.delete(TableTenants, id, old)
	return &ferrypb.CommandResult{Status: ok(), Tenant: old}
}

// Identities -------------------------------------------------------------------

func validateIdentity(in *ferrypb.Identity) error {
	if !ValidGUID(in.ObjectId) {
		return fmt.Errorf("object_id %q is not a GUID", in.ObjectId)
	}
	if !ValidGUID(in.ClientId) {
		return fmt.Errorf("client_id %q is not a GUID", in.ClientId)
	}
	if !ValidGUID(in.TenantId) {
		return fmt.Errorf("tenant_id %q is not a GUID", in.TenantId)
	}
	return ValidateIdentityContent(in)
}

// ValidateIdentityContent checks what a caller writes of an identity (name,
// kind, owner, resource ID), as the FSM does; the IDs the server assigns are
// not checked.
func ValidateIdentityContent(in *ferrypb.Identity) error {
	if !ValidIdentityName(in.Name) {
		return fmt.Errorf("name %q must be %d-%d characters of A-Z, a-z, 0-9, '-' and '_', starting with a letter or digit", in.Name, MinIdentityName, MaxIdentityName)
	}
	switch in.Kind {
	case KindUserAssigned, KindApplication:
		if in.OwnerSpiffeId != "" || in.OwnerEntryId != "" {
			return fmt.Errorf("only a %s identity has an owner", KindSystemAssigned)
		}
	case KindSystemAssigned:
		if err := ValidateSPIFFEID(in.OwnerSpiffeId); err != nil {
			return fmt.Errorf("owner_spiffe_id: %w", err)
		}
		if len(in.OwnerEntryId) > maxEntryIDLength {
			return fmt.Errorf("owner_entry_id is longer than %d bytes", maxEntryIDLength)
		}
	default:
		return fmt.Errorf("kind %q must be %s, %s or %s", in.Kind, KindUserAssigned, KindSystemAssigned, KindApplication)
	}
	if r := in.ResourceId; r != "" {
		if len(r) > MaxResourceIDLength || r[0] != '/' || strings.ContainsFunc(r, func(c rune) bool { return unicode.IsSpace(c) || unicode.IsControl(c) }) {
			return fmt.Errorf("resource_id must be an ARM-style path of at most %d characters", MaxResourceIDLength)
		}
	}
	return nil
}

func (a *applier) identity(objectID string) *ferrypb.Identity {
	raw, err := a.txn.First(TableIdentities, "id", objectID)
	must(err)
	if raw == nil {
		return nil
	}
	return raw.(*ferrypb.Identity)
}

func (a *applier) putIdentity(p *ferrypb.IdentityPut) *ferrypb.CommandResult {
	in := p.GetIdentity()
	if in == nil {
		return &ferrypb.CommandResult{Status: status(codes.InvalidArgument, "identity is required")}
	}
	if err := validateIdentity(in); err != nil {
		return &ferrypb.CommandResult{Status: status(codes.InvalidArgument, "invalid identity: %v", err)}
	}
	old := a.identity(in.ObjectId)
	if in.Kind == KindSystemAssigned || old != nil && old.Kind == KindSystemAssigned {
		// Azure: a system-assigned identity is a property of its resource,
		// never an object of its own.
		return &ferrypb.CommandResult{Status: status(codes.FailedPrecondition, "%s identities are created and deleted with their registration entry or agent (entry create --system-assigned-identity, agent identity enable)", KindSystemAssigned), Identity: old}
	}
	if old != nil {
		if p.CreateOnly {
			return &ferrypb.CommandResult{Status: status(codes.AlreadyExists, "identity %s already exists", in.ObjectId), Identity: old}
		}
		if in.Revision != 0 && in.Revision != old.Revision {
			return &ferrypb.CommandResult{Status: status(codes.Aborted, "identity %s changed since revision %d (now %d)", in.ObjectId, in.Revision, old.Revision), Identity: old}
		}
	} else if in.Revision != 0 {
		return &ferrypb.CommandResult{Status: status(codes.NotFound, "identity %s not found", in.ObjectId)}
	}
	if st := a.checkIdentity(in, old); st != nil {
		return &ferrypb.CommandResult{Status: st}
	}
	row := a.writeIdentity(in, old)
	return &ferrypb.CommandResult{Status: ok(), Identity: row}
}

// checkIdentity checks a valid identity against the stored rows: its tenant,
// what an update may not change (old is the stored version, or nil), and the
// client IDs, names and resource IDs other rows hold. It writes nothing.
func (a *applier) checkIdentity(in, old *ferrypb.Identity) *ferrypb.Status {
	if a.tenant(in.TenantId) == nil {
		return status(codes.NotFound, "tenant %s not found", in.TenantId)
	}
	if old != nil {
		for _, f := range []struct{ name, was, now string }{
			{"client_id", old.ClientId, in.ClientId},
			{"tenant_id", old.TenantId, in.TenantId},
			{"kind", old.Kind, in.Kind},
			{"name", old.Name, in.Name},
		} {
			if f.was != f.now {
				return status(codes.InvalidArgument, "identity %s: %s is immutable", in.ObjectId, f.name)
			}
		}
	}
	if raw := a.first(TableIdentities, "client_id", in.ClientId); raw != nil && raw.(*ferrypb.Identity).ObjectId != in.ObjectId {
		return status(codes.AlreadyExists, "client_id %s is in use", in.ClientId)
	}
	if raw := a.first(TableResources, "app_id", in.ClientId); raw != nil {
		return status(codes.AlreadyExists, "client_id %s is in use by a resource", in.ClientId)
	}
	if raw := a.first(TableIdentities, "name", in.TenantId, in.Name); raw != nil && raw.(*ferrypb.Identity).ObjectId != in.ObjectId {
		return status(codes.AlreadyExists, "an identity named %q exists in tenant %s", in.Name, in.TenantId)
	}
	if in.ResourceId != "" {
		if raw := a.first(TableIdentities, "resource_id", in.ResourceId); raw != nil && raw.(*ferrypb.Identity).ObjectId != in.ObjectId {
			return status(codes.AlreadyExists, "resource_id %s is in use", in.ResourceId)
		}
	}
	return nil
}

// writeIdentity stores a checked identity (old: the stored version, or nil).
func (a *applier) writeIdentity(in, old *ferrypb.Identity) *ferrypb.Identity {
	row := proto.Clone(in).(*ferrypb.Identity)
	row.Revision = a.index
	if old != nil {
		row.CreatedIndex, row.CreatedAt = old.CreatedIndex, old.CreatedAt
	} else {
		row.CreatedIndex, row.CreatedAt = a.index, a.now.Unix()
	}
	a.upsert(TableIdentities, row.ObjectId, row)
	return row
}

// deleteIdentity deletes an identity with its credentials and role
// assignments. A system-assigned identity goes only with its owner.
func (a *applier) deleteIdentity(objectID string) *ferrypb.CommandResult {
	old := a.identity(objectID)
	if old == nil {
		return &ferrypb.CommandResult{Status: status(codes.NotFound, "identity %s not found", objectID)}
	}
	if old.Kind == KindSystemAssigned {
		return &ferrypb.CommandResult{Status: status(codes.FailedPrecondition, "identity %s is %s: it is deleted with its owner, or by disabling it there (entry update, agent identity disable)", old.Name, KindSystemAssigned), Identity: old}
	}
	a.removeIdentity(old)
	return &ferrypb.CommandResult{Status: ok(), Identity: old}
}

// removeIdentity deletes a stored identity, its credentials and its role assignments.
func (a *applier) removeIdentity(old *ferrypb.Identity) {
	for _, fc := range a.credentials(old.ObjectId) {
		a.delete(TableFederatedCredentials, ficKey(fc), fc)
	}
	for _, ra := range a.assignments("principal", old.ObjectId) {
		a.delete(TableRoleAssignments, ra.Id, ra)
	}
	a.delete(TableIdentities, old.ObjectId, old)
}

// Federated identity credentials --------------------------------------------------

func ficKey(fc *ferrypb.FederatedCredential) string {
	return fc.IdentityObjectId + "/" + fc.Name
}

// credentials returns an identity's credentials in name order. The slice is
// fresh; the rows are shared.
func (a *applier) credentials(objectID string) []*ferrypb.FederatedCredential {
	it, err := a.txn.Get(TableFederatedCredentials, "identity", objectID)
	must(err)
	var out []*ferrypb.FederatedCredential
	for raw := it.Next(); raw != nil; raw = it.Next() {
		out = append(out, raw.(*ferrypb.FederatedCredential))
	}
	return out
}

func (a *applier) credential(objectID, name string) *ferrypb.FederatedCredential {
	raw, err := a.txn.First(TableFederatedCredentials, "id", objectID, name)
	must(err)
	if raw == nil {
		return nil
	}
	return raw.(*ferrypb.FederatedCredential)
}

// putCredential creates (Entra's create rules) or updates (name and identity
// immutable) a credential. A non-zero revision makes it an update of exactly
// that revision.
func (a *applier) putCredential(p *ferrypb.FederatedCredentialPut) *ferrypb.CommandResult {
	if p.GetCredential() == nil {
		return &ferrypb.CommandResult{Status: status(codes.InvalidArgument, "credential is required")}
	}
	fc := proto.Clone(p.Credential).(*ferrypb.FederatedCredential)
	fic.Normalize(fc)
	idn := a.identity(fc.IdentityObjectId)
	if idn == nil {
		return &ferrypb.CommandResult{Status: status(codes.NotFound, "identity %q not found", fc.IdentityObjectId)}
	}
	if idn.Kind == KindSystemAssigned {
		return &ferrypb.CommandResult{Status: notShareable(idn)}
	}
	existing := a.credentials(fc.IdentityObjectId)
	old := a.credential(fc.IdentityObjectId, fc.Name)
	if fc.Revision != 0 {
		if old == nil {
			return &ferrypb.CommandResult{Status: status(codes.NotFound, "federated credential %q not found", fc.Name)}
		}
		if old.Revision != fc.Revision {
			return &ferrypb.CommandResult{Status: status(codes.Aborted, "federated credential %q changed since revision %d (now %d)", fc.Name, fc.Revision, old.Revision), FederatedCredential: old}
		}
	}
	var err error
	if p.CreateOnly || old == nil {
		err = fic.CheckCreate(existing, fc)
	} else {
		err = fic.CheckUpdate(existing, fc)
	}
	if err != nil {
		return &ferrypb.CommandResult{Status: status(ficCode(err), "%v", err), FederatedCredential: old}
	}
	fc.Revision = a.index
	a.upsert(TableFederatedCredentials, ficKey(fc), fc)
	return &ferrypb.CommandResult{Status: ok(), FederatedCredential: fc}
}

func ficCode(err error) codes.Code {
	switch {
	case errors.Is(err, fic.ErrDuplicate):
		return codes.AlreadyExists
	case errors.Is(err, fic.ErrTooMany):
		return codes.FailedPrecondition
	default:
		return codes.InvalidArgument
	}
}

// notShareable refuses to change the credentials of a system-assigned
// identity: its one credential, binding it to its owner, is the server's.
func notShareable(idn *ferrypb.Identity) *ferrypb.Status {
	return status(codes.FailedPrecondition, "identity %s is %s: only its owner %s may use it, through the federated credential the server manages; use a %s identity to share", idn.Name, KindSystemAssigned, idn.OwnerSpiffeId, KindUserAssigned)
}

func (a *applier) deleteCredential(p *ferrypb.FederatedCredentialDelete) *ferrypb.CommandResult {
	if idn := a.identity(p.IdentityObjectId); idn != nil && idn.Kind == KindSystemAssigned {
		return &ferrypb.CommandResult{Status: notShareable(idn)}
	}
	old := a.credential(p.IdentityObjectId, p.Name)
	if old == nil {
		return &ferrypb.CommandResult{Status: status(codes.NotFound, "federated credential %q not found on identity %s", p.Name, p.IdentityObjectId)}
	}
	a.delete(TableFederatedCredentials, ficKey(old), old)
	return &ferrypb.CommandResult{Status: ok(), FederatedCredential: old}
}

// Resources --------------------------------------------------------------------

func validateResource(r *ferrypb.Resource) error {
	if !ValidGUID(r.ObjectId) {
		return fmt.Errorf("object_id %q is not a GUID", r.ObjectId)
	}
	if !ValidGUID(r.AppId) {
		return fmt.Errorf("app_id %q is not a GUID", r.AppId)
	}
	if !ValidGUID(r.TenantId) {
		return fmt.Errorf("tenant_id %q is not a GUID", r.TenantId)
	}
	for i, ar := range r.AppRoles {
		if ar == nil || !ValidGUID(ar.Id) {
			return fmt.Errorf("app role %d: id is not a GUID", i)
		}
	}
	return ValidateResourceContent(r)
}

// ValidateResourceContent checks what a caller writes of a resource (name,
// identifier URIs, app role values and display names), as the FSM does; the
// IDs the server assigns are not checked.
func ValidateResourceContent(r *ferrypb.Resource) error {
	if err := validDisplayName(r.Name); err != nil {
		return fmt.Errorf("name %w", err)
	}
	if len(r.IdentifierUris) > MaxIdentifierURIs {
		return fmt.Errorf("more than %d identifier URIs", MaxIdentifierURIs)
	}
	for i, u := range r.IdentifierUris {
		if err := validIdentifierURI(u); err != nil {
			return fmt.Errorf("identifier URI %q: %w", u, err)
		}
		if slices.Contains(r.IdentifierUris[:i], u) {
			return fmt.Errorf("identifier URI %q is listed twice", u)
		}
	}
	if len(r.AppRoles) > MaxAppRoles {
		return fmt.Errorf("more than %d app roles", MaxAppRoles)
	}
	for i, ar := range r.AppRoles {
		if ar == nil {
			return fmt.Errorf("app role %d is empty", i)
		}
		if !validAppRoleValue(ar.Value) {
			return fmt.Errorf("app role value %q must be 1-%d printable ASCII characters without space, '\"' or '\\', not starting with '.'", ar.Value, MaxAppRoleValue)
		}
		if ar.DisplayName != "" {
			if err := validDisplayName(ar.DisplayName); err != nil {
				return fmt.Errorf("app role %q display name %w", ar.Value, err)
			}
		}
		for _, o := range r.AppRoles[:i] {
			if o.Id == ar.Id && ar.Id != "" {
				return fmt.Errorf("app role id %s is listed twice", ar.Id)
			}
			if o.Value == ar.Value {
				return fmt.Errorf("app role value %q is listed twice", ar.Value)
			}
		}
	}
	return nil
}

func (a *applier) resource(objectID string) *ferrypb.Resource {
	raw, err := a.txn.First(TableResources, "id", objectID)
	must(err)
	if raw == nil {
		return nil
	}
	return raw.(*ferrypb.Resource)
}

func (a *applier) putResource(p *ferrypb.ResourcePut) *ferrypb.CommandResult {
	in := p.GetResource()
	if in == nil {
		return &ferrypb.CommandResult{Status: status(codes.InvalidArgument, "resource is required")}
	}
	if err := validateResource(in); err != nil {
		return &ferrypb.CommandResult{Status: status(codes.InvalidArgument, "invalid resource: %v", err)}
	}
	if a.tenant(in.TenantId) == nil {
		return &ferrypb.CommandResult{Status: status(codes.NotFound, "tenant %s not found", in.TenantId)}
	}
	old := a.resource(in.ObjectId)
	if old != nil {
		if p.CreateOnly {
			return &ferrypb.CommandResult{Status: status(codes.AlreadyExists, "resource %s already exists", in.ObjectId), Resource: old}
		}
		if in.Revision != 0 && in.Revision != old.Revision {
			return &ferrypb.CommandResult{Status: status(codes.Aborted, "resource %s changed since revision %d (now %d)", in.ObjectId, in.Revision, old.Revision), Resource: old}
		}
		if old.AppId != in.AppId || old.TenantId != in.TenantId {
			return &ferrypb.CommandResult{Status: status(codes.InvalidArgument, "resource %s: app_id and tenant_id are immutable", in.ObjectId)}
		}
		// An assigned app role may not disappear under its assignments.
		for _, ra := range a.assignments("resource", in.ObjectId) {
			if !slices.ContainsFunc(in.AppRoles, func(ar *ferrypb.AppRole) bool { return ar.Id == ra.AppRoleId }) {
				return &ferrypb.CommandResult{Status: status(codes.FailedPrecondition, "app role %s is assigned (assignment %s); remove the assignment first", ra.AppRoleId, ra.Id)}
			}
		}
	} else if in.Revision != 0 {
		return &ferrypb.CommandResult{Status: status(codes.NotFound, "resource %s not found", in.ObjectId)}
	}
	if raw := a.first(TableResources, "app_id", in.AppId); raw != nil && raw.(*ferrypb.Resource).ObjectId != in.ObjectId {
		return &ferrypb.CommandResult{Status: status(codes.AlreadyExists, "app_id %s is in use", in.AppId)}
	}
	if raw := a.first(TableIdentities, "client_id", in.AppId); raw != nil {
		return &ferrypb.CommandResult{Status: status(codes.AlreadyExists, "app_id %s is in use by an identity", in.AppId)}
	}
	for _, u := range in.IdentifierUris {
		if raw := a.first(TableResources, "identifier", in.TenantId, u); raw != nil && raw.(*ferrypb.Resource).ObjectId != in.ObjectId {
			return &ferrypb.CommandResult{Status: status(codes.AlreadyExists, "identifier URI %q is in use by resource %s", u, raw.(*ferrypb.Resource).ObjectId)}
		}
	}
	row := proto.Clone(in).(*ferrypb.Resource)
	row.Revision = a.index
	a.upsert(TableResources, row.ObjectId, row)
	return &ferrypb.CommandResult{Status: ok(), Resource: row}
}

// deleteResource deletes a resource with the role assignments of its app roles.
func (a *applier) deleteResource(objectID string) *ferrypb.CommandResult {
	old := a.resource(objectID)
	if old == nil {
		return &ferrypb.CommandResult{Status: status(codes.NotFound, "resource %s not found", objectID)}
	}
	for _, ra := range a.assignments("resource", objectID) {
		a.delete(TableRoleAssignments, ra.Id, ra)
	}
	a.delete(TableResources, objectID, old)
	return &ferrypb.CommandResult{Status: ok(), Resource: old}
}

// Role assignments -------------------------------------------------------------

func (a *applier) assignments(index, id string) []*ferrypb.RoleAssignment {
	it, err := a.txn.Get(TableRoleAssignments, index, id)
	must(err)
	var out []*ferrypb.RoleAssignment
	for raw := it.Next(); raw != nil; raw = it.Next() {
		out = append(out, raw.(*ferrypb.RoleAssignment))
	}
	return out
}

func (a *applier) putRoleAssignment(in *ferrypb.RoleAssignment) *ferrypb.CommandResult {
	if in == nil {
		return &ferrypb.CommandResult{Status: status(codes.InvalidArgument, "assignment is required")}
	}
	for _, f := range []struct{ name, v string }{
		{"id", in.Id}, {"resource_object_id", in.ResourceObjectId},
		{"app_role_id", in.AppRoleId}, {"principal_object_id", in.PrincipalObjectId},
	} {
		if !ValidGUID(f.v) {
			return &ferrypb.CommandResult{Status: status(codes.InvalidArgument, "role assignment %s %q is not a GUID", f.name, f.v)}
		}
	}
	if raw := a.first(TableRoleAssignments, "id", in.Id); raw != nil {
		return &ferrypb.CommandResult{Status: status(codes.AlreadyExists, "role assignment %s already exists", in.Id), RoleAssignment: raw.(*ferrypb.RoleAssignment)}
	}
	res := a.resource(in.ResourceObjectId)
	if res == nil {
		return &ferrypb.CommandResult{Status: status(codes.NotFound, "resource %s not found", in.ResourceObjectId)}
	}
	if !slices.ContainsFunc(res.AppRoles, func(ar *ferrypb.AppRole) bool { return ar.Id == in.AppRoleId }) {
		return &ferrypb.CommandResult{Status: status(codes.NotFound, "resource %s has no app role %s", res.ObjectId, in.AppRoleId)}
	}
	principal := a.identity(in.PrincipalObjectId)
	if principal == nil {
		return &ferrypb.CommandResult{Status: status(codes.NotFound, "identity %s not found", in.PrincipalObjectId)}
	}
	if principal.TenantId != res.TenantId {
		return &ferrypb.CommandResult{Status: status(codes.FailedPrecondition, "identity %s and resource %s are in different tenants", principal.ObjectId, res.ObjectId)}
	}
	it, err := a.txn.Get(TableRoleAssignments, "resource_principal", in.ResourceObjectId, in.PrincipalObjectId)
	must(err)
	for raw := it.Next(); raw != nil; raw = it.Next() {
		if o := raw.(*ferrypb.RoleAssignment); o.AppRoleId == in.AppRoleId {
			return &ferrypb.CommandResult{Status: status(codes.AlreadyExists, "the app role is already assigned (assignment %s)", o.Id), RoleAssignment: o}
		}
	}
	row := proto.Clone(in).(*ferrypb.RoleAssignment)
	row.Revision = a.index
	a.upsert(TableRoleAssignments, row.Id, row)
	return &ferrypb.CommandResult{Status: ok(), RoleAssignment: row}
}

func (a *applier) deleteRoleAssignment(id string) *ferrypb.CommandResult {
	raw, err := a.txn.First(TableRoleAssignments, "id", id)
	must(err)
	if raw == nil {
		return &ferrypb.CommandResult{Status: status(codes.NotFound, "role assignment %s not found", id)}
	}
	old := raw.(*ferrypb.RoleAssignment)
	a.delete(TableRoleAssignments, id, old)
	return &ferrypb.CommandResult{Status: ok(), RoleAssignment: old}
}

// System-assigned identities ---------------------------------------------------

// Azure's rules for a system-assigned identity, which ferry gives registration
// entries and attested agents: it is enabled on its resource and created with
// it (in the same command), it has the resource's name and the resource's own
// ID as its resource ID, only its owner may use it, and it is deleted with the
// resource (or when disabled there), together with its role assignments.

// ResourceGroup is the resource group of the ARM-style resource IDs ferry
// derives: /subscriptions/{tenant}/resourceGroups/ferry/providers/...
const ResourceGroup = "ferry"

// TokenExchangeAudience is the audience of the JWT-SVIDs traded for access
// tokens, and of the credential binding a system-assigned identity to its owner.
const TokenExchangeAudience = "api://AzureADTokenExchange"

// SystemCredentialName names the federated credential the server manages on a
// system-assigned identity.
const SystemCredentialName = "system-assigned"

// EntryResourceID is the resource ID of a registration entry, and so of its
// system-assigned identity.
func EntryResourceID(tenantID, entryID string) string {
	return "/subscriptions/" + tenantID + "/resourceGroups/" + ResourceGroup + "/providers/Ferry.Identity/registrationEntries/" + entryID
}

// AgentResourceID is the resource ID of an attested agent, and so of its
// system-assigned identity.
func AgentResourceID(tenantID, agentID string) string {
	return "/subscriptions/" + tenantID + "/resourceGroups/" + ResourceGroup + "/providers/Ferry.Identity/agents/" + AgentIdentityName(agentID)
}

// AgentIdentityName is an agent's resource name, which its system-assigned
// identity bears: its SPIFFE ID without the scheme, every character an ARM
// name may not hold replaced by '-', at most MaxIdentityName characters.
func AgentIdentityName(agentID string) string {
	b := []byte(strings.TrimPrefix(agentID, "spiffe://"))
	for i, c := range b {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-') {
			b[i] = '-'
		}
	}
	name := strings.Trim(string(b), "-_")
	if len(name) > MaxIdentityName {
		name = strings.TrimRight(name[:MaxIdentityName], "-_")
	}
	return name
}

// ownerIndexer indexes a system-assigned identity under its owner:
// "entry\x00<entry ID>" or "agent\x00<SPIFFE ID>".
type ownerIndexer struct{}

func ownerKey(entryID, agentID string) []byte {
	if entryID != "" {
		return []byte("entry\x00" + entryID + "\x00")
	}
	return []byte("agent\x00" + agentID + "\x00")
}

func (ownerIndexer) FromObject(obj any) (bool, [][]byte, error) {
	i, ok := obj.(*ferrypb.Identity)
	if !ok {
		return false, nil, fmt.Errorf("state: owner index on %T", obj)
	}
	if i.Kind != KindSystemAssigned || i.OwnerEntryId == "" && i.OwnerSpiffeId == "" {
		return false, nil, nil
	}
	return true, [][]byte{ownerKey(i.OwnerEntryId, i.OwnerSpiffeId)}, nil
}

func (ownerIndexer) FromArgs(args ...any) ([]byte, error) {
	if len(args) != 2 {
		return nil, errors.New("state: owner index takes entry ID and agent ID")
	}
	e, ok1 := args[0].(string)
	n, ok2 := args[1].(string)
	if !ok1 || !ok2 {
		return nil, errors.New("state: owner index arguments must be strings")
	}
	return ownerKey(e, n), nil
}

// ownedIdentity returns the system-assigned identity of an entry (entryID set)
// or an agent, or nil.
func (a *applier) ownedIdentity(entryID, agentID string) *ferrypb.Identity {
	raw := a.first(TableIdentities, "owner", entryID, agentID)
	if raw == nil {
		return nil
	}
	return raw.(*ferrypb.Identity)
}

// systemIdentity is a checked system-assigned identity with its credential,
// ready to write.
type systemIdentity struct {
	identity   *ferrypb.Identity
	credential *ferrypb.FederatedCredential
}

// prepareSystemIdentity checks the identity an owner (entry entryID, or agent
// agentID when entryID is empty) gets from si, and the credential binding it
// to ownerSPIFFE. It writes nothing.
func (a *applier) prepareSystemIdentity(si *ferrypb.SystemIdentity, entryID, ownerSPIFFE string) (*systemIdentity, *ferrypb.Status) {
	owner := entryID
	if owner == "" {
		owner = ownerSPIFFE
	}
	if si == nil || si.Owner != owner {
		return nil, status(codes.InvalidArgument, "%s needs a system-assigned identity, and the command carries none for it", owner)
	}
	in := &ferrypb.Identity{
		ObjectId: si.ObjectId, ClientId: si.ClientId, TenantId: si.TenantId,
		Kind: KindSystemAssigned, OwnerEntryId: entryID, OwnerSpiffeId: ownerSPIFFE,
	}
	if entryID != "" {
		// Azure: the identity bears its resource's name.
		if !ValidIdentityName(entryID) {
			return nil, status(codes.InvalidArgument, "entry ID %q cannot name a system-assigned identity: it must be %d-%d characters of A-Z, a-z, 0-9, '-' and '_', starting with a letter or digit", entryID, MinIdentityName, MaxIdentityName)
		}
		in.Name, in.ResourceId = entryID, EntryResourceID(si.TenantId, entryID)
	} else {
		in.Name, in.ResourceId = AgentIdentityName(ownerSPIFFE), AgentResourceID(si.TenantId, ownerSPIFFE)
	}
	if err := validateIdentity(in); err != nil {
		return nil, status(codes.InvalidArgument, "system-assigned identity of %s: %v", owner, err)
	}
	if a.identity(in.ObjectId) != nil {
		return nil, status(codes.AlreadyExists, "identity %s already exists", in.ObjectId)
	}
	if st := a.checkIdentity(in, nil); st != nil {
		return nil, status(codes.Code(st.Code), "system-assigned identity of %s: %s", owner, st.Message)
	}
	fc := a.systemCredential(in, si.Issuer)
	if err := fic.CheckCreate(nil, fc); err != nil {
		return nil, status(codes.InvalidArgument, "system-assigned identity of %s: credential: %v", owner, err)
	}
	return &systemIdentity{identity: in, credential: fc}, nil
}

// systemCredential is the credential binding a system-assigned identity to
// its owner: JWT-SVIDs of the trust domain's issuer, for the owner's SPIFFE
// ID, with the token exchange audience.
func (a *applier) systemCredential(idn *ferrypb.Identity, issuer string) *ferrypb.FederatedCredential {
	fc := &ferrypb.FederatedCredential{
		IdentityObjectId: idn.ObjectId,
		Name:             SystemCredentialName,
		Issuer:           issuer,
		Subject:          idn.OwnerSpiffeId,
		Audiences:        []string{TokenExchangeAudience},
		Description:      "managed by the server: binds the system-assigned identity to its owner",
	}
	fic.Normalize(fc)
	return fc
}

// writeSystemIdentity stores a prepared identity and its credential.
func (a *applier) writeSystemIdentity(p *systemIdentity) *ferrypb.Identity {
	row := a.writeIdentity(p.identity, nil)
	fc := proto.Clone(p.credential).(*ferrypb.FederatedCredential)
	fc.Revision = a.index
	a.upsert(TableFederatedCredentials, ficKey(fc), fc)
	return row
}

// rebindSystemIdentity follows its owner: a new SPIFFE ID (the entry's
// changed) or a new issuer (issuer non-empty: the trust domain's changed)
// moves the identity and its credential along. It returns the identity, or nil
// when nothing changed.
func (a *applier) rebindSystemIdentity(idn *ferrypb.Identity, spiffeID, issuer string) *ferrypb.Identity {
	var changed *ferrypb.Identity
	if idn.OwnerSpiffeId != spiffeID {
		row := proto.Clone(idn).(*ferrypb.Identity)
		row.OwnerSpiffeId = spiffeID
		changed = a.writeIdentity(row, idn)
	}
	for _, fc := range a.credentials(idn.ObjectId) {
		if fc.Name != SystemCredentialName || fc.Subject == spiffeID && (issuer == "" || fc.Issuer == issuer) {
			continue
		}
		next := proto.Clone(fc).(*ferrypb.FederatedCredential)
		next.Subject, next.Revision = spiffeID, a.index
		if issuer != "" {
			next.Issuer = issuer
		}
		if fic.Validate(next) != nil {
			continue
		}
		a.upsert(TableFederatedCredentials, ficKey(next), next)
		if changed == nil {
			changed = idn
		}
	}
	return changed
}

// setNodeIdentity enables or disables an agent's system-assigned identity.
func (a *applier) setNodeIdentity(p *ferrypb.NodeIdentitySet) *ferrypb.CommandResult {
	n := a.node(p.SpiffeId)
	if n == nil {
		return &ferrypb.CommandResult{Status: status(codes.NotFound, "agent %s not found", p.SpiffeId)}
	}
	cur := a.ownedIdentity("", n.SpiffeId)
	res := &ferrypb.CommandResult{Status: ok(), Node: n}
	switch {
	case p.Enabled && n.SystemAssignedIdentity && cur != nil:
		res.Identities = []*ferrypb.Identity{cur}
		return res
	case p.Enabled:
		if n.Banned {
			return &ferrypb.CommandResult{Status: status(codes.FailedPrecondition, "agent %s is banned", n.SpiffeId), Node: n}
		}
		prep, st := a.prepareSystemIdentity(p.Identity, "", n.SpiffeId)
		if st != nil {
			return &ferrypb.CommandResult{Status: st, Node: n}
		}
		res.Identities = []*ferrypb.Identity{a.writeSystemIdentity(prep)}
	case cur != nil:
		a.removeIdentity(cur)
		res.Identities = []*ferrypb.Identity{cur}
	}
	if n.SystemAssignedIdentity != p.Enabled {
		row := proto.Clone(n).(*ferrypb.AttestedNode)
		row.SystemAssignedIdentity = p.Enabled
		row.Revision = a.index
		a.upsert(TableNodes, row.SpiffeId, row)
		res.Node = row
	}
	return res
}

// Signing keys -----------------------------------------------------------------

func validateSigningKey(k *ferrypb.SigningKey) error {
	if k.Kid == "" || len(k.Kid) > MaxKeyIDLength || strings.ContainsFunc(k.Kid, func(c rune) bool { return c <= ' ' || c > '~' }) {
		return fmt.Errorf("kid must be 1-%d printable ASCII characters", MaxKeyIDLength)
	}
	if len(k.Owner) > MaxDisplayName {
		return fmt.Errorf("owner is longer than %d bytes", MaxDisplayName)
	}
	if _, err := x509.ParsePKIXPublicKey(k.PublicKey); err != nil {
		return fmt.Errorf("public_key: %w", err)
	}
	if len(k.Certificate) > 0 {
		cert, err := x509.ParseCertificate(k.Certificate)
		if err != nil {
			return fmt.Errorf("certificate: %w", err)
		}
		if !bytes.Equal(cert.RawSubjectPublicKeyInfo, k.PublicKey) {
			return errors.New("certificate does not hold public_key")
		}
	}
	if k.NotAfter < 0 {
		return errors.New("not_after must not be negative")
	}
	return nil
}

func (a *applier) putSigningKey(k *ferrypb.SigningKey) *ferrypb.CommandResult {
	if k == nil {
		return &ferrypb.CommandResult{Status: status(codes.InvalidArgument, "key is required")}
	}
	if err := validateSigningKey(k); err != nil {
		return &ferrypb.CommandResult{Status: status(codes.InvalidArgument, "invalid signing key: %v", err)}
	}
	row := proto.Clone(k).(*ferrypb.SigningKey)
	if raw := a.first(TableSigningKeys, "id", k.Kid); raw != nil {
		old := raw.(*ferrypb.SigningKey)
		if !bytes.Equal(old.PublicKey, k.PublicKey) {
			return &ferrypb.CommandResult{Status: status(codes.AlreadyExists, "a different key with kid %q exists", k.Kid)}
		}
		// Republishing an unchanged key is a no-op, so replicas can publish on
		// every start without disturbing watchers.
		row.Revision = old.Revision
		if proto.Equal(row, old) {
			return &ferrypb.CommandResult{Status: ok(), SigningKey: old}
		}
	}
	row.Revision = a.index
	a.upsert(TableSigningKeys, row.Kid, row)
	return &ferrypb.CommandResult{Status: ok(), SigningKey: row}
}

func (a *applier) deleteSigningKey(kid string) *ferrypb.CommandResult {
	raw, err := a.txn.First(TableSigningKeys, "id", kid)
	must(err)
	if raw == nil {
		return &ferrypb.CommandResult{Status: status(codes.NotFound, "signing key %q not found", kid)}
	}
	old := raw.(*ferrypb.SigningKey)
	a.delete(TableSigningKeys, kid, old)
	return &ferrypb.CommandResult{Status: ok(), SigningKey: old}
}

// Reads ------------------------------------------------------------------------

func viewFirst[T any](v *View, table, index string, args ...any) T {
	var zero T
	raw, err := v.txn.First(table, index, args...)
	if err != nil || raw == nil {
		return zero
	}
	return raw.(T)
}

func viewAll[T any](v *View, table, index string, args ...any) []T {
	it, err := v.txn.Get(table, index, args...)
	if err != nil {
		return nil
	}
	var out []T
	for raw := it.Next(); raw != nil; raw = it.Next() {
		out = append(out, raw.(T))
	}
	return out
}

// Tenant returns the tenant with this ID, or nil.
func (v *View) Tenant(id string) *ferrypb.Tenant {
	return viewFirst[*ferrypb.Tenant](v, TableTenants, "id", id)
}

// Tenants returns every tenant, by ID.
func (v *View) Tenants() []*ferrypb.Tenant {
	return viewAll[*ferrypb.Tenant](v, TableTenants, "id")
}

// Identity returns the identity with this object ID, or nil.
func (v *View) Identity(objectID string) *ferrypb.Identity {
	return viewFirst[*ferrypb.Identity](v, TableIdentities, "id", objectID)
}

// IdentityByClientID returns the identity with this client ID, or nil.
func (v *View) IdentityByClientID(clientID string) *ferrypb.Identity {
	return viewFirst[*ferrypb.Identity](v, TableIdentities, "client_id", clientID)
}

// IdentityByName returns the identity with this name (case-insensitively) in the
// tenant, or nil.
func (v *View) IdentityByName(tenantID, name string) *ferrypb.Identity {
	return viewFirst[*ferrypb.Identity](v, TableIdentities, "name", tenantID, name)
}

// IdentityByResourceID returns the identity with this ARM resource ID
// (case-insensitively), or nil.
func (v *View) IdentityByResourceID(resourceID string) *ferrypb.Identity {
	if resourceID == "" {
		return nil
	}
	return viewFirst[*ferrypb.Identity](v, TableIdentities, "resource_id", resourceID)
}

// Identities returns the identities of a tenant (every tenant when tenantID is
// empty), by object ID.
func (v *View) Identities(tenantID string) []*ferrypb.Identity {
	if tenantID == "" {
		return viewAll[*ferrypb.Identity](v, TableIdentities, "id")
	}
	return viewAll[*ferrypb.Identity](v, TableIdentities, "tenant", tenantID)
}

// FederatedCredentials returns the credentials of an identity, by name.
func (v *View) FederatedCredentials(identityObjectID string) []*ferrypb.FederatedCredential {
	return viewAll[*ferrypb.FederatedCredential](v, TableFederatedCredentials, "identity", identityObjectID)
}

// FederatedCredential returns an identity's credential by name
// (case-insensitively), or nil.
func (v *View) FederatedCredential(identityObjectID, name string) *ferrypb.FederatedCredential {
	return viewFirst[*ferrypb.FederatedCredential](v, TableFederatedCredentials, "id", identityObjectID, name)
}

// AllFederatedCredentials returns every credential of every identity.
func (v *View) AllFederatedCredentials() []*ferrypb.FederatedCredential {
	return viewAll[*ferrypb.FederatedCredential](v, TableFederatedCredentials, "id")
}

// Resource returns the resource with this object ID, or nil.
func (v *View) Resource(objectID string) *ferrypb.Resource {
	return viewFirst[*ferrypb.Resource](v, TableResources, "id", objectID)
}

// ResourceByIdentifier returns the resource of the tenant whose app ID or one of
// whose identifier URIs is id, or nil.
func (v *View) ResourceByIdentifier(tenantID, id string) *ferrypb.Resource {
	return viewFirst[*ferrypb.Resource](v, TableResources, "identifier", tenantID, id)
}

// Resources returns the resources of a tenant (every tenant when tenantID is
// empty), by object ID.
func (v *View) Resources(tenantID string) []*ferrypb.Resource {
	if tenantID == "" {
		return viewAll[*ferrypb.Resource](v, TableResources, "id")
	}
	return viewAll[*ferrypb.Resource](v, TableResources, "tenant", tenantID)
}

// RoleAssignment returns the role assignment with this ID, or nil.
func (v *View) RoleAssignment(id string) *ferrypb.RoleAssignment {
	return viewFirst[*ferrypb.RoleAssignment](v, TableRoleAssignments, "id", id)
}

// RoleAssignments returns the role assignments of a resource to a principal.
// An empty resource or principal matches any; both empty lists every assignment.
func (v *View) RoleAssignments(resourceObjectID, principalObjectID string) []*ferrypb.RoleAssignment {
	switch {
	case resourceObjectID != "" && principalObjectID != "":
		return viewAll[*ferrypb.RoleAssignment](v, TableRoleAssignments, "resource_principal", resourceObjectID, principalObjectID)
	case resourceObjectID != "":
		return viewAll[*ferrypb.RoleAssignment](v, TableRoleAssignments, "resource", resourceObjectID)
	case principalObjectID != "":
		return viewAll[*ferrypb.RoleAssignment](v, TableRoleAssignments, "principal", principalObjectID)
	}
	return viewAll[*ferrypb.RoleAssignment](v, TableRoleAssignments, "id")
}

// SigningKeys returns every published bridge signing key, by kid.
func (v *View) SigningKeys() []*ferrypb.SigningKey {
	return viewAll[*ferrypb.SigningKey](v, TableSigningKeys, "id")
}

// SystemAssignedIdentity returns the system-assigned identity of an entry
// (entryID set) or an agent (agentID), or nil.
func (v *View) SystemAssignedIdentity(entryID, agentID string) *ferrypb.Identity {
	return viewFirst[*ferrypb.Identity](v, TableIdentities, "owner", entryID, agentID)
}
