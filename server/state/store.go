package state

import (
	"context"
	"encoding/binary"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-memdb"
	"github.com/hashicorp/raft"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/ferry-id/ferry/proto/ferrypb"
)

// DefaultDedupWindow is how long, in command time, a request ID is remembered.
// A retry later than that is applied again.
const DefaultDedupWindow = 15 * time.Minute

// Config configures a Store. The zero value is usable.
type Config struct {
	Logger *slog.Logger
	// DedupWindow is how long request IDs are remembered (DefaultDedupWindow if 0).
	DedupWindow time.Duration
	// FeedWindow is how many changes the change feed keeps at most (65,536 if
	// 0). It also keeps no more bytes of rows than the state's rows take, or
	// FeedBytes (64 KiB if 0) if more.
	FeedWindow int
	FeedBytes  int64
}

// Store is the server's replicated state. It implements raft.FSM and
// raft.BatchingFSM; reads go through View.
type Store struct {
	log         *slog.Logger
	dedupWindow time.Duration
	feedWindow  int

	// mu makes (db, feed, applied) change together: a View sees a database and an
	// index that belong to each other. Apply holds it only for the commit.
	mu      sync.RWMutex
	db      *memdb.MemDB
	feed    *feed
	applied atomic.Uint64
	// rowBytes is the encoded size of every row of db; appliedBytes the size
	// of the log entries applied since the store was made.
	rowBytes     atomic.Int64
	appliedBytes atomic.Uint64
	// appliedCh is closed and replaced whenever applied moves.
	appliedCh chan struct{}
}

var (
	_ raft.FSM         = (*Store)(nil)
	_ raft.BatchingFSM = (*Store)(nil)
)

// New returns an empty store.
func New(cfg Config) (*Store, error) {
	db, err := memdb.NewMemDB(schema())
	if err != nil {
		return nil, fmt.Errorf("state: schema: %w", err)
	}
	s := &Store{
		log:         cfg.Logger,
		dedupWindow: cfg.DedupWindow,
		feedWindow:  cfg.FeedWindow,
		db:          db,
		appliedCh:   make(chan struct{}),
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if s.dedupWindow <= 0 {
		s.dedupWindow = DefaultDedupWindow
	}
	if s.feedWindow <= 0 {
		s.feedWindow = defaultFeedWindow
	}
	if cfg.FeedBytes <= 0 {
		cfg.FeedBytes = defaultFeedBytes
	}
	s.feed = newFeed(s.feedWindow, cfg.FeedBytes, 0)
	return s, nil
}

// AppliedBytes is the size of the log entries applied since the store was
// made (a snapshot restore does not count): how much writing it has seen.
func (s *Store) AppliedBytes() uint64 { return s.appliedBytes.Load() }

// StateBytes is the encoded size of the state's rows: what a snapshot of it
// holds, give or take framing.
func (s *Store) StateBytes() int64 { return s.rowBytes.Load() }

// AppliedIndex is the Raft index of the last log entry applied.
func (s *Store) AppliedIndex() uint64 { return s.applied.Load() }

// WaitForIndex blocks until the store has applied index, or ctx ends.
func (s *Store) WaitForIndex(ctx context.Context, index uint64) error {
	for {
		s.mu.RLock()
		ch := s.appliedCh
		s.mu.RUnlock()
		if s.applied.Load() >= index {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-ch:
		}
	}
}

// ChangesSince returns every change to the given tables (all tables when none are
// named) made by commands after index, blocking until there is at least one or ctx
// ends. It returns ErrCompacted when the feed no longer reaches back to index: the
// caller reloads from a View and continues from View.Index.
func (s *Store) ChangesSince(ctx context.Context, index uint64, tables ...string) ([]Change, error) {
	s.mu.RLock()
	f := s.feed
	s.mu.RUnlock()
	return f.since(ctx, index, tables)
}

// Apply applies one Raft log entry. It returns a *ferrypb.CommandResult for
// commands, nil for other log types.
func (s *Store) Apply(l *raft.Log) any {
	return s.ApplyBatch([]*raft.Log{l})[0]
}

// ApplyBatch applies several log entries in one transaction.
func (s *Store) ApplyBatch(logs []*raft.Log) []any {
	out := make([]any, len(logs))
	if len(logs) == 0 {
		return out
	}
	txn := s.db.Txn(true)
	txn.TrackChanges()
	var changes []Change
	for i, l := range logs {
		if l.Type != raft.LogCommand {
			continue
		}
		res, cs := s.applyOne(txn, l)
		out[i] = res
		changes = append(changes, cs...)
	}
	var delta int64
	for _, c := range txn.Changes() {
		delta += rowSize(c.After) - rowSize(c.Before)
	}
	last := logs[len(logs)-1].Index
	var n uint64
	for _, l := range logs {
		n += uint64(len(l.Data))
	}
	s.appliedBytes.Add(n)
	s.mu.Lock()
	txn.Commit()
	rows := s.rowBytes.Add(delta)
	s.feed.append(changes, last, rows)
	s.applied.Store(last)
	close(s.appliedCh)
	s.appliedCh = make(chan struct{})
	s.mu.Unlock()
	return out
}

// rowSize is the encoded size of a row (0 for none).
func rowSize(row any) int64 {
	if m, ok := row.(proto.Message); ok {
		return int64(proto.Size(m))
	}
	return 0
}

// applyOne applies a command inside txn, de-duplicating by request ID.
func (s *Store) applyOne(txn *memdb.Txn, l *raft.Log) (*ferrypb.CommandResult, []Change) {
	cmd, err := DecodeCommand(l.Data)
	if err != nil {
		// Every node decodes the same bytes the same way, so refusing is
		// deterministic; the submitter gets the error.
		s.log.Error("undecodable log entry", "index", l.Index, "error", err)
		return failed(l.Index, codes.InvalidArgument, err.Error()), nil
	}
	if b, isBatch := cmd.Op.(*ferrypb.Command_Batch); isBatch {
		// A group commit: independent commands sharing one log entry, each
		// de-duplicated and answered on its own.
		out := &ferrypb.CommandResult{Index: l.Index, Status: ok()}
		var changes []Change
		var latest int64
		for _, sub := range b.Batch.Commands {
			if _, nested := sub.Op.(*ferrypb.Command_Batch); nested {
				out.Batch = append(out.Batch, failed(l.Index, codes.InvalidArgument, "batches do not nest"))
				continue
			}
			res, cs := s.applyCommand(txn, l.Index, sub)
			out.Batch = append(out.Batch, res)
			changes = append(changes, cs...)
			latest = max(latest, sub.TimeUnixNano)
		}
		s.pruneRequests(txn, latest)
		return out, changes
	}
	res, changes := s.applyCommand(txn, l.Index, cmd)
	s.pruneRequests(txn, cmd.TimeUnixNano)
	return res, changes
}

// applyCommand applies one command at index, or answers a request ID it has
// already applied with the stored result.
func (s *Store) applyCommand(txn *memdb.Txn, index uint64, cmd *ferrypb.Command) (*ferrypb.CommandResult, []Change) {
	if cmd.RequestId != "" {
		raw, err := txn.First(TableRequests, "id", cmd.RequestId)
		if err != nil {
			panic(fmt.Sprintf("state: requests lookup: %v", err))
		}
		if raw != nil {
			return replayResult(txn, raw.(*ferrypb.AppliedRequest)), nil
		}
	}
	a := &applier{txn: txn, index: index, now: time.Unix(0, cmd.TimeUnixNano)}
	res := a.apply(cmd)
	res.Index = index
	if cmd.RequestId != "" {
		must(txn.Insert(TableRequests, appliedRequest(cmd.RequestId, index, cmd.TimeUnixNano, res)))
	}
	return res, a.changes
}

// appliedRequest is what the requests table keeps of a command's result: the
// result without its entry rows, which it names by ID and revision instead
// (see ferrypb.AppliedRequest).
func appliedRequest(requestID string, index uint64, timeUnixNano int64, res *ferrypb.CommandResult) *ferrypb.AppliedRequest {
	ar := &ferrypb.AppliedRequest{RequestId: requestID, Index: index, TimeUnixNano: timeUnixNano, Result: res}
	if len(res.Entries) == 0 && len(res.Items) == 0 {
		return ar
	}
	ar.Result = withoutEntries(res)
	ar.Result.Items = shareOK(res.Items)
	if len(res.Entries) == 0 {
		return ar
	}
	var n int
	var scratch [binary.MaxVarintLen64]byte
	for _, e := range res.Entries {
		if e == nil {
			n++
			continue
		}
		n += len(binary.AppendUvarint(scratch[:0], uint64(len(e.Id))+1)) + len(e.Id) + len(binary.AppendUvarint(scratch[:0], e.Revision))
	}
	refs := make([]byte, 0, n)
	for _, e := range res.Entries {
		if e == nil {
			refs = binary.AppendUvarint(refs, 0)
			continue
		}
		refs = binary.AppendUvarint(refs, uint64(len(e.Id))+1)
		refs = append(refs, e.Id...)
		refs = binary.AppendUvarint(refs, e.Revision)
	}
	ar.EntryRefs = refs
	return ar
}

// shareOK returns items with every plain OK status replaced by okStatus: a
// batch's items are mostly that, and the requests table keeps them a while.
func shareOK(items []*ferrypb.Status) []*ferrypb.Status {
	out := make([]*ferrypb.Status, len(items))
	for i, st := range items {
		if proto.Equal(st, okStatus) {
			st = okStatus
		}
		out[i] = st
	}
	return out
}

// replayResult answers a retry from its AppliedRequest: the stored result
// with its entries looked up again.
func replayResult(txn *memdb.Txn, ar *ferrypb.AppliedRequest) *ferrypb.CommandResult {
	if len(ar.EntryRefs) == 0 {
		return ar.Result
	}
	out := withoutEntries(ar.Result)
	for refs := ar.EntryRefs; len(refs) > 0; {
		l, k := binary.Uvarint(refs)
		if k <= 0 || (l > 0 && uint64(len(refs)-k) < l-1) {
			break // not written by appliedRequest: stop at garbage
		}
		refs = refs[k:]
		if l == 0 {
			out.Entries = append(out.Entries, nil)
			continue
		}
		id := string(refs[:l-1])
		refs = refs[l-1:]
		rev, k := binary.Uvarint(refs)
		if k <= 0 {
			break
		}
		refs = refs[k:]
		raw, err := txn.First(TableEntries, "id", id)
		must(err)
		if e, ok := raw.(*ferrypb.Entry); ok && e.Revision == rev {
			out.Entries = append(out.Entries, e)
		} else {
			out.Entries = append(out.Entries, &ferrypb.Entry{Id: id, Revision: rev})
		}
	}
	return out
}

// withoutEntries is a shallow copy of res (sharing its other fields' values)
// without its entries.
func withoutEntries(res *ferrypb.CommandResult) *ferrypb.CommandResult {
	src := res.ProtoReflect()
	dst := src.New()
	entries := src.Descriptor().Fields().ByName("entries")
	src.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		if fd != entries {
			dst.Set(fd, v)
		}
		return true
	})
	return dst.Interface().(*ferrypb.CommandResult)
}

// pruneRequests forgets request IDs older than the dedup window, measured in
// command time so every node prunes the same rows.
func (s *Store) pruneRequests(txn *memdb.Txn, now int64) {
	cutoff := now - s.dedupWindow.Nanoseconds()
	if cutoff <= 0 {
		return
	}
	// Few rows expire per command; stop at the first one still inside the window.
	for {
		it, err := txn.LowerBound(TableRequests, "time", int64(0))
		if err != nil {
			panic(fmt.Sprintf("state: requests scan: %v", err))
		}
		raw := it.Next()
		if raw == nil || raw.(*ferrypb.AppliedRequest).TimeUnixNano >= cutoff {
			return
		}
		must(txn.Delete(TableRequests, raw))
	}
}

// applier applies one command at one index.
type applier struct {
	txn     *memdb.Txn
	index   uint64
	now     time.Time
	changes []Change
}

func (a *applier) apply(cmd *ferrypb.Command) *ferrypb.CommandResult {
	switch op := cmd.Op.(type) {
	case *ferrypb.Command_EntriesCreate:
		return a.createEntries(op.EntriesCreate)
	case *ferrypb.Command_EntriesUpdate:
		return a.updateEntries(op.EntriesUpdate)
	case *ferrypb.Command_EntriesDelete:
		return a.deleteEntries(op.EntriesDelete.Ids)
	case *ferrypb.Command_JoinTokenCreate:
		return a.createJoinToken(op.JoinTokenCreate.Token)
	case *ferrypb.Command_JoinTokenConsume:
		return a.consumeJoinToken(op.JoinTokenConsume.Hash)
	case *ferrypb.Command_NodePut:
		return a.putNode(op.NodePut)
	case *ferrypb.Command_NodeDelete:
		return a.deleteNode(op.NodeDelete.SpiffeId)
	case *ferrypb.Command_NodeBan:
		return a.banNode(op.NodeBan)
	case *ferrypb.Command_NodeIdentitySet:
		return a.setNodeIdentity(op.NodeIdentitySet)
	case *ferrypb.Command_BundleX509AuthorityPut:
		return a.putX509Authority(op.BundleX509AuthorityPut)
	case *ferrypb.Command_BundleX509AuthorityRemove:
		return a.removeX509Authority(op.BundleX509AuthorityRemove)
	case *ferrypb.Command_BundleJwtAuthorityPut:
		return a.putJWTAuthority(op.BundleJwtAuthorityPut)
	case *ferrypb.Command_BundleJwtAuthorityRemove:
		return a.removeJWTAuthority(op.BundleJwtAuthorityRemove)
	case *ferrypb.Command_BundleSet:
		return a.setBundle(op.BundleSet)
	case *ferrypb.Command_BundleDelete:
		return a.deleteBundle(op.BundleDelete.TrustDomain)
	// Directory (directory.go).
	case *ferrypb.Command_TenantPut:
		return a.putTenant(op.TenantPut.Tenant, op.TenantPut.CreateOnly)
	case *ferrypb.Command_TenantDelete:
		return a.deleteTenant(op.TenantDelete.Id)
	case *ferrypb.Command_IdentityPut:
		return a.putIdentity(op.IdentityPut)
	case *ferrypb.Command_IdentityDelete:
		return a.deleteIdentity(op.IdentityDelete.ObjectId)
	case *ferrypb.Command_FederatedCredentialPut:
		return a.putCredential(op.FederatedCredentialPut)
	case *ferrypb.Command_FederatedCredentialDelete:
		return a.deleteCredential(op.FederatedCredentialDelete)
	case *ferrypb.Command_ResourcePut:
		return a.putResource(op.ResourcePut)
	case *ferrypb.Command_ResourceDelete:
		return a.deleteResource(op.ResourceDelete.ObjectId)
	case *ferrypb.Command_RoleAssignmentPut:
		return a.putRoleAssignment(op.RoleAssignmentPut.Assignment)
	case *ferrypb.Command_RoleAssignmentDelete:
		return a.deleteRoleAssignment(op.RoleAssignmentDelete.Id)
	case *ferrypb.Command_SigningKeyPut:
		return a.putSigningKey(op.SigningKeyPut.Key)
	case *ferrypb.Command_SigningKeyDelete:
		return a.deleteSigningKey(op.SigningKeyDelete.Kid)
	// Federation (federation.go).
	case *ferrypb.Command_FederationPut:
		return a.putFederation(op.FederationPut)
	case *ferrypb.Command_FederationDelete:
		return a.deleteFederation(op.FederationDelete.TrustDomain)
	case *ferrypb.Command_FederationStatusSet:
		return a.setFederationStatus(op.FederationStatusSet)
	// Authority rotation (reports.go).
	case *ferrypb.Command_AgentReportPut:
		return a.putAgentReport(op.AgentReportPut)
	case nil:
		if cmd.IgnoreUnknown {
			return &ferrypb.CommandResult{Status: ok()}
		}
		// A newer server wrote a command this one does not know. Applying
		// nothing would make this node's state diverge from the others; stopping
		// lets the operator upgrade it.
		panic("state: unknown command type in the log; upgrade this server")
	default:
		panic(fmt.Sprintf("state: command %T has no handler", op))
	}
}

func (a *applier) upsert(table, key string, row proto.Message) {
	must(a.txn.Insert(table, row))
	a.changes = append(a.changes, Change{Index: a.index, Table: table, Op: OpUpsert, Key: key, Row: row})
}

func (a *applier) delete(table, key string, row proto.Message) {
	must(a.txn.Delete(table, row))
	a.changes = append(a.changes, Change{Index: a.index, Table: table, Op: OpDelete, Key: key, Row: row})
}

func ok() *ferrypb.Status { return &ferrypb.Status{Code: int32(codes.OK)} }

// okStatus is the one OK status the requests table keeps for every item that
// had it; like every row it is shared and must not be modified.
var okStatus = ok()

func status(c codes.Code, format string, args ...any) *ferrypb.Status {
	return &ferrypb.Status{Code: int32(c), Message: fmt.Sprintf(format, args...)}
}

func failed(index uint64, c codes.Code, msg string) *ferrypb.CommandResult {
	return &ferrypb.CommandResult{Index: index, Status: &ferrypb.Status{Code: int32(c), Message: msg}}
}

// must stops the FSM on a go-memdb error: they come only from schema mistakes,
// and carrying on would let this node diverge.
func must(err error) {
	if err != nil {
		panic(fmt.Sprintf("state: %v", err))
	}
}
