package ca_test

import (
	"crypto"
	"encoding/json"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/ca"
)

func TestBundleListsPublishedAuthorities(t *testing.T) {
	e := newReadyEnv(t, nil)
	e.clock.Set(t0.Add(13 * time.Hour))
	require.NoError(t, e.ca.Rotate(t.Context())) // prepares the next ones
	b := e.ca.Bundle()
	assert.Equal(t, "example.org", b.TrustDomain)
	require.Len(t, b.X509Authorities, 2, "active and prepared")
	require.Len(t, b.JwtAuthorities, 2, "active and prepared")
	for _, a := range e.ca.List(ca.KindJWT) {
		found := false
		for _, j := range b.JwtAuthorities {
			if j.KeyId == a.ID {
				found = true
				assert.Equal(t, a.NotAfter.Unix(), j.ExpiresAt)
			}
		}
		assert.True(t, found, a.ID)
	}
	// The node's view equals what the publisher holds.
	want := e.pub.bundle()
	assert.ElementsMatch(t, rawX509(want), rawX509(b))
}

func rawX509(b *ferrypb.Bundle) []string {
	var out []string
	for _, a := range b.X509Authorities {
		out = append(out, string(a.Certificate))
	}
	return out
}

func TestBundleUnpublishedNotListed(t *testing.T) {
	e := newEnv(t, nil)
	e.pub.setFail(true)
	require.Error(t, e.ca.Rotate(t.Context()))
	b := e.ca.Bundle()
	assert.Empty(t, b.X509Authorities)
	assert.Empty(t, b.JwtAuthorities)
}

func TestBundleConversionRoundTrip(t *testing.T) {
	e := newReadyEnv(t, func(c *ca.Config) { c.JWTAlgorithm = ca.RS256 })
	b := e.ca.Bundle()
	b.SequenceNumber = 42
	b.RefreshHintSeconds = 300

	sb, err := ca.ToSPIFFEBundle(b)
	require.NoError(t, err)
	assert.Equal(t, td, sb.TrustDomain())
	seq, ok := sb.SequenceNumber()
	require.True(t, ok)
	assert.Equal(t, uint64(42), seq)
	hint, ok := sb.RefreshHint()
	require.True(t, ok)
	assert.Equal(t, 5*time.Minute, hint)
	require.Len(t, sb.X509Authorities(), 1)
	assert.Equal(t, e.active(t, ca.KindX509).Certificate.Raw, sb.X509Authorities()[0].Raw)
	jwtKey, ok := sb.FindJWTAuthority(e.active(t, ca.KindJWT).ID)
	require.True(t, ok)
	assert.True(t, e.active(t, ca.KindJWT).PublicKey.(interface{ Equal(crypto.PublicKey) bool }).Equal(jwtKey))

	// The SPIFFE bundle format carries use, spiffe_sequence and
	// spiffe_refresh_hint.
	doc, err := sb.Marshal()
	require.NoError(t, err)
	var jwks struct {
		Keys []struct {
			Use string `json:"use"`
			Kid string `json:"kid"`
		} `json:"keys"`
		Sequence    uint64 `json:"spiffe_sequence"`
		RefreshHint int64  `json:"spiffe_refresh_hint"`
	}
	require.NoError(t, json.Unmarshal(doc, &jwks))
	assert.Equal(t, uint64(42), jwks.Sequence)
	assert.Equal(t, int64(300), jwks.RefreshHint)
	uses := map[string]int{}
	for _, k := range jwks.Keys {
		uses[k.Use]++
		if k.Use == "x509-svid" {
			assert.Empty(t, k.Kid)
		} else {
			assert.NotEmpty(t, k.Kid)
		}
	}
	assert.Equal(t, map[string]int{"x509-svid": 1, "jwt-svid": 1}, uses)

	// Back again, through the JSON form a federated endpoint serves.
	parsed, err := spiffebundle.Parse(td, doc)
	require.NoError(t, err)
	back, err := ca.FromSPIFFEBundle(parsed)
	require.NoError(t, err)
	// Only JWT expiry (not in the SPIFFE format) is lost.
	want := proto.Clone(b).(*ferrypb.Bundle)
	for _, j := range want.JwtAuthorities {
		j.ExpiresAt = 0
	}
	assert.True(t, proto.Equal(want, back), "round trip:\nwant %v\n got %v", want, back)

	xb, err := ca.ToX509Bundle(b)
	require.NoError(t, err)
	assert.Len(t, xb.X509Authorities(), 1)
	jb, err := ca.ToJWTBundle(b)
	require.NoError(t, err)
	assert.Len(t, jb.JWTAuthorities(), 1)
}

func TestBundleConversionErrors(t *testing.T) {
	_, err := ca.ToSPIFFEBundle(&ferrypb.Bundle{TrustDomain: "Not A Domain!"})
	require.Error(t, err)
	_, err = ca.ToSPIFFEBundle(&ferrypb.Bundle{TrustDomain: "example.org",
		X509Authorities: []*ferrypb.X509Authority{{Certificate: []byte("junk")}}})
	require.Error(t, err)
	_, err = ca.ToSPIFFEBundle(&ferrypb.Bundle{TrustDomain: "example.org",
		JwtAuthorities: []*ferrypb.JWTAuthority{{KeyId: "k", PublicKey: []byte("junk")}}})
	require.Error(t, err)
}
