package ca_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/exp/bundle/witbundle"
	"github.com/spiffe/go-spiffe/v2/exp/svid/witsvid"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/server/ca"
)

func witBundle(t *testing.T, e *env) *witbundle.Bundle {
	t.Helper()
	sb, err := ca.ToSPIFFEBundle(e.pub.bundle())
	require.NoError(t, err)
	assert.Empty(t, sb.WITAuthorities(), "the stored bundle has no WIT authorities of its own")
	wb := ca.WithWITAuthorities(sb)
	assert.Empty(t, sb.WITAuthorities(), "WithWITAuthorities must not change its input")
	assert.Equal(t, sb.JWTAuthorities(), wb.WITAuthorities())
	return witbundle.FromWITAuthorities(wb.TrustDomain(), wb.WITAuthorities())
}

func TestMintWITSVID(t *testing.T) {
	for _, tc := range []struct {
		alg     ca.JWTAlgorithm
		issuer  string
		key     crypto.Signer
		wantAlg string
	}{
		{ca.ES256, "", ecKey(t), "ES256"},
		{ca.RS256, "https://oidc.example.org", rsaKey(t, 2048), "RS256"},
		{ca.ES256, "", mustEC(t, elliptic.P384()), "ES384"},
	} {
		t.Run(string(tc.alg)+"/"+tc.wantAlg, func(t *testing.T) {
			e := newEnv(t, func(c *ca.Config) {
				c.JWTAlgorithm = tc.alg
				c.JWTIssuer = tc.issuer
			})
			// go-spiffe checks exp against the wall clock.
			e.clock.Set(time.Now().Truncate(time.Second))
			require.NoError(t, e.ca.Rotate(t.Context()))
			id := wid("/ns/prod/sa/web")
			svid, err := e.ca.MintWITSVID(id, tc.key.Public(), 0)
			require.NoError(t, err)
			kid := e.active(t, ca.KindJWT).ID
			assert.Equal(t, kid, svid.KeyID)
			assert.Equal(t, e.clock.Now().Add(ca.DefaultWITSVIDTTL), svid.ExpiresAt)

			parts := strings.Split(svid.Token, ".")
			require.Len(t, parts, 3)
			assert.Equal(t, map[string]any{"alg": string(tc.alg), "kid": kid, "typ": "wit+jwt"}, decodeSegment(t, parts[0]))
			claims := decodeSegment(t, parts[1])
			assert.Equal(t, id.String(), claims["sub"])
			assert.NotContains(t, claims, "aud")
			assert.Len(t, claims["jti"], 32)
			if tc.issuer != "" {
				assert.Equal(t, tc.issuer, claims["iss"])
			} else {
				assert.NotContains(t, claims, "iss")
			}
			jwk := claims["cnf"].(map[string]any)["jwk"].(map[string]any)
			assert.Equal(t, tc.wantAlg, jwk["alg"])
			assert.NotContains(t, jwk, "d")

			// go-spiffe validates it against the WIT bundle and recovers the bound key.
			parsed, err := witsvid.ParseAndValidate(svid.Token, witBundle(t, e))
			require.NoError(t, err)
			assert.Equal(t, id, parsed.ID)
			assert.Equal(t, kid, parsed.KeyID)
			assert.True(t, tc.key.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(parsed.PublicKey))
			assert.True(t, svid.ExpiresAt.Equal(parsed.Expiry), "exp %v, token says %v", svid.ExpiresAt, parsed.Expiry)

			// It is not a JWT-SVID.
			jb, err := ca.ToJWTBundle(e.pub.bundle())
			require.NoError(t, err)
			_, err = jwtsvid.ParseAndValidate(svid.Token, jb, []string{"any"})
			require.Error(t, err)
		})
	}
}

func mustEC(t *testing.T, c elliptic.Curve) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(c, rand.Reader)
	require.NoError(t, err)
	return k
}

func TestMintWITSVIDOtherBundleRefuses(t *testing.T) {
	e := newReadyEnv(t, nil)
	other := newReadyEnv(t, nil)
	e.clock.Set(time.Now())
	svid, err := e.ca.MintWITSVID(wid("/web"), ecKey(t).Public(), 0)
	require.NoError(t, err)
	_, err = witsvid.ParseAndValidate(svid.Token, witBundle(t, other))
	require.Error(t, err, "a bundle without the signing key must not verify the token")
}

func TestMintWITSVIDRejects(t *testing.T) {
	e := newReadyEnv(t, nil)
	pub := ecKey(t).Public()
	edPub, _, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	for name, tc := range map[string]struct {
		f    func() error
		want error
	}{
		"negative TTL": {func() error { _, err := e.ca.MintWITSVID(wid("/web"), pub, -1); return err }, ca.ErrInvalidRequest},
		"foreign ID": {func() error {
			_, err := e.ca.MintWITSVID(spiffeid.RequireFromString("spiffe://other.org/web"), pub, 0)
			return err
		}, ca.ErrInvalidRequest},
		"server ID":   {func() error { _, err := e.ca.MintWITSVID(e.ca.ServerID(), pub, 0); return err }, ca.ErrInvalidRequest},
		"ed25519 key": {func() error { _, err := e.ca.MintWITSVID(wid("/web"), edPub, 0); return err }, ca.ErrUnsupportedKey},
		"P-224 key": {func() error {
			_, err := e.ca.MintWITSVID(wid("/web"), mustEC(t, elliptic.P224()).Public(), 0)
			return err
		}, ca.ErrUnsupportedKey},
		"small RSA key": {func() error { _, err := e.ca.MintWITSVID(wid("/web"), rsaKey(t, 1024).Public(), 0); return err }, ca.ErrUnsupportedKey},
	} {
		t.Run(name, func(t *testing.T) { require.ErrorIs(t, tc.f(), tc.want) })
	}
}

func TestMintWITSVIDNeedsAuthority(t *testing.T) {
	e := newEnv(t, nil)
	_, err := e.ca.MintWITSVID(wid("/web"), ecKey(t).Public(), 0)
	require.ErrorIs(t, err, ca.ErrNoAuthority)
}

func TestMintWITSVIDCappedByKey(t *testing.T) {
	e := newReadyEnv(t, nil)
	key := e.active(t, ca.KindJWT)
	svid, err := e.ca.MintWITSVID(wid("/web"), ecKey(t).Public(), 1000*time.Hour)
	require.NoError(t, err)
	assert.Equal(t, key.NotAfter, svid.ExpiresAt)
}
