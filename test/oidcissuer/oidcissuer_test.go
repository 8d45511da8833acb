package oidcissuer_test

import (
	"context"
	"crypto/rsa"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/golang-jwt/jwt/v5"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/bridge/discovery"
	"github.com/ferry-id/ferry/test/oidcissuer"
)

// The issuer is read the way the bridge reads external issuers
// (bridge/discovery), and its tokens verify with the keys found there.
func TestDiscoveryAndTokens(t *testing.T) {
	for _, path := range []string{"", "/0f1e2d3c-aks-issuer/"} {
		t.Run("path "+path, func(t *testing.T) {
			iss, err := oidcissuer.Start(oidcissuer.Config{Path: path})
			require.NoError(t, err)
			defer iss.Close()
			require.True(t, strings.HasSuffix(iss.URL(), path))
			keys := discovery.New(discovery.Config{HTTPClient: iss.Client()})

			for _, tc := range []struct {
				tok oidcissuer.Token
				sub string
			}{
				{oidcissuer.GitHubActions("contoso/app", "refs/heads/main"), "repo:contoso/app:ref:refs/heads/main"},
				{oidcissuer.KubernetesServiceAccount("payments", "api"), "system:serviceaccount:payments:api"},
				{oidcissuer.Google("113456789012345678901", "svc@proj.iam.gserviceaccount.com"), "113456789012345678901"},
				{oidcissuer.AWS("123456789012", "app"), "arn:aws:iam::123456789012:role/app"},
			} {
				raw, err := iss.Mint(tc.tok)
				require.NoError(t, err)
				var c jwt.MapClaims
				tok, err := jwt.ParseWithClaims(raw, &c, func(tok *jwt.Token) (any, error) {
					k, err := keys.Key(context.Background(), iss.URL(), tok.Header["kid"].(string))
					if err != nil {
						return nil, err
					}
					return k.Public.(*rsa.PublicKey), nil
				}, jwt.WithValidMethods([]string{"RS256"}), jwt.WithIssuer(iss.URL()), jwt.WithAudience(oidcissuer.Exchange))
				require.NoError(t, err)
				require.True(t, tok.Valid)
				require.Equal(t, tc.sub, c["sub"])
				require.Equal(t, oidcissuer.Exchange, c["aud"], "a single string, as the providers send it")
			}
			require.Equal(t, "contoso/app/.github/workflows/ci.yml@refs/heads/main",
				oidcissuer.GitHubActions("contoso/app", "refs/heads/main").Claims["job_workflow_ref"])

			// Rotation publishes the new key beside the old one.
			old := iss.KID()
			kid, err := iss.Rotate()
			require.NoError(t, err)
			require.NotEqual(t, old, kid)
			require.Equal(t, kid, iss.KID())
			fresh := discovery.New(discovery.Config{HTTPClient: iss.Client()})
			for _, k := range []string{old, kid} {
				_, err := fresh.Key(context.Background(), iss.URL(), k)
				require.NoError(t, err, k)
			}
			// A kid it never had is unknown.
			_, err = fresh.Key(context.Background(), iss.URL(), "nope")
			require.ErrorIs(t, err, discovery.ErrUnknownKey)
		})
	}
}

func TestMintEndpoint(t *testing.T) {
	iss, err := oidcissuer.Start(oidcissuer.Config{Mint: true})
	require.NoError(t, err)
	defer iss.Close()
	resp, err := iss.Client().Get(iss.MintURL("system:serviceaccount:ns:sa", "api://custom") + "&claim=team=blue&lifetime=1m")
	require.NoError(t, err)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode, string(body))
	c := jwt.MapClaims{}
	_, _, err = jwt.NewParser().ParseUnverified(strings.TrimSpace(string(body)), c)
	require.NoError(t, err)
	require.Equal(t, "system:serviceaccount:ns:sa", c["sub"])
	require.Equal(t, "api://custom", c["aud"])
	require.Equal(t, "blue", c["team"])
	require.Equal(t, iss.URL(), c["iss"])

	resp, err = iss.Client().Get(strings.Replace(iss.MintURL("x", ""), "sub=x", "", 1))
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusBadRequest, resp.StatusCode)

	// Without Mint the endpoint does not exist.
	plain, err := oidcissuer.Start(oidcissuer.Config{})
	require.NoError(t, err)
	defer plain.Close()
	resp, err = plain.Client().Get(plain.MintURL("x", ""))
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusNotFound, resp.StatusCode)
}
