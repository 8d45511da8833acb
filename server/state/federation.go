package state

import (
	"fmt"
	"net/url"

	"github.com/hashicorp/go-memdb"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	"github.com/ferry-id/ferry/proto/ferrypb"
)

// TableFederation holds SPIFFE federation relationships, one per foreign
// trust domain. Their bundles live in TableBundles like any other.
const TableFederation = "federation_relationships"

// Bundle endpoint profiles of a federation relationship.
const (
	ProfileHTTPSWeb    = "https_web"
	ProfileHTTPSSPIFFE = "https_spiffe"
)

func federationTable() *memdb.TableSchema {
	return &memdb.TableSchema{
		Name: TableFederation,
		Indexes: map[string]*memdb.IndexSchema{
			"id": {Name: "id", Unique: true, Indexer: &memdb.StringFieldIndex{Field: "TrustDomain"}},
		},
	}
}

// ValidateFederationRelationship checks a relationship as the FSM will: a
// trust domain name, an https bundle endpoint URL, a known profile, and for
// https_spiffe a SPIFFE ID for the endpoint.
func ValidateFederationRelationship(r *ferrypb.FederationRelationship) error {
	if r == nil {
		return fmt.Errorf("relationship is required")
	}
	td, err := spiffeid.TrustDomainFromString(r.TrustDomain)
	if err != nil {
		return fmt.Errorf("trust_domain: %v", err)
	}
	if r.TrustDomain != td.Name() {
		return fmt.Errorf("trust_domain: %q is not in canonical form %q", r.TrustDomain, td.Name())
	}
	u, err := url.Parse(r.BundleEndpointUrl)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return fmt.Errorf("bundle_endpoint_url: %q is not an https URL", r.BundleEndpointUrl)
	}
	switch r.Profile {
	case ProfileHTTPSWeb:
		if r.EndpointSpiffeId != "" {
			return fmt.Errorf("endpoint_spiffe_id is only for the %s profile", ProfileHTTPSSPIFFE)
		}
	case ProfileHTTPSSPIFFE:
		if err := ValidateSPIFFEID(r.EndpointSpiffeId); err != nil {
			return fmt.Errorf("endpoint_spiffe_id: %v", err)
		}
	default:
		return fmt.Errorf("profile: %q is neither %s nor %s", r.Profile, ProfileHTTPSWeb, ProfileHTTPSSPIFFE)
	}
	return nil
}

func (a *applier) federation(td string) *ferrypb.FederationRelationship {
	raw, err := a.txn.First(TableFederation, "id", td)
	must(err)
	if raw == nil {
		return nil
	}
	return raw.(*ferrypb.FederationRelationship)
}

// putFederation creates or replaces a relationship and, with it, the initial
// bundle. An https_spiffe relationship needs a bundle of its endpoint's trust
// domain to authenticate the endpoint: given here, or already stored.
func (a *applier) putFederation(p *ferrypb.FederationPut) *ferrypb.CommandResult {
	r := p.GetRelationship()
	if err := ValidateFederationRelationship(r); err != nil {
		return &ferrypb.CommandResult{Status: status(codes.InvalidArgument, "%v", err)}
	}
	old := a.federation(r.TrustDomain)
	switch {
	case p.CreateOnly && old != nil:
		return &ferrypb.CommandResult{Status: status(codes.AlreadyExists, "federation relationship with %s exists", r.TrustDomain)}
	case p.UpdateOnly && old == nil:
		return &ferrypb.CommandResult{Status: status(codes.NotFound, "no federation relationship with %s", r.TrustDomain)}
	}
	if b := p.GetBundle(); b != nil {
		if b.TrustDomain != r.TrustDomain {
			return &ferrypb.CommandResult{Status: status(codes.InvalidArgument, "bundle is for %q, not %q", b.TrustDomain, r.TrustDomain)}
		}
		if len(b.X509Authorities) == 0 && len(b.JwtAuthorities) == 0 {
			return &ferrypb.CommandResult{Status: status(codes.InvalidArgument, "bundle for %s has no authorities", r.TrustDomain)}
		}
	}
	if r.Profile == ProfileHTTPSSPIFFE {
		id, _ := spiffeid.FromString(r.EndpointSpiffeId)
		etd := id.TrustDomain().Name()
		if (p.GetBundle() == nil || etd != r.TrustDomain) && a.bundle(etd) == nil {
			return &ferrypb.CommandResult{Status: status(codes.FailedPrecondition,
				"the https_spiffe endpoint %s is authenticated with the bundle of %s, which is unknown: provide it", r.EndpointSpiffeId, etd)}
		}
	}
	if b := p.GetBundle(); b != nil {
		row := proto.Clone(b).(*ferrypb.Bundle)
		row.Revision = a.index
		a.upsert(TableBundles, row.TrustDomain, row)
	}
	row := proto.Clone(r).(*ferrypb.FederationRelationship)
	// The refresher's status is its own: kept from the old row, never taken
	// from the request.
	row.LastRefresh, row.LastError, row.NextRefresh, row.RefreshHintSeconds = 0, "", 0, 0
	if old != nil {
		row.LastRefresh, row.LastError = old.LastRefresh, old.LastError
		row.NextRefresh, row.RefreshHintSeconds = old.NextRefresh, old.RefreshHintSeconds
	}
	row.Revision = a.index
	a.upsert(TableFederation, row.TrustDomain, row)
	return &ferrypb.CommandResult{Status: ok(), FederationRelationship: row}
}

func (a *applier) deleteFederation(td string) *ferrypb.CommandResult {
	old := a.federation(td)
	if old == nil {
		return &ferrypb.CommandResult{Status: status(codes.NotFound, "no federation relationship with %q", td)}
	}
	a.delete(TableFederation, td, old)
	return &ferrypb.CommandResult{Status: ok(), FederationRelationship: old}
}

func (a *applier) setFederationStatus(p *ferrypb.FederationStatusSet) *ferrypb.CommandResult {
	old := a.federation(p.TrustDomain)
	if old == nil {
		return &ferrypb.CommandResult{Status: status(codes.NotFound, "no federation relationship with %q", p.TrustDomain)}
	}
	row := proto.Clone(old).(*ferrypb.FederationRelationship)
	row.LastRefresh, row.LastError = p.LastRefresh, p.LastError
	row.NextRefresh, row.RefreshHintSeconds = p.NextRefresh, p.RefreshHintSeconds
	row.Revision = a.index
	a.upsert(TableFederation, row.TrustDomain, row)
	return &ferrypb.CommandResult{Status: ok(), FederationRelationship: row}
}

// FederationRelationship returns the relationship with a trust domain, or nil.
func (v *View) FederationRelationship(td string) *ferrypb.FederationRelationship {
	raw, err := v.txn.First(TableFederation, "id", td)
	if err != nil || raw == nil {
		return nil
	}
	return raw.(*ferrypb.FederationRelationship)
}

// FederationRelationships returns every relationship, by trust domain.
func (v *View) FederationRelationships() []*ferrypb.FederationRelationship {
	it, err := v.txn.Get(TableFederation, "id")
	if err != nil {
		return nil
	}
	var out []*ferrypb.FederationRelationship
	for raw := it.Next(); raw != nil; raw = it.Next() {
		out = append(out, raw.(*ferrypb.FederationRelationship))
	}
	return out
}
