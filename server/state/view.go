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
func (v *View) ListEntries(f EntryFilter, after string, limit int) (entries []*ferrypb.Entry, next string) {
	var it memdb.ResultIterator
	var err error
	switch {
	case f.SpiffeID != "":
		it, err = v.txn.Get(TableEntries, "spiffe_id", f.SpiffeID)
	case f.ParentID != "":
		it, err = v.txn.Get(TableEntries, "parent_id", f.ParentID)
	case len(f.Selectors) > 0:
		it, err = v.txn.Get(TableEntries, "selector", f.Selectors[0])
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
