package interop

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/azidentity"
	"github.com/AzureAD/microsoft-authentication-library-for-go/apps/managedidentity"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/test/freeport"
)

// The managed-identity endpoint is tested against an agent process of its
// own, started in a private mount namespace: Arc clients accept challenge
// files only under /var/opt/azcmagent/tokens, so the namespace gets a tmpfs
// on /var/opt and the host stays untouched. Clients run as children entered
// into that namespace (nsenter), as the Arc clients on a real host would.
//
// Entries of that agent (all uid 0; the gid tells them apart):
//   - /interop/imds-multi (gid 0): federated to identities imds-a and imds-b,
//     so a request must name one;
//   - /interop/imds-single (gid 4242): federated to imds-c only;
//   - /interop/imds-sys (gid 4545): owner of the system-assigned identity
//     imds-sys (created with its entry), and federated to the user-assigned imds-d. imds-sys is
//     also federated to /interop/imds-multi, which must still not get it:
//     a system-assigned identity serves its owner only.
//
// Nothing selects uid 65534.

const (
	singleGID = 4242
	sysGID    = 4545
	curlUID   = 4343
	nobody    = 65534
	imdsRes   = "api://imds-demo"
)

type imdsIdentity struct{ name, clientID, objectID, resourceID string }

type imdsAgent struct {
	id       string // the agent's SPIFFE ID
	pid      int
	arc      string // http://127.0.0.1:port
	vm       string // 127.0.0.1:port
	tenantID string
	appID    string
	ids      map[string]imdsIdentity // by name
	coldURIs []string
}

var (
	imdsOnce sync.Once
	imdsAg   *imdsAgent
	imdsErr  error
)

// startIMDSAgent sets up the directory and the agent once per test binary.
func startIMDSAgent(tb testing.TB) *imdsAgent {
	tb.Helper()
	// Root: a private mount namespace for /var/opt/azcmagent/tokens, and
	// children under other uids.
	requireRoot(tb)
	for _, tool := range []string{"unshare", "nsenter", "mount"} {
		if _, err := exec.LookPath(tool); err != nil {
			skipSecurity(tb, "%s is not installed", tool)
		}
	}
	imdsOnce.Do(func() { imdsAg, imdsErr = setupIMDSAgent(tb) })
	if imdsErr != nil {
		tb.Fatalf("managed-identity agent: %v", imdsErr)
	}
	return imdsAg
}

func ferryOut(args ...string) (string, error) {
	cmd := exec.Command(dev.bin, args...)
	cmd.Env = os.Environ()
	for k, v := range dev.env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("ferry %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

func setupIMDSAgent(tb testing.TB) (*imdsAgent, error) {
	td := dev.env["FERRY_TRUST_DOMAIN"]
	agentID := "spiffe://" + td + "/spire/agent/interop-imds"
	ag := &imdsAgent{id: agentID, tenantID: dev.env["AZURE_TENANT_ID"], ids: map[string]imdsIdentity{}}
	multi, single, sys := "spiffe://"+td+"/interop/imds-multi", "spiffe://"+td+"/interop/imds-single", "spiffe://"+td+"/interop/imds-sys"
	for _, id := range []struct {
		name     string
		create   []string
		subjects []string
	}{
		{"imds-a", nil, []string{multi}},
		{"imds-b", nil, []string{multi}},
		{"imds-c", nil, []string{single}},
		{"imds-d", nil, []string{sys}},
	} {
		out, err := ferryOut(append([]string{"identity", "create", "--name", id.name, "--output", "json"}, id.create...)...)
		if err != nil {
			return nil, err
		}
		var v struct {
			ObjectID   string `json:"object_id"`
			ClientID   string `json:"client_id"`
			ResourceID string `json:"resource_id"`
		}
		if err := json.Unmarshal([]byte(out), &v); err != nil {
			return nil, err
		}
		ag.ids[id.name] = imdsIdentity{name: id.name, clientID: v.ClientID, objectID: v.ObjectID, resourceID: v.ResourceID}
		for i, subject := range id.subjects {
			if _, err := ferryOut("identity", "federated-credential", "create", "--identity-name", id.name, "--name", fmt.Sprintf("spiffe-imds-%d", i),
				"--issuer", dev.env["FERRY_JWT_ISSUER"], "--subject", subject); err != nil {
				return nil, err
			}
		}
	}
	out, err := ferryOut("resource", "create", "--name", "imds-demo", "--identifier-uri", imdsRes, "--app-role", "reader", "--output", "json")
	if err != nil {
		return nil, err
	}
	var res struct {
		AppID string `json:"app_id"`
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		return nil, err
	}
	ag.appID = res.AppID
	for name := range ag.ids {
		if _, err := ferryOut("role", "assign", "--identity-name", name, "--resource", imdsRes, "--role", "reader"); err != nil {
			return nil, err
		}
	}
	// A resource with many identifier URIs: each is a token the agent has not
	// cached yet, for the cold-path benchmark.
	cold := []string{"resource", "create", "--name", "imds-cold"}
	for i := range 50 {
		u := fmt.Sprintf("api://imds-cold/%d", i)
		ag.coldURIs = append(ag.coldURIs, u)
		cold = append(cold, "--identifier-uri", u)
	}
	if _, err := ferryOut(cold...); err != nil {
		return nil, err
	}
	for _, e := range []struct{ name, gid string }{{"imds-multi", "0"}, {"imds-single", strconv.Itoa(singleGID)}, {"imds-sys", strconv.Itoa(sysGID)}} {
		args := []string{"entry", "create", "--spiffe-id", "spiffe://" + td + "/interop/" + e.name, "--parent-id", agentID,
			"--selector", "unix:uid:0", "--selector", "unix:gid:" + e.gid}
		if e.name == "imds-sys" {
			// Its system-assigned identity is created with the entry, named
			// after it, and bound to its SPIFFE ID by the server.
			args = append(args, "--entry-id", "imds-sys", "--system-assigned-identity")
		}
		if _, err := ferryOut(args...); err != nil {
			return nil, err
		}
	}
	out, err = ferryOut("identity", "show", "--name", "imds-sys", "--output", "json")
	if err != nil {
		return nil, err
	}
	var shown struct {
		Identity struct {
			ObjectID   string `json:"object_id"`
			ClientID   string `json:"client_id"`
			ResourceID string `json:"resource_id"`
		} `json:"identity"`
	}
	if err := json.Unmarshal([]byte(out), &shown); err != nil {
		return nil, err
	}
	ag.ids["imds-sys"] = imdsIdentity{name: "imds-sys", clientID: shown.Identity.ClientID, objectID: shown.Identity.ObjectID, resourceID: shown.Identity.ResourceID}
	if _, err := ferryOut("role", "assign", "--identity-name", "imds-sys", "--resource", imdsRes, "--role", "reader"); err != nil {
		return nil, err
	}

	// The agent: its own data dir and Workload API socket, Arc and VM
	// listeners on free loopback ports, the dev bridge as token authority.
	dir := filepath.Join(filepath.Dir(dev.bin), "imds-agent")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	bundle, err := ferryOut("bundle", "show")
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, "bundle.pem"), []byte(bundle), 0o600); err != nil {
		return nil, err
	}
	var ports struct {
		Agent int `json:"agent"`
	}
	data, err := os.ReadFile(filepath.Join(dev.dir, "ports.json"))
	if err != nil {
		return nil, err
	}
	if err := json.Unmarshal(data, &ports); err != nil {
		return nil, err
	}
	arcPort, vmPort := freePort(tb), freePort(tb)
	ag.arc = fmt.Sprintf("http://127.0.0.1:%d", arcPort)
	ag.vm = fmt.Sprintf("127.0.0.1:%d", vmPort)
	conf := fmt.Sprintf(`agent {
  trust_domain = %q
  server_addresses = ["127.0.0.1:%d"]
  trust_bundle_file = "bundle.pem"
  data_dir = "data"
  socket_path = "api.sock"
  log_level = "debug"
  imds {
    authority = %q
    authority_ca_file = %q
    arc_addr = "127.0.0.1:%d"
    vm = true
    vm_addr = "127.0.0.1:%d"
  }
}
`, td, ports.Agent, dev.env["AZURE_AUTHORITY_HOST"], dev.env["FERRY_BRIDGE_CA"], arcPort, vmPort)
	if err := os.WriteFile(filepath.Join(dir, "agent.conf"), []byte(conf), 0o600); err != nil {
		return nil, err
	}
	out, err = ferryOut("token", "generate", "--spiffe-id", agentID, "--output", "json")
	if err != nil {
		return nil, err
	}
	var tok struct {
		Token string `json:"token"`
	}
	if err := json.Unmarshal([]byte(out), &tok); err != nil {
		return nil, err
	}
	logf, err := os.Create(filepath.Join(dir, "agent.log"))
	if err != nil {
		return nil, err
	}
	// Private mounts; a tmpfs over /var/opt gives /var/opt/azcmagent/tokens.
	cmd := exec.Command("unshare", "--mount", "--propagation", "private", "sh", "-c",
		`mount -t tmpfs -o mode=0755 ferry-imds /var/opt && exec "$0" agent run --config "$1"`,
		dev.bin, filepath.Join(dir, "agent.conf"))
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "FERRY_JOIN_TOKEN="+tok.Token)
	cmd.Stdout, cmd.Stderr = logf, logf
	// The agent ends with this test binary.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	ag.pid = cmd.Process.Pid
	go func() { _ = cmd.Wait(); logf.Close() }()
	deadline := time.Now().Add(30 * time.Second)
	c := &http.Client{Timeout: 10 * time.Second}
	for {
		// The listeners accept before the agent has attested and synced its
		// entries; a token shows it is serving.
		err := ag.vmGet(c, imdsRes)
		if err == nil {
			return ag, nil
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(filepath.Join(dir, "agent.log"))
			return nil, fmt.Errorf("agent not serving after 30s: %v\n%s", err, log)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// freePort is a loopback TCP port reserved for this test binary.
func freePort(tb testing.TB) int {
	tb.Helper()
	return freeport.Port(tb)
}

// clientResult is what a client child prints.
type clientResult struct {
	Token string `json:"token"`
	Err   string `json:"err"`
}

// client runs an unmodified Azure client in a child process inside the
// agent's mount namespace, as uid 0 (or nobody when gid is nobody) with the
// given gid. mode is "arc" or "vm"; lib "azidentity" or "msal".
func (ag *imdsAgent) client(tb testing.TB, mode, lib, clientID string, gid int) (string, error) {
	tb.Helper()
	return ag.clientBy(tb, mode, lib, "client_id", clientID, gid)
}

// clientBy is client with the user-assigned identity named by kind
// ("client_id", "object_id" or "resource_id"); an empty id asks for the
// system-assigned identity.
func (ag *imdsAgent) clientBy(tb testing.TB, mode, lib, kind, id string, gid int) (string, error) {
	tb.Helper()
	uid := 0
	if gid == nobody {
		uid = nobody
	}
	ep := endpoints{pid: ag.pid, arc: ag.arc, vm: ag.vm}
	return ep.client(tb, mode, lib, kind, id, imdsRes, uid, gid)
}

// endpoints are an agent's managed-identity endpoints: the agent's process
// (its mount namespace holds the challenge files), the Arc base URL
// (http://127.0.0.1:port) and the VM-style address (127.0.0.1:port).
type endpoints struct {
	pid     int
	arc, vm string
}

// client runs an unmodified Azure client in a child process inside the
// agent's mount namespace, as uid and gid, asking for resource with the
// identity named by kind and id (none: no selector).
func (ep endpoints) client(tb testing.TB, mode, lib, kind, id, resource string, uid, gid int) (string, error) {
	tb.Helper()
	cmd := exec.Command("nsenter", "-t", strconv.Itoa(ep.pid), "-m", "-S", strconv.Itoa(uid), "-G", strconv.Itoa(gid), "--",
		filepath.Join(filepath.Dir(dev.bin), "interop.test"), "-test.run", "^$")
	cmd.Dir = "/"
	env := []string{"PATH=" + os.Getenv("PATH"), "NO_PROXY=*", "HOME=/",
		"FERRY_IMDS_CLIENT=" + lib, "FERRY_IMDS_ID_KIND=" + kind, "FERRY_IMDS_CLIENT_ID=" + id, "FERRY_IMDS_RESOURCE=" + resource}
	if mode == "arc" {
		env = append(env, "IDENTITY_ENDPOINT="+ep.arc+"/metadata/identity/oauth2/token", "IMDS_ENDPOINT="+ep.arc)
	} else {
		env = append(env, "FERRY_IMDS_VM_ADDR="+ep.vm)
	}
	cmd.Env = env
	out, err := cmd.Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return "", fmt.Errorf("client child: %w: %s%s", err, out, ee.Stderr)
		}
		return "", err
	}
	var r clientResult
	if err := json.Unmarshal(out, &r); err != nil {
		return "", fmt.Errorf("client child output %q: %w", out, err)
	}
	if r.Err != "" {
		return "", errors.New(r.Err)
	}
	return r.Token, nil
}

func init() {
	lib := os.Getenv("FERRY_IMDS_CLIENT")
	if lib == "" {
		return
	}
	tok, err := runClient(lib)
	r := clientResult{Token: tok}
	if err != nil {
		r.Err = err.Error()
	}
	_ = json.NewEncoder(os.Stdout).Encode(r)
	os.Exit(0)
}

// vmClient sends what a client addresses to 169.254.169.254:80 to addr.
func vmClient(addr string) *http.Client {
	d := &net.Dialer{Timeout: 5 * time.Second}
	return &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		Proxy: nil,
		DialContext: func(ctx context.Context, network, a string) (net.Conn, error) {
			if a == "169.254.169.254:80" {
				a = addr
			}
			return d.DialContext(ctx, network, a)
		},
	}}
}

// runClient gets a token with an unmodified client, configured only by the
// environment (and, in VM mode, a transport standing in for the link-local
// route).
func runClient(lib string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	clientID, resource := os.Getenv("FERRY_IMDS_CLIENT_ID"), os.Getenv("FERRY_IMDS_RESOURCE")
	kind := os.Getenv("FERRY_IMDS_ID_KIND")
	var httpc *http.Client
	if a := os.Getenv("FERRY_IMDS_VM_ADDR"); a != "" {
		httpc = vmClient(a)
	}
	switch lib {
	case "azidentity":
		opts := &azidentity.ManagedIdentityCredentialOptions{}
		if httpc != nil {
			opts.ClientOptions = azcore.ClientOptions{Transport: httpc}
		}
		switch {
		case clientID == "":
			// System-assigned: no ID.
		case kind == "object_id":
			opts.ID = azidentity.ObjectID(clientID)
		case kind == "resource_id":
			opts.ID = azidentity.ResourceID(clientID)
		default:
			opts.ID = azidentity.ClientID(clientID)
		}
		cred, err := azidentity.NewManagedIdentityCredential(opts)
		if err != nil {
			return "", err
		}
		tok, err := cred.GetToken(ctx, policy.TokenRequestOptions{Scopes: []string{resource + "/.default"}})
		return tok.Token, err
	case "msal":
		var id managedidentity.ID = managedidentity.SystemAssigned()
		switch {
		case clientID == "":
		case kind == "object_id":
			id = managedidentity.UserAssignedObjectID(clientID)
		case kind == "resource_id":
			id = managedidentity.UserAssignedResourceID(clientID)
		default:
			id = managedidentity.UserAssignedClientID(clientID)
		}
		var opts []managedidentity.ClientOption
		if httpc != nil {
			opts = append(opts, managedidentity.WithHTTPClient(httpc))
		}
		c, err := managedidentity.New(id, opts...)
		if err != nil {
			return "", err
		}
		res, err := c.AcquireToken(ctx, resource)
		return res.AccessToken, err
	}
	return "", fmt.Errorf("unknown client %q", lib)
}

func (ag *imdsAgent) federation(name string) federation {
	id := ag.ids[name]
	return federation{clientID: id.clientID, objectID: id.objectID, tenantID: ag.tenantID, resourceURI: imdsRes, resourceAppID: ag.appID}
}

// TestIMDSClients runs azidentity's ManagedIdentityCredential and MSAL's
// managedidentity client against the agent, in Arc and VM mode, with and
// without a client_id, and validates every token at the bridge's JWKS.
func TestIMDSClients(t *testing.T) {
	ag := startIMDSAgent(t)
	for _, mode := range []string{"arc", "vm"} {
		for _, lib := range []string{"azidentity", "msal"} {
			t.Run(mode+"/"+lib+"/client_id", func(t *testing.T) {
				for _, name := range []string{"imds-a", "imds-b"} {
					tok, err := ag.client(t, mode, lib, ag.ids[name].clientID, 0)
					require.NoError(t, err)
					checkAccessToken(t, ag.federation(name), tok)
				}
			})
			t.Run(mode+"/"+lib+"/only_identity", func(t *testing.T) {
				tok, err := ag.client(t, mode, lib, "", singleGID)
				require.NoError(t, err)
				checkAccessToken(t, ag.federation("imds-c"), tok)
			})
		}
	}
}

// TestIMDSSystemAssigned runs both clients with managedidentity.SystemAssigned()
// (no selector) as the owner of a system-assigned identity, which also may
// use a user-assigned one: no selector gets the system-assigned identity;
// client_id, object_id or msi_res_id get the user-assigned one; an identity
// federated to another SPIFFE ID is not found. Another caller federated to
// the system-assigned identity does not get it. Every token is checked at the
// bridge's JWKS (aud, oid, azp (v2's appid), tid).
func TestIMDSSystemAssigned(t *testing.T) {
	ag := startIMDSAgent(t)
	d := ag.ids["imds-d"]
	for _, mode := range []string{"arc", "vm"} {
		for _, lib := range []string{"azidentity", "msal"} {
			t.Run(mode+"/"+lib, func(t *testing.T) {
				tok, err := ag.clientBy(t, mode, lib, "", "", sysGID)
				require.NoError(t, err)
				checkAccessToken(t, ag.federation("imds-sys"), tok)
				for kind, id := range map[string]string{"client_id": d.clientID, "object_id": d.objectID, "resource_id": d.resourceID} {
					tok, err := ag.clientBy(t, mode, lib, kind, id, sysGID)
					require.NoError(t, err, kind)
					checkAccessToken(t, ag.federation("imds-d"), tok)
				}
				_, err = ag.client(t, mode, lib, ag.ids["imds-a"].clientID, sysGID)
				require.ErrorContains(t, err, "Identity not found", "imds-a is federated to another SPIFFE ID")
				_, err = ag.client(t, mode, lib, ag.ids["imds-sys"].clientID, 0)
				require.ErrorContains(t, err, "Identity not found", "imds-sys is system-assigned to another SPIFFE ID")
			})
		}
	}
}

// TestIMDSAgentIdentity enables the agent's own system-assigned identity
// (`ferry agent identity enable`) and runs both clients with
// SystemAssigned(), in Arc and VM mode, as uid 65534, which no entry selects:
// like any process on an Azure VM it gets the VM's identity, checked at the
// bridge's JWKS. A caller with identities of its own still gets its own, or
// must name one. Disabled again, the identity is refused to everyone.
func TestIMDSAgentIdentity(t *testing.T) {
	ag := startIMDSAgent(t)
	out, err := ferryOut("agent", "identity", "enable", "--output", "json", ag.id)
	require.NoError(t, err, out)
	var set struct {
		Identity struct {
			ClientID string `json:"client_id"`
			ObjectID string `json:"object_id"`
		} `json:"identity"`
	}
	require.NoError(t, json.Unmarshal([]byte(out), &set), out)
	disabled := false
	disable := func() {
		if disabled {
			return
		}
		disabled = true
		out, err := ferryOut("agent", "identity", "disable", ag.id)
		require.NoError(t, err, out)
		// Other tests expect nothing for uid 65534: wait until it is so.
		require.Eventually(t, func() bool {
			_, err := ag.client(t, "vm", "msal", "", nobody)
			return err != nil && strings.Contains(err.Error(), "Identity not found")
		}, 30*time.Second, 100*time.Millisecond, "the agent's identity is refused once disabled")
	}
	t.Cleanup(disable)
	out, err = ferryOut("role", "assign", "--identity-object-id", set.Identity.ObjectID, "--resource", imdsRes, "--role", "reader")
	require.NoError(t, err, out)
	node := federation{clientID: set.Identity.ClientID, objectID: set.Identity.ObjectID, tenantID: ag.tenantID, resourceURI: imdsRes, resourceAppID: ag.appID}

	for _, mode := range []string{"arc", "vm"} {
		for _, lib := range []string{"azidentity", "msal"} {
			t.Run(mode+"/"+lib, func(t *testing.T) {
				var tok string
				// The agent hears of the change from its entry stream.
				require.Eventually(t, func() bool {
					tok, err = ag.clientBy(t, mode, lib, "", "", nobody)
					return err == nil
				}, 30*time.Second, 100*time.Millisecond, "uid %d gets the agent's identity: %v", nobody, err)
				checkAccessToken(t, node, tok)
				tok, err = ag.client(t, mode, lib, node.clientID, nobody)
				require.NoError(t, err, "named by client_id")
				checkAccessToken(t, node, tok)
				tok, err = ag.clientBy(t, mode, lib, "", "", sysGID)
				require.NoError(t, err)
				checkAccessToken(t, ag.federation("imds-sys"), tok)
				tok, err = ag.client(t, mode, lib, node.clientID, sysGID)
				require.NoError(t, err, "a caller with its own identity may name the agent's")
				checkAccessToken(t, node, tok)
			})
		}
	}
	_, err = ag.client(t, "vm", "msal", "", 0)
	require.ErrorContains(t, err, "Multiple user assigned identities exist", "a caller with two identities of its own must still name one")
	disable()
	_, err = ag.client(t, "arc", "azidentity", node.clientID, sysGID)
	require.ErrorContains(t, err, "Identity not found")
}

// TestIMDSRefusals: a caller with several identities must name one; nobody
// cannot use another SPIFFE ID's identity or the entries that select uid 0.
func TestIMDSRefusals(t *testing.T) {
	ag := startIMDSAgent(t)
	_, err := ag.client(t, "vm", "msal", "", 0)
	require.ErrorContains(t, err, "Multiple user assigned identities exist, please specify the clientId")

	_, err = ag.client(t, "arc", "msal", ag.ids["imds-c"].clientID, 0)
	require.ErrorContains(t, err, "Identity not found", "imds-c is federated to another SPIFFE ID")

	for _, mode := range []string{"arc", "vm"} {
		for _, id := range []string{"", ag.ids["imds-a"].clientID, ag.ids["imds-c"].clientID} {
			_, err := ag.client(t, mode, "msal", id, nobody)
			require.ErrorContains(t, err, "Identity not found", "uid %d, %s, client_id %q", nobody, mode, id)
		}
	}
}

// TestIMDSArcDocumentationCurl runs Azure's documented Arc curl commands, as
// written but for the address, against the dev stack's agent (its
// IDENTITY_ENDPOINT; challenge files under the data dir, which curl does not
// mind). They run as a uid of their own, whose only entry is federated to one
// identity, so no client_id is needed.
func TestIMDSArcDocumentationCurl(t *testing.T) {
	for _, tool := range []string{"bash", "curl", "grep", "cut", "tr", "cat"} {
		if _, err := exec.LookPath(tool); err != nil {
			skipSecurity(t, "%s is not installed", tool)
		}
	}
	ag := startIMDSAgent(t) // the directory: resource and identities; root
	td := dev.env["FERRY_TRUST_DOMAIN"]
	id := "spiffe://" + td + "/interop/imds-dev-curl"
	dev.ferry(t, "entry", "create", "--spiffe-id", id, "--parent-id", dev.env["FERRY_AGENT_ID"],
		"--selector", fmt.Sprintf("unix:uid:%d", curlUID))
	v := federatedIdentity(t, "imds-dev-curl", id, imdsRes)

	const script = `ChallengeTokenPath=$(curl -s -D - -H Metadata:true "http://127.0.0.1:40342/metadata/identity/oauth2/token?api-version=2019-11-01&resource=https%3A%2F%2Fmanagement.azure.com" | grep Www-Authenticate | cut -d "=" -f 2 | tr -d "[:cntrl:]")
ChallengeToken=$(cat $ChallengeTokenPath)
if [ $? -ne 0 ]; then
    echo "Could not retrieve challenge token, double check that this command is run with root privileges."
else
    curl -s -H Metadata:true -H "Authorization: Basic $ChallengeToken" "http://127.0.0.1:40342/metadata/identity/oauth2/token?api-version=2019-11-01&resource=https%3A%2F%2Fmanagement.azure.com"
fi
`
	// The address, and the resource (the bridge knows api://imds-demo, not ARM).
	s := strings.ReplaceAll(script, "http://127.0.0.1:40342", dev.env["IMDS_ENDPOINT"])
	s = strings.ReplaceAll(s, "https%3A%2F%2Fmanagement.azure.com", "api%3A%2F%2Fimds-demo")
	var resp map[string]string
	var last string
	// The new entry and credential reach the agent within moments.
	ok := assert.Eventually(t, func() bool {
		// In ferry dev's mount namespace, where its challenge files are.
		cmd := exec.Command("nsenter", "-t", strconv.Itoa(dev.pid), "-m", "-S", strconv.Itoa(curlUID), "-G", strconv.Itoa(curlUID), "--", "bash", "-c", s)
		cmd.Dir = "/"
		cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "NO_PROXY=*"}
		out, err := cmd.CombinedOutput()
		last, resp = string(out), nil
		return err == nil && json.Unmarshal(out, &resp) == nil && resp["access_token"] != ""
	}, 20*time.Second, 500*time.Millisecond)
	require.True(t, ok, "last answer: %s", last)
	require.Equal(t, v.clientID, resp["client_id"])
	require.Equal(t, imdsRes, resp["resource"])
	require.Equal(t, "Bearer", resp["token_type"])
	checkAccessToken(t, federation{clientID: v.clientID, objectID: v.objectID, tenantID: ag.tenantID, resourceURI: imdsRes, resourceAppID: ag.appID}, resp["access_token"])
}

// vmGet is one VM-style token request from this process (uid 0, gid 0: the
// imds-multi entry, so it names imds-a).
func (ag *imdsAgent) vmGet(c *http.Client, resource string) error {
	req, _ := http.NewRequest(http.MethodGet, "http://"+ag.vm+"/metadata/identity/oauth2/token?api-version=2018-02-01&resource="+url.QueryEscape(resource)+"&client_id="+ag.ids["imds-a"].clientID, nil)
	req.Header.Set("Metadata", "true")
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var body struct {
		AccessToken string `json:"access_token"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK || body.AccessToken == "" {
		return fmt.Errorf("token request: status %d", resp.StatusCode)
	}
	return nil
}

// BenchmarkIMDSAgentCached measures cached-token responses end to end against
// the agent process at concurrency 16: loopback HTTP, caller lookup,
// attestation, identity selection and the token cache (no exchange). Each
// worker keeps one HTTP/1.1 connection and writes requests directly, as
// agent/imds's in-process benchmark does. Reports requests/s and p99.
func BenchmarkIMDSAgentCached(b *testing.B) {
	const concurrency = 16
	ag := startIMDSAgent(b)
	require.NoError(b, ag.vmGet(&http.Client{}, imdsRes))
	request := []byte("GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=" + url.QueryEscape(imdsRes) +
		"&client_id=" + ag.ids["imds-a"].clientID + " HTTP/1.1\r\nHost: " + ag.vm + "\r\nMetadata: true\r\n\r\n")
	lat := make([][]time.Duration, concurrency)
	var next atomic.Int64
	var wg sync.WaitGroup
	errc := make(chan error, concurrency)
	b.ResetTimer()
	start := time.Now()
	for w := range concurrency {
		wg.Go(func() {
			c, err := net.Dial("tcp", ag.vm)
			if err != nil {
				errc <- err
				return
			}
			defer c.Close()
			br := bufio.NewReader(c)
			for next.Add(1) <= int64(b.N) {
				t0 := time.Now()
				if _, err := c.Write(request); err != nil {
					errc <- err
					return
				}
				resp, err := http.ReadResponse(br, nil)
				if err != nil {
					errc <- err
					return
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					errc <- fmt.Errorf("status %d", resp.StatusCode)
					return
				}
				lat[w] = append(lat[w], time.Since(t0))
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	select {
	case err := <-errc:
		b.Fatal(err)
	default:
	}
	reportLatency(b, slices.Concat(lat...), elapsed)
}

// coldNext hands out identifier URIs no token has been cached for yet.
var coldNext atomic.Int32

// BenchmarkIMDSAgentCold measures the cold path: attestation, a JWT-SVID and
// the exchange at the bridge, for a resource the agent has no token for.
// Only 50 such resources exist: run with -benchtime=40x or less.
func BenchmarkIMDSAgentCold(b *testing.B) {
	ag := startIMDSAgent(b)
	c := &http.Client{}
	var lat []time.Duration
	b.ResetTimer()
	start := time.Now()
	for range b.N {
		i := int(coldNext.Add(1)) - 1
		if i >= len(ag.coldURIs) {
			b.Skip("no uncached resources left; run with -benchtime=40x")
		}
		t0 := time.Now()
		if err := ag.vmGet(c, ag.coldURIs[i]); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(t0))
	}
	reportLatency(b, lat, time.Since(start))
}

func reportLatency(b *testing.B, lat []time.Duration, elapsed time.Duration) {
	if len(lat) == 0 {
		return
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	p := func(q float64) float64 {
		return float64(lat[min(len(lat)-1, int(q*float64(len(lat))))].Microseconds())
	}
	b.ReportMetric(float64(len(lat))/elapsed.Seconds(), "req/s")
	b.ReportMetric(p(0.50), "p50-µs")
	b.ReportMetric(p(0.99), "p99-µs")
}
