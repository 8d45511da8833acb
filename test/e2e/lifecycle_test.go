package e2e

import (
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"math/big"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/internal/roottest"
	"github.com/ferry-id/ferry/test/testcluster"
)

// The managed-identity lifecycle end to end, with real processes: a server,
// a bridge, an agent serving the VM-style endpoint, the demo API, and the
// workload's requests made by curl running under the workload's uid, as
// Azure's own docs make them (curl ... -H Metadata:true).

const (
	lcIssuer    = "https://oidc.lifecycle.test"
	lcUID       = 4711 // the VM workload
	lcBatchUID  = 4712
	lcSpiffeID  = "spiffe://example.org/vm/web"
	lcResource  = "api://vm-app"
	lcProbe     = "api://probe"
	lcNotFound  = "Identity not found"
	lcWaitLimit = 60 * time.Second
)

type lifecycleStack struct {
	t      *testing.T
	bin    string
	srv    *testcluster.Node
	agent  *testcluster.Agent
	bridge string // host:port
	caFile string // the bridge's TLS CA
	https  *http.Client
	vm     string // the agent's VM-style listener
	demo   string // the demo API
}

// cli runs a ferry command on the server and returns its output.
func (s *lifecycleStack) cli(args ...string) string {
	s.t.Helper()
	out, err := s.srv.CLI(args...)
	require.NoError(s.t, err, "ferry %s\n%s", strings.Join(args, " "), out)
	return out
}

// cliJSON runs a ferry command with --output json and decodes its output.
func (s *lifecycleStack) cliJSON(v any, args ...string) {
	s.t.Helper()
	out := s.cli(append(args, "--output", "json")...)
	require.NoError(s.t, json.Unmarshal([]byte(out), v), out)
}

func newLifecycleStack(t *testing.T) *lifecycleStack {
	if testing.Short() {
		t.Skip("starts real server, bridge, agent and API processes")
	}
	roottest.Require(t) // runs the workload under other uids
	if _, err := exec.LookPath("curl"); err != nil {
		roottest.Skipf(t, "curl is not installed")
	}
	c := testcluster.New(t, testcluster.Options{Nodes: 1, ExtraServerConfig: fmt.Sprintf(`  ca {
    jwt_issuer = %q
  }`, lcIssuer)})
	s := &lifecycleStack{t: t, bin: c.Bin, srv: c.Nodes[0], bridge: testcluster.FreeAddr(t), vm: testcluster.FreeAddr(t), demo: testcluster.FreeAddr(t)}

	dir := t.TempDir()
	conf := filepath.Join(dir, "bridge.conf")
	require.NoError(t, os.WriteFile(conf, []byte(fmt.Sprintf(`bridge {
  listen_addr   = %q
  data_dir      = "data"
  server_socket = %q
  log_level     = "debug"
}
`, s.bridge, s.srv.Socket)), 0o600))
	startProcess(t, "bridge", dir, nil, c.Bin, "bridge", "run", "--config", conf)
	s.caFile = filepath.Join(dir, "data", "tls-ca.pem")
	require.Eventually(t, func() bool {
		pem, err := os.ReadFile(s.caFile)
		if err != nil {
			return false
		}
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(pem)
		s.https = &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
		kids, err := jwksKids(s.https, s.bridge)
		return err == nil && len(kids) > 0
	}, 30*time.Second, 100*time.Millisecond, "the bridge serves its JWKS")

	s.agent = c.StartAgentWith("vm1", fmt.Sprintf(`  imds {
    arc_addr          = ""
    vm                = true
    vm_addr           = %q
    authority         = "https://%s"
    authority_ca_file = %q
    # Longer than any test: what these tests see change, the agent learns
    # from its entry stream, never from an answer growing old.
    identity_cache_ttl = "1h"
  }`, s.vm, s.bridge, s.caFile))
	return s
}

// imdsGet asks the agent's VM-style endpoint for a token the way Azure's docs
// do, with curl running as uid, and returns the status and the JSON body.
func (s *lifecycleStack) imdsGet(uid int, resource string, selector ...string) (int, map[string]string) {
	s.t.Helper()
	q := url.Values{"api-version": {"2018-02-01"}, "resource": {resource}}
	for i := 0; i+1 < len(selector); i += 2 {
		q.Set(selector[i], selector[i+1])
	}
	cmd := exec.Command("curl", "-s", "--noproxy", "*", "-m", "30", "-H", "Metadata: true", "-w", "\n%{http_code}",
		"http://"+s.vm+"/metadata/identity/oauth2/token?"+q.Encode())
	cmd.Dir = "/"
	cmd.Env = []string{"PATH=/usr/bin:/bin"}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(uid)}}
	out, err := cmd.Output()
	require.NoError(s.t, err, "curl: %s", out)
	body, code, ok := strings.Cut(strings.TrimSpace(string(out)), "\n")
	if !ok {
		body, code = "", body
	}
	status, err := strconv.Atoi(code)
	require.NoError(s.t, err, "curl output %q", out)
	var v map[string]string
	if body != "" {
		require.NoError(s.t, json.Unmarshal([]byte(body), &v), "every IMDS value is a string: %s", body)
	}
	return status, v
}

// waitIMDS polls the endpoint until it answers want, and returns the answer
// and how long it took.
func (s *lifecycleStack) waitIMDS(want int, uid int, resource string, selector ...string) (map[string]string, time.Duration) {
	s.t.Helper()
	begin := time.Now()
	for {
		status, body := s.imdsGet(uid, resource, selector...)
		if status == want {
			return body, time.Since(begin)
		}
		if time.Since(begin) > lcWaitLimit {
			s.t.Fatalf("the endpoint still answers %d %v after %s (want %d)\n%s", status, body, lcWaitLimit, want, s.agent.LogTail(40))
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// accessClaims verifies an access token against the bridge's JWKS for the
// tenant and returns its claims.
func (s *lifecycleStack) accessClaims(tenant, token string) jwt.MapClaims {
	s.t.Helper()
	resp, err := s.https.Get("https://" + s.bridge + "/" + tenant + "/discovery/v2.0/keys")
	require.NoError(s.t, err)
	defer resp.Body.Close()
	var jwks struct {
		Keys []struct {
			Kid, Kty, Use, N, E string
		} `json:"keys"`
	}
	require.NoError(s.t, json.NewDecoder(resp.Body).Decode(&jwks))
	claims := jwt.MapClaims{}
	_, err = jwt.ParseWithClaims(token, claims, func(tok *jwt.Token) (any, error) {
		for _, k := range jwks.Keys {
			if k.Kid != tok.Header["kid"] {
				continue
			}
			n, err := base64.RawURLEncoding.DecodeString(k.N)
			if err != nil {
				return nil, err
			}
			e, err := base64.RawURLEncoding.DecodeString(k.E)
			if err != nil {
				return nil, err
			}
			return &rsa.PublicKey{N: new(big.Int).SetBytes(n), E: int(new(big.Int).SetBytes(e).Int64())}, nil
		}
		return nil, fmt.Errorf("kid %v not in the JWKS", tok.Header["kid"])
	}, jwt.WithValidMethods([]string{"RS256"}), jwt.WithIssuer("https://"+s.bridge+"/"+tenant+"/v2.0"), jwt.WithExpirationRequired())
	require.NoError(s.t, err, "the token verifies against the bridge's JWKS")
	return claims
}

// callDemo calls the demo API with a bearer token.
func (s *lifecycleStack) callDemo(token string) (int, map[string]any) {
	s.t.Helper()
	req, err := http.NewRequest(http.MethodGet, "http://"+s.demo+"/", nil)
	require.NoError(s.t, err)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(s.t, err)
	defer resp.Body.Close()
	var v map[string]any
	_ = json.NewDecoder(resp.Body).Decode(&v)
	return resp.StatusCode, v
}

type lcIdentity struct {
	ObjectID   string `json:"object_id"`
	ClientID   string `json:"client_id"`
	Name       string `json:"name"`
	TenantID   string `json:"tenant_id"`
	Kind       string `json:"kind"`
	ResourceID string `json:"resource_id"`
	OwnerEntry string `json:"owner_entry_id"`
	OwnerID    string `json:"owner_spiffe_id"`
}

type lcUsage struct {
	Identity    lcIdentity `json:"identity"`
	Credentials []struct {
		Name      string   `json:"name"`
		Issuer    string   `json:"issuer"`
		Subject   string   `json:"subject"`
		Audiences []string `json:"audiences"`
	} `json:"credentials"`
	Workloads []struct {
		Entry struct {
			ID        string `json:"id"`
			SpiffeID  string `json:"spiffe_id"`
			ParentID  string `json:"parent_id"`
			Selectors []struct {
				Type  string `json:"type"`
				Value string `json:"value"`
			} `json:"selectors"`
		} `json:"entry"`
		Credential string `json:"credential"`
		Reason     string `json:"reason"`
	} `json:"workloads"`
	RoleAssignments []struct {
		Assignment struct {
			ID string `json:"id"`
		} `json:"assignment"`
		Role         string `json:"role"`
		ResourceName string `json:"resource_name"`
	} `json:"role_assignments"`
	OwnerEntry *struct {
		ID string `json:"id"`
	} `json:"owner_entry"`
}

// TestLifecycleAzureVMFlow walks Azure's "How a system-assigned managed
// identity works with an Azure VM", one numbered step at a time, then deletes
// the VM (the entry) and checks its identity, roles and tokens go while a
// user-assigned identity stays with its roles.
func TestLifecycleAzureVMFlow(t *testing.T) {
	s := newLifecycleStack(t)

	// Before any workload: an API with an app role, a resource to probe the
	// endpoint with, and a user-assigned identity pre-authorised on the API.
	var api struct {
		AppID    string `json:"app_id"`
		TenantID string `json:"tenant_id"`
	}
	s.cliJSON(&api, "resource", "create", "--name", "vm-app", "--identifier-uri", lcResource, "--app-role", "reader")
	s.cli("resource", "create", "--name", "probe", "--identifier-uri", lcProbe)
	tenant := api.TenantID
	var uami lcIdentity
	s.cliJSON(&uami, "identity", "create", "--name", "shared-uami")
	s.cli("role", "assign", "--identity-name", "shared-uami", "--resource", lcResource, "--role", "reader")
	s.cli("identity", "federated-credential", "create", "--identity-name", "shared-uami", "--name", "vm-web",
		"--issuer", lcIssuer, "--subject", lcSpiffeID)
	startProcess(t, "demo-api", t.TempDir(), nil, s.bin, "demo-api", "--listen", s.demo, "--authority", "https://"+s.bridge,
		"--tenant", tenant, "--audience", lcResource, "--audience", api.AppID, "--role", "reader", "--ca", s.caFile)

	// 1. "Azure Resource Manager receives a request to enable the
	// system-assigned managed identity on a VM."
	s.cli("entry", "create", "--entry-id", "vm-web", "--spiffe-id", lcSpiffeID, "--parent-id", s.agent.ID,
		"--selector", fmt.Sprintf("unix:uid:%d", lcUID), "--system-assigned-identity")
	var entry struct {
		SystemAssigned bool `json:"system_assigned_identity"`
	}
	s.cliJSON(&entry, "entry", "show", "--entry-id", "vm-web")
	require.True(t, entry.SystemAssigned, "step 1: the identity is enabled on the resource")

	// 2. "Azure Resource Manager creates a service principal in Microsoft Entra
	// ID for the identity of the VM ... in the tenant that's trusted by the
	// subscription."
	var sys lcUsage
	s.cliJSON(&sys, "identity", "show", "--name", "vm-web")
	require.Equal(t, "system-assigned", sys.Identity.Kind, "step 2")
	require.Equal(t, tenant, sys.Identity.TenantID, "step 2: in the tenant")
	require.Equal(t, "vm-web", sys.Identity.Name, "step 2: named after its resource")
	require.Equal(t, "/subscriptions/"+tenant+"/resourceGroups/ferry/providers/Ferry.Identity/registrationEntries/vm-web", sys.Identity.ResourceID,
		"step 2: the resource's own ID")
	require.Equal(t, "vm-web", sys.OwnerEntry.ID)
	require.Len(t, sys.Credentials, 1, "step 2: bound to its owner by the credential the server manages")
	require.Equal(t, lcIssuer, sys.Credentials[0].Issuer)
	require.Equal(t, lcSpiffeID, sys.Credentials[0].Subject)
	require.Equal(t, []string{"api://AzureADTokenExchange"}, sys.Credentials[0].Audiences)
	require.Len(t, sys.Workloads, 1)
	require.Equal(t, "vm-web", sys.Workloads[0].Entry.ID)
	require.Equal(t, s.agent.ID, sys.Workloads[0].Entry.ParentID)
	require.Equal(t, "system-assigned", sys.Workloads[0].Credential)
	var shared lcUsage
	s.cliJSON(&shared, "identity", "show", "--name", "shared-uami")
	require.Len(t, shared.Workloads, 1, "the user-assigned identity names the workload its credential accepts")
	require.Equal(t, "vm-web", shared.Workloads[0].Entry.ID)
	require.Equal(t, "vm-web", shared.Workloads[0].Credential)
	require.Len(t, shared.RoleAssignments, 1)
	require.Equal(t, "reader", shared.RoleAssignments[0].Role)
	// Never shareable.
	out, err := s.srv.CLI("identity", "federated-credential", "create", "--identity-name", "vm-web", "--name", "share",
		"--issuer", lcIssuer, "--subject", "spiffe://example.org/other")
	require.Error(t, err)
	require.Contains(t, out, "FailedPrecondition")

	// 3. "Azure Resource Manager updates the VM identity using the Azure
	// Instance Metadata Service identity endpoint, providing the endpoint with
	// the service principal client ID and certificate." The agent offers it:
	// without a selector the caller gets its system-assigned identity, with
	// one the user-assigned one.
	body, took := s.waitIMDS(http.StatusOK, lcUID, lcProbe)
	t.Logf("step 3: the endpoint offered the new identity after %s", took)
	require.Equal(t, sys.Identity.ClientID, body["client_id"], "step 3: no selector, the system-assigned identity")
	body, _ = s.waitIMDS(http.StatusOK, lcUID, lcProbe, "msi_res_id", sys.Identity.ResourceID)
	require.Equal(t, sys.Identity.ClientID, body["client_id"])
	body, _ = s.waitIMDS(http.StatusOK, lcUID, lcProbe, "client_id", uami.ClientID)
	require.Equal(t, uami.ClientID, body["client_id"])
	status, body := s.imdsGet(lcBatchUID, lcProbe)
	require.Equal(t, http.StatusBadRequest, status, "another uid gets nothing")
	require.Equal(t, lcNotFound, body["error_description"])

	// 4. "After the VM has an identity, use the service principal information
	// to grant the VM access to Azure resources."
	s.cli("role", "assign", "--identity-object-id", sys.Identity.ObjectID, "--resource", lcResource, "--role", "reader")

	// 5. "Your code that's running on the VM can request a token from the
	// Azure Instance Metadata service endpoint."
	body, _ = s.waitIMDS(http.StatusOK, lcUID, lcResource)
	require.Equal(t, "Bearer", body["token_type"])
	require.Equal(t, sys.Identity.ClientID, body["client_id"])
	require.Equal(t, lcResource, body["resource"])
	expiresIn, err := strconv.Atoi(body["expires_in"])
	require.NoError(t, err)
	require.Greater(t, expiresIn, 300, "clients cache only tokens living over 5 minutes")

	// 6. "Microsoft Entra ID returns a JSON Web Token (JWT) access token."
	claims := s.accessClaims(tenant, body["access_token"])
	require.Equal(t, api.AppID, claims["aud"], "step 6: aud")
	require.Equal(t, sys.Identity.ObjectID, claims["oid"], "step 6: oid")
	require.Equal(t, sys.Identity.ClientID, claims["azp"], "step 6: appid (azp in v2 tokens)")
	require.Equal(t, tenant, claims["tid"], "step 6: tid")
	require.Equal(t, []any{"reader"}, claims["roles"], "step 6: roles")
	require.Equal(t, "app", claims["idtyp"])

	// 7. "Your code sends the access token on a call to a service that
	// supports Microsoft Entra authentication."
	code, who := s.callDemo(body["access_token"])
	require.Equal(t, http.StatusOK, code, "step 7: %v", who)
	require.Equal(t, sys.Identity.ObjectID, who["oid"])

	// The user-assigned identity was authorised before the workload existed.
	body, _ = s.waitIMDS(http.StatusOK, lcUID, lcResource, "client_id", uami.ClientID)
	require.Equal(t, []any{"reader"}, s.accessClaims(tenant, body["access_token"])["roles"])

	// A second VM, deleted in the same batch as the first.
	s.cli("entry", "create", "--entry-id", "vm-batch", "--spiffe-id", "spiffe://example.org/vm/batch", "--parent-id", s.agent.ID,
		"--selector", fmt.Sprintf("unix:uid:%d", lcBatchUID), "--system-assigned-identity")
	var batch lcUsage
	s.cliJSON(&batch, "identity", "show", "--name", "vm-batch")
	s.cli("role", "assign", "--identity-object-id", batch.Identity.ObjectID, "--resource", lcResource, "--role", "reader")
	s.waitIMDS(http.StatusOK, lcBatchUID, lcResource)

	// Deleting the VMs deletes their identities and role assignments, and the
	// endpoint stops issuing their tokens.
	s.cli("entry", "delete", "--entry-id", "vm-web", "--entry-id", "vm-batch")
	for _, name := range []string{"vm-web", "vm-batch"} {
		out, err := s.srv.CLI("identity", "show", "--name", name)
		require.Error(t, err, "the identity of %s is gone", name)
		require.Contains(t, out, "NotFound")
	}
	roles := s.cli("role", "list", "--resource", lcResource, "--output", "json")
	require.NotContains(t, roles, sys.Identity.ObjectID)
	require.NotContains(t, roles, batch.Identity.ObjectID)
	require.Contains(t, roles, uami.ObjectID)
	body, took = s.waitIMDS(http.StatusBadRequest, lcUID, lcResource)
	require.Equal(t, "invalid_request", body["error"])
	require.Equal(t, lcNotFound, body["error_description"])
	t.Logf("after the entry's deletion the endpoint answered %q within %s", lcNotFound, took)
	for _, sel := range [][]string{{"client_id", sys.Identity.ClientID}, {"client_id", uami.ClientID}} {
		status, body := s.imdsGet(lcUID, lcResource, sel...)
		require.Equal(t, http.StatusBadRequest, status, "%v", sel)
		require.Equal(t, lcNotFound, body["error_description"])
	}
	status, body = s.imdsGet(lcBatchUID, lcResource)
	require.Equal(t, http.StatusBadRequest, status)
	require.Equal(t, lcNotFound, body["error_description"])

	// The user-assigned identity outlives every workload that used it, with
	// its credentials and roles, and serves the next workload at once.
	var after lcUsage
	s.cliJSON(&after, "identity", "show", "--name", "shared-uami")
	require.Empty(t, after.Workloads)
	require.Len(t, after.Credentials, 1)
	require.Len(t, after.RoleAssignments, 1)
	require.Equal(t, shared.RoleAssignments[0].Assignment.ID, after.RoleAssignments[0].Assignment.ID, "the same assignment")
	s.cli("entry", "create", "--entry-id", "vm-web-2", "--spiffe-id", lcSpiffeID, "--parent-id", s.agent.ID,
		"--selector", fmt.Sprintf("unix:uid:%d", lcUID))
	body, _ = s.waitIMDS(http.StatusOK, lcUID, lcResource, "client_id", uami.ClientID)
	claims = s.accessClaims(tenant, body["access_token"])
	require.Equal(t, uami.ObjectID, claims["oid"])
	require.Equal(t, []any{"reader"}, claims["roles"])
	code, who = s.callDemo(body["access_token"])
	require.Equal(t, http.StatusOK, code, "%v", who)
	// A new entry with the same SPIFFE ID does not bring the deleted identity
	// back, once the agent's cached directory answer for that SPIFFE ID has
	// expired (agent/identities: TTL 30 s).
	body, took = s.waitIMDS(http.StatusBadRequest, lcUID, lcResource, "client_id", sys.Identity.ClientID)
	require.Equal(t, lcNotFound, body["error_description"])
	t.Logf("with a new entry of the same SPIFFE ID, the deleted identity was refused after %s", took)
}

// TestLifecycleDisableAndEvict: disabling an entry's identity (the entry
// stays) stops its tokens as soon as the agent sees the entry change, and
// an agent's own system-assigned identity goes when the agent is evicted.
func TestLifecycleDisableAndEvict(t *testing.T) {
	s := newLifecycleStack(t)
	s.cli("resource", "create", "--name", "vm-app", "--identifier-uri", lcResource, "--app-role", "reader")
	s.cli("entry", "create", "--entry-id", "vm-web", "--spiffe-id", lcSpiffeID, "--parent-id", s.agent.ID,
		"--selector", fmt.Sprintf("unix:uid:%d", lcUID), "--system-assigned-identity")
	var sys lcUsage
	s.cliJSON(&sys, "identity", "show", "--name", "vm-web")
	s.cli("role", "assign", "--identity-object-id", sys.Identity.ObjectID, "--resource", lcResource, "--role", "reader")
	body, _ := s.waitIMDS(http.StatusOK, lcUID, lcResource)
	require.Equal(t, sys.Identity.ClientID, body["client_id"])

	// An update that does not mention the identity keeps it.
	s.cli("entry", "update", "--entry-id", "vm-web", "--spiffe-id", lcSpiffeID, "--parent-id", s.agent.ID,
		"--selector", fmt.Sprintf("unix:uid:%d", lcUID), "--jwt-ttl", "10m")
	var again lcUsage
	s.cliJSON(&again, "identity", "show", "--name", "vm-web")
	require.Equal(t, sys.Identity.ObjectID, again.Identity.ObjectID)
	require.Len(t, again.RoleAssignments, 1)

	s.cli("entry", "update", "--entry-id", "vm-web", "--spiffe-id", lcSpiffeID, "--parent-id", s.agent.ID,
		"--selector", fmt.Sprintf("unix:uid:%d", lcUID), "--system-assigned-identity=false")
	out, err := s.srv.CLI("identity", "show", "--name", "vm-web")
	require.Error(t, err)
	require.Contains(t, out, "NotFound")
	body, took := s.waitIMDS(http.StatusBadRequest, lcUID, lcResource, "client_id", sys.Identity.ClientID)
	require.Equal(t, lcNotFound, body["error_description"])
	t.Logf("after disabling, the endpoint answered %q within %s", lcNotFound, took)
	status, body := s.imdsGet(lcUID, lcResource)
	require.Equal(t, http.StatusBadRequest, status, "the entry stays, with no identity")
	require.Equal(t, lcNotFound, body["error_description"])

	// The agent's own system-assigned identity.
	var set struct {
		Agent struct {
			SystemAssigned bool `json:"system_assigned_identity"`
		} `json:"agent"`
		Identity lcIdentity `json:"identity"`
	}
	out = s.cli("agent", "identity", "enable", "--output", "json", s.agent.ID)
	require.NoError(t, json.Unmarshal([]byte(out), &set), out)
	require.True(t, set.Agent.SystemAssigned)
	require.Equal(t, s.agent.ID, set.Identity.OwnerID)
	s.cli("role", "assign", "--identity-object-id", set.Identity.ObjectID, "--resource", lcResource, "--role", "reader")
	var node lcUsage
	s.cliJSON(&node, "identity", "show", "--object-id", set.Identity.ObjectID)
	require.Equal(t, "system-assigned", node.Identity.Kind)
	require.Len(t, node.RoleAssignments, 1)
	s.cli("agent", "evict", "--spiffe-id", s.agent.ID)
	out, err = s.srv.CLI("identity", "show", "--object-id", set.Identity.ObjectID)
	require.Error(t, err, "evicting the agent deletes its identity")
	require.Contains(t, out, "NotFound")
	require.NotContains(t, s.cli("role", "list", "--resource", lcResource, "--output", "json"), set.Identity.ObjectID)
}

// TestLifecycleAgentIdentity: the agent's own system-assigned identity (`ferry
// agent identity enable`) is usable by every process on its node, as a VM's
// is by every process on an Azure VM, while a workload with an identity of its
// own keeps getting its own when it names none; disabling it ends it at once.
func TestLifecycleAgentIdentity(t *testing.T) {
	s := newLifecycleStack(t)
	var api struct {
		AppID    string `json:"app_id"`
		TenantID string `json:"tenant_id"`
	}
	s.cliJSON(&api, "resource", "create", "--name", "vm-app", "--identifier-uri", lcResource, "--app-role", "reader")
	tenant := api.TenantID
	status, body := s.imdsGet(lcBatchUID, lcResource)
	require.Equal(t, http.StatusBadRequest, status, "no entry and no agent identity: %v", body)
	require.Equal(t, lcNotFound, body["error_description"])

	var set struct {
		Identity lcIdentity `json:"identity"`
	}
	s.cliJSON(&set, "agent", "identity", "enable", "--spiffe-id", s.agent.ID)
	node := set.Identity
	require.Equal(t, "system-assigned", node.Kind)
	s.cli("role", "assign", "--identity-object-id", node.ObjectID, "--resource", lcResource, "--role", "reader")

	// A process with no entry at all gets the agent's identity, and the
	// token is the identity's, signed by the bridge.
	body, took := s.waitIMDS(http.StatusOK, lcBatchUID, lcResource)
	t.Logf("after enabling, the agent's identity was served within %s", took)
	require.Equal(t, node.ClientID, body["client_id"])
	claims := s.accessClaims(tenant, body["access_token"])
	require.Equal(t, api.AppID, claims["aud"])
	require.Equal(t, node.ObjectID, claims["oid"])
	require.Equal(t, node.ClientID, claims["azp"])
	require.Equal(t, tenant, claims["tid"])
	require.Equal(t, []any{"reader"}, claims["roles"])
	status, body = s.imdsGet(lcBatchUID, lcResource, "client_id", node.ClientID)
	require.Equal(t, http.StatusOK, status, "named by client_id: %v", body)
	status, body = s.imdsGet(lcBatchUID, lcResource, "object_id", node.ObjectID)
	require.Equal(t, http.StatusOK, status, "named by object_id: %v", body)

	// A workload with a system-assigned identity of its own gets that one
	// when it names none, and the agent's when it names it.
	s.cli("entry", "create", "--entry-id", "vm-web", "--spiffe-id", lcSpiffeID, "--parent-id", s.agent.ID,
		"--selector", fmt.Sprintf("unix:uid:%d", lcUID), "--system-assigned-identity")
	var own lcUsage
	s.cliJSON(&own, "identity", "show", "--name", "vm-web")
	s.cli("role", "assign", "--identity-object-id", own.Identity.ObjectID, "--resource", lcResource, "--role", "reader")
	body, _ = s.waitIMDS(http.StatusOK, lcUID, lcResource, "client_id", own.Identity.ClientID)
	require.Equal(t, own.Identity.ObjectID, s.accessClaims(tenant, body["access_token"])["oid"])
	status, body = s.imdsGet(lcUID, lcResource)
	require.Equal(t, http.StatusOK, status, "%v", body)
	require.Equal(t, own.Identity.ClientID, body["client_id"], "a workload's own identity comes first")
	status, body = s.imdsGet(lcUID, lcResource, "client_id", node.ClientID)
	require.Equal(t, http.StatusOK, status, "%v", body)
	require.Equal(t, node.ObjectID, s.accessClaims(tenant, body["access_token"])["oid"])

	// Disabled: every process is refused it at once, even with its token
	// cached (the agent reuses answers for an hour here: only its entry
	// stream can end them); the workload keeps its own.
	s.cli("agent", "identity", "disable", s.agent.ID)
	body, took = s.waitIMDS(http.StatusBadRequest, lcBatchUID, lcResource)
	require.Equal(t, lcNotFound, body["error_description"])
	t.Logf("after disabling, the endpoint answered %q within %s", lcNotFound, took)
	status, body = s.imdsGet(lcUID, lcResource, "client_id", node.ClientID)
	require.Equal(t, http.StatusBadRequest, status, "%v", body)
	status, body = s.imdsGet(lcUID, lcResource)
	require.Equal(t, http.StatusOK, status, "%v", body)
	require.Equal(t, own.Identity.ClientID, body["client_id"])
}
