package state_test

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/state"
)

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
