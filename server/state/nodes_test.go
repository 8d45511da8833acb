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
