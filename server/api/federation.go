package api

import (
	"context"
	"errors"
	"log/slog"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/federation"
	"github.com/ferry-id/ferry/server/state"
)

// BundleRefresher fetches a federated trust domain's bundle on demand.
// *federation.Refresher implements it; Refresh returns federation.ErrNotLeader
// on a node that is not the leader and federation.ErrNoRelationship for an
// unknown trust domain.
type BundleRefresher interface {
	Refresh(ctx context.Context, td spiffeid.TrustDomain) error
}

// FederationConfig configures the Federation service.
type FederationConfig struct {
	Cluster Cluster
	Store   *state.Store
	// TrustDomain is ours: no relationship with it.
	TrustDomain spiffeid.TrustDomain
	// Refresher serves RefreshBundle; nil answers it Unimplemented.
	Refresher BundleRefresher
	// Leader names the current leader (ID and cluster address) for a refresh
	// sent to a follower.
	Leader func() (id, addr string)
	// Forward, when set, has the leader run a refresh sent to a follower
	// (cluster.Node.RunOnLeader running RefreshHere there) and returns once
	// the follower has applied its outcome; without it a follower answers
	// FailedPrecondition, naming the leader.
	Forward func(ctx context.Context, td spiffeid.TrustDomain) error
	Logger  *slog.Logger
}

// Federation implements ferrypb.FederationServer: SPIFFE federation
// relationships, replicated through the log.
type Federation struct {
	ferrypb.UnimplementedFederationServer
	cfg FederationConfig
	log *slog.Logger
}

var _ ferrypb.FederationServer = (*Federation)(nil)

// NewFederation returns the Federation service.
func NewFederation(cfg FederationConfig) (*Federation, error) {
	if cfg.Cluster == nil || cfg.Store == nil || cfg.TrustDomain.IsZero() {
		return nil, errors.New("api: cluster, store and trust domain are required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Federation{cfg: cfg, log: cfg.Logger}, nil
}

func (f *Federation) CreateFederationRelationship(ctx context.Context, req *ferrypb.PutFederationRelationshipRequest) (*ferrypb.FederationRelationshipStatus, error) {
	return f.put(ctx, req, true)
}

func (f *Federation) UpdateFederationRelationship(ctx context.Context, req *ferrypb.PutFederationRelationshipRequest) (*ferrypb.FederationRelationshipStatus, error) {
	return f.put(ctx, req, false)
}

func (f *Federation) put(ctx context.Context, req *ferrypb.PutFederationRelationshipRequest, create bool) (*ferrypb.FederationRelationshipStatus, error) {
	in := req.GetRelationship()
	if in == nil {
		return nil, status.Error(codes.InvalidArgument, "relationship is required")
	}
	td, err := f.foreign(in.TrustDomain)
	if err != nil {
		return nil, err
	}
	rel := &ferrypb.FederationRelationship{TrustDomain: td.Name(), BundleEndpointUrl: in.BundleEndpointUrl, Profile: in.Profile, EndpointSpiffeId: in.EndpointSpiffeId}
	if err := state.ValidateFederationRelationship(rel); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	put := &ferrypb.FederationPut{Relationship: rel, CreateOnly: create, UpdateOnly: !create}
	if b := req.GetTrustDomainBundle(); b != nil {
		if b.TrustDomain != "" && b.TrustDomain != td.Name() {
			return nil, status.Errorf(codes.InvalidArgument, "trust_domain_bundle is for %q, not %s", b.TrustDomain, td)
		}
		if err := checkBundle(b); err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "trust_domain_bundle: %v", err)
		}
		put.Bundle = proto.Clone(b).(*ferrypb.Bundle)
		put.Bundle.TrustDomain, put.Bundle.Revision = td.Name(), 0
	}
	res, err := f.cfg.Cluster.Apply(ctx, &ferrypb.Command{Op: &ferrypb.Command_FederationPut{FederationPut: put}})
	if err != nil {
		return nil, toStatus(err)
	}
	if err := resultError(res); err != nil {
		return nil, err
	}
	verb := "updated"
	if create {
		verb = "created"
	}
	f.log.Info("federation relationship "+verb, "trust_domain", td.Name(), "url", rel.BundleEndpointUrl, "profile", rel.Profile, "bundle_given", put.Bundle != nil)
	if err := f.cfg.Store.WaitForIndex(ctx, res.Index); err != nil {
		return nil, toStatus(err)
	}
	return f.statusOf(res.FederationRelationship), nil
}

func (f *Federation) GetFederationRelationship(ctx context.Context, req *ferrypb.GetFederationRelationshipRequest) (*ferrypb.FederationRelationshipStatus, error) {
	td, err := f.foreign(req.TrustDomain)
	if err != nil {
		return nil, err
	}
	if err := f.cfg.Cluster.VerifyRead(ctx); err != nil {
		return nil, toStatus(err)
	}
	rel := f.cfg.Store.View().FederationRelationship(td.Name())
	if rel == nil {
		return nil, status.Errorf(codes.NotFound, "no federation relationship with %s", td)
	}
	return f.statusOf(rel), nil
}

func (f *Federation) ListFederationRelationships(ctx context.Context, _ *ferrypb.ListFederationRelationshipsRequest) (*ferrypb.ListFederationRelationshipsResponse, error) {
	if err := f.cfg.Cluster.VerifyRead(ctx); err != nil {
		return nil, toStatus(err)
	}
	v := f.cfg.Store.View()
	resp := &ferrypb.ListFederationRelationshipsResponse{}
	for _, rel := range v.FederationRelationships() {
		resp.Relationships = append(resp.Relationships, &ferrypb.FederationRelationshipStatus{Relationship: rel, Bundle: v.Bundle(rel.TrustDomain)})
	}
	return resp, nil
}

func (f *Federation) DeleteFederationRelationship(ctx context.Context, req *ferrypb.DeleteFederationRelationshipRequest) (*ferrypb.DeleteFederationRelationshipResponse, error) {
	td, err := f.foreign(req.TrustDomain)
	if err != nil {
		return nil, err
	}
	res, err := f.cfg.Cluster.Apply(ctx, &ferrypb.Command{Op: &ferrypb.Command_FederationDelete{FederationDelete: &ferrypb.FederationDelete{TrustDomain: td.Name()}}})
	if err != nil {
		return nil, toStatus(err)
	}
	if err := resultError(res); err != nil {
		return nil, err
	}
	f.log.Info("federation relationship deleted", "trust_domain", td.Name())
	return &ferrypb.DeleteFederationRelationshipResponse{}, nil
}

// RefreshBundle fetches the bundle now, on the leader (forwarded there from
// a follower), and returns the relationship with the outcome recorded.
func (f *Federation) RefreshBundle(ctx context.Context, req *ferrypb.RefreshBundleRequest) (*ferrypb.FederationRelationshipStatus, error) {
	td, err := f.foreign(req.TrustDomain)
	if err != nil {
		return nil, err
	}
	if f.cfg.Refresher == nil {
		return nil, status.Error(codes.Unimplemented, "this server does not refresh federated bundles")
	}
	err = f.cfg.Refresher.Refresh(ctx, td)
	if errors.Is(err, federation.ErrNotLeader) && f.cfg.Forward != nil {
		err = f.cfg.Forward(ctx, td)
	}
	if err != nil {
		return nil, f.refreshStatus(td, err)
	}
	return f.GetFederationRelationship(ctx, &ferrypb.GetFederationRelationshipRequest{TrustDomain: td.Name()})
}

// RefreshHere fetches td's bundle on this node, which must be the leader
// (the task a follower's RefreshBundle forwards); its errors are gRPC
// statuses.
func (f *Federation) RefreshHere(ctx context.Context, td spiffeid.TrustDomain) error {
	if f.cfg.Refresher == nil {
		return status.Error(codes.Unimplemented, "this server does not refresh federated bundles")
	}
	if err := f.cfg.Refresher.Refresh(ctx, td); err != nil {
		return f.refreshStatus(td, err)
	}
	return nil
}

// refreshStatus maps a refresh's error to a gRPC status; a status (the
// leader's answer to a forwarded refresh) passes as it is.
func (f *Federation) refreshStatus(td spiffeid.TrustDomain, err error) error {
	if _, ok := status.FromError(err); ok {
		return err
	}
	switch {
	case errors.Is(err, federation.ErrNotLeader):
		id, addr := "", ""
		if f.cfg.Leader != nil {
			id, addr = f.cfg.Leader()
		}
		if id == "" {
			return status.Error(codes.Unavailable, "this node is not the leader and no leader is known")
		}
		return status.Errorf(codes.FailedPrecondition, "only the leader fetches federated bundles: run this on %s (%s)", id, addr)
	case errors.Is(err, federation.ErrNoRelationship):
		return status.Errorf(codes.NotFound, "no federation relationship with %s", td)
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return toStatus(err)
	}
	f.log.Warn("federated bundle refresh on request failed", "trust_domain", td.Name(), "error", err)
	return status.Errorf(codes.Unavailable, "refreshing the bundle of %s: %v (the last good bundle is kept)", td, err)
}

func (f *Federation) statusOf(rel *ferrypb.FederationRelationship) *ferrypb.FederationRelationshipStatus {
	return &ferrypb.FederationRelationshipStatus{Relationship: rel, Bundle: f.cfg.Store.View().Bundle(rel.GetTrustDomain())}
}

// foreign parses raw (a name or spiffe://name) and refuses our trust domain.
func (f *Federation) foreign(raw string) (spiffeid.TrustDomain, error) {
	if raw == "" {
		return spiffeid.TrustDomain{}, status.Error(codes.InvalidArgument, "trust_domain is required")
	}
	td, err := spiffeid.TrustDomainFromString(raw)
	if err != nil {
		return spiffeid.TrustDomain{}, status.Errorf(codes.InvalidArgument, "trust_domain: %v", err)
	}
	if td == f.cfg.TrustDomain {
		return spiffeid.TrustDomain{}, status.Errorf(codes.InvalidArgument, "%s is our own trust domain", td)
	}
	return td, nil
}
