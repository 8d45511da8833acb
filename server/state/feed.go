package state

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"

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

	size int64 // encoded size of Row, counted against the feed's byte budget
}

// ErrCompacted is returned for "changes since N" when the feed no longer holds every
// change after N (it keeps a bounded window, and a snapshot restore empties it). The
// watcher reloads the table from a View and continues from View.Index.
var ErrCompacted = errors.New("state: changes since that index were compacted; reload")

// Defaults for the feed's bounds: the changes it keeps at most, and the least
// bytes of rows it may keep (see feed.budget).
const (
	defaultFeedWindow = 1 << 16
	defaultFeedBytes  = 64 << 10
)

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
	// bytes is the encoded size of the rows of changes; minBytes the least
	// budget for it (see budget).
	bytes, minBytes int64
	notify          chan struct{} // closed and replaced on every append or reset
	// waiting counts the watchers blocked for a change (tests wait on it).
	waiting atomic.Int32
}

func newFeed(window int, minBytes int64, base uint64) *feed {
	return &feed{base: base, last: base, window: window, minBytes: minBytes, notify: make(chan struct{})}
}

// budget is the most bytes of rows the feed keeps while the state's rows take
// stateBytes: as much as the state, and at least minBytes. A watcher further
// behind reloads the state, which costs no more than replaying that many
// changes would; keeping more only holds history (deleted and replaced rows)
// in memory.
func (f *feed) budget(stateBytes int64) int64 { return max(f.minBytes, stateBytes) }

// append adds the changes of commands applied up to index last, then drops
// the oldest commands' changes beyond the window or the byte budget for a
// state of stateBytes.
func (f *feed) append(cs []Change, last uint64, stateBytes int64) {
	f.mu.Lock()
	if last > f.last {
		f.last = last
	}
	if len(cs) == 0 {
		f.mu.Unlock()
		return
	}
	for i := range cs {
		cs[i].size = int64(proto.Size(cs[i].Row))
		f.bytes += cs[i].size
	}
	f.changes = append(f.changes, cs...)
	budget := f.budget(stateBytes)
	cut := 0
	for over := len(f.changes) - f.window; cut < len(f.changes) && (cut < over || f.bytes > budget); {
		// Drop whole commands only: a watcher must never see half of one.
		index := f.changes[cut].Index
		for cut < len(f.changes) && f.changes[cut].Index == index {
			f.bytes -= f.changes[cut].size
			cut++
		}
		f.base = index
	}
	if cut > 0 {
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
	f.bytes = 0
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
		f.waiting.Add(1)
		select {
		case <-ctx.Done():
			f.waiting.Add(-1)
			return nil, ctx.Err()
		case <-wait:
		}
		f.waiting.Add(-1)
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
