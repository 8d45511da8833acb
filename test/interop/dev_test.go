package interop

import (
	"encoding/json"
	"net/url"
	"os"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestDevEndpointsSDKs points unmodified azidentity and MSAL clients at the
// managed-identity endpoints `make run` (ferry dev) serves, as root: the Arc
// endpoint through IDENTITY_ENDPOINT and IMDS_ENDPOINT only (its challenge
// files are in /var/opt/azcmagent/tokens, the one directory the SDKs accept),
// and the VM-style endpoint at the address ferry dev's env file gives. Every
// token is checked at the bridge's JWKS.
func TestDevEndpointsSDKs(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("ferry dev serves the Arc endpoint to SDKs only as root")
	}
	const gid = 4646 // only this test's entry selects it
	td := dev.env["FERRY_TRUST_DOMAIN"]
	spiffeID := "spiffe://" + td + "/interop/dev-mi"
	dev.ferry(t, "entry", "create", "--spiffe-id", spiffeID, "--parent-id", dev.env["FERRY_AGENT_ID"],
		"--selector", "unix:uid:0", "--selector", "unix:gid:4646")
	const resource = "api://interop-dev-mi"
	out := dev.ferry(t, "resource", "create", "--name", "interop-dev-mi", "--identifier-uri", resource, "--app-role", "reader", "--output", "json")
	var res struct {
		AppID string `json:"app_id"`
	}
	require.NoError(t, json.Unmarshal([]byte(out), &res))
	ident := federatedIdentity(t, "dev-mi", spiffeID, resource)
	f := federation{clientID: ident.clientID, objectID: ident.objectID, tenantID: dev.env["AZURE_TENANT_ID"], resourceURI: resource, resourceAppID: res.AppID}

	vm, err := url.Parse(dev.env["AZURE_POD_IDENTITY_AUTHORITY_HOST"])
	require.NoError(t, err)
	ep := endpoints{pid: dev.pid, arc: dev.env["IMDS_ENDPOINT"], vm: vm.Host}
	require.Equal(t, ep.arc+"/metadata/identity/oauth2/token", dev.env["IDENTITY_ENDPOINT"])
	for _, mode := range []string{"arc", "vm"} {
		for _, lib := range []string{"azidentity", "msal"} {
			t.Run(mode+"/"+lib, func(t *testing.T) {
				tok, err := ep.client(t, mode, lib, "client_id", ident.clientID, resource, 0, gid)
				require.NoError(t, err)
				checkAccessToken(t, f, tok)
			})
		}
	}
}

// federatedIdentity creates identity name, federated to the JWT-SVIDs of
// spiffeID, holding the reader role of resource.
func federatedIdentity(t *testing.T, name, spiffeID, resource string) imdsIdentity {
	t.Helper()
	out := dev.ferry(t, "identity", "create", "--name", name, "--output", "json")
	var v struct {
		ObjectID string `json:"object_id"`
		ClientID string `json:"client_id"`
	}
	require.NoError(t, json.Unmarshal([]byte(out), &v))
	dev.ferry(t, "identity", "federated-credential", "create", "--identity-name", name, "--name", "spiffe",
		"--issuer", dev.env["FERRY_JWT_ISSUER"], "--subject", spiffeID)
	dev.ferry(t, "role", "assign", "--identity-name", name, "--resource", resource, "--role", "reader")
	return imdsIdentity{name: name, clientID: v.ClientID, objectID: v.ObjectID}
}
