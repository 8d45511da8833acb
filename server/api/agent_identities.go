package api

import (
	"context"
	"slices"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/ferry-id/ferry/bridge/fic"
	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/state"
)

// TokenExchangeAudience is the audience of the JWT-SVIDs agents trade for
// access tokens, and the audience a federated credential must accept for an
// agent to offer its identity.
const TokenExchangeAudience = state.TokenExchangeAudience

// maxIdentityIDs bounds the SPIFFE IDs one ListAgentIdentities call may ask about.
const maxIdentityIDs = 1000

// ListAgentIdentities answers, for every SPIFFE ID of an entry the agent is
// authorized for (and the agent's own ID), the identities whose federated
// credentials accept a JWT-SVID for that ID (issuer AgentConfig.JWTIssuer,
// audience TokenExchangeAudience, subject the ID or a claims-matching
// expression that accepts it). A system-assigned identity is offered only to
// its owner: the SPIFFE ID of its entry, while that entry exists with the
// identity enabled and is one the agent is authorized for; or the agent
// itself, while it is attested with the identity enabled. The answer comes
// from the local replica of the directory, so it may trail the leader by a
// moment; the token authority checks the credential again at exchange.
func (a *Agent) ListAgentIdentities(ctx context.Context, req *ferrypb.ListAgentIdentitiesRequest) (*ferrypb.ListAgentIdentitiesResponse, error) {
	n, _, err := a.caller(ctx)
	if err != nil {
		return nil, err
	}
	if len(req.GetSpiffeIds()) > maxIdentityIDs {
		return nil, status.Errorf(codes.InvalidArgument, "at most %d SPIFFE IDs per call", maxIdentityIDs)
	}
	v := a.cfg.Store.View()
	auth := a.authorized(v, n)
	allowed := map[string]bool{n.SpiffeId: true}
	for _, e := range auth {
		allowed[e.GetSpiffeId()] = true
	}
	var ids []string
	for _, id := range req.GetSpiffeIds() {
		if allowed[id] && !slices.Contains(ids, id) {
			ids = append(ids, id)
		}
	}
	resp := &ferrypb.ListAgentIdentitiesResponse{}
	if len(ids) == 0 {
		return resp, nil
	}
	rules := exchangeRules(v, a.cfg.JWTIssuer)
	for _, id := range ids {
		resp.Identities = append(resp.Identities, a.identitiesFor(v, rules, id, n, auth)...)
	}
	return resp, nil
}

// identitiesFor returns the identities SPIFFE ID id (one agent n may ask
// about, authorized for the entries auth) may use under rules.
func (a *Agent) identitiesFor(v *state.View, rules []identityRules, id string, n *ferrypb.AttestedNode, auth map[string]*ferrypb.Entry) []*ferrypb.AgentIdentity {
	var out []*ferrypb.AgentIdentity
	for _, ir := range rules {
		idn := ir.identity
		if idn.GetKind() == state.KindSystemAssigned && !ownerHolds(v, idn, id, n, auth) {
			continue
		}
		if !ir.accepts(id, a.cfg.JWTIssuer) {
			continue
		}
		out = append(out, &ferrypb.AgentIdentity{
			SpiffeId:   id,
			ClientId:   idn.GetClientId(),
			ObjectId:   idn.GetObjectId(),
			ResourceId: idn.GetResourceId(),
			TenantId:   idn.GetTenantId(),
			Name:       idn.GetName(),
			Kind:       idn.GetKind(),
		})
	}
	return out
}

// ownerHolds reports whether SPIFFE ID id, asked about by agent n (authorized
// for the entries auth), is the live owner of a system-assigned identity.
func ownerHolds(v *state.View, idn *ferrypb.Identity, id string, n *ferrypb.AttestedNode, auth map[string]*ferrypb.Entry) bool {
	if idn.GetOwnerSpiffeId() != id {
		return false
	}
	if eid := idn.GetOwnerEntryId(); eid != "" {
		e := auth[eid]
		return e != nil && e.GetSystemAssignedIdentity() && e.GetSpiffeId() == id
	}
	cur := v.Node(id)
	return id == n.GetSpiffeId() && cur != nil && cur.GetSystemAssignedIdentity() && !cur.GetBanned()
}

// identityRules is an identity with its credentials that could accept a
// JWT-SVID of this trust domain for the token exchange.
type identityRules struct {
	identity *ferrypb.Identity
	rules    []*fic.Rule
}

// exchangeRules compiles the credentials with the exchange audience (and the
// trust domain's issuer, when known), grouped by identity in object ID order.
func exchangeRules(v *state.View, issuer string) []identityRules {
	byID := map[string]int{}
	var out []identityRules
	for _, fc := range v.AllFederatedCredentials() {
		if issuer != "" && fc.GetIssuer() != issuer {
			continue
		}
		if !slices.Contains(fc.GetAudiences(), TokenExchangeAudience) && len(fc.GetAudiences()) != 0 {
			continue
		}
		r, err := fic.Compile(fc)
		if err != nil || r.Audience != TokenExchangeAudience {
			continue
		}
		i, ok := byID[fc.GetIdentityObjectId()]
		if !ok {
			idn := v.Identity(fc.GetIdentityObjectId())
			if idn == nil {
				continue
			}
			i = len(out)
			byID[fc.GetIdentityObjectId()] = i
			out = append(out, identityRules{identity: idn})
		}
		out[i].rules = append(out[i].rules, r)
	}
	slices.SortFunc(out, func(x, y identityRules) int {
		return strings.Compare(x.identity.GetObjectId(), y.identity.GetObjectId())
	})
	return out
}

// accepts reports whether one of the rules accepts a JWT-SVID for id.
func (ir identityRules) accepts(id, issuer string) bool {
	for _, r := range ir.rules {
		if ruleAccepts(r, id, issuer) {
			return true
		}
	}
	return false
}

// ruleAccepts reports whether a credential rule accepts a JWT-SVID for id
// from issuer (the rule's own issuer when empty) with the rule's audience.
func ruleAccepts(r *fic.Rule, id, issuer string) bool {
	if issuer == "" {
		issuer = r.Issuer
	}
	claims := map[string]any{"iss": issuer, "sub": id, "aud": r.Audience}
	_, err := fic.Select([]*fic.Rule{r}, fic.Assertion{
		Issuer: issuer, Subject: id, Audiences: []string{r.Audience}, Claims: claims,
	})
	return err == nil
}
