package state_test

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/state"
)

// TestNodePutRefuseActive: a put with refuse_active is refused while the node
// holds an unexpired SVID (current or the one it renewed with), and accepted
// once both have expired, for a new node, or without the flag.
func TestNodePutRefuseActive(t *testing.T) {
	h := newHarness(t, state.Config{})
	const id = "spiffe://example.org/spire/agent/aws_iid/123456789012/us-east-1/i-0abc"
	put := func(serial string, notAfter time.Time, refuse bool) (*ferrypb.CommandResult, codes.Code) {
		res := h.apply(&ferrypb.Command{Op: &ferrypb.Command_NodePut{NodePut: &ferrypb.NodePut{
			Node:         &ferrypb.AttestedNode{SpiffeId: id, AttestationType: "aws_iid", CertSerial: serial, CertNotAfter: notAfter.Unix()},
			RefuseActive: refuse,
		}}})
		return res, codeOf(res.Status)
	}
	_, code := put("1", h.now.Add(time.Hour), true)
	require.Equal(t, codes.OK, code, "a first attestation is admitted")

	res, code := put("2", h.now.Add(time.Hour), true)
	require.Equal(t, codes.PermissionDenied, code)
	require.Contains(t, res.Status.Message, "already attested")
	require.Equal(t, "1", h.s.View().Node(id).CertSerial, "the refused put changed nothing")

	_, code = put("3", h.now.Add(time.Hour), false)
	require.Equal(t, codes.OK, code, "without the flag (re-attestation allowed) the put goes through")

	// Renewed: the old SVID (NewCertNotAfter) still counts as active.
	n := h.s.View().Node(id)
	upd := &ferrypb.AttestedNode{SpiffeId: id, CertSerial: "4", CertNotAfter: h.now.Add(-time.Second).Unix(), NewCertSerial: "3", NewCertNotAfter: h.now.Add(time.Minute).Unix()}
	res = h.apply(&ferrypb.Command{Op: &ferrypb.Command_NodePut{NodePut: &ferrypb.NodePut{Node: upd, ExpectSerial: n.CertSerial}}})
	require.Equal(t, codes.OK, codeOf(res.Status), res.Status.GetMessage())
	_, code = put("5", h.now.Add(time.Hour), true)
	require.Equal(t, codes.PermissionDenied, code, "the SVID it renewed with has not expired")

	h.now = h.now.Add(2 * time.Minute)
	_, code = put("6", h.now.Add(time.Hour), true)
	require.Equal(t, codes.OK, code, "every SVID of the old agent has expired: the instance may attest again")
}

func tokenCreate(hash, id string, expires time.Time) *ferrypb.Command {
	return &ferrypb.Command{Op: &ferrypb.Command_JoinTokenCreate{JoinTokenCreate: &ferrypb.JoinTokenCreate{
		Token: &ferrypb.JoinToken{Hash: hash, SpiffeId: id, ExpiresAt: expires.Unix()}}}}
}

func nodePut(id, token string) *ferrypb.Command {
	return &ferrypb.Command{Op: &ferrypb.Command_NodePut{NodePut: &ferrypb.NodePut{
		Node: &ferrypb.AttestedNode{SpiffeId: id, AttestationType: "join_token", CertSerial: "1"}, ConsumeJoinToken: token}}}
}

// TestNodePutSpendsJoinToken: the token an attestation used is spent by the
// write that records the agent, and only by a write that does.
func TestNodePutSpendsJoinToken(t *testing.T) {
	h := newHarness(t, state.Config{})
	hash := func(c byte) string {
		b := make([]byte, 64)
		for i := range b {
			b[i] = c
		}
		return string(b)
	}
	const a, b = "spiffe://example.org/spire/agent/a", "spiffe://example.org/spire/agent/b"
	require.Equal(t, codes.OK, codeOf(h.apply(tokenCreate(hash('1'), "", h.now.Add(time.Hour))).Status))

	// A refused put (the agent ID is banned) leaves the token where it was.
	ban := &ferrypb.Command{Op: &ferrypb.Command_NodeBan{NodeBan: &ferrypb.NodeBan{SpiffeId: a, Banned: true}}}
	require.Equal(t, codes.OK, codeOf(h.apply(ban).Status))
	res := h.apply(nodePut(a, hash('1')))
	require.Equal(t, codes.PermissionDenied, codeOf(res.Status), res.Status.GetMessage())
	require.NotNil(t, h.s.View().JoinToken(hash('1')), "a refused attestation does not spend the token")

	// The first put that records its agent spends it; the next finds none.
	res = h.apply(nodePut(b, hash('1')))
	require.Equal(t, codes.OK, codeOf(res.Status), res.Status.GetMessage())
	require.Nil(t, h.s.View().JoinToken(hash('1')))
	res = h.apply(nodePut("spiffe://example.org/spire/agent/c", hash('1')))
	require.Equal(t, codes.NotFound, codeOf(res.Status))
	require.Contains(t, res.Status.GetMessage(), "join token unknown or already used")
	require.Nil(t, h.s.View().Node("spiffe://example.org/spire/agent/c"), "no agent without a token")

	// An expired token records nothing, and goes.
	require.Equal(t, codes.OK, codeOf(h.apply(tokenCreate(hash('2'), "", h.now.Add(-time.Second))).Status))
	res = h.apply(nodePut("spiffe://example.org/spire/agent/d", hash('2')))
	require.Equal(t, codes.PermissionDenied, codeOf(res.Status))
	require.Nil(t, h.s.View().Node("spiffe://example.org/spire/agent/d"))
	require.Nil(t, h.s.View().JoinToken(hash('2')))
}
