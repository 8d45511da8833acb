package cluster

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"

	"github.com/hashicorp/raft"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/state"
)

// maxMessageSize leaves room for the largest command plus framing.
const maxMessageSize = state.MaxCommandSize + 64*1024

// forwardedKey marks a request one server already forwarded, so a follower
// with a stale view of the leader refuses instead of forwarding again.
const forwardedKey = "ferry-forwarded"

// connPool keeps one gRPC connection per peer address. gRPC multiplexes
// concurrent calls over it, so forwarded writes share one TLS session.
type connPool struct {
	m     *mux
	mu    sync.Mutex
	conns map[string]*grpc.ClientConn
}

func newConnPool(m *mux) *connPool {
	return &connPool{m: m, conns: make(map[string]*grpc.ClientConn)}
}

func (p *connPool) get(addr string) (*grpc.ClientConn, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.conns == nil {
		return nil, errors.New("cluster: node is closed")
	}
	if cc, ok := p.conns[addr]; ok {
		return cc, nil
	}
	// The dialer returns a connection already authenticated by mutual TLS, so
	// gRPC's own transport security stays off.
	cc, err := grpc.NewClient("passthrough:///"+addr,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, a string) (net.Conn, error) {
			return p.m.dial(ctx, a, connGRPC)
		}),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxMessageSize), grpc.MaxCallSendMsgSize(maxMessageSize)),
	)
	if err != nil {
		return nil, fmt.Errorf("cluster: %w", err)
	}
	p.conns[addr] = cc
	return cc, nil
}

func (p *connPool) cluster(addr string) (ferrypb.ClusterClient, error) {
	cc, err := p.get(addr)
	if err != nil {
		return nil, err
	}
	return ferrypb.NewClusterClient(cc), nil
}

func (p *connPool) close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, cc := range p.conns {
		cc.Close()
	}
	p.conns = nil
}

// clusterService is the Cluster gRPC service of proto/cluster.proto.
type clusterService struct {
	ferrypb.UnimplementedClusterServer
	n *Node
}

func (s *clusterService) Apply(ctx context.Context, req *ferrypb.ApplyRequest) (*ferrypb.ApplyResponse, error) {
	if cmds := req.GetCommands(); len(cmds) > 0 {
		return s.applyMany(ctx, cmds)
	}
	if len(req.GetCommand()) == 0 {
		return nil, status.Error(codes.InvalidArgument, "cluster: empty command")
	}
	if len(req.GetCommand()) > state.MaxCommandSize {
		return nil, status.Errorf(codes.InvalidArgument, "cluster: command of %d bytes exceeds %d", len(req.GetCommand()), state.MaxCommandSize)
	}
	res, err := s.n.applyLocal(ctx, req.GetCommand())
	if err != nil {
		return nil, toStatus(err)
	}
	return &ferrypb.ApplyResponse{Result: res}, nil
}

// applyMany commits commands a follower forwarded together. They join the
// leader's group commit one by one (and so may share log entries with others);
// one failure fails the call, and the follower retries every command of it (the
// FSM answers those already applied from its record).
func (s *clusterService) applyMany(ctx context.Context, cmds [][]byte) (*ferrypb.ApplyResponse, error) {
	for _, c := range cmds {
		if len(c) == 0 || len(c) > state.MaxCommandSize {
			return nil, status.Errorf(codes.InvalidArgument, "cluster: forwarded command of %d bytes", len(c))
		}
	}
	out := &ferrypb.ApplyResponse{Results: make([]*ferrypb.CommandResult, len(cmds))}
	errs := make([]error, len(cmds))
	var wg sync.WaitGroup
	for i, c := range cmds {
		wg.Go(func() { out.Results[i], errs[i] = s.n.applyLocal(ctx, c) })
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return nil, toStatus(err)
		}
	}
	return out, nil
}

func (s *clusterService) Join(ctx context.Context, req *ferrypb.JoinRequest) (*ferrypb.JoinResponse, error) {
	if err := validNodeID(req.GetId()); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if _, _, err := net.SplitHostPort(req.GetAddress()); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "cluster: join address %q: %v", req.GetAddress(), err)
	}
	if !s.n.IsLeader() {
		cc, err := s.n.forwardTarget(ctx)
		if err != nil {
			return nil, toStatus(err)
		}
		resp, err := ferrypb.NewClusterClient(cc).Join(markForwarded(ctx), req)
		return resp, err
	}
	idx, err := s.n.addServer(req.GetId(), req.GetAddress(), req.GetNonVoter())
	if err != nil {
		return nil, toStatus(err)
	}
	return &ferrypb.JoinResponse{Index: idx}, nil
}

func (s *clusterService) ReadIndex(ctx context.Context, _ *ferrypb.ReadIndexRequest) (*ferrypb.ReadIndexResponse, error) {
	idx, err := s.n.leaderReadIndex(ctx)
	if err != nil {
		return nil, toStatus(err)
	}
	return &ferrypb.ReadIndexResponse{Index: idx}, nil
}

// LeaderTask runs a registered task if this node leads, else forwards it
// once to the leader it knows.
func (s *clusterService) LeaderTask(ctx context.Context, req *ferrypb.LeaderTaskRequest) (*ferrypb.LeaderTaskResponse, error) {
	f := s.n.task(req.GetName())
	if f == nil {
		return nil, status.Errorf(codes.Unimplemented, "cluster: no leader task %q", req.GetName())
	}
	if !s.n.IsLeader() {
		cc, err := s.n.forwardTarget(ctx)
		if err != nil {
			return nil, toStatus(err)
		}
		return ferrypb.NewClusterClient(cc).LeaderTask(markForwarded(ctx), req)
	}
	if err := f(ctx, req.GetArg()); err != nil {
		return nil, toStatus(err)
	}
	// The FSM's own index, not Raft's: Raft records an index as applied
	// only after the FSM goroutine may already have applied it and answered
	// the task's write, so Raft's can still be below that write here.
	return &ferrypb.LeaderTaskResponse{Index: s.n.appliedIndex()}, nil
}

// opsService carries the membership operations cluster.proto does not have
// yet: Remove (forwarded to the leader) and Status (a member's last log index,
// for Members). It is a hand-written service over well-known message types.
type opsService struct{ n *Node }

const opsServiceName = "ferry.v1.ClusterOps"

var opsServiceDesc = grpc.ServiceDesc{
	ServiceName: opsServiceName,
	HandlerType: (*any)(nil),
	Methods: []grpc.MethodDesc{
		{MethodName: "Remove", Handler: opsRemoveHandler},
		{MethodName: "Status", Handler: opsStatusHandler},
	},
	Metadata: "cluster_ops",
}

func opsRemoveHandler(srv any, ctx context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
	in := new(wrapperspb.StringValue)
	if err := dec(in); err != nil {
		return nil, err
	}
	return srv.(*opsService).remove(ctx, in)
}

func opsStatusHandler(srv any, ctx context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
	in := new(emptypb.Empty)
	if err := dec(in); err != nil {
		return nil, err
	}
	return wrapperspb.UInt64(srv.(*opsService).n.raft.LastIndex()), nil
}

func (s *opsService) remove(ctx context.Context, in *wrapperspb.StringValue) (*wrapperspb.UInt64Value, error) {
	if !s.n.IsLeader() {
		cc, err := s.n.forwardTarget(ctx)
		if err != nil {
			return nil, toStatus(err)
		}
		out := new(wrapperspb.UInt64Value)
		if err := cc.Invoke(markForwarded(ctx), "/"+opsServiceName+"/Remove", in, out); err != nil {
			return nil, err
		}
		return out, nil
	}
	idx, err := s.n.removeServer(in.GetValue())
	if err != nil {
		return nil, toStatus(err)
	}
	return wrapperspb.UInt64(idx), nil
}

// forwardTarget returns a connection to the leader for a request that arrived
// over gRPC, refusing if the request was already forwarded once.
func (n *Node) forwardTarget(ctx context.Context) (*grpc.ClientConn, error) {
	if md, ok := metadata.FromIncomingContext(ctx); ok && len(md.Get(forwardedKey)) > 0 {
		return nil, fmt.Errorf("%w: request already forwarded once", raft.ErrNotLeader)
	}
	_, addr := n.Leader()
	if addr == "" || addr == n.advertise {
		return nil, errNoLeader
	}
	return n.pool.get(addr)
}

func markForwarded(ctx context.Context) context.Context {
	return metadata.AppendToOutgoingContext(ctx, forwardedKey, "1")
}

// errNoLeader is returned while the cluster has no known leader.
var errNoLeader = errors.New("cluster: no known leader")

// toStatus maps errors to gRPC codes at the edge. Codes the caller may retry
// (another leader, no leader yet) are Unavailable or FailedPrecondition.
func toStatus(err error) error {
	if _, ok := status.FromError(err); ok {
		return err
	}
	switch {
	case errors.Is(err, raft.ErrNotLeader), errors.Is(err, ErrNotReadyLeader),
		errors.Is(err, raft.ErrLeadershipTransferInProgress):
		return status.Error(codes.FailedPrecondition, err.Error())
	case errors.Is(err, raft.ErrLeadershipLost), errors.Is(err, errNoLeader),
		errors.Is(err, raft.ErrEnqueueTimeout), errors.Is(err, raft.ErrRaftShutdown),
		errors.Is(err, raft.ErrAbortedByRestore):
		return status.Error(codes.Unavailable, err.Error())
	case errors.Is(err, context.DeadlineExceeded):
		return status.Error(codes.DeadlineExceeded, err.Error())
	case errors.Is(err, context.Canceled):
		return status.Error(codes.Canceled, err.Error())
	case errors.Is(err, state.ErrCommandTooLarge), errors.Is(err, errInvalidMember):
		return status.Error(codes.InvalidArgument, err.Error())
	default:
		return status.Error(codes.Internal, err.Error())
	}
}

// retryable reports whether a failed forward may be sent again (to the same or
// a new leader). Errors of our own context are not retryable.
func retryable(ctx context.Context, err error) bool {
	if ctx.Err() != nil {
		return false
	}
	if errors.Is(err, raft.ErrNotLeader) || errors.Is(err, raft.ErrLeadershipLost) ||
		errors.Is(err, raft.ErrEnqueueTimeout) || errors.Is(err, raft.ErrLeadershipTransferInProgress) ||
		errors.Is(err, errNoLeader) || errors.Is(err, ErrNotReadyLeader) {
		return true
	}
	st, ok := status.FromError(err)
	if !ok {
		return false
	}
	switch st.Code() {
	case codes.Unavailable, codes.FailedPrecondition, codes.Aborted, codes.ResourceExhausted,
		codes.DeadlineExceeded, codes.Canceled:
		return true
	}
	return false
}
