// Package api implements the server's gRPC services: the operator's Admin API on
// the admin unix socket. Errors leave as gRPC status codes; everything underneath
// returns plain Go errors.
package api

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strconv"

	"github.com/google/uuid"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/ferry-id/ferry/internal/logging"
	"github.com/ferry-id/ferry/internal/selector"
	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/state"
)

// Cluster is what the Admin API needs from the server's Raft membership.
// Implementations are safe for concurrent use.
type Cluster interface {
	// Apply commits a command (forwarding it to the leader when needed) and returns
	// the FSM's result.
	Apply(ctx context.Context, cmd *ferrypb.Command) (*ferrypb.CommandResult, error)
	// VerifyRead returns once this node's state reflects every write acknowledged
	// before the call (a linearizable read barrier).
	VerifyRead(ctx context.Context) error
	Join(ctx context.Context, addr string) error
	Members(ctx context.Context) (*ferrypb.ClusterListResponse, error)
	Remove(ctx context.Context, id string) error
	SnapshotSave(ctx context.Context, w io.Writer) error
	SnapshotRestore(ctx context.Context, r io.Reader) (uint64, error)
}

// Config configures the Admin service.
type Config struct {
	Cluster Cluster
	Store   *state.Store
	Logger  *slog.Logger
	// MaxBatch is the most entries one command carries (a bigger request is split
	// into several commands). Default 1,000.
	MaxBatch int
	// Authority is this node's CA, for the local authority and mint RPCs;
	// nil answers them Unimplemented.
	Authority AuthorityManager
	// TrustDomain is ours, whose bundle the federated bundle RPCs refuse to
	// touch; default Authority's.
	TrustDomain spiffeid.TrustDomain
	// JWTIssuer is the `iss` of the trust domain's JWT-SVIDs: the issuer of
	// the credential binding a system-assigned identity to its owner. Without
	// it, system-assigned identities cannot be enabled.
	JWTIssuer string
	// Info describes this node for GetServerInfo: build, cluster role and
	// readiness (the API adds the size of the state). Nil leaves them empty.
	Info func() *ferrypb.ServerInfo
	// LogLevel is this node's logger level, for GetLogger, SetLogLevel and
	// ResetLogLevel; nil refuses them.
	LogLevel *logging.Level
	// Selectors checks entry selectors; nil is every compiled-in attestor's
	// (catalog.Selectors()). A server narrows the node class to the node
	// attestors it runs.
	Selectors *selector.Registry
}

// Admin implements ferrypb.AdminServer.
type Admin struct {
	ferrypb.UnimplementedAdminServer
	cfg     Config
	log     *slog.Logger
	entries EntryRules
}

var _ ferrypb.AdminServer = (*Admin)(nil)

// NewAdmin returns the Admin service.
func NewAdmin(cfg Config) (*Admin, error) {
	if cfg.Cluster == nil || cfg.Store == nil {
		return nil, errors.New("api: cluster and store are required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.MaxBatch <= 0 {
		cfg.MaxBatch = 1000
	}
	if cfg.TrustDomain.IsZero() && cfg.Authority != nil {
		cfg.TrustDomain = cfg.Authority.TrustDomain()
	}
	return &Admin{cfg: cfg, log: cfg.Logger, entries: EntryRules{TrustDomain: cfg.TrustDomain, Selectors: cfg.Selectors}}, nil
}

// ClusterJoin asks this node to join the cluster a member of which listens at the
// given address.
func (a *Admin) ClusterJoin(ctx context.Context, req *ferrypb.ClusterJoinRequest) (*ferrypb.ClusterJoinResponse, error) {
	if err := CheckClusterAddress(req.Address); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if err := a.cfg.Cluster.Join(ctx, req.Address); err != nil {
		return nil, toStatus(err)
	}
	return &ferrypb.ClusterJoinResponse{}, nil
}

// CheckClusterAddress checks a server's cluster address: host:port with a
// host and a port from 1 to 65535.
func CheckClusterAddress(addr string) error {
	if addr == "" {
		return errors.New("address is required")
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("address %q: want host:port (%v)", addr, err)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 || host == "" {
		return fmt.Errorf("address %q: want host:port with a port from 1 to 65535", addr)
	}
	return nil
}

func (a *Admin) ClusterList(ctx context.Context, _ *ferrypb.ClusterListRequest) (*ferrypb.ClusterListResponse, error) {
	resp, err := a.cfg.Cluster.Members(ctx)
	if err != nil {
		return nil, toStatus(err)
	}
	return resp, nil
}

func (a *Admin) ClusterRemove(ctx context.Context, req *ferrypb.ClusterRemoveRequest) (*ferrypb.ClusterRemoveResponse, error) {
	if req.Id == "" {
		return nil, status.Error(codes.InvalidArgument, "id is required")
	}
	if err := a.cfg.Cluster.Remove(ctx, req.Id); err != nil {
		return nil, toStatus(err)
	}
	return &ferrypb.ClusterRemoveResponse{}, nil
}

// chunkWriter streams what is written to it as SnapshotChunks.
type chunkWriter struct {
	stream ferrypb.Admin_SnapshotSaveServer
}

func (w chunkWriter) Write(p []byte) (int, error) {
	const max = 1 << 20
	for off := 0; off < len(p); off += max {
		end := min(off+max, len(p))
		if err := w.stream.Send(&ferrypb.SnapshotChunk{Data: p[off:end]}); err != nil {
			return off, err
		}
	}
	return len(p), nil
}

func (a *Admin) SnapshotSave(_ *ferrypb.SnapshotSaveRequest, stream ferrypb.Admin_SnapshotSaveServer) error {
	if err := a.cfg.Cluster.SnapshotSave(stream.Context(), chunkWriter{stream}); err != nil {
		return toStatus(err)
	}
	return nil
}

// chunkReader reads the bytes of a SnapshotChunk client stream.
type chunkReader struct {
	stream ferrypb.Admin_SnapshotRestoreServer
	buf    []byte
}

func (r *chunkReader) Read(p []byte) (int, error) {
	for len(r.buf) == 0 {
		c, err := r.stream.Recv()
		if err != nil {
			return 0, err // io.EOF at the end of the stream
		}
		r.buf = c.Data
	}
	n := copy(p, r.buf)
	r.buf = r.buf[n:]
	return n, nil
}

func (a *Admin) SnapshotRestore(stream ferrypb.Admin_SnapshotRestoreServer) error {
	index, err := a.cfg.Cluster.SnapshotRestore(stream.Context(), &chunkReader{stream: stream})
	if err != nil {
		return toStatus(err)
	}
	a.log.Warn("cluster state restored from a snapshot", "index", index)
	return stream.SendAndClose(&ferrypb.SnapshotRestoreResponse{Index: index})
}

// BatchCreateEntry creates entries; each gets its own status. Entries without an
// ID get a new random one. An entry with system_assigned_identity set is
// created with its identity, in the same command.
func (a *Admin) BatchCreateEntry(ctx context.Context, req *ferrypb.BatchCreateEntryRequest) (*ferrypb.BatchEntryResponse, error) {
	entries := make([]*ferrypb.Entry, len(req.Entries))
	for i, e := range req.Entries {
		e = proto.Clone(e).(*ferrypb.Entry)
		if e.Id == "" {
			e.Id = uuid.NewString()
		}
		e.Revision, e.CreatedIndex, e.CreatedAt = 0, 0, 0
		entries[i] = e
	}
	sys, err := a.systemIdentities(ctx, entries, req.IdentityTenantId)
	if err != nil {
		return nil, err
	}
	return a.batchEntries(ctx, req.RequestId, entries, func(es []*ferrypb.Entry) *ferrypb.Command {
		return &ferrypb.Command{Op: &ferrypb.Command_EntriesCreate{EntriesCreate: &ferrypb.EntriesCreate{Entries: es, SystemIdentities: sys.of(es)}}}
	})
}

// BatchUpdateEntry replaces entries by ID. An entry carrying a non-zero revision
// is updated only if it still has that revision (compare-and-set). Turning
// system_assigned_identity on or off creates or deletes the identity with the
// entry.
func (a *Admin) BatchUpdateEntry(ctx context.Context, req *ferrypb.BatchUpdateEntryRequest) (*ferrypb.BatchEntryResponse, error) {
	sys, err := a.systemIdentities(ctx, req.Entries, req.IdentityTenantId)
	if err != nil {
		return nil, err
	}
	return a.batchEntries(ctx, req.RequestId, req.Entries, func(es []*ferrypb.Entry) *ferrypb.Command {
		return &ferrypb.Command{Op: &ferrypb.Command_EntriesUpdate{EntriesUpdate: &ferrypb.EntriesUpdate{Entries: es, SystemIdentities: sys.of(es)}}}
	})
}

// systemIdentityDetails are a request's system-assigned identity details by owner.
type systemIdentityDetails map[string]*ferrypb.SystemIdentity

// of returns the details for the entries of one command.
func (d systemIdentityDetails) of(es []*ferrypb.Entry) []*ferrypb.SystemIdentity {
	var out []*ferrypb.SystemIdentity
	for _, e := range es {
		if si := d[e.GetId()]; si != nil {
			out = append(out, si)
		}
	}
	return out
}

// systemIdentities makes the details of a system-assigned identity for every
// entry that has one enabled: new GUIDs, the tenant, the JWT-SVID issuer. The
// FSM uses them only where an identity is to be created.
func (a *Admin) systemIdentities(ctx context.Context, entries []*ferrypb.Entry, tenantID string) (systemIdentityDetails, error) {
	out := systemIdentityDetails{}
	var tenant string
	for _, e := range entries {
		if !e.GetSystemAssignedIdentity() {
			continue
		}
		if tenant == "" {
			var err error
			if tenant, err = a.identityTenant(ctx, tenantID); err != nil {
				return nil, err
			}
		}
		out[e.Id] = a.newSystemIdentity(e.Id, tenant)
	}
	return out, nil
}

// identityTenant resolves the tenant of new system-assigned identities, and
// checks they can be bound to their owner at all.
func (a *Admin) identityTenant(ctx context.Context, tenantID string) (string, error) {
	if a.cfg.JWTIssuer == "" {
		return "", status.Error(codes.FailedPrecondition, "system-assigned identities need the trust domain's JWT issuer (jwt_issuer or oidc.issuer in the server config)")
	}
	return resolveTenant(ctx, a.cfg.Cluster, a.cfg.Store, a.log, a.cfg.TrustDomain, tenantID, true)
}

func (a *Admin) newSystemIdentity(owner, tenant string) *ferrypb.SystemIdentity {
	return &ferrypb.SystemIdentity{Owner: owner, ObjectId: uuid.NewString(), ClientId: uuid.NewString(), TenantId: tenant, Issuer: a.cfg.JWTIssuer}
}

// BatchDeleteEntry deletes entries, each with its system-assigned identity.
func (a *Admin) BatchDeleteEntry(ctx context.Context, req *ferrypb.BatchDeleteEntryRequest) (*ferrypb.BatchEntryResponse, error) {
	resp := &ferrypb.BatchEntryResponse{}
	for n, chunk := range chunks(req.Ids, a.cfg.MaxBatch) {
		res, err := a.cfg.Cluster.Apply(ctx, &ferrypb.Command{
			RequestId: chunkRequestID(req.RequestId, n),
			Op:        &ferrypb.Command_EntriesDelete{EntriesDelete: &ferrypb.EntriesDelete{Ids: chunk}},
		})
		if err != nil {
			return nil, toStatus(err)
		}
		if err := resultError(res); err != nil {
			return nil, err
		}
		resp.Results = append(resp.Results, res.Items...)
		resp.Entries = append(resp.Entries, res.Entries...)
		resp.Identities = append(resp.Identities, res.Identities...)
		resp.Index = res.Index
	}
	return resp, nil
}

// batchEntries validates entries, commits the valid ones in commands of at most
// MaxBatch, and returns one status per input entry, in order.
func (a *Admin) batchEntries(ctx context.Context, requestID string, in []*ferrypb.Entry, mk func([]*ferrypb.Entry) *ferrypb.Command) (*ferrypb.BatchEntryResponse, error) {
	resp := &ferrypb.BatchEntryResponse{
		Results: make([]*ferrypb.Status, len(in)),
		Entries: make([]*ferrypb.Entry, len(in)),
	}
	var valid []*ferrypb.Entry
	var pos []int
	for i, e := range in {
		if err := a.checkEntry(e); err != nil {
			resp.Results[i] = &ferrypb.Status{Code: int32(codes.InvalidArgument), Message: "invalid entry: " + err.Error()}
			continue
		}
		valid = append(valid, e)
		pos = append(pos, i)
	}
	done := 0
	for n, chunk := range chunks(valid, a.cfg.MaxBatch) {
		cmd := mk(chunk)
		cmd.RequestId = chunkRequestID(requestID, n)
		res, err := a.cfg.Cluster.Apply(ctx, cmd)
		if err != nil {
			return nil, toStatus(err)
		}
		if err := resultError(res); err != nil {
			return nil, err
		}
		for j := range chunk {
			i := pos[done+j]
			if j < len(res.Items) {
				resp.Results[i] = res.Items[j]
			}
			if j < len(res.Entries) {
				resp.Entries[i] = res.Entries[j]
			}
		}
		resp.Identities = append(resp.Identities, res.Identities...)
		done += len(chunk)
		resp.Index = res.Index
	}
	return resp, nil
}

// checkEntry checks an entry with its ID assigned.
func (a *Admin) checkEntry(e *ferrypb.Entry) error {
	if err := state.ValidateEntry(e); err != nil {
		return err
	}
	return a.entries.Check(e)
}

func chunks[T any](in []T, size int) [][]T {
	var out [][]T
	for len(in) > 0 {
		n := min(size, len(in))
		out = append(out, in[:n])
		in = in[n:]
	}
	return out
}

// chunkRequestID derives a request ID per command from the caller's, so a retried
// request replays every chunk idempotently. No caller ID: a fresh one per chunk.
func chunkRequestID(requestID string, n int) string {
	if requestID == "" {
		return uuid.NewString()
	}
	if n == 0 {
		return requestID
	}
	return fmt.Sprintf("%s/%d", requestID, n)
}

func (a *Admin) GetEntry(ctx context.Context, req *ferrypb.GetEntryRequest) (*ferrypb.Entry, error) {
	if err := a.read(ctx, req.Consistency); err != nil {
		return nil, err
	}
	e := a.cfg.Store.View().Entry(req.Id)
	if e == nil {
		return nil, status.Errorf(codes.NotFound, "entry %q not found", req.Id)
	}
	return e, nil
}

// MaxPageSize is the most entries ListEntries returns in one page.
const MaxPageSize = 10000

func (a *Admin) ListEntries(ctx context.Context, req *ferrypb.ListEntriesRequest) (*ferrypb.ListEntriesResponse, error) {
	if err := a.read(ctx, req.Consistency); err != nil {
		return nil, err
	}
	if err := a.entries.CheckFilter(req.BySpiffeId, req.ByParentId, req.BySelectors); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if req.PageSize < 0 || req.PageSize > MaxPageSize {
		return nil, status.Errorf(codes.InvalidArgument, "page_size must be from 1 to %d (0: the largest)", MaxPageSize)
	}
	size := int(req.PageSize)
	if size == 0 {
		size = MaxPageSize
	}
	entries, next := a.cfg.Store.View().ListEntries(state.EntryFilter{
		SpiffeID:  req.BySpiffeId,
		ParentID:  req.ByParentId,
		Hint:      req.ByHint,
		Selectors: req.BySelectors,
	}, req.PageToken, size)
	return &ferrypb.ListEntriesResponse{Entries: entries, NextPageToken: next}, nil
}

func (a *Admin) CountEntries(ctx context.Context, req *ferrypb.CountEntriesRequest) (*ferrypb.CountEntriesResponse, error) {
	if err := a.read(ctx, req.Consistency); err != nil {
		return nil, err
	}
	return &ferrypb.CountEntriesResponse{Count: int64(a.cfg.Store.View().CountEntries())}, nil
}

func (a *Admin) read(ctx context.Context, c ferrypb.ReadConsistency) error {
	if c != ferrypb.ReadConsistency_READ_LINEARIZABLE {
		return nil
	}
	if err := a.cfg.Cluster.VerifyRead(ctx); err != nil {
		return toStatus(err)
	}
	return nil
}

// resultError turns a whole-command failure into a gRPC status.
func resultError(res *ferrypb.CommandResult) error {
	if st := res.GetStatus(); st != nil && codes.Code(st.Code) != codes.OK {
		return status.Error(codes.Code(st.Code), st.Message)
	}
	return nil
}

// toStatus maps an error from below to a gRPC status, keeping one that already is.
func toStatus(err error) error {
	if _, ok := status.FromError(err); ok {
		return err
	}
	switch {
	case errors.Is(err, context.Canceled):
		return status.Error(codes.Canceled, err.Error())
	case errors.Is(err, context.DeadlineExceeded):
		return status.Error(codes.DeadlineExceeded, err.Error())
	case errors.Is(err, state.ErrCommandTooLarge):
		return status.Error(codes.InvalidArgument, err.Error())
	case errors.Is(err, state.ErrBadSnapshot):
		return status.Error(codes.InvalidArgument, err.Error())
	}
	return status.Error(codes.Unavailable, err.Error())
}
