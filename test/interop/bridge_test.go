package interop

import (
	"context"

	"crypto/x509"
	"encoding/json"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/cloud"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/azidentity"
	"github.com/AzureAD/microsoft-authentication-library-for-go/apps/confidential"
	"github.com/golang-jwt/jwt/v5"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"github.com/stretchr/testify/require"
)

// federation is the directory set up once for the bridge tests: a workload
// SPIFFE ID, a user-assigned identity federated to it, and a resource with an
// app role assigned to the identity.
type federation struct {
	spiffeID, clientID, objectID, tenantID string
	resourceURI, resourceAppID             string
}

var (
	fedOnce sync.Once
	fed     federation
)

func setupFederation(t *testing.T) federation {
	t.Helper()
	fedOnce.Do(func() {
		id := entryFor(t, "azure")
		fed.spiffeID = id.String()
		fed.tenantID = dev.env["AZURE_TENANT_ID"]
		out := dev.ferry(t, "identity", "create", "--name", "interop-app", "--output", "json")
		var ident struct {
			ObjectID string `json:"object_id"`
			ClientID string `json:"client_id"`
		}
		require.NoError(t, json.Unmarshal([]byte(out), &ident))
		fed.clientID, fed.objectID = ident.ClientID, ident.ObjectID
		dev.ferry(t, "identity", "federated-credential", "create", "--identity-name", "interop-app", "--name", "spiffe-azure",
			"--issuer", dev.env["FERRY_JWT_ISSUER"], "--subject", fed.spiffeID)
		fed.resourceURI = "api://interop-demo"
		out = dev.ferry(t, "resource", "create", "--name", "interop-demo", "--identifier-uri", fed.resourceURI, "--app-role", "reader", "--output", "json")
		var res struct {
			AppID string `json:"app_id"`
		}
		require.NoError(t, json.Unmarshal([]byte(out), &res))
		fed.resourceAppID = res.AppID
		dev.ferry(t, "role", "assign", "--identity-name", "interop-app", "--resource", fed.resourceURI, "--role", "reader")
	})
	require.NotEmpty(t, fed.clientID, "federation setup failed earlier")
	return fed
}

func clientOptions() azcore.ClientOptions {
	return azcore.ClientOptions{Cloud: cloud.Configuration{ActiveDirectoryAuthorityHost: dev.env["AZURE_AUTHORITY_HOST"]}}
}

// jwtSVID fetches a JWT-SVID for the token exchange audience.
func jwtSVID(ctx context.Context, spiffeID string) (string, error) {
	client, err := workloadapi.New(ctx, addr())
	if err != nil {
		return "", err
	}
	defer client.Close()
	svids, err := client.FetchJWTSVIDs(ctx, jwtsvid.Params{Audience: "api://AzureADTokenExchange"})
	if err != nil {
		return "", err
	}
	for _, s := range svids {
		if s.ID.String() == spiffeID {
			return s.Marshal(), nil
		}
	}
	return "", os.ErrNotExist
}

// checkAccessToken validates an access token the way a resource server does:
// keys from the bridge's OIDC metadata, then issuer, audience and claims.
func checkAccessToken(t *testing.T, f federation, token string) {
	t.Helper()
	httpc := &http.Client{Timeout: 10 * time.Second}
	var meta struct {
		Issuer  string `json:"issuer"`
		JWKSURI string `json:"jwks_uri"`
	}
	getJSON(t, httpc, dev.env["AZURE_AUTHORITY_HOST"]+"/"+f.tenantID+"/v2.0/.well-known/openid-configuration", &meta)
	var jwks struct {
		Keys []struct {
			Kid string   `json:"kid"`
			X5c []string `json:"x5c"`
		} `json:"keys"`
	}
	getJSON(t, httpc, meta.JWKSURI, &jwks)
	claims := jwt.MapClaims{}
	parsed, err := jwt.ParseWithClaims(token, claims, func(tok *jwt.Token) (any, error) {
		kid, _ := tok.Header["kid"].(string)
		for _, k := range jwks.Keys {
			if k.Kid == kid && len(k.X5c) > 0 {
				der, err := decodeStd(k.X5c[0])
				if err != nil {
					return nil, err
				}
				cert, err := x509.ParseCertificate(der)
				if err != nil {
					return nil, err
				}
				return cert.PublicKey, nil
			}
		}
		return nil, jwt.ErrTokenUnverifiable
	}, jwt.WithValidMethods([]string{"RS256"}), jwt.WithIssuer(meta.Issuer), jwt.WithExpirationRequired())
	require.NoError(t, err)
	require.True(t, parsed.Valid)
	aud, _ := claims.GetAudience()
	require.Contains(t, []string{f.resourceAppID, f.resourceURI}, aud[0])
	require.Equal(t, f.tenantID, claims["tid"])
	require.Equal(t, f.objectID, claims["oid"])
	require.Equal(t, f.clientID, claims["azp"])
	require.Contains(t, claims["roles"], "reader")
}

func getJSON(t *testing.T, c *http.Client, url string, v any) {
	t.Helper()
	resp, err := c.Get(url)
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode, url)
	require.NoError(t, json.NewDecoder(resp.Body).Decode(v))
}

func TestClientAssertionCredential(t *testing.T) {
	f := setupFederation(t)
	cred, err := azidentity.NewClientAssertionCredential(f.tenantID, f.clientID,
		func(ctx context.Context) (string, error) { return jwtSVID(ctx, f.spiffeID) },
		&azidentity.ClientAssertionCredentialOptions{ClientOptions: clientOptions(), DisableInstanceDiscovery: true})
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	tok, err := cred.GetToken(ctx, policy.TokenRequestOptions{Scopes: []string{f.resourceURI + "/.default"}})
	require.NoError(t, err)
	require.True(t, tok.ExpiresOn.After(time.Now().Add(50*time.Minute)))
	checkAccessToken(t, f, tok.Token)
}

func TestWorkloadIdentityCredential(t *testing.T) {
	f := setupFederation(t)
	// `ferry api fetch jwt --write FILE --watch` keeps the federated token
	// file fresh, as Kubernetes does for pods.
	tokenFile := filepath.Join(t.TempDir(), "token")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cmd := exec.CommandContext(ctx, dev.bin, "api", "fetch", "jwt", "--audience", "api://AzureADTokenExchange",
		"--spiffe-id", f.spiffeID, "--write", tokenFile, "--watch", "--socket", dev.env["SPIFFE_ENDPOINT_SOCKET"])
	require.NoError(t, cmd.Start())
	defer func() { cancel(); _ = cmd.Wait() }()
	require.Eventually(t, func() bool { fi, err := os.Stat(tokenFile); return err == nil && fi.Size() > 0 }, 10*time.Second, 20*time.Millisecond)
	fi, err := os.Stat(tokenFile)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), fi.Mode().Perm())

	cred, err := azidentity.NewWorkloadIdentityCredential(&azidentity.WorkloadIdentityCredentialOptions{
		ClientOptions: clientOptions(), ClientID: f.clientID, TenantID: f.tenantID, TokenFilePath: tokenFile,
		DisableInstanceDiscovery: true,
	})
	require.NoError(t, err)
	gctx, gcancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer gcancel()
	tok, err := cred.GetToken(gctx, policy.TokenRequestOptions{Scopes: []string{f.resourceURI + "/.default"}})
	require.NoError(t, err)
	checkAccessToken(t, f, tok.Token)
}

func TestMSALConfidentialClient(t *testing.T) {
	f := setupFederation(t)
	cred := confidential.NewCredFromAssertionCallback(func(ctx context.Context, _ confidential.AssertionRequestOptions) (string, error) {
		return jwtSVID(ctx, f.spiffeID)
	})
	client, err := confidential.New(dev.env["AZURE_AUTHORITY_HOST"]+"/"+f.tenantID, f.clientID, cred, confidential.WithInstanceDiscovery(false))
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	res, err := client.AcquireTokenByCredential(ctx, []string{f.resourceURI + "/.default"})
	require.NoError(t, err)
	checkAccessToken(t, f, res.AccessToken)
	// A second call is served from MSAL's own token cache.
	again, err := client.AcquireTokenByCredential(ctx, []string{f.resourceURI + "/.default"})
	require.NoError(t, err)
	require.Equal(t, res.AccessToken, again.AccessToken)
}

// TestBridgeRefusesAnotherSubject shows a FIC rule holding: a JWT-SVID of a
// SPIFFE ID the identity is not federated to gets AADSTS700213.
func TestBridgeRefusesAnotherSubject(t *testing.T) {
	f := setupFederation(t)
	other := entryFor(t, "not-federated")
	cred, err := azidentity.NewClientAssertionCredential(f.tenantID, f.clientID,
		func(ctx context.Context) (string, error) { return jwtSVID(ctx, other.String()) },
		&azidentity.ClientAssertionCredentialOptions{ClientOptions: clientOptions(), DisableInstanceDiscovery: true})
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err = cred.GetToken(ctx, policy.TokenRequestOptions{Scopes: []string{f.resourceURI + "/.default"}})
	require.Error(t, err)
	require.True(t, strings.Contains(err.Error(), "AADSTS700213"), err.Error())
}
