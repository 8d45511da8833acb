package api

import (
	"context"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/ferry-id/ferry/proto/ferrypb"
)

// StateHash digests this node's replicated state (see state.Store.StateHash).
// Two nodes at the same applied index must answer the same digest; operators
// and the chaos suite compare them to detect divergence. It reads local state
// only and never waits for the leader.
func (a *Admin) StateHash(context.Context, *ferrypb.StateHashRequest) (*ferrypb.StateHashResponse, error) {
	index, sum, err := a.cfg.Store.StateHash()
	if err != nil {
		a.log.Error("state hash", "error", err)
		return nil, status.Error(codes.Internal, "api: state hash failed")
	}
	return &ferrypb.StateHashResponse{AppliedIndex: index, Sha256: sum[:]}, nil
}
