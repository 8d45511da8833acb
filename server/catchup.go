package server

import (
	"context"
	"net"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/ferry-id/ferry/proto/ferrypb"
)

// A restarted node holds only its last snapshot until it has caught up with
// the cluster's log (cluster.Node.CaughtUp). Nothing it serves may be read
// from that state: an agent would be sent stale entries, a bridge a stale
// directory, and a "create if missing" at startup would create a second copy
// of what exists. So every listener but the admin socket accepts connections
// only once the node has caught up, and the admin services wait for it too,
// except those that manage membership, which a node outside any cluster must
// answer to get into one. The listeners that present a server SVID (agent
// API, OIDC, bundle endpoint) also wait for the CA to be able to sign it
// (Server.signing).

// servedBeforeCaughtUp are the admin methods that do not wait: membership
// and disaster recovery, and those that say how the node is (health, info,
// log level), which must answer most when it is not ready.
var servedBeforeCaughtUp = map[string]bool{
	ferrypb.Admin_ClusterJoin_FullMethodName:     true,
	ferrypb.Admin_ClusterList_FullMethodName:     true,
	ferrypb.Admin_ClusterRemove_FullMethodName:   true,
	ferrypb.Admin_SnapshotRestore_FullMethodName: true,
	ferrypb.Admin_GetServerInfo_FullMethodName:   true,
	ferrypb.Admin_GetLogger_FullMethodName:       true,
	ferrypb.Admin_SetLogLevel_FullMethodName:     true,
	ferrypb.Admin_ResetLogLevel_FullMethodName:   true,
	healthpb.Health_Check_FullMethodName:         true,
	healthpb.Health_Watch_FullMethodName:         true,
}

// CaughtUp is closed once this node's state reflects every write the cluster
// acknowledged before it started (see cluster.Node.CaughtUp). Roles started
// in the same process wait for it before they read the state.
func (s *Server) CaughtUp() <-chan struct{} { return s.caughtUp }

func (s *Server) isCaughtUp() bool {
	select {
	case <-s.caughtUp:
		return true
	default:
		return false
	}
}

// waitCaughtUp waits until the node has caught up, or ctx ends.
func (s *Server) waitCaughtUp(ctx context.Context, method string) error {
	if servedBeforeCaughtUp[method] || s.isCaughtUp() {
		return nil
	}
	select {
	case <-s.caughtUp:
		return nil
	case <-ctx.Done():
		return status.Error(codes.Unavailable, "server: still catching up with the cluster log; retry")
	}
}

// catchUpGate holds admin calls until the node has caught up. It comes first
// in the chain, so a waiting call holds no admission slot.
func (s *Server) catchUpGate() grpc.ServerOption {
	return grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		if err := s.waitCaughtUp(ctx, info.FullMethod); err != nil {
			return nil, err
		}
		return h(ctx, req)
	})
}

func (s *Server) catchUpStreamGate() grpc.ServerOption {
	return grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
		if err := s.waitCaughtUp(ss.Context(), info.FullMethod); err != nil {
			return err
		}
		return h(srv, ss)
	})
}

// gatedListener accepts connections only once open is closed; until then
// they wait in the kernel's backlog.
type gatedListener struct {
	net.Listener
	open      <-chan struct{}
	closed    chan struct{}
	closeOnce sync.Once
}

func gate(l net.Listener, open <-chan struct{}) net.Listener {
	return &gatedListener{Listener: l, open: open, closed: make(chan struct{})}
}

func (l *gatedListener) Accept() (net.Conn, error) {
	select {
	case <-l.open:
	case <-l.closed:
		return nil, net.ErrClosed
	}
	return l.Listener.Accept()
}

func (l *gatedListener) Close() error {
	l.closeOnce.Do(func() { close(l.closed) })
	return l.Listener.Close()
}
