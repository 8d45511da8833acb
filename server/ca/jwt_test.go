package ca_test

import (
	"encoding/base64"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/server/ca"
)

func decodeSegment(t *testing.T, seg string) map[string]any {
	t.Helper()
	raw, err := base64.RawURLEncoding.DecodeString(seg)
	require.NoError(t, err)
	var m map[string]any
	require.NoError(t, json.Unmarshal(raw, &m))
	return m
}

func TestMintJWTSVID(t *testing.T) {
	for _, tc := range []struct {
		alg    ca.JWTAlgorithm
		issuer string
	}{
		{ca.ES256, ""},
		{ca.RS256, "https://oidc.example.org"},
	} {
		t.Run(string(tc.alg), func(t *testing.T) {
			e := newEnv(t, func(c *ca.Config) {
				c.JWTAlgorithm = tc.alg
				c.JWTIssuer = tc.issuer
			})
			// go-spiffe checks iat and exp against the wall clock.
			e.clock.Set(time.Now().Truncate(time.Second))
			require.NoError(t, e.ca.Rotate(t.Context()))
			e.clock.Add(3 * time.Second)
			id := wid("/ns/prod/sa/web")
			aud := []string{"api://AzureADTokenExchange"}
			svid, err := e.ca.MintJWTSVID(id, aud, 0, map[string]any{"jti": "j-1"})
			require.NoError(t, err)
			kid := e.active(t, ca.KindJWT).ID
			assert.Equal(t, kid, svid.KeyID)
			assert.Equal(t, e.clock.Now().Add(ca.DefaultJWTSVIDTTL), svid.ExpiresAt)

			parts := strings.Split(svid.Token, ".")
			require.Len(t, parts, 3)
			hdr := decodeSegment(t, parts[0])
			assert.Equal(t, map[string]any{"alg": string(tc.alg), "kid": kid, "typ": "JWT"}, hdr)
			claims := decodeSegment(t, parts[1])
			want := map[string]any{
				"sub": id.String(),
				"aud": []any{aud[0]},
				"iat": float64(e.clock.Now().Unix()),
				"exp": float64(e.clock.Now().Add(5 * time.Minute).Unix()),
				"jti": "j-1",
			}
			if tc.issuer != "" {
				want["iss"] = tc.issuer
			}
			assert.Equal(t, want, claims)

			// go-spiffe validates it against the published bundle.
			bundle, err := ca.ToJWTBundle(e.pub.bundle())
			require.NoError(t, err)
			parsed, err := jwtsvid.ParseAndValidate(svid.Token, bundle, aud)
			require.NoError(t, err)
			assert.Equal(t, id, parsed.ID)
			assert.Equal(t, aud, parsed.Audience)

			_, err = jwtsvid.ParseAndValidate(svid.Token, bundle, []string{"other"})
			require.Error(t, err, "wrong audience")
		})
	}
}

func TestMintJWTSVIDRejects(t *testing.T) {
	e := newReadyEnv(t, nil)
	id := wid("/web")
	for name, f := range map[string]func() error{
		"no audience":    func() error { _, err := e.ca.MintJWTSVID(id, nil, 0, nil); return err },
		"empty audience": func() error { _, err := e.ca.MintJWTSVID(id, []string{""}, 0, nil); return err },
		"negative TTL":   func() error { _, err := e.ca.MintJWTSVID(id, []string{"a"}, -1, nil); return err },
		"foreign ID": func() error {
			_, err := e.ca.MintJWTSVID(spiffeid.RequireFromString("spiffe://other.org/web"), []string{"a"}, 0, nil)
			return err
		},
		"reserved claim sub": func() error {
			_, err := e.ca.MintJWTSVID(id, []string{"a"}, 0, map[string]any{"sub": "spiffe://example.org/admin"})
			return err
		},
		"reserved claim exp": func() error {
			_, err := e.ca.MintJWTSVID(id, []string{"a"}, 0, map[string]any{"exp": 1 << 40})
			return err
		},
	} {
		t.Run(name, func(t *testing.T) { require.ErrorIs(t, f(), ca.ErrInvalidRequest) })
	}
}

func TestMintJWTSVIDCappedByKey(t *testing.T) {
	e := newReadyEnv(t, nil)
	key := e.active(t, ca.KindJWT)
	svid, err := e.ca.MintJWTSVID(wid("/web"), []string{"a"}, 1000*time.Hour, nil)
	require.NoError(t, err)
	assert.Equal(t, key.NotAfter, svid.ExpiresAt)
}
