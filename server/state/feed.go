package state

import (
	"context"
	"errors"
	"sync"

	"google.golang.org/protobuf/proto"
)

// Op says what a change did to a row.
type Op int

const (
	// OpUpsert is a created or updated row; Change.Row is the row after the change.
	OpUpsert Op = iota + 1
	// OpDelete is a deleted row; Change.Row is the row as it was before.
	OpDelete
)

func (o Op) String() string {
	switch o {
	case OpUpsert:
		return "upsert"
	case OpDelete:
		return "delete"
	}
	return "unknown"
}

// Change is one row changed by the command at Raft index Index.
type Change struct {
	Index uint64
	Table string
	Op    Op
	Key   string
	// Row is shared with the store and other watchers: never modify it.
	Row proto.Message
}

// ErrCompacted is returned for "changes since N" when the feed no longer holds every
// change after N (it keeps a bounded window, and a snapshot restore empties it). The
// watcher reloads the table from a View and continues from View.Index.
var ErrCompacted = errors.New("state: changes since that index were compacted; reload")

// defaultFeedWindow is how many changes the feed keeps for watchers that fall behind.
const defaultFeedWindow = 1 << 16

// feed is the in-memory window of recent changes. Appends come from the FSM's one
// goroutine; reads from any number of watchers.
type feed struct {
	mu      sync.Mutex
	changes []Change // ascending Index
	// base is the index up to which changes may be missing from the window: a
	// watcher must be at base or later to be served from it.
	base uint64
	// last is the newest applied index the feed has heard of; a watcher claiming to
	// be past it comes from a history a restore replaced.
	last   uint64
	window int
	notify chan struct{} // closed and replaced on every append or reset
}

func newFeed(window int, base uint64) *feed {
	return &feed{base: base, last: base, window: window, notify: make(chan struct{})}
}

// append adds the changes of commands applied up to index last.
func (f *feed) append(cs []Change, last uint64) {
	f.mu.Lock()
	if last > f.last {
		f.last = last
	}
	if len(cs) == 0 {
		f.mu.Unlock()
		return
	}
	f.changes = append(f.changes, cs...)
	if over := len(f.changes) - f.window; over > 0 {
		// Drop whole commands only: a watcher must never see half of one.
		cut := over
		for cut < len(f.changes) && f.changes[cut].Index == f.changes[cut-1].Index {
			cut++
		}
		f.base = f.changes[cut-1].Index
		f.changes = append(f.changes[:0:0], f.changes[cut:]...)
	}
	close(f.notify)
	f.notify = make(chan struct{})
	f.mu.Unlock()
}

// reset empties the window after a restore: nobody can be served changes from
// before index.
func (f *feed) reset(index uint64) {
	f.mu.Lock()
	f.changes = nil
	f.base = index
	f.last = index
	close(f.notify)
	f.notify = make(chan struct{})
	f.mu.Unlock()
}

// since returns the changes after index in the given tables (all when empty),
// blocking until there is at least one or ctx ends.
func (f *feed) since(ctx context.Context, index uint64, tables []string) ([]Change, error) {
	for {
		f.mu.Lock()
		if index < f.base || index > f.last {
			f.mu.Unlock()
			return nil, ErrCompacted
		}
		var out []Change
		// Binary search for the first change after index.
		lo, hi := 0, len(f.changes)
		for lo < hi {
			mid := (lo + hi) / 2
			if f.changes[mid].Index <= index {
				lo = mid + 1
			} else {
				hi = mid
			}
		}
		for _, c := range f.changes[lo:] {
			if wanted(c.Table, tables) {
				out = append(out, c)
			}
		}
		wait := f.notify
		f.mu.Unlock()
		if len(out) > 0 {
			return out, nil
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-wait:
		}
	}
}

func wanted(table string, tables []string) bool {
	if len(tables) == 0 {
		return true
	}
	for _, t := range tables {
		if t == table {
			return true
		}
	}
	return false
}
