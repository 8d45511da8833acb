package e2e

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/exp/bundle/witbundle"
	"github.com/spiffe/go-spiffe/v2/exp/svid/witsvid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/ca"
	"github.com/ferry-id/ferry/test/testcluster"
)

// TestAgentAPINewWITSVID: the Agent service mints WIT-SVIDs for authorized
// entries only, bound to the key the agent sent, verifiable with the bundle
// the agent is streamed.
func TestAgentAPINewWITSVID(t *testing.T) {
	if testing.Short() {
		t.Skip("real processes")
	}
	c := testcluster.New(t, testcluster.Options{Nodes: 1, LogLevel: "info"})
	api := newAgentAPI(t, c)
	s := c.Nodes[0]
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	mine, theirs := "spiffe://example.org/spire/agent/wit-a", "spiffe://example.org/spire/agent/wit-b"
	svid := api.mustAttest(ctx, s, mine)
	createEntries(t, s,
		apiEntry("wit-mine", "spiffe://example.org/w/wit", mine),
		apiEntry("wit-theirs", "spiffe://example.org/w/other", theirs))
	cl := api.client(s.AgentAddr, svid)

	// The bundle the agent follows, as the agent turns it into a WIT bundle.
	stream, err := cl.SyncEntries(ctx, &ferrypb.SyncEntriesRequest{})
	require.NoError(t, err)
	first, err := stream.Recv()
	require.NoError(t, err)
	var wb *witbundle.Bundle
	for _, b := range first.Bundles {
		if b.TrustDomain == "example.org" {
			sb, err := ca.ToSPIFFEBundle(b)
			require.NoError(t, err)
			sb = ca.WithWITAuthorities(sb)
			wb = witbundle.FromWITAuthorities(sb.TrustDomain(), sb.WITAuthorities())
		}
	}
	require.NotNil(t, wb)
	require.NotEmpty(t, wb.WITAuthorities())

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	der, err := x509.MarshalPKIXPublicKey(key.Public())
	require.NoError(t, err)

	resp, err := cl.NewWITSVID(ctx, &ferrypb.NewWITSVIDRequest{EntryId: "wit-mine", PublicKey: der})
	require.NoError(t, err)
	require.Greater(t, resp.ExpiresAt, resp.IssuedAt)
	parsed, err := witsvid.ParseAndValidate(resp.Token, wb)
	require.NoError(t, err)
	require.Equal(t, "spiffe://example.org/w/wit", parsed.ID.String())
	require.True(t, key.PublicKey.Equal(parsed.PublicKey), "cnf.jwk is the key the agent sent")
	require.Equal(t, resp.ExpiresAt, parsed.Expiry.Unix())

	_, err = cl.NewWITSVID(ctx, &ferrypb.NewWITSVIDRequest{EntryId: "wit-theirs", PublicKey: der})
	requireCode(t, codes.PermissionDenied, err, "another agent's entry")
	_, err = cl.NewWITSVID(ctx, &ferrypb.NewWITSVIDRequest{EntryId: "no-such-entry", PublicKey: der})
	requireCode(t, codes.PermissionDenied, err, "unknown entry")
	_, err = cl.NewWITSVID(ctx, &ferrypb.NewWITSVIDRequest{EntryId: "wit-mine", PublicKey: []byte("not a key")})
	requireCode(t, codes.InvalidArgument, err, "malformed key")
	edPub, _, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	edDER, err := x509.MarshalPKIXPublicKey(edPub)
	require.NoError(t, err)
	_, err = cl.NewWITSVID(ctx, &ferrypb.NewWITSVIDRequest{EntryId: "wit-mine", PublicKey: edDER})
	requireCode(t, codes.InvalidArgument, err, "Ed25519 has no WIT alg")

	// Without an agent SVID there is no call at all.
	_, err = api.client(s.AgentAddr, nil).NewWITSVID(ctx, &ferrypb.NewWITSVIDRequest{EntryId: "wit-mine", PublicKey: der})
	require.Error(t, err)
}
