package state

import (
	"errors"
	"fmt"

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
			"selector":  {Name: "selector", AllowMissing: true, Indexer: selectorIndexer{}},
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

// selectorIndexer indexes an entry under each of its selectors, as "type:value".
type selectorIndexer struct{}

func (selectorIndexer) FromObject(obj any) (bool, [][]byte, error) {
	e, ok := obj.(*ferrypb.Entry)
	if !ok {
		return false, nil, fmt.Errorf("state: selector index on %T", obj)
	}
	if len(e.Selectors) == 0 {
		return false, nil, nil
	}
	vals := make([][]byte, 0, len(e.Selectors))
	for _, s := range e.Selectors {
		vals = append(vals, []byte(selectorKey(s)+"\x00"))
	}
	return true, vals, nil
}

func (selectorIndexer) FromArgs(args ...any) ([]byte, error) {
	if len(args) != 1 {
		return nil, errors.New("state: selector index takes one argument")
	}
	switch v := args[0].(type) {
	case *ferrypb.Selector:
		return []byte(selectorKey(v) + "\x00"), nil
	case string:
		return []byte(v + "\x00"), nil
	default:
		return nil, fmt.Errorf("state: selector index argument %T", v)
	}
}

func selectorKey(s *ferrypb.Selector) string { return s.GetType() + ":" + s.GetValue() }
