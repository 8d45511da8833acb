package api

import (
	"context"
	"fmt"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/ferry-id/ferry/attestors/node"
	"github.com/ferry-id/ferry/attestors/node/jointoken"
	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/state"
)

// MaxJoinTokenTTL caps how long a join token stays usable.
const MaxJoinTokenTTL = 7 * 24 * time.Hour

// CreateJoinToken makes a one-time join token. Only its hash enters the log; the
// token itself is returned once, here.
func (a *Admin) CreateJoinToken(ctx context.Context, req *ferrypb.CreateJoinTokenRequest) (*ferrypb.CreateJoinTokenResponse, error) {
	ttl := time.Duration(req.TtlSeconds) * time.Second
	if ttl <= 0 || ttl > MaxJoinTokenTTL {
		return nil, status.Errorf(codes.InvalidArgument, "ttl must be between 1s and %s", MaxJoinTokenTTL)
	}
	if req.SpiffeId != "" {
		if err := CheckJoinTokenID(a.cfg.TrustDomain, req.SpiffeId); err != nil {
			return nil, status.Error(codes.InvalidArgument, err.Error())
		}
	}
	token, err := jointoken.Generate()
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	expires := time.Now().Add(ttl).Unix()
	res, err := a.cfg.Cluster.Apply(ctx, &ferrypb.Command{Op: &ferrypb.Command_JoinTokenCreate{JoinTokenCreate: &ferrypb.JoinTokenCreate{
		Token: &ferrypb.JoinToken{Hash: jointoken.Hash(token), SpiffeId: req.SpiffeId, ExpiresAt: expires},
	}}})
	if err != nil {
		return nil, toStatus(err)
	}
	if err := resultError(res); err != nil {
		return nil, err
	}
	return &ferrypb.CreateJoinTokenResponse{Token: token, ExpiresAt: expires}, nil
}

// CheckJoinTokenID reports whether id may be the agent ID a join token
// attests to: a canonical SPIFFE ID that is an agent ID in td (a zero td, for
// clients that do not know the server's, skips that part). Attestation would
// refuse any other, so the token is refused when it is made.
func CheckJoinTokenID(td spiffeid.TrustDomain, raw string) error {
	if err := state.ValidateSPIFFEID(raw); err != nil {
		return fmt.Errorf("spiffe_id: %w", err)
	}
	if err := node.CheckAgentID(td, spiffeid.RequireFromString(raw)); err != nil {
		return fmt.Errorf("spiffe_id: %w", err)
	}
	return nil
}

func (a *Admin) ListAgents(ctx context.Context, _ *ferrypb.ListAgentsRequest) (*ferrypb.ListAgentsResponse, error) {
	return &ferrypb.ListAgentsResponse{Agents: a.cfg.Store.View().Nodes()}, nil
}

func (a *Admin) GetAgent(ctx context.Context, req *ferrypb.GetAgentRequest) (*ferrypb.AttestedNode, error) {
	n := a.cfg.Store.View().Node(req.SpiffeId)
	if n == nil {
		return nil, status.Errorf(codes.NotFound, "agent %s not found", req.SpiffeId)
	}
	return n, nil
}

// EvictAgent forgets an agent: its SVID stops being accepted at once, and it must
// attest again (which a consumed join token cannot).
func (a *Admin) EvictAgent(ctx context.Context, req *ferrypb.EvictAgentRequest) (*ferrypb.AttestedNode, error) {
	res, err := a.cfg.Cluster.Apply(ctx, &ferrypb.Command{Op: &ferrypb.Command_NodeDelete{NodeDelete: &ferrypb.NodeDelete{SpiffeId: req.SpiffeId}}})
	if err != nil {
		return nil, toStatus(err)
	}
	if err := resultError(res); err != nil {
		return nil, err
	}
	return res.Node, nil
}

// SetAgentIdentity enables an attested agent's system-assigned identity
// (created in the same command that flags the agent) or disables it (deleted
// with its role assignments). Evicting the agent deletes it too.
func (a *Admin) SetAgentIdentity(ctx context.Context, req *ferrypb.SetAgentIdentityRequest) (*ferrypb.SetAgentIdentityResponse, error) {
	if err := state.ValidateSPIFFEID(req.SpiffeId); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "spiffe_id: %v", err)
	}
	if a.cfg.Store.View().Node(req.SpiffeId) == nil {
		return nil, status.Errorf(codes.NotFound, "agent %s not found", req.SpiffeId)
	}
	set := &ferrypb.NodeIdentitySet{SpiffeId: req.SpiffeId, Enabled: req.Enabled}
	if req.Enabled {
		tenant, err := a.identityTenant(ctx, req.TenantId)
		if err != nil {
			return nil, err
		}
		set.Identity = a.newSystemIdentity(req.SpiffeId, tenant)
	}
	res, err := applyAndWait(ctx, a.cfg.Cluster, a.cfg.Store, req.RequestId, &ferrypb.Command{Op: &ferrypb.Command_NodeIdentitySet{NodeIdentitySet: set}})
	if err != nil {
		return nil, err
	}
	out := &ferrypb.SetAgentIdentityResponse{Agent: res.Node}
	if len(res.Identities) > 0 {
		out.Identity = res.Identities[0]
		a.log.Info("agent system-assigned identity set", "agent", req.SpiffeId, "enabled", req.Enabled, "object_id", out.Identity.ObjectId)
	}
	return out, nil
}

// BanAgent keeps an agent out: its SVID is refused and it may not attest again
// until unbanned.
func (a *Admin) BanAgent(ctx context.Context, req *ferrypb.BanAgentRequest) (*ferrypb.AttestedNode, error) {
	res, err := a.cfg.Cluster.Apply(ctx, &ferrypb.Command{Op: &ferrypb.Command_NodeBan{NodeBan: &ferrypb.NodeBan{SpiffeId: req.SpiffeId, Banned: !req.Unban}}})
	if err != nil {
		return nil, toStatus(err)
	}
	if err := resultError(res); err != nil {
		return nil, err
	}
	return res.Node, nil
}

func (a *Admin) ListBundles(ctx context.Context, _ *ferrypb.ListBundlesRequest) (*ferrypb.ListBundlesResponse, error) {
	return &ferrypb.ListBundlesResponse{Bundles: a.cfg.Store.View().Bundles()}, nil
}
