package state

import (
	"github.com/hashicorp/go-memdb"

	"github.com/ferry-id/ferry/proto/ferrypb"
)

// Table names. Each table has one schema function below.
const (
	TableEntries    = "entries"
	TableRequests   = "requests"
	TableJoinTokens = "join_tokens"
	TableNodes      = "nodes"
	TableBundles    = "bundles"
)

func schema() *memdb.DBSchema {
	s := &memdb.DBSchema{Tables: map[string]*memdb.TableSchema{
		TableEntries:  entriesTable(),
		TableRequests: requestsTable(),
		TableJoinTokens: {Name: TableJoinTokens, Indexes: map[string]*memdb.IndexSchema{
			"id": {Name: "id", Unique: true, Indexer: &memdb.StringFieldIndex{Field: "Hash"}},
		}},
		TableNodes: {Name: TableNodes, Indexes: map[string]*memdb.IndexSchema{
			"id": {Name: "id", Unique: true, Indexer: &memdb.StringFieldIndex{Field: "SpiffeId"}},
		}},
		TableBundles: {Name: TableBundles, Indexes: map[string]*memdb.IndexSchema{
			"id": {Name: "id", Unique: true, Indexer: &memdb.StringFieldIndex{Field: "TrustDomain"}},
		}},
	}}
	directorySchema(s.Tables) // directory.go
	// federation.go
	s.Tables[TableFederation] = federationTable()
	// reports.go
	s.Tables[TableAgentReports] = agentReportsTable()
	return s
}

func entriesTable() *memdb.TableSchema {
	return &memdb.TableSchema{
		Name: TableEntries,
		Indexes: map[string]*memdb.IndexSchema{
			"id":        {Name: "id", Unique: true, Indexer: &memdb.StringFieldIndex{Field: "Id"}},
			"spiffe_id": {Name: "spiffe_id", Indexer: &memdb.StringFieldIndex{Field: "SpiffeId"}},
			"parent_id": {Name: "parent_id", Indexer: &memdb.StringFieldIndex{Field: "ParentId"}},
			"hint":      {Name: "hint", AllowMissing: true, Indexer: &memdb.StringFieldIndex{Field: "Hint"}},
		},
	}
}

func requestsTable() *memdb.TableSchema {
	return &memdb.TableSchema{
		Name: TableRequests,
		Indexes: map[string]*memdb.IndexSchema{
			"id":   {Name: "id", Unique: true, Indexer: &memdb.StringFieldIndex{Field: "RequestId"}},
			"time": {Name: "time", Indexer: &memdb.IntFieldIndex{Field: "TimeUnixNano"}},
		},
	}
}

func selectorKey(s *ferrypb.Selector) string { return s.GetType() + ":" + s.GetValue() }
