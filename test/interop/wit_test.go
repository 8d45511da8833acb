package interop

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/exp/bundle/witbundle"
	"github.com/spiffe/go-spiffe/v2/exp/svid/witsvid"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"github.com/stretchr/testify/require"
)

// TestWITSource: go-spiffe's (experimental) WIT source gets a WIT-SVID the
// server minted for this workload, bound to a key the agent generated, and a
// WIT bundle that verifies it.
func TestWITSource(t *testing.T) {
	id := entryFor(t, "wit")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	src, err := workloadapi.NewWITSource(ctx, workloadapi.WithClientOptions(addr()))
	require.NoError(t, err)
	defer src.Close()

	svid, err := src.GetWITSVIDForID(id)
	require.NoError(t, err)
	require.Equal(t, id, svid.ID)
	require.True(t, svid.Expiry.After(time.Now()), "expiry %v", svid.Expiry)

	// Offline validation against the WIT bundle the source holds.
	parsed, err := witsvid.ParseAndValidate(svid.Marshal(), src)
	require.NoError(t, err)
	require.Equal(t, id, parsed.ID)
	requireBound(t, svid)

	// A bundle without the trust domain's keys refuses it.
	_, err = witsvid.ParseAndValidate(svid.Marshal(), witbundle.New(id.TrustDomain()))
	require.Error(t, err)
}

// TestFetchWITSVIDAndBundles: the one-shot client calls, with and without a
// requested SPIFFE ID.
func TestFetchWITSVIDAndBundles(t *testing.T) {
	id := entryFor(t, "wit-fetch")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	svid, err := workloadapi.FetchWITSVID(ctx, id.String(), addr())
	require.NoError(t, err)
	require.Equal(t, id, svid.ID)
	requireBound(t, svid)

	all, err := workloadapi.FetchWITSVIDs(ctx, "", addr())
	require.NoError(t, err)
	var found bool
	for _, s := range all {
		found = found || s.ID == id
	}
	require.True(t, found, "WIT-SVID for %s among %d", id, len(all))

	set, err := workloadapi.FetchWITBundles(ctx, addr())
	require.NoError(t, err)
	b, err := set.GetWITBundleForTrustDomain(id.TrustDomain())
	require.NoError(t, err)
	require.NotEmpty(t, b.WITAuthorities())
	require.True(t, b.HasWITAuthority(svid.KeyID), "bundle has the signing key %q", svid.KeyID)
	for _, s := range all {
		_, err := witsvid.ParseAndValidate(s.Marshal(), set)
		require.NoError(t, err, s.ID)
	}

	// An ID the caller has no entry for is refused.
	other := spiffeid.RequireFromPath(id.TrustDomain(), "/interop/not-mine")
	_, err = workloadapi.FetchWITSVID(ctx, other.String(), addr())
	require.Error(t, err)
}

// requireBound checks proof of possession: the private key the Workload API
// handed out signs what the token's cnf.jwk verifies.
func requireBound(t *testing.T, svid *witsvid.SVID) {
	t.Helper()
	signer, ok := svid.PrivateKey.(crypto.Signer)
	require.True(t, ok, "private key %T", svid.PrivateKey)
	pub, ok := svid.PublicKey.(*ecdsa.PublicKey)
	require.True(t, ok, "cnf.jwk key %T", svid.PublicKey)
	digest := sha256.Sum256([]byte("proof of possession"))
	sig, err := signer.Sign(rand.Reader, digest[:], crypto.SHA256)
	require.NoError(t, err)
	require.True(t, ecdsa.VerifyASN1(pub, digest[:], sig), "the private key does not match cnf.jwk")
}
