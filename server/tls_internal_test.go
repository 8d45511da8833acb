package server

import (
	"context"
	"crypto/x509"
	"encoding/hex"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/ca"
)

// nopPublisher accepts every bundle change: the CA under test only needs its
// publications to succeed.
type nopPublisher struct{}

func (nopPublisher) PublishX509Authority(context.Context, *ferrypb.X509Authority) error { return nil }
func (nopPublisher) PublishJWTAuthority(context.Context, *ferrypb.JWTAuthority) error   { return nil }
func (nopPublisher) RemoveX509Authority(context.Context, []byte) error                  { return nil }
func (nopPublisher) RemoveJWTAuthority(context.Context, string) error                   { return nil }

// TestServerSVIDFollowsActiveAuthority: the certificate served on every
// listener is signed again by the new authority as soon as it is activated,
// not at the old certificate's half-life; and never by an authority after it
// was revoked.
func TestServerSVIDFollowsActiveAuthority(t *testing.T) {
	ctx := context.Background()
	authority, err := ca.New(ca.Config{TrustDomain: spiffeid.RequireTrustDomainFromString("example.org"),
		DataDir: t.TempDir(), NodeID: "s1", Publisher: nopPublisher{}})
	require.NoError(t, err)
	require.NoError(t, authority.Rotate(ctx))
	first := authority.ActiveX509AuthorityID()
	require.NotEmpty(t, first)

	svid := &serverSVID{ca: authority, dnsNames: []string{"localhost"}}
	signer := func(c *x509.Certificate) string { return hex.EncodeToString(c.AuthorityKeyId) }
	c1, err := svid.get(nil)
	require.NoError(t, err)
	require.Equal(t, first, signer(c1.Leaf))
	again, err := svid.get(nil)
	require.NoError(t, err)
	require.Same(t, c1, again, "an SVID of the active authority is reused")

	next, err := authority.Prepare(ctx, ca.KindX509)
	require.NoError(t, err)
	same, err := svid.get(nil)
	require.NoError(t, err)
	require.Same(t, c1, same, "preparing changes nothing: the prepared authority does not sign yet")

	_, err = authority.Activate(ctx, ca.KindX509, next.ID)
	require.NoError(t, err)
	c2, err := svid.get(nil)
	require.NoError(t, err)
	require.Equal(t, next.ID, signer(c2.Leaf), "signed again by the new authority at once")
	require.Equal(t, []string{"localhost"}, c2.Leaf.DNSNames)

	_, err = authority.Taint(ctx, ca.KindX509, first)
	require.NoError(t, err)
	_, err = authority.Revoke(ctx, ca.KindX509, first)
	require.NoError(t, err)
	c3, err := svid.get(nil)
	require.NoError(t, err)
	require.Same(t, c2, c3)
	require.Equal(t, next.ID, signer(c3.Leaf))
}
