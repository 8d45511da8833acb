// Package node defines node attestation: how an agent proves which machine it
// runs on, and how the server turns that proof into the agent's SPIFFE ID and
// node selectors.
//
// Each attestor package (attestors/node/jointoken, x509pop, azureimds,
// azuremsi, awsiid, gcpiit, tpm, sshpop) holds both halves; docs/attestors.md
// describes them for operators. The agent half produces a payload and answers challenges;
// the server half verifies the payload, may issue any number of challenges and
// returns a Result. The server's attestation stream carries the bytes:
//
//	agent                                server
//	Payload()         ── payload ──>     Attest(payload, challenge)
//	Respond(c)        <── c ──────       challenge(ctx, c)
//	                  ── response ──>
//	                  <── SVID ───────   (the caller signs for Result.AgentID)
//
// Attestor implementations must not trust anything in the payload or
// responses before verifying it, must bound the work an unauthenticated payload
// can cause, and must never log secrets carried in it.
package node

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ferry-id/ferry/internal/selector"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

// MaxPayloadSize is the largest payload or challenge response the server's
// attestation stream should accept; attestors enforce it too.
const MaxPayloadSize = 64 << 10

// AgentAttestor is the agent half of a node attestor. Calls for one
// attestation are sequential: Payload, then Respond once per challenge.
type AgentAttestor interface {
	// Name returns the attestor name, e.g. "join_token"; the server uses it to
	// pick the matching ServerAttestor.
	Name() string
	// Payload returns the initial attestation data.
	Payload(ctx context.Context) ([]byte, error)
	// Respond answers a challenge from the server.
	Respond(ctx context.Context, challenge []byte) ([]byte, error)
}

// ChallengeFunc sends challenge c to the agent and returns its response.
type ChallengeFunc func(ctx context.Context, c []byte) ([]byte, error)

// ServerAttestor is the server half of a node attestor. Implementations must be
// safe for concurrent use: many agents attest at once.
type ServerAttestor interface {
	// Name returns the attestor name; it matches the agent half's.
	Name() string
	// Attest verifies payload, issuing challenges through challenge as needed,
	// and returns who the agent is. Any error means the agent is not attested.
	Attest(ctx context.Context, payload []byte, challenge ChallengeFunc) (*Result, error)
}

// Result is the outcome of a successful attestation.
type Result struct {
	// AgentID is the SPIFFE ID the agent's SVID is issued for.
	AgentID spiffeid.ID
	// Selectors are the node selectors, used to match node-alias entries.
	Selectors []*ferrypb.Selector
	// CanReattest says the agent can prove itself again with the same
	// credential (x509pop can; a consumed join token cannot), so it may renew
	// by re-attesting rather than only with its current SVID.
	CanReattest bool
	// SingleAgent says whoever once saw the proof could present it again (a
	// static signed document, a bearer token still within its lifetime), so
	// the server admits it only while no other agent holds an unexpired SVID
	// for AgentID. Attestors set it unless their configuration allows
	// re-attestation.
	SingleAgent bool
	// JoinTokenHash, when set, is the hash of the one-time join token the
	// agent proved itself with. The server spends the token in the same
	// replicated write that records the agent, after every other check has
	// passed: an attestation refused for any other reason (its CA not ready,
	// a banned ID, a lost leader) leaves the token usable, and of several
	// attestations racing with one token exactly one records its agent.
	JoinTokenHash string
}

// ErrNoChallenge is returned by agent halves of attestors that never expect a
// challenge.
var ErrNoChallenge = errors.New("node: attestor does not expect a challenge")

// AgentPathPrefix starts the path of every agent's SPIFFE ID, as in SPIRE.
const AgentPathPrefix = "/spire/agent/"

// CheckAgentID reports whether id may be an agent's SPIFFE ID: in td (a zero
// td skips that check, for clients that do not know the server's) and under
// AgentPathPrefix. The server's CA signs agent SVIDs for no other ID, so
// anything naming an agent ID (a join token, an attestor's template) is held
// to this before it is accepted.
func CheckAgentID(td spiffeid.TrustDomain, id spiffeid.ID) error {
	if id.IsZero() {
		return errors.New("no SPIFFE ID")
	}
	if !td.IsZero() && !id.MemberOf(td) {
		return fmt.Errorf("%q is not a member of trust domain %q", id.String(), td.Name())
	}
	if !strings.HasPrefix(id.Path(), AgentPathPrefix) || len(id.Path()) == len(AgentPathPrefix) {
		name := id.TrustDomain().Name()
		return fmt.Errorf("%q is not an agent ID: agent IDs are under spiffe://%s%s, e.g. spiffe://%s%snode1",
			id.String(), name, AgentPathPrefix, name, AgentPathPrefix)
	}
	return nil
}

// AgentPath returns spiffe://<td>/spire/agent/<attestor>/<segments…>, the agent
// ID layout SPIRE uses, validating every segment.
func AgentPath(td spiffeid.TrustDomain, attestor string, segments ...string) (spiffeid.ID, error) {
	if td.IsZero() {
		return spiffeid.ID{}, errors.New("node: trust domain is required")
	}
	id, err := spiffeid.FromSegments(td, append([]string{"spire", "agent", attestor}, segments...)...)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("node: agent ID: %w", err)
	}
	return id, nil
}

// Exchange runs agent against server in process, carrying payload, challenges
// and responses directly, with the same size limit the attestation stream
// applies. It serves tests and single-process setups.
func Exchange(ctx context.Context, agent AgentAttestor, server ServerAttestor) (*Result, error) {
	if agent.Name() != server.Name() {
		return nil, fmt.Errorf("node: agent attestor %q does not match server attestor %q", agent.Name(), server.Name())
	}
	payload, err := agent.Payload(ctx)
	if err != nil {
		return nil, fmt.Errorf("node: %s payload: %w", agent.Name(), err)
	}
	if len(payload) > MaxPayloadSize {
		return nil, fmt.Errorf("node: %s payload is %d bytes, over %d", agent.Name(), len(payload), MaxPayloadSize)
	}
	return server.Attest(ctx, payload, func(ctx context.Context, c []byte) ([]byte, error) {
		resp, err := agent.Respond(ctx, c)
		if err != nil {
			return nil, err
		}
		if len(resp) > MaxPayloadSize {
			return nil, fmt.Errorf("node: %s response is %d bytes, over %d", agent.Name(), len(resp), MaxPayloadSize)
		}
		return resp, nil
	})
}

// Selectors turns values, produced by attestor typ, into its node
// selectors in canonical order, refusing any value schema does not accept
// (the attestor's own Selectors declaration, so what it emits and what
// node-alias entries are checked against cannot drift apart).
func Selectors(schema *selector.Registry, typ string, values ...string) ([]*ferrypb.Selector, error) {
	out := make([]*ferrypb.Selector, 0, len(values))
	for _, v := range values {
		sel := &ferrypb.Selector{Type: typ, Value: v}
		if err := schema.Check(selector.Node, sel); err != nil {
			return nil, err
		}
		out = append(out, sel)
	}
	return selector.Canonical(out), nil
}
