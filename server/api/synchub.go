package api

import (
	"context"
	"errors"
	"slices"
	"sync"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/state"
)

// syncHub follows the state's change feed once for every entry stream of the
// server and wakes only the streams a change may concern: a change to an
// entry wakes the streams registered on its parent ID (before and after the
// change), a change to a node row the streams of that agent, a change to a
// node alias (an entry parented on the server) or to a bundle every stream.
// Before, every stream woke on every committed change to entries, nodes or
// bundles and recomputed its agent's whole authorized set: with 10,000 agents
// connected one agent's SVID renewal cost 10,000 recomputations.
//
// A stream registers the IDs its agent's entries may be parented on: the
// agent's own ID, the node aliases it belongs to, and the SPIFFE IDs of the
// entries it was sent (downstream and nested entries).
type syncHub struct {
	store    *state.Store
	serverID string

	mu       sync.Mutex
	running  bool
	cancel   context.CancelFunc
	index    uint64 // changes up to index were dispatched
	streams  map[*syncStream]struct{}
	byAgent  map[string][]*syncStream
	byParent map[string][]*syncStream
}

// syncStream is one SyncEntries stream's mailbox: what changed since it last
// looked. The hub fills it; the stream drains it.
type syncStream struct {
	agentID string
	wake    chan struct{} // capacity 1: a pending signal

	mu      sync.Mutex
	keys    map[string]struct{} // changed entry IDs
	full    bool                // recompute everything (alias change, compaction, catch-up)
	node    bool                // the agent's own node row changed
	bundles bool                // some bundle changed

	// parents is owned by the hub (under hub.mu): what the stream is
	// registered on, with a count of the reasons for each.
	parents map[string]int
}

// maxPendingKeys bounds a slow stream's mailbox: past it the stream
// recomputes its whole set instead.
const maxPendingKeys = 4096

func newSyncHub(store *state.Store, serverID string) *syncHub {
	return &syncHub{store: store, serverID: serverID, streams: map[*syncStream]struct{}{},
		byAgent: map[string][]*syncStream{}, byParent: map[string][]*syncStream{}}
}

// register adds a stream for agentID, starting the hub's loop if it is the
// first. Nothing but the agent's node row is dispatched to it until it
// registers parents (setParents).
func (h *syncHub) register(agentID string) *syncStream {
	s := &syncStream{agentID: agentID, wake: make(chan struct{}, 1), parents: map[string]int{}}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.streams[s] = struct{}{}
	h.byAgent[agentID] = append(h.byAgent[agentID], s)
	if !h.running {
		ctx, cancel := context.WithCancel(context.Background())
		v := h.store.View()
		h.running, h.cancel, h.index = true, cancel, v.Index()
		go h.run(ctx, v)
	}
	return s
}

// unregister removes s; the last stream out stops the loop.
func (h *syncHub) unregister(s *syncStream) {
	h.mu.Lock()
	defer h.mu.Unlock()
	delete(h.streams, s)
	h.byAgent[s.agentID] = remove(h.byAgent[s.agentID], s)
	if len(h.byAgent[s.agentID]) == 0 {
		delete(h.byAgent, s.agentID)
	}
	for p := range s.parents {
		h.drop(p, s)
	}
	s.parents = nil
	if len(h.streams) == 0 && h.running {
		h.cancel()
		h.running = false
	}
}

func (h *syncHub) drop(p string, s *syncStream) {
	if l := remove(h.byParent[p], s); len(l) > 0 {
		h.byParent[p] = l
	} else {
		delete(h.byParent, p)
	}
}

func remove(l []*syncStream, s *syncStream) []*syncStream {
	if i := slices.Index(l, s); i >= 0 {
		l[i] = l[len(l)-1]
		l[len(l)-1] = nil
		return l[:len(l)-1]
	}
	return l
}

// setParents makes s registered on exactly want (ID -> reasons), computed
// from a view at index. It reports whether changes after index may have
// been dispatched before s was registered on a parent it now adds: the
// stream must then recompute from a newer view.
func (h *syncHub) setParents(s *syncStream, want map[string]int, index uint64) (behind bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if s.parents == nil { // unregistered
		return false
	}
	added := false
	for p := range want {
		if _, ok := s.parents[p]; !ok {
			h.byParent[p] = append(h.byParent[p], s)
			added = true
		}
	}
	for p := range s.parents {
		if _, ok := want[p]; !ok {
			h.drop(p, s)
		}
	}
	s.parents = want
	return added && h.index > index
}

// run dispatches the feed's changes to the streams until ctx ends.
func (h *syncHub) run(ctx context.Context, prev *state.View) {
	index := prev.Index()
	done, cancel := context.WithCancel(ctx)
	cancel() // a context that has ended: ChangesSince returns what it has
	for {
		_, err := h.store.ChangesSince(ctx, index, state.TableEntries, state.TableNodes, state.TableBundles)
		if ctx.Err() != nil {
			return
		}
		cur := h.store.View()
		var changes []state.Change
		if err == nil {
			// Every change up to cur's index is in the feed: a view never
			// reflects a command the feed has not been given.
			changes, err = h.store.ChangesSince(done, index, state.TableEntries, state.TableNodes, state.TableBundles)
		}
		if err != nil && !errors.Is(err, state.ErrCompacted) && !errors.Is(err, context.Canceled) {
			return
		}
		h.mu.Lock()
		if ctx.Err() != nil {
			h.mu.Unlock()
			return
		}
		if errors.Is(err, state.ErrCompacted) {
			for s := range h.streams {
				s.post(func() { s.full = true })
			}
		} else {
			h.dispatch(changes, prev, cur.Index())
		}
		h.index = cur.Index()
		h.mu.Unlock()
		prev, index = cur, cur.Index()
	}
}

// dispatch hands each change up to last to the streams it may concern;
// prev is the state the changes apply to. Called with h.mu held.
func (h *syncHub) dispatch(changes []state.Change, prev *state.View, last uint64) {
	for _, c := range changes {
		if c.Index > last {
			break
		}
		switch c.Table {
		case state.TableNodes:
			for _, s := range h.byAgent[c.Key] {
				s.post(func() { s.node = true })
			}
		case state.TableBundles:
			for s := range h.streams {
				s.post(func() { s.bundles = true })
			}
		case state.TableEntries:
			row, _ := c.Row.(*ferrypb.Entry)
			old := prev.Entry(c.Key)
			if (row != nil && row.ParentId == h.serverID) || (old != nil && old.ParentId == h.serverID) {
				// A node alias: which agents it covers depends on their selectors.
				for s := range h.streams {
					s.post(func() { s.full = true })
				}
				continue
			}
			key := c.Key
			if row != nil {
				for _, s := range h.byParent[row.ParentId] {
					s.post(func() { s.addKey(key) })
				}
			}
			if old != nil && (row == nil || old.ParentId != row.ParentId) {
				for _, s := range h.byParent[old.ParentId] {
					s.post(func() { s.addKey(key) })
				}
			}
		}
	}
}

// post changes the mailbox with f and wakes the stream.
func (s *syncStream) post(f func()) {
	s.mu.Lock()
	f()
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// addKey records a changed entry; called with s.mu held.
func (s *syncStream) addKey(id string) {
	if s.full {
		return
	}
	if len(s.keys) >= maxPendingKeys {
		s.full, s.keys = true, nil
		return
	}
	if s.keys == nil {
		s.keys = map[string]struct{}{}
	}
	s.keys[id] = struct{}{}
}

// take empties the mailbox.
func (s *syncStream) take() (keys map[string]struct{}, full, node, bundles bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	keys, full, node, bundles = s.keys, s.full, s.node, s.bundles
	s.keys, s.full, s.node, s.bundles = nil, false, false, false
	return
}
