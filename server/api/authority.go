package api

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/ca"
	"github.com/ferry-id/ferry/server/state"
)

// AuthorityManager is what the Admin API needs from this node's CA (*ca.CA):
// its authorities' lifecycle, and minting SVIDs for operators. Implementations
// are safe for concurrent use.
type AuthorityManager interface {
	TrustDomain() spiffeid.TrustDomain
	List(k ca.Kind) []ca.Authority
	Prepare(ctx context.Context, k ca.Kind) (ca.Authority, error)
	Activate(ctx context.Context, k ca.Kind, id string) (ca.Authority, error)
	Taint(ctx context.Context, k ca.Kind, id string) (ca.Authority, error)
	Revoke(ctx context.Context, k ca.Kind, id string) (ca.Authority, error)
	SignWorkloadX509SVID(csr []byte, id spiffeid.ID, dnsNames []string, ttl time.Duration) ([]*x509.Certificate, error)
	MintJWTSVID(id spiffeid.ID, audience []string, ttl time.Duration, extra map[string]any) (*ca.JWTSVID, error)
}

var _ AuthorityManager = (*ca.CA)(nil)

// MaxMintTTL caps the lifetime of an SVID minted through the admin API; the
// CA caps it further at its authority's end.
const MaxMintTTL = 30 * 24 * time.Hour

func (a *Admin) authority() (AuthorityManager, error) {
	if a.cfg.Authority == nil {
		return nil, status.Error(codes.Unimplemented, "this server has no local authority")
	}
	return a.cfg.Authority, nil
}

// ListLocalAuthorities lists this node's authorities, oldest first per kind.
func (a *Admin) ListLocalAuthorities(_ context.Context, req *ferrypb.ListLocalAuthoritiesRequest) (*ferrypb.ListLocalAuthoritiesResponse, error) {
	m, err := a.authority()
	if err != nil {
		return nil, err
	}
	k := ca.Kind(req.Kind)
	if k != "" {
		if k, err = parseKind(req.Kind); err != nil {
			return nil, err
		}
	}
	resp := &ferrypb.ListLocalAuthoritiesResponse{}
	for _, x := range m.List(k) {
		resp.Authorities = append(resp.Authorities, localAuthority(x))
	}
	return resp, nil
}

// PrepareLocalAuthority creates and publishes a new authority; a previously
// prepared one becomes old.
func (a *Admin) PrepareLocalAuthority(ctx context.Context, req *ferrypb.LocalAuthorityRequest) (*ferrypb.LocalAuthority, error) {
	return a.authorityOp(ctx, req, "prepare", false, func(m AuthorityManager, k ca.Kind, _ string) (ca.Authority, error) {
		return m.Prepare(ctx, k)
	})
}

// ActivateLocalAuthority makes the prepared authority (authority_id, or the
// only prepared one) active; the active one becomes old.
func (a *Admin) ActivateLocalAuthority(ctx context.Context, req *ferrypb.LocalAuthorityRequest) (*ferrypb.LocalAuthority, error) {
	return a.authorityOp(ctx, req, "activate", false, func(m AuthorityManager, k ca.Kind, id string) (ca.Authority, error) {
		if id == "" {
			for _, x := range m.List(k) {
				if x.Status == ca.StatusPrepared {
					id = x.ID
				}
			}
			if id == "" {
				return ca.Authority{}, status.Errorf(codes.FailedPrecondition, "no prepared %s authority to activate; prepare one first", k)
			}
		}
		return m.Activate(ctx, k, id)
	})
}

// TaintLocalAuthority marks an old authority tainted in the bundle.
func (a *Admin) TaintLocalAuthority(ctx context.Context, req *ferrypb.LocalAuthorityRequest) (*ferrypb.LocalAuthority, error) {
	return a.authorityOp(ctx, req, "taint", true, func(m AuthorityManager, k ca.Kind, id string) (ca.Authority, error) {
		return m.Taint(ctx, k, id)
	})
}

// RevokeLocalAuthority removes a tainted old authority from the bundle and
// deletes its key.
func (a *Admin) RevokeLocalAuthority(ctx context.Context, req *ferrypb.LocalAuthorityRequest) (*ferrypb.LocalAuthority, error) {
	return a.authorityOp(ctx, req, "revoke", true, func(m AuthorityManager, k ca.Kind, id string) (ca.Authority, error) {
		return m.Revoke(ctx, k, id)
	})
}

func (a *Admin) authorityOp(ctx context.Context, req *ferrypb.LocalAuthorityRequest, op string, needID bool,
	fn func(AuthorityManager, ca.Kind, string) (ca.Authority, error)) (*ferrypb.LocalAuthority, error) {
	m, err := a.authority()
	if err != nil {
		return nil, err
	}
	k, err := parseKind(req.Kind)
	if err != nil {
		return nil, err
	}
	if needID && req.AuthorityId == "" {
		return nil, status.Errorf(codes.InvalidArgument, "authority_id is required to %s an authority", op)
	}
	x, err := fn(m, k, req.AuthorityId)
	if err != nil {
		return nil, caStatus(err)
	}
	a.log.Info("local authority changed", "op", op, "kind", k, "authority_id", x.ID, "status", x.Status, "tainted", x.Tainted)
	return localAuthority(x), nil
}

// MintX509SVID signs an X509-SVID for the CSR's key; the caller keeps the
// private key. The response carries the trust domain's X.509 authorities.
func (a *Admin) MintX509SVID(_ context.Context, req *ferrypb.MintX509SVIDRequest) (*ferrypb.MintX509SVIDResponse, error) {
	m, err := a.authority()
	if err != nil {
		return nil, err
	}
	id, ttl, err := mintArgs(m.TrustDomain(), req.SpiffeId, req.TtlSeconds)
	if err != nil {
		return nil, err
	}
	chain, err := m.SignWorkloadX509SVID(req.Csr, id, req.DnsNames, ttl)
	if err != nil {
		return nil, caStatus(err)
	}
	resp := &ferrypb.MintX509SVIDResponse{ExpiresAt: chain[0].NotAfter.Unix()}
	for _, c := range chain {
		resp.SvidChain = append(resp.SvidChain, c.Raw)
	}
	if b := a.cfg.Store.View().Bundle(m.TrustDomain().Name()); b != nil {
		for _, x := range b.X509Authorities {
			resp.RootCas = append(resp.RootCas, x.Certificate)
		}
	}
	a.log.Info("X509-SVID minted", "spiffe_id", id.String(), "expires_at", chain[0].NotAfter, "serial", chain[0].SerialNumber.Text(16))
	return resp, nil
}

// MintJWTSVID signs a JWT-SVID with this node's active JWT authority.
func (a *Admin) MintJWTSVID(_ context.Context, req *ferrypb.MintJWTSVIDRequest) (*ferrypb.MintJWTSVIDResponse, error) {
	m, err := a.authority()
	if err != nil {
		return nil, err
	}
	id, ttl, err := mintArgs(m.TrustDomain(), req.SpiffeId, req.TtlSeconds)
	if err != nil {
		return nil, err
	}
	if len(req.Audience) == 0 {
		return nil, status.Error(codes.InvalidArgument, "audience is required")
	}
	svid, err := m.MintJWTSVID(id, req.Audience, ttl, nil)
	if err != nil {
		return nil, caStatus(err)
	}
	a.log.Info("JWT-SVID minted", "spiffe_id", id.String(), "audience", req.Audience, "key_id", svid.KeyID, "expires_at", svid.ExpiresAt)
	return &ferrypb.MintJWTSVIDResponse{
		Token: svid.Token, KeyId: svid.KeyID, IssuedAt: svid.IssuedAt.Unix(), ExpiresAt: svid.ExpiresAt.Unix(),
	}, nil
}

func mintArgs(td spiffeid.TrustDomain, rawID string, ttlSeconds int64) (spiffeid.ID, time.Duration, error) {
	if err := CheckMint(td, rawID, ttlSeconds); err != nil {
		return spiffeid.ID{}, 0, status.Error(codes.InvalidArgument, err.Error())
	}
	return spiffeid.RequireFromString(rawID), time.Duration(ttlSeconds) * time.Second, nil
}

// CheckMint checks the SPIFFE ID and lifetime of an SVID minted through the
// admin API: a workload ID in td (a zero td skips that part, for clients that
// do not know the server's; see ca.CheckWorkloadID) and a lifetime from 0 (the
// server's default) to MaxMintTTL.
func CheckMint(td spiffeid.TrustDomain, rawID string, ttlSeconds int64) error {
	if rawID == "" {
		return errors.New("spiffe_id is required")
	}
	if err := state.ValidateSPIFFEID(rawID); err != nil {
		return fmt.Errorf("spiffe_id: %w", err)
	}
	if err := ca.CheckWorkloadID(td, spiffeid.RequireFromString(rawID)); err != nil {
		return fmt.Errorf("spiffe_id: %w", err)
	}
	if ttlSeconds < 0 || time.Duration(ttlSeconds)*time.Second > MaxMintTTL {
		return fmt.Errorf("ttl must be between 0 (the default) and %s", MaxMintTTL)
	}
	return nil
}

// SetFederatedBundle replaces a federated trust domain's bundle. Our own
// trust domain's bundle belongs to the server nodes' CAs and is refused.
func (a *Admin) SetFederatedBundle(ctx context.Context, req *ferrypb.SetFederatedBundleRequest) (*ferrypb.Bundle, error) {
	in := req.GetBundle()
	if in == nil {
		return nil, status.Error(codes.InvalidArgument, "bundle is required")
	}
	td, err := a.federatedTrustDomain(in.TrustDomain)
	if err != nil {
		return nil, err
	}
	if err := checkBundle(in); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "bundle for %s: %v", td, err)
	}
	b := proto.Clone(in).(*ferrypb.Bundle)
	b.TrustDomain, b.Revision = td.Name(), 0
	res, err := a.cfg.Cluster.Apply(ctx, &ferrypb.Command{Op: &ferrypb.Command_BundleSet{BundleSet: &ferrypb.BundleSet{Bundle: b}}})
	if err != nil {
		return nil, toStatus(err)
	}
	if err := resultError(res); err != nil {
		return nil, err
	}
	a.log.Info("federated bundle set", "trust_domain", td.Name(), "x509_authorities", len(b.X509Authorities), "jwt_authorities", len(b.JwtAuthorities))
	return res.Bundle, nil
}

// DeleteFederatedBundle removes a federated trust domain's bundle.
func (a *Admin) DeleteFederatedBundle(ctx context.Context, req *ferrypb.DeleteFederatedBundleRequest) (*ferrypb.Bundle, error) {
	td, err := a.federatedTrustDomain(req.TrustDomain)
	if err != nil {
		return nil, err
	}
	res, err := a.cfg.Cluster.Apply(ctx, &ferrypb.Command{Op: &ferrypb.Command_BundleDelete{BundleDelete: &ferrypb.BundleDelete{TrustDomain: td.Name()}}})
	if err != nil {
		return nil, toStatus(err)
	}
	if err := resultError(res); err != nil {
		return nil, err
	}
	a.log.Info("federated bundle deleted", "trust_domain", td.Name())
	return res.Bundle, nil
}

// federatedTrustDomain parses raw (a name or spiffe://name) and refuses our
// own trust domain.
func (a *Admin) federatedTrustDomain(raw string) (spiffeid.TrustDomain, error) {
	if raw == "" {
		return spiffeid.TrustDomain{}, status.Error(codes.InvalidArgument, "trust_domain is required")
	}
	td, err := spiffeid.TrustDomainFromString(raw)
	if err != nil {
		return spiffeid.TrustDomain{}, status.Errorf(codes.InvalidArgument, "trust_domain: %v", err)
	}
	own := a.cfg.TrustDomain
	if own.IsZero() && a.cfg.Authority != nil {
		own = a.cfg.Authority.TrustDomain()
	}
	if own.IsZero() {
		return spiffeid.TrustDomain{}, status.Error(codes.FailedPrecondition, "this server does not know its own trust domain")
	}
	if td == own {
		return spiffeid.TrustDomain{}, status.Errorf(codes.InvalidArgument,
			"%s is this server's own trust domain: its bundle is managed by the server nodes' authorities", td)
	}
	return td, nil
}

// checkBundle requires at least one authority and that each one parses.
func checkBundle(b *ferrypb.Bundle) error {
	if len(b.X509Authorities) == 0 && len(b.JwtAuthorities) == 0 {
		return errors.New("no authorities")
	}
	for i, x := range b.X509Authorities {
		c, err := x509.ParseCertificate(x.Certificate)
		if err != nil {
			return fmt.Errorf("X.509 authority %d: %w", i, err)
		}
		if !c.IsCA {
			return fmt.Errorf("X.509 authority %d (%s) is not a CA certificate", i, c.Subject)
		}
	}
	seen := map[string]bool{}
	for _, k := range b.JwtAuthorities {
		if k.KeyId == "" {
			return errors.New("JWT authority without a key ID")
		}
		if seen[k.KeyId] {
			return fmt.Errorf("JWT key ID %q appears twice", k.KeyId)
		}
		seen[k.KeyId] = true
		if _, err := x509.ParsePKIXPublicKey(k.PublicKey); err != nil {
			return fmt.Errorf("JWT authority %q: %w", k.KeyId, err)
		}
	}
	if b.RefreshHintSeconds < 0 {
		return errors.New("negative refresh hint")
	}
	return nil
}

func parseKind(s string) (ca.Kind, error) {
	switch k := ca.Kind(strings.ToLower(s)); k {
	case ca.KindX509, ca.KindJWT:
		return k, nil
	}
	return "", status.Errorf(codes.InvalidArgument, "kind %q: want %q or %q", s, ca.KindX509, ca.KindJWT)
}

func localAuthority(x ca.Authority) *ferrypb.LocalAuthority {
	out := &ferrypb.LocalAuthority{
		Kind: string(x.Kind), Id: x.ID, Status: string(x.Status), Tainted: x.Tainted, Published: x.Published,
		IssuedAt: x.IssuedAt.Unix(), NotAfter: x.NotAfter.Unix(), Upstream: x.Upstream,
	}
	if x.Certificate != nil {
		out.Certificate = x.Certificate.Raw
	}
	if x.PublicKey != nil {
		if der, err := x509.MarshalPKIXPublicKey(x.PublicKey); err == nil {
			out.PublicKey = der
		}
	}
	return out
}

// caStatus maps the CA's errors to gRPC codes.
func caStatus(err error) error {
	if _, ok := status.FromError(err); ok {
		return err
	}
	switch {
	case errors.Is(err, ca.ErrUnknownAuthority):
		return status.Error(codes.NotFound, err.Error())
	case errors.Is(err, ca.ErrAuthorityState), errors.Is(err, ca.ErrUpstreamManaged):
		return status.Error(codes.FailedPrecondition, err.Error())
	case errors.Is(err, ca.ErrInvalidRequest), errors.Is(err, ca.ErrInvalidCSR), errors.Is(err, ca.ErrUnsupportedKey):
		return status.Error(codes.InvalidArgument, err.Error())
	case errors.Is(err, ca.ErrNoAuthority):
		return status.Error(codes.Unavailable, err.Error())
	}
	return toStatus(err)
}
