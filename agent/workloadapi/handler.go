package workloadapi

import (
	"context"
	"errors"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	workloadpb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/ferry-id/ferry/agent/cache"
	"github.com/ferry-id/ferry/attestors/workload"
	"github.com/ferry-id/ferry/internal/jwtform"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

// maxJWTSVIDSize bounds a JWT-SVID handed to ValidateJWTSVID.
const maxJWTSVIDSize = 64 << 10

var (
	errNoIdentity   = status.Error(codes.PermissionDenied, "no identity issued")
	errNoAudience   = status.Error(codes.InvalidArgument, "audience must be specified")
	errShutdown     = status.Error(codes.Unavailable, "agent is shutting down")
	errSubEnded     = status.Error(codes.Unavailable, "identity cache subscription ended")
	errNoWITProfile = status.Error(codes.Unimplemented, "WIT-SVID profile is not supported by this agent")
)

// service implements the SpiffeWorkloadAPI RPCs. It is registered with the
// gRPC server only, behind the interceptors that check the security header,
// so the RPCs are not methods of Server.
type service struct {
	workloadpb.UnsafeSpiffeWorkloadAPIServer
	*Server
}

var _ workloadpb.SpiffeWorkloadAPIServer = service{}

// attest returns the selectors of the caller of ctx, through
// workload.AttestCaller: attestors read the process through the pin taken at
// connect, its credentials are read once for the call and must be those the
// kernel recorded at connect, and it must still be the process that
// connected. A caller whose process is no longer the one behind its PID gets
// Unauthenticated (the selectors might describe another process); one whose
// credentials changed, or that runs a setuid or setgid program, gets
// PermissionDenied; nothing is looked up for either.
func (s *Server) attest(ctx context.Context) ([]*ferrypb.Selector, error) {
	c, ok := callerFrom(ctx)
	if !ok {
		return nil, status.Error(codes.Internal, "caller credentials missing from connection")
	}
	sels, err := workload.AttestCaller(ctx, c.proc, c.peer(), s.attestor.Attest)
	switch {
	case err == nil:
		return sels, nil
	case errors.Is(err, workload.ErrProcessChanged):
		return nil, status.Errorf(codes.Unauthenticated, "could not verify existence of the original caller: %v", err)
	case errors.Is(err, workload.ErrCredentialsChanged):
		return nil, status.Error(codes.PermissionDenied, err.Error())
	case ctx.Err() != nil:
		return nil, status.FromContextError(ctx.Err()).Err()
	default:
		return nil, status.Errorf(codes.Unavailable, "workload attestation failed: %v", err)
	}
}

// subscribe attests the caller and follows its identities.
func (s *Server) subscribe(ctx context.Context) (cache.Subscriber, error) {
	sels, err := s.attest(ctx)
	if err != nil {
		return nil, err
	}
	sub, err := s.manager.SubscribeToCacheChanges(ctx, sels)
	if err != nil {
		return nil, cacheErr(ctx, "subscribe to identity cache", err)
	}
	return sub, nil
}

// fetchUpdate attests the caller and reads its identities once.
func (s *Server) fetchUpdate(ctx context.Context) (*cache.WorkloadUpdate, error) {
	sels, err := s.attest(ctx)
	if err != nil {
		return nil, err
	}
	u, err := s.manager.FetchWorkloadUpdate(ctx, sels)
	if err != nil {
		return nil, cacheErr(ctx, "fetch identities", err)
	}
	if u == nil {
		u = &cache.WorkloadUpdate{}
	}
	return u, nil
}

// cacheErr is the status of a failed cache call: the client's own
// cancellation or deadline when its context has ended (the client went away:
// not the agent's failure), else Unavailable.
func cacheErr(ctx context.Context, what string, err error) error {
	if ctx.Err() != nil {
		return status.FromContextError(ctx.Err()).Err()
	}
	return status.Errorf(codes.Unavailable, "%s: %v", what, err)
}

// follow calls send with every update sub delivers until the client goes
// away (nil), the server stops, or send fails. When send returns a non-zero
// time, send is also called again with the latest update at that time.
func (s *Server) follow(ctx context.Context, sub cache.Subscriber, send func(*cache.WorkloadUpdate) (time.Time, error)) error {
	var (
		last   *cache.WorkloadUpdate
		timer  *time.Timer
		timerC <-chan time.Time
	)
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	for {
		select {
		case u, ok := <-sub.Updates():
			if !ok {
				if ctx.Err() != nil { // the cache ends subscriptions with ctx
					return nil
				}
				return errSubEnded
			}
			if u == nil {
				continue
			}
			last = u
		case <-timerC:
		case <-ctx.Done():
			return nil
		case <-s.quit:
			return errShutdown
		}
		again, err := send(last)
		if err != nil {
			return err
		}
		if again.IsZero() {
			timerC = nil
			continue
		}
		if timer == nil {
			timer = time.NewTimer(time.Until(again))
		} else {
			timer.Reset(time.Until(again))
		}
		timerC = timer.C
	}
}

// FetchX509SVID streams the caller's X509-SVIDs.
func (s service) FetchX509SVID(_ *workloadpb.X509SVIDRequest, stream workloadpb.SpiffeWorkloadAPI_FetchX509SVIDServer) error {
	ctx := stream.Context()
	sub, err := s.subscribe(ctx)
	if err != nil {
		return err
	}
	defer sub.Finish()
	return s.follow(ctx, sub, func(u *cache.WorkloadUpdate) (time.Time, error) {
		resp, err := composeX509SVIDResponse(u)
		if err != nil {
			return time.Time{}, err
		}
		return time.Time{}, stream.Send(resp)
	})
}

// FetchX509Bundles streams the X.509 bundles the caller may trust.
func (s service) FetchX509Bundles(_ *workloadpb.X509BundlesRequest, stream workloadpb.SpiffeWorkloadAPI_FetchX509BundlesServer) error {
	ctx := stream.Context()
	sub, err := s.subscribe(ctx)
	if err != nil {
		return err
	}
	defer sub.Finish()
	var prev *workloadpb.X509BundlesResponse
	return s.follow(ctx, sub, func(u *cache.WorkloadUpdate) (time.Time, error) {
		if !s.mayVerify(u) {
			return time.Time{}, errNoIdentity
		}
		resp, err := composeX509BundlesResponse(u)
		if err != nil {
			return time.Time{}, err
		}
		if proto.Equal(resp, prev) {
			return time.Time{}, nil
		}
		prev = resp
		return time.Time{}, stream.Send(resp)
	})
}

// FetchJWTBundles streams the JWT bundles the caller may trust.
func (s service) FetchJWTBundles(_ *workloadpb.JWTBundlesRequest, stream workloadpb.SpiffeWorkloadAPI_FetchJWTBundlesServer) error {
	ctx := stream.Context()
	sub, err := s.subscribe(ctx)
	if err != nil {
		return err
	}
	defer sub.Finish()
	var prev *workloadpb.JWTBundlesResponse
	return s.follow(ctx, sub, func(u *cache.WorkloadUpdate) (time.Time, error) {
		if !s.mayVerify(u) {
			return time.Time{}, errNoIdentity
		}
		resp, err := composeJWTBundlesResponse(u)
		if err != nil {
			return time.Time{}, err
		}
		if proto.Equal(resp, prev) {
			return time.Time{}, nil
		}
		prev = resp
		return time.Time{}, stream.Send(resp)
	})
}

// FetchJWTSVID returns JWT-SVIDs for the requested audience: for the
// requested SPIFFE ID, or for every identity of the caller.
func (s service) FetchJWTSVID(ctx context.Context, req *workloadpb.JWTSVIDRequest) (*workloadpb.JWTSVIDResponse, error) {
	if len(req.GetAudience()) == 0 {
		return nil, errNoAudience
	}
	for _, aud := range req.GetAudience() {
		if aud == "" {
			return nil, status.Error(codes.InvalidArgument, "audience must not be empty")
		}
	}
	if err := checkRequestedID(req.GetSpiffeId()); err != nil {
		return nil, err
	}
	u, err := s.fetchUpdate(ctx)
	if err != nil {
		return nil, err
	}
	ids := selectIdentities(u.Identities, req.GetSpiffeId())
	if len(ids) == 0 {
		return nil, errNoIdentity
	}
	resp := &workloadpb.JWTSVIDResponse{Svids: make([]*workloadpb.JWTSVID, 0, len(ids))}
	for _, id := range ids {
		svid, err := s.manager.FetchJWTSVID(ctx, id.Entry, req.GetAudience())
		if err != nil {
			return nil, cacheErr(ctx, "could not fetch JWT-SVID for "+id.Entry.GetSpiffeId(), err)
		}
		resp.Svids = append(resp.Svids, &workloadpb.JWTSVID{
			SpiffeId: id.Entry.GetSpiffeId(),
			Svid:     svid.Token,
			Hint:     id.Entry.GetHint(),
		})
	}
	return resp, nil
}

// ValidateJWTSVID validates a JWT-SVID against the bundles the caller may
// trust and returns its SPIFFE ID and claims.
func (s service) ValidateJWTSVID(ctx context.Context, req *workloadpb.ValidateJWTSVIDRequest) (*workloadpb.ValidateJWTSVIDResponse, error) {
	if req.GetAudience() == "" {
		return nil, errNoAudience
	}
	if req.GetSvid() == "" {
		return nil, status.Error(codes.InvalidArgument, "svid must be specified")
	}
	// The form alone disqualifies many hostile tokens: refuse them before
	// looking up bundles or verifying anything.
	if err := jwtform.Check(req.GetSvid(), maxJWTSVIDSize); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "invalid JWT-SVID: %v", err)
	}
	u, err := s.fetchUpdate(ctx)
	if err != nil {
		return nil, err
	}
	if u.Bundle == nil {
		return nil, errNoBundle
	}
	own := u.Bundle.TrustDomain()
	set := jwtbundle.NewSet(jwtbundle.FromJWTAuthorities(own, u.Bundle.JWTAuthorities()))
	for td, b := range visibleFederated(u, u.Identities) {
		set.Add(jwtbundle.FromJWTAuthorities(td, b.JWTAuthorities()))
	}
	svid, err := jwtsvid.ParseAndValidate(req.GetSvid(), set, []string{req.GetAudience()})
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	claims, err := claimsStruct(svid.Claims, !svid.ID.MemberOf(own), s.foreignClaims)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "claims of JWT-SVID: %v", err)
	}
	return &workloadpb.ValidateJWTSVIDResponse{SpiffeId: svid.ID.String(), Claims: claims}, nil
}

// FetchWITSVID streams WIT-SVIDs: for the requested SPIFFE ID, or for every
// identity of the caller. WIT-SVIDs are short-lived, so besides cache updates
// the stream fetches again when half the remaining life of the soonest
// expiring one has passed.
func (s service) FetchWITSVID(req *workloadpb.WITSVIDRequest, stream workloadpb.SpiffeWorkloadAPI_FetchWITSVIDServer) error {
	if s.wit == nil {
		return errNoWITProfile
	}
	if err := checkRequestedID(req.GetSpiffeId()); err != nil {
		return err
	}
	ctx := stream.Context()
	sub, err := s.subscribe(ctx)
	if err != nil {
		return err
	}
	defer sub.Finish()
	var prev *workloadpb.WITSVIDResponse
	return s.follow(ctx, sub, func(u *cache.WorkloadUpdate) (time.Time, error) {
		resp, expires, err := s.composeWITSVIDResponse(ctx, u, req.GetSpiffeId())
		if err != nil {
			return time.Time{}, err
		}
		again := witRefreshAt(time.Now(), expires)
		if proto.Equal(resp, prev) {
			return again, nil
		}
		prev = resp
		return again, stream.Send(resp)
	})
}

// FetchWITBundles streams the WIT bundles the caller may trust.
func (s service) FetchWITBundles(_ *workloadpb.WITBundlesRequest, stream workloadpb.SpiffeWorkloadAPI_FetchWITBundlesServer) error {
	if s.wit == nil {
		return errNoWITProfile
	}
	ctx := stream.Context()
	sub, err := s.subscribe(ctx)
	if err != nil {
		return err
	}
	defer sub.Finish()
	var prev *workloadpb.WITBundlesResponse
	return s.follow(ctx, sub, func(u *cache.WorkloadUpdate) (time.Time, error) {
		if !s.mayVerify(u) {
			return time.Time{}, errNoIdentity
		}
		resp, err := composeWITBundlesResponse(u)
		if err != nil {
			return time.Time{}, err
		}
		if proto.Equal(resp, prev) {
			return time.Time{}, nil
		}
		prev = resp
		return time.Time{}, stream.Send(resp)
	})
}

// mayVerify reports whether the caller of u may receive bundles.
func (s *Server) mayVerify(u *cache.WorkloadUpdate) bool {
	return len(u.Identities) > 0 || s.unauthVerifier
}

// checkRequestedID validates an optional requested SPIFFE ID.
func checkRequestedID(id string) error {
	if id == "" {
		return nil
	}
	if _, err := spiffeid.FromString(id); err != nil {
		return status.Errorf(codes.InvalidArgument, "invalid requested SPIFFE ID: %v", err)
	}
	return nil
}

// minWITRefresh keeps a WIT stream from spinning when a source keeps
// returning tokens that are about to expire.
const minWITRefresh = time.Second

// witRefreshAt is when a stream whose soonest WIT-SVID expires at expires
// fetches again: half its remaining life from now.
func witRefreshAt(now, expires time.Time) time.Time {
	if expires.IsZero() {
		return time.Time{}
	}
	d := expires.Sub(now) / 2
	if d < minWITRefresh {
		d = minWITRefresh
	}
	return now.Add(d)
}
