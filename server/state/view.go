package state

import (
	"github.com/hashicorp/go-memdb"

	"github.com/ferry-id/ferry/proto/ferrypb"
)

// View is a consistent, immutable read of the whole state as of Index. It is cheap
// to take and safe to use from any goroutine; rows it returns are shared and must
// not be modified.
type View struct {
	txn   *memdb.Txn
	index uint64
}

// View returns a read view of the current state.
func (s *Store) View() *View {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return &View{txn: s.db.Txn(false), index: s.applied.Load()}
}

// Index is the Raft index the view reflects: a watcher that loads a table from this
// view continues with ChangesSince(Index).
func (v *View) Index() uint64 { return v.index }

// Entry returns the entry with the given ID, or nil.
func (v *View) Entry(id string) *ferrypb.Entry {
	raw, err := v.txn.First(TableEntries, "id", id)
	if err != nil || raw == nil {
		return nil
	}
	return raw.(*ferrypb.Entry)
}

// EntryFilter narrows ListEntries; empty fields do not filter.
type EntryFilter struct {
	SpiffeID string
	ParentID string
	Hint     string
	// Selectors: entries whose selectors include all of these.
	Selectors []*ferrypb.Selector
}

// ListEntries returns up to limit entries (all when limit <= 0) that match f, in
// entry ID order, starting after the entry ID `after`. next is the ID to pass as
// `after` for the following page, or "" when there is none.
//
// Selectors alone are not indexed: such a filter scans the entries (a few
// milliseconds per 10,000). An index on them cost every entry three index
// inserts, about 40% of what writing, replaying and restoring an entry costs,
// and as much memory, for an operator's query.
func (v *View) ListEntries(f EntryFilter, after string, limit int) (entries []*ferrypb.Entry, next string) {
	var it memdb.ResultIterator
	var err error
	switch {
	case f.SpiffeID != "":
		it, err = v.txn.Get(TableEntries, "spiffe_id", f.SpiffeID)
	case f.ParentID != "":
		it, err = v.txn.Get(TableEntries, "parent_id", f.ParentID)
	case f.Hint != "":
		it, err = v.txn.Get(TableEntries, "hint", f.Hint)
	default:
		it, err = v.txn.LowerBound(TableEntries, "id", after)
	}
	if err != nil {
		return nil, ""
	}
	var want []string
	if len(f.Selectors) > 0 {
		want = selectorKeys(f.Selectors)
	}
	for raw := it.Next(); raw != nil; raw = it.Next() {
		e := raw.(*ferrypb.Entry)
		if after != "" && e.Id <= after {
			continue
		}
		if !matches(e, f, want) {
			continue
		}
		if limit > 0 && len(entries) == limit {
			return entries, entries[len(entries)-1].Id
		}
		entries = append(entries, e)
	}
	return entries, ""
}

func matches(e *ferrypb.Entry, f EntryFilter, want []string) bool {
	if f.SpiffeID != "" && e.SpiffeId != f.SpiffeID {
		return false
	}
	if f.ParentID != "" && e.ParentId != f.ParentID {
		return false
	}
	if f.Hint != "" && e.Hint != f.Hint {
		return false
	}
	if len(want) > 0 {
		have := selectorKeys(e.Selectors)
		for _, w := range want {
			if !containsSorted(have, w) {
				return false
			}
		}
	}
	return true
}

func containsSorted(sorted []string, s string) bool {
	lo, hi := 0, len(sorted)
	for lo < hi {
		m := (lo + hi) / 2
		if sorted[m] < s {
			lo = m + 1
		} else {
			hi = m
		}
	}
	return lo < len(sorted) && sorted[lo] == s
}

// CountEntries returns the number of entries.
func (v *View) CountEntries() int {
	it, err := v.txn.Get(TableEntries, "id")
	if err != nil {
		return 0
	}
	n := 0
	for raw := it.Next(); raw != nil; raw = it.Next() {
		n++
	}
	return n
}

// Node returns the attested node with the given SPIFFE ID, or nil.
func (v *View) Node(id string) *ferrypb.AttestedNode {
	raw, err := v.txn.First(TableNodes, "id", id)
	if err != nil || raw == nil {
		return nil
	}
	return raw.(*ferrypb.AttestedNode)
}

// Nodes returns every attested node, by SPIFFE ID.
func (v *View) Nodes() []*ferrypb.AttestedNode {
	var out []*ferrypb.AttestedNode
	it, err := v.txn.Get(TableNodes, "id")
	if err != nil {
		return nil
	}
	for raw := it.Next(); raw != nil; raw = it.Next() {
		out = append(out, raw.(*ferrypb.AttestedNode))
	}
	return out
}

// JoinToken returns the unused join token with the given hash, or nil.
func (v *View) JoinToken(hash string) *ferrypb.JoinToken {
	raw, err := v.txn.First(TableJoinTokens, "id", hash)
	if err != nil || raw == nil {
		return nil
	}
	return raw.(*ferrypb.JoinToken)
}

// Bundle returns the bundle of a trust domain, or nil.
func (v *View) Bundle(td string) *ferrypb.Bundle {
	raw, err := v.txn.First(TableBundles, "id", td)
	if err != nil || raw == nil {
		return nil
	}
	return raw.(*ferrypb.Bundle)
}

// Bundles returns every bundle, by trust domain.
func (v *View) Bundles() []*ferrypb.Bundle {
	var out []*ferrypb.Bundle
	it, err := v.txn.Get(TableBundles, "id")
	if err != nil {
		return nil
	}
	for raw := it.Next(); raw != nil; raw = it.Next() {
		out = append(out, raw.(*ferrypb.Bundle))
	}
	return out
}

// AuthorizedEntries returns the entries an agent may serve: those parented on the
// agent, on a node alias the agent belongs to (an entry parented on serverID whose
// selectors are all among the agent's node selectors), and, transitively, on any
// SPIFFE ID those entries issue (downstream and nested workloads).
func (v *View) AuthorizedEntries(agentID, serverID string, nodeSelectors []*ferrypb.Selector) []*ferrypb.Entry {
	parents := []string{agentID}
	seen := map[string]bool{agentID: true}
	for _, id := range v.NodeAliases(serverID, nodeSelectors) {
		if !seen[id] {
			seen[id] = true
			parents = append(parents, id)
		}
	}
	var out []*ferrypb.Entry
	got := map[string]bool{}
	for len(parents) > 0 {
		p := parents[0]
		parents = parents[1:]
		children, _ := v.ListEntries(EntryFilter{ParentID: p}, "", 0)
		for _, e := range children {
			if got[e.Id] {
				continue
			}
			got[e.Id] = true
			out = append(out, e)
			if !seen[e.SpiffeId] {
				seen[e.SpiffeId] = true
				parents = append(parents, e.SpiffeId)
			}
		}
	}
	return out
}

// NodeAliases returns the SPIFFE IDs of the node aliases an agent with
// nodeSelectors belongs to: entries parented on serverID whose selectors are
// all among nodeSelectors (a SPIFFE ID once per alias entry).
func (v *View) NodeAliases(serverID string, nodeSelectors []*ferrypb.Selector) []string {
	w := authWalk{have: selectorKeys(nodeSelectors)}
	aliases, _ := v.ListEntries(EntryFilter{ParentID: serverID}, "", 0)
	var out []string
	for _, e := range aliases {
		if w.alias(e) {
			out = append(out, e.SpiffeId)
		}
	}
	return out
}

// AuthorizedEntry returns the entry with ID id if AuthorizedEntries (same
// arguments) would include it, else nil. It walks up from the entry through
// its parents instead of listing all an agent may serve, so its cost does not
// grow with the agent's other entries.
func (v *View) AuthorizedEntry(id, agentID, serverID string, nodeSelectors []*ferrypb.Selector) *ferrypb.Entry {
	e := v.Entry(id)
	if e == nil {
		return nil
	}
	w := authWalk{v: v, agentID: agentID, serverID: serverID, have: selectorKeys(nodeSelectors), visiting: map[string]bool{}}
	if !w.parentAuthorized(e.ParentId) {
		return nil
	}
	return e
}

// authWalk decides whether a SPIFFE ID is one an agent's authorized entries
// may be parented on: the agent's own ID, a node alias the agent belongs to,
// or the ID of an authorized entry.
type authWalk struct {
	v                 *View
	agentID, serverID string
	have              []string // the agent's node selectors, as selectorKeys
	visiting          map[string]bool
}

func (w *authWalk) parentAuthorized(p string) bool {
	if p == w.agentID {
		return true
	}
	if w.visiting[p] {
		return false // a cycle adds nothing
	}
	w.visiting[p] = true
	issuers, _ := w.v.ListEntries(EntryFilter{SpiffeID: p}, "", 0)
	for _, x := range issuers {
		if x.ParentId == w.serverID && w.alias(x) {
			return true
		}
	}
	for _, x := range issuers {
		if w.parentAuthorized(x.ParentId) {
			return true
		}
	}
	return false
}

// alias reports whether entry x (parented on the server) is a node alias the
// agent belongs to: it has selectors, all among the agent's node selectors.
func (w *authWalk) alias(x *ferrypb.Entry) bool {
	if len(x.Selectors) == 0 {
		return false
	}
	for _, k := range selectorKeys(x.Selectors) {
		if !containsSorted(w.have, k) {
			return false
		}
	}
	return true
}
