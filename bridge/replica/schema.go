package replica

import (
	"errors"
	"fmt"

	"github.com/hashicorp/go-memdb"

	"github.com/ferry-id/ferry/proto/ferrypb"
)

const (
	tableTenants     = "tenants"
	tableIdentities  = "identities"
	tableCredentials = "federated_credentials"
	tableResources   = "resources"
	tableAssignments = "role_assignments"
	tableKeys        = "signing_keys"
	tableBundles     = "bundles"
)

// newDB returns an empty database with the indexes the lookups need. Primary
// keys are the server's, so a change's row finds the row it replaces.
func newDB() (*memdb.MemDB, error) {
	str := func(field string) memdb.Indexer { return &memdb.StringFieldIndex{Field: field} }
	byID := func(ix memdb.Indexer) *memdb.IndexSchema {
		return &memdb.IndexSchema{Name: "id", Unique: true, Indexer: ix}
	}
	table := func(name string, id memdb.Indexer, more ...*memdb.IndexSchema) *memdb.TableSchema {
		t := &memdb.TableSchema{Name: name, Indexes: map[string]*memdb.IndexSchema{"id": byID(id)}}
		for _, ix := range more {
			t.Indexes[ix.Name] = ix
		}
		return t
	}
	schema := &memdb.DBSchema{Tables: map[string]*memdb.TableSchema{
		tableTenants: table(tableTenants, str("Id")),
		tableIdentities: table(tableIdentities, str("ObjectId"),
			&memdb.IndexSchema{Name: "client_id", Unique: true, Indexer: str("ClientId")}),
		// Credential names are keys case-insensitively, as on the server.
		tableCredentials: table(tableCredentials,
			&memdb.CompoundIndex{Indexes: []memdb.Indexer{str("IdentityObjectId"), &memdb.StringFieldIndex{Field: "Name", Lowercase: true}}},
			&memdb.IndexSchema{Name: "identity", Indexer: str("IdentityObjectId")}),
		tableResources: table(tableResources, str("ObjectId"),
			&memdb.IndexSchema{Name: "identifier", Indexer: identifierIndexer{}}),
		tableAssignments: table(tableAssignments, str("Id"),
			&memdb.IndexSchema{Name: "resource_principal", Indexer: &memdb.CompoundIndex{Indexes: []memdb.Indexer{str("ResourceObjectId"), str("PrincipalObjectId")}}}),
		tableKeys:    table(tableKeys, str("Kid")),
		tableBundles: table(tableBundles, str("TrustDomain")),
	}}
	db, err := memdb.NewMemDB(schema)
	if err != nil {
		return nil, fmt.Errorf("replica: schema: %w", err)
	}
	return db, nil
}

// identifierIndexer indexes a resource under "tenant\x00identifier" for its app
// ID and each identifier URI.
type identifierIndexer struct{}

func (identifierIndexer) FromObject(obj any) (bool, [][]byte, error) {
	r, ok := obj.(*ferrypb.Resource)
	if !ok {
		return false, nil, fmt.Errorf("replica: identifier index on %T", obj)
	}
	vals := [][]byte{identifierKey(r.TenantId, r.AppId)}
	for _, u := range r.IdentifierUris {
		vals = append(vals, identifierKey(r.TenantId, u))
	}
	return true, vals, nil
}

func (identifierIndexer) FromArgs(args ...any) ([]byte, error) {
	if len(args) != 2 {
		return nil, errors.New("replica: identifier index takes tenant and identifier")
	}
	t, ok1 := args[0].(string)
	id, ok2 := args[1].(string)
	if !ok1 || !ok2 {
		return nil, errors.New("replica: identifier index arguments must be strings")
	}
	return identifierKey(t, id), nil
}

func identifierKey(tenant, id string) []byte { return []byte(tenant + "\x00" + id + "\x00") }
