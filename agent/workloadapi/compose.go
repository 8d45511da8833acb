package workloadapi

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	workloadpb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/ferry-id/ferry/agent/cache"
)

func serializeErr(err error) error {
	return status.Errorf(codes.Unavailable, "could not serialize response: %v", err)
}

var errNoBundle = status.Error(codes.Unavailable, "trust bundle not available")

// selectIdentities returns the identities to serve, in the cache's order (the
// first is the default identity): only the one with SPIFFE ID id when id is
// set, and never two with the same non-empty hint, since hints must be unique
// in a response; the first identity with a hint wins.
func selectIdentities(all []cache.Identity, id string) []cache.Identity {
	out := make([]cache.Identity, 0, len(all))
	var hints map[string]bool
	for _, ident := range all {
		if ident.Entry == nil {
			continue
		}
		if id != "" && ident.Entry.GetSpiffeId() != id {
			continue
		}
		if h := ident.Entry.GetHint(); h != "" {
			if hints[h] {
				continue
			}
			if hints == nil {
				hints = make(map[string]bool)
			}
			hints[h] = true
		}
		out = append(out, ident)
	}
	return out
}

// visibleFederated returns the federated bundles of u that the entries of ids
// federate with. The agent's own trust domain is never among them.
func visibleFederated(u *cache.WorkloadUpdate, ids []cache.Identity) map[spiffeid.TrustDomain]*spiffebundle.Bundle {
	if len(u.FederatedBundles) == 0 || len(ids) == 0 {
		return nil
	}
	var own spiffeid.TrustDomain
	if u.Bundle != nil {
		own = u.Bundle.TrustDomain()
	}
	out := make(map[spiffeid.TrustDomain]*spiffebundle.Bundle)
	for _, ident := range ids {
		for _, name := range ident.Entry.GetFederatesWith() {
			td, err := spiffeid.TrustDomainFromString(name)
			if err != nil || td == own {
				continue
			}
			if b := u.FederatedBundles[td]; b != nil {
				out[td] = b
			}
		}
	}
	return out
}

func concatDER(certs []*x509.Certificate) []byte {
	n := 0
	for _, c := range certs {
		n += len(c.Raw)
	}
	out := make([]byte, 0, n)
	for _, c := range certs {
		out = append(out, c.Raw...)
	}
	return out
}

func composeX509SVIDResponse(u *cache.WorkloadUpdate) (*workloadpb.X509SVIDResponse, error) {
	ids := selectIdentities(u.Identities, "")
	if len(ids) == 0 {
		return nil, errNoIdentity
	}
	if u.Bundle == nil {
		return nil, errNoBundle
	}
	bundle := concatDER(u.Bundle.X509Authorities())
	resp := &workloadpb.X509SVIDResponse{Svids: make([]*workloadpb.X509SVID, 0, len(ids))}
	for _, ident := range ids {
		if len(ident.SVID) == 0 || ident.PrivateKey == nil {
			return nil, serializeErr(fmt.Errorf("identity %s has no X509-SVID", ident.Entry.GetSpiffeId()))
		}
		// The cache encodes each SVID's key and chain once; encode here only
		// for a Manager that does not.
		key := ident.PrivateKeyDER
		if key == nil {
			var err error
			if key, err = x509.MarshalPKCS8PrivateKey(ident.PrivateKey); err != nil {
				return nil, serializeErr(fmt.Errorf("key of %s: %w", ident.Entry.GetSpiffeId(), err))
			}
		}
		chain := ident.SVIDDER
		if chain == nil {
			chain = concatDER(ident.SVID)
		}
		resp.Svids = append(resp.Svids, &workloadpb.X509SVID{
			SpiffeId:    ident.Entry.GetSpiffeId(),
			X509Svid:    chain,
			X509SvidKey: key,
			Bundle:      bundle,
			Hint:        ident.Entry.GetHint(),
		})
	}
	if fed := visibleFederated(u, ids); len(fed) > 0 {
		resp.FederatedBundles = make(map[string][]byte, len(fed))
		for td, b := range fed {
			resp.FederatedBundles[td.IDString()] = concatDER(b.X509Authorities())
		}
	}
	return resp, nil
}

func composeX509BundlesResponse(u *cache.WorkloadUpdate) (*workloadpb.X509BundlesResponse, error) {
	if u.Bundle == nil {
		return nil, errNoBundle
	}
	resp := &workloadpb.X509BundlesResponse{Bundles: map[string][]byte{
		u.Bundle.TrustDomain().IDString(): concatDER(u.Bundle.X509Authorities()),
	}}
	for td, b := range visibleFederated(u, u.Identities) {
		resp.Bundles[td.IDString()] = concatDER(b.X509Authorities())
	}
	return resp, nil
}

func composeJWTBundlesResponse(u *cache.WorkloadUpdate) (*workloadpb.JWTBundlesResponse, error) {
	if u.Bundle == nil {
		return nil, errNoBundle
	}
	resp := &workloadpb.JWTBundlesResponse{Bundles: make(map[string][]byte)}
	add := func(b *spiffebundle.Bundle) error {
		doc, err := marshalJWKS(b, b.JWTAuthorities(), useJWTSVID)
		if err != nil {
			return serializeErr(err)
		}
		resp.Bundles[b.TrustDomain().IDString()] = doc
		return nil
	}
	if err := add(u.Bundle); err != nil {
		return nil, err
	}
	for _, b := range visibleFederated(u, u.Identities) {
		if err := add(b); err != nil {
			return nil, err
		}
	}
	return resp, nil
}

func composeWITBundlesResponse(u *cache.WorkloadUpdate) (*workloadpb.WITBundlesResponse, error) {
	if u.Bundle == nil {
		return nil, errNoBundle
	}
	resp := &workloadpb.WITBundlesResponse{Bundles: make(map[string]string)}
	add := func(b *spiffebundle.Bundle) error {
		doc, err := marshalJWKS(b, b.WITAuthorities(), useWITSVID)
		if err != nil {
			return serializeErr(err)
		}
		resp.Bundles[b.TrustDomain().IDString()] = string(doc)
		return nil
	}
	if err := add(u.Bundle); err != nil {
		return nil, err
	}
	for _, b := range visibleFederated(u, u.Identities) {
		if err := add(b); err != nil {
			return nil, err
		}
	}
	return resp, nil
}

// composeWITSVIDResponse fetches a WIT-SVID for each identity to serve and
// reports when the soonest of them expires.
func (s *Server) composeWITSVIDResponse(ctx context.Context, u *cache.WorkloadUpdate, id string) (*workloadpb.WITSVIDResponse, time.Time, error) {
	ids := selectIdentities(u.Identities, id)
	if len(ids) == 0 {
		return nil, time.Time{}, errNoIdentity
	}
	var soonest time.Time
	resp := &workloadpb.WITSVIDResponse{Svids: make([]*workloadpb.WITSVID, 0, len(ids))}
	for _, ident := range ids {
		svid, err := s.wit.FetchWITSVID(ctx, ident.Entry)
		if err != nil {
			return nil, time.Time{}, cacheErr(ctx, "could not fetch WIT-SVID for "+ident.Entry.GetSpiffeId(), err)
		}
		if svid == nil || svid.PrivateKey == nil {
			return nil, time.Time{}, serializeErr(fmt.Errorf("WIT-SVID for %s has no private key", ident.Entry.GetSpiffeId()))
		}
		key, err := privateJWK(svid.PrivateKey)
		if err != nil {
			return nil, time.Time{}, serializeErr(err)
		}
		keyJSON, err := json.Marshal(key)
		if err != nil {
			return nil, time.Time{}, serializeErr(err)
		}
		resp.Svids = append(resp.Svids, &workloadpb.WITSVID{
			SpiffeId:   ident.Entry.GetSpiffeId(),
			WitSvid:    svid.Token,
			WitSvidKey: string(keyJSON),
			Hint:       ident.Entry.GetHint(),
		})
		if !svid.ExpiresAt.IsZero() && (soonest.IsZero() || svid.ExpiresAt.Before(soonest)) {
			soonest = svid.ExpiresAt
		}
	}
	return resp, soonest, nil
}

// claimsStruct converts validated JWT claims to a protobuf Struct. For a token
// of another trust domain only sub, aud, exp and the allowed claims are kept.
// A single-valued aud is returned as a list, as SPIRE always has.
func claimsStruct(claims map[string]any, foreign bool, allowed map[string]bool) (*structpb.Struct, error) {
	out := make(map[string]any, len(claims))
	for k, v := range claims {
		switch k {
		case "sub", "aud", "exp":
		default:
			if foreign && !allowed[k] {
				continue
			}
		}
		out[k] = v
	}
	if aud, ok := out["aud"].(string); ok {
		out["aud"] = []any{aud}
	}
	// A JSON round trip turns whatever types the JWT library produced into
	// the JSON values a Struct holds.
	raw, err := json.Marshal(out)
	if err != nil {
		return nil, err
	}
	s := new(structpb.Struct)
	if err := protojson.Unmarshal(raw, s); err != nil {
		return nil, err
	}
	return s, nil
}
