package state

import (
	"google.golang.org/protobuf/proto"

	"github.com/ferry-id/ferry/proto/ferrypb"
)

// FeedWaiters is how many watchers are blocked in ChangesSince for a change.
func (s *Store) FeedWaiters() int {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return int(s.feed.waiting.Load())
}

// RewriteRequestAsBefore stores request id's row as releases before entry
// references stored it: the whole result, entry rows included.
func (s *Store) RewriteRequestAsBefore(id string, res *ferrypb.CommandResult) {
	txn := s.db.Txn(true)
	defer txn.Abort()
	raw, err := txn.First(TableRequests, "id", id)
	if err != nil || raw == nil {
		panic("no request " + id)
	}
	old := proto.Clone(raw.(*ferrypb.AppliedRequest)).(*ferrypb.AppliedRequest)
	old.EntryRefs = nil
	old.Result = res
	must(txn.Insert(TableRequests, old))
	txn.Commit()
}
