package e2e

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/internal/roottest"
	"github.com/ferry-id/ferry/test/oidcissuer"
	"github.com/ferry-id/ferry/test/testcluster"
)

// The flow tests run every piece as its own `ferry` process, as on a real
// machine: a one-node server (with its JWT-SVID OIDC issuer), a bridge
// replica following it, an agent with the Arc-style managed-identity
// endpoint, and `ferry demo-api` as the protected resource. Only the external
// identity provider (test/oidcissuer) runs inside the test.

// flowStack is a server and a bridge, with helpers for the directory.
type flowStack struct {
	t        *testing.T
	c        *testcluster.Cluster
	dir      string // traversable by every user
	tenant   string
	jwtIss   string // the trust domain's JWT-SVID issuer
	bridge   string // https://127.0.0.1:port
	bridgeCA string
	client   *http.Client // trusts the bridge
}

// newFlowStack starts the server and a bridge; bridgeEnv is added to the
// bridge's environment (e.g. SSL_CERT_FILE for an external issuer).
func newFlowStack(t *testing.T, bridgeEnv ...string) *flowStack {
	t.Helper()
	if testing.Short() {
		t.Skip("starts real server, bridge, agent and demo-api processes")
	}
	oidcAddr := testcluster.FreeAddr(t)
	_, oidcPort, _ := net.SplitHostPort(oidcAddr)
	jwtIss := "https://localhost:" + oidcPort
	c := testcluster.New(t, testcluster.Options{Nodes: 1, ExtraServerConfig: fmt.Sprintf(`  oidc {
    addr   = %q
    issuer = %q
  }
`, oidcAddr, jwtIss)})
	return attachFlowStack(t, c, jwtIss, bridgeEnv...)
}

// attachFlowStack creates a tenant on c's server (whose JWT-SVIDs carry
// jwtIss) and starts a bridge following it.
func attachFlowStack(t *testing.T, c *testcluster.Cluster, jwtIss string, bridgeEnv ...string) *flowStack {
	t.Helper()
	dir, err := os.MkdirTemp("", "ferry-flow-")
	require.NoError(t, err)
	require.NoError(t, os.Chmod(dir, 0o755))
	t.Cleanup(func() { os.RemoveAll(dir) })
	s := &flowStack{t: t, c: c, dir: dir, jwtIss: jwtIss}

	var tenant struct {
		ID string `json:"id"`
	}
	s.cliJSON(&tenant, "tenant", "create", "--name", "default")
	s.tenant = tenant.ID

	addr := testcluster.FreeAddr(t)
	bdir := filepath.Join(dir, "bridge")
	require.NoError(t, os.MkdirAll(bdir, 0o700))
	conf := filepath.Join(bdir, "bridge.conf")
	require.NoError(t, os.WriteFile(conf, []byte(fmt.Sprintf(`bridge {
  listen_addr   = %q
  data_dir      = "data"
  server_socket = %q
  name          = "flow"
  log_level     = "debug"
}
`, addr, c.Nodes[0].Socket)), 0o600))
	startProcess(t, "bridge", bdir, bridgeEnv, c.Bin, "bridge", "run", "--config", conf)
	s.bridge = "https://" + addr
	s.bridgeCA = filepath.Join(bdir, "data", "tls-ca.pem")
	require.Eventually(t, func() bool {
		pem, err := os.ReadFile(s.bridgeCA)
		if err != nil {
			return false
		}
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(pem)
		s.client = &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
		resp, err := s.client.Get(s.bridge + "/" + s.tenant + "/v2.0/.well-known/openid-configuration")
		if err != nil {
			return false
		}
		resp.Body.Close()
		// 200 once the replica holds the directory (and so the tenant).
		return resp.StatusCode == http.StatusOK
	}, 30*time.Second, 100*time.Millisecond, "the bridge serves the tenant's metadata")
	return s
}

// cli runs a ferry operator command against the server.
func (s *flowStack) cli(args ...string) string {
	s.t.Helper()
	out, err := s.c.Nodes[0].CLI(args...)
	require.NoError(s.t, err, "ferry %s\n%s", strings.Join(args, " "), out)
	return out
}

func (s *flowStack) cliJSON(v any, args ...string) {
	s.t.Helper()
	out := s.cli(append(args, "--output", "json")...)
	require.NoError(s.t, json.Unmarshal([]byte(out), v), out)
}

type flowIdentity struct {
	ObjectID string `json:"object_id"`
	ClientID string `json:"client_id"`
}

// identity creates an identity with one federated credential (issuer,
// subject or expression; audience api://AzureADTokenExchange).
func (s *flowStack) identity(name, issuer, subject, expr string) flowIdentity {
	s.t.Helper()
	var id flowIdentity
	s.cliJSON(&id, "identity", "create", "--name", name)
	args := []string{"identity", "federated-credential", "create", "--identity-name", name, "--name", name + "-fic", "--issuer", issuer}
	if expr != "" {
		args = append(args, "--claims-matching-expression", expr)
	} else {
		args = append(args, "--subject", subject)
	}
	s.cli(args...)
	return id
}

// resource creates a resource with the app role reader and returns its app ID.
func (s *flowStack) resource(name, uri string) string {
	s.t.Helper()
	var r struct {
		AppID string `json:"app_id"`
	}
	s.cliJSON(&r, "resource", "create", "--name", name, "--identifier-uri", uri, "--app-role", "reader")
	require.NotEmpty(s.t, r.AppID)
	return r.AppID
}

// demoAPI starts `ferry demo-api` for a resource (its URI and app ID),
// requiring the role reader, and returns its URL.
func (s *flowStack) demoAPI(uri, appID string) string {
	s.t.Helper()
	addr := testcluster.FreeAddr(s.t)
	ddir := filepath.Join(s.dir, "demo-api-"+appID[:8])
	require.NoError(s.t, os.MkdirAll(ddir, 0o700))
	startProcess(s.t, "demo-api", ddir, nil, s.c.Bin, "demo-api", "--listen", addr,
		"--authority", s.bridge, "--tenant", s.tenant, "--ca", s.bridgeCA,
		"--audience", uri, "--audience", appID, "--role", "reader", "--log-level", "debug")
	require.Eventually(s.t, func() bool {
		conn, err := net.Dial("tcp", addr)
		if err == nil {
			conn.Close()
		}
		return err == nil
	}, 20*time.Second, 50*time.Millisecond, "demo-api listens")
	return "http://" + addr + "/"
}

// tokenResponse is the bridge's answer, success or AADSTS error.
type tokenResponse struct {
	status      int
	AccessToken string `json:"access_token"`
	Error       string `json:"error"`
	Description string `json:"error_description"`
	Codes       []int  `json:"error_codes"`
}

// exchange posts a client assertion to the bridge's v2 (scope) or v1
// (resource) token endpoint.
func (s *flowStack) exchange(v1 bool, clientID, assertion, resource string) tokenResponse {
	s.t.Helper()
	form := url.Values{
		"grant_type":            {"client_credentials"},
		"client_id":             {clientID},
		"client_assertion_type": {"urn:ietf:params:oauth:client-assertion-type:jwt-bearer"},
		"client_assertion":      {assertion},
	}
	path := "/" + s.tenant + "/oauth2/v2.0/token"
	if v1 {
		path = "/" + s.tenant + "/oauth2/token"
		form.Set("resource", resource)
	} else {
		form.Set("scope", resource+"/.default")
	}
	resp, err := s.client.PostForm(s.bridge+path, form)
	require.NoError(s.t, err)
	defer resp.Body.Close()
	tr := tokenResponse{status: resp.StatusCode}
	body, _ := io.ReadAll(resp.Body)
	require.NoError(s.t, json.Unmarshal(body, &tr), "%s", body)
	return tr
}

// requireAADSTS checks an Entra error answer.
func requireAADSTS(t *testing.T, tr tokenResponse, status int, kind string, code int) {
	t.Helper()
	require.Equal(t, status, tr.status, "%+v", tr)
	require.Equal(t, kind, tr.Error, "%+v", tr)
	require.Equal(t, []int{code}, tr.Codes, "%+v", tr)
	require.True(t, strings.HasPrefix(tr.Description, fmt.Sprintf("AADSTS%d: ", code)), tr.Description)
	require.Empty(t, tr.AccessToken)
}

// apiAnswer is what the demo API said.
type apiAnswer struct {
	status int
	www    string
	body   map[string]any
}

func callAPI(t *testing.T, apiURL, token string) apiAnswer {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, apiURL, nil)
	require.NoError(t, err)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	a := apiAnswer{status: resp.StatusCode, www: resp.Header.Get("WWW-Authenticate")}
	body, _ := io.ReadAll(resp.Body)
	require.NoError(t, json.Unmarshal(body, &a.body), "%s", body)
	return a
}

// startProcess starts a ferry process with its output in dir/<name>.log,
// stopped (and its log shown on failure) at cleanup.
func startProcess(t *testing.T, name, dir string, env []string, bin string, args ...string) *exec.Cmd {
	t.Helper()
	logPath := filepath.Join(dir, name+".log")
	logf, err := os.Create(logPath)
	require.NoError(t, err)
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = append(cleanEnv(os.Getenv("PATH")), env...)
	require.NoError(t, cmd.Start())
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); logf.Close(); close(done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			out, _ := os.ReadFile(logPath)
			t.Logf("==== %s log (tail)\n%s", name, tail(string(out), 60))
		}
	})
	return cmd
}

// arcAgent is a `ferry agent run` process serving the Arc-style
// managed-identity endpoint, exchanging at the stack's bridge.
type arcAgent struct {
	id       string // the agent's SPIFFE ID
	addr     string // 127.0.0.1:port of the endpoint
	endpoint string // IDENTITY_ENDPOINT
	tokenDir string
	socket   string
}

func (s *flowStack) arcAgent(name string) *arcAgent {
	s.t.Helper()
	id := "spiffe://example.org/spire/agent/" + name
	bundle := s.cli("bundle", "show")
	var tok struct {
		Token string `json:"token"`
	}
	s.cliJSON(&tok, "token", "generate", "--spiffe-id", id, "--ttl", "10m")
	adir := filepath.Join(s.dir, "agent-"+name)
	require.NoError(s.t, os.MkdirAll(adir, 0o755))
	require.NoError(s.t, os.WriteFile(filepath.Join(adir, "bundle.pem"), []byte(bundle), 0o644))
	a := &arcAgent{
		id:       id,
		addr:     testcluster.FreeAddr(s.t),
		tokenDir: filepath.Join(adir, "tokens"),
		socket:   filepath.Join(adir, "public", "api.sock"),
	}
	a.endpoint = "http://" + a.addr + "/metadata/identity/oauth2/token"
	conf := filepath.Join(adir, "agent.conf")
	require.NoError(s.t, os.WriteFile(conf, []byte(fmt.Sprintf(`agent {
  trust_domain      = "example.org"
  server_addresses  = [%q]
  trust_bundle_file = "bundle.pem"
  data_dir          = "data"
  socket_path       = %q
  log_level         = "debug"
  join_token        = %q
  imds {
    arc_addr          = %q
    token_dir         = %q
    authority         = %q
    authority_ca_file = %q
  }
}
`, s.c.Nodes[0].AgentAddr, a.socket, tok.Token, a.addr, a.tokenDir, s.bridge, s.bridgeCA)), 0o600))
	startProcess(s.t, "agent", adir, nil, s.c.Bin, "agent", "run", "--config", conf)
	require.Eventually(s.t, func() bool {
		for _, dial := range [][2]string{{"unix", a.socket}, {"tcp", a.addr}} {
			conn, err := net.Dial(dial[0], dial[1])
			if err != nil {
				return false
			}
			conn.Close()
		}
		return true
	}, 30*time.Second, 50*time.Millisecond, "the agent serves the Workload API and the Arc endpoint")
	return a
}

// arcGet sends one Arc token request (Metadata: true), with auth as the
// Authorization header when set.
func arcGet(t *testing.T, endpoint, resource, auth string) (*http.Response, map[string]string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, endpoint+"?api-version=2020-06-01&resource="+url.QueryEscape(resource), nil)
	require.NoError(t, err)
	req.Header.Set("Metadata", "true")
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	m := map[string]string{}
	require.NoError(t, json.Unmarshal(body, &m), "%s", body)
	return resp, m
}

// arcDocScript is the bash example of Azure's Arc documentation ("Acquiring
// an access token using REST API", Linux), verbatim; the tests change only
// the address.
const arcDocScript = `ChallengeTokenPath=$(curl -s -D - -H Metadata:true "http://127.0.0.1:40342/metadata/identity/oauth2/token?api-version=2019-11-01&resource=https%3A%2F%2Fmanagement.azure.com" | grep Www-Authenticate | cut -d "=" -f 2 | tr -d "[:cntrl:]")
ChallengeToken=$(cat $ChallengeTokenPath)
if [ $? -ne 0 ]; then
    echo "Could not retrieve challenge token, double check that this command is run with root privileges."
else
    curl -s -H Metadata:true -H "Authorization: Basic $ChallengeToken" "http://127.0.0.1:40342/metadata/identity/oauth2/token?api-version=2019-11-01&resource=https%3A%2F%2Fmanagement.azure.com"
fi
`

const nobodyUID = 65534

// TestFlowArc follows Azure's description of the Arc managed-identity
// endpoint step by step against a real agent, then runs Azure's own curl
// commands, and spends the token at the demo API.
//
// The resource is a stand-in for Azure Resource Manager: demo-api serving
// https://management.azure.com, the resource Azure's example asks for.
func TestFlowArc(t *testing.T) {
	roottest.Require(t) // the Arc flow hands challenge files to other users
	s := newFlowStack(t)
	ag := s.arcAgent("arc")
	const arm = "https://management.azure.com"
	appID := s.resource("arm", arm)
	api := s.demoAPI(arm, appID)
	s.cli("entry", "create", "--spiffe-id", "spiffe://example.org/arc-app", "--parent-id", ag.id, "--selector", "unix:uid:0")
	id := s.identity("arc-app", s.jwtIss, "spiffe://example.org/arc-app", "")
	s.cli("role", "assign", "--identity-name", "arc-app", "--resource", arm, "--role", "reader")

	// 1. "On the first attempt to access the token URI, the service will
	// generate a randomly generated cryptographic blob in a location on the
	// file system that only trusted callers can read": a request without a
	// secret is answered 401 with WWW-Authenticate: Basic realm=<path>.
	// The agent has the entry once the Workload API hands this process its SVID.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for {
		x, err := workloadapi.FetchX509Context(ctx, workloadapi.WithAddr("unix://"+ag.socket))
		if err == nil && len(x.SVIDs) > 0 && x.SVIDs[0].ID.String() == "spiffe://example.org/arc-app" {
			break
		}
		require.NoError(t, ctx.Err(), "the agent never served the entry: %v", err)
		time.Sleep(100 * time.Millisecond)
	}
	resp, body := arcGet(t, ag.endpoint, arm, "")
	require.Equal(t, http.StatusUnauthorized, resp.StatusCode, "%v", body)
	www := resp.Header.Values("WWW-Authenticate")
	require.Len(t, www, 1)
	require.True(t, strings.HasPrefix(www[0], "Basic realm="), www[0])
	path := strings.TrimPrefix(www[0], "Basic realm=")
	require.Equal(t, ag.tokenDir, filepath.Dir(path), "directly in the token directory")
	require.Equal(t, ".key", filepath.Ext(path))
	require.NotContains(t, body, "access_token")

	// 2. The file is readable only by the caller: mode 0600, owned by the
	// caller's uid, in a directory nobody else may list; another user cannot
	// read it.
	fi, err := os.Stat(path)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
	require.Equal(t, uint32(os.Geteuid()), fi.Sys().(*syscall.Stat_t).Uid)
	require.LessOrEqual(t, fi.Size(), int64(4096))
	di, err := os.Stat(ag.tokenDir)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o711), di.Mode().Perm(), "traversable, not listable")
	out, err := asUser(nobodyUID, "cat", path).CombinedOutput()
	require.Error(t, err)
	require.Contains(t, string(out), "Permission denied")
	out, err = asUser(nobodyUID, "ls", ag.tokenDir).CombinedOutput()
	require.Error(t, err, "another user cannot list the directory: %s", out)
	secret, err := os.ReadFile(path)
	require.NoError(t, err)
	require.NotContains(t, string(secret), "\n")

	// 3. "The caller must then read the file and retry the request with the
	// file contents in the authorization header": the second request gets
	// the token.
	resp, body = arcGet(t, ag.endpoint, arm, "Basic "+string(secret))
	require.Equal(t, http.StatusOK, resp.StatusCode, "%v", body)
	require.NotEmpty(t, body["access_token"])
	require.Equal(t, "Bearer", body["token_type"])
	require.Equal(t, arm, body["resource"])
	require.Equal(t, id.ClientID, body["client_id"])
	for _, k := range []string{"expires_in", "expires_on", "not_before"} {
		require.Regexp(t, `^[0-9]+$`, body[k], k)
	}
	// The secret is spent: the file is gone and the secret no longer works.
	_, err = os.Stat(path)
	require.ErrorIs(t, err, os.ErrNotExist)
	resp, _ = arcGet(t, ag.endpoint, arm, "Basic "+string(secret))
	require.Equal(t, http.StatusUnauthorized, resp.StatusCode)

	// 4. The token is spent at the resource.
	ans := callAPI(t, api, body["access_token"])
	require.Equal(t, http.StatusOK, ans.status, "%v", ans.body)
	require.Equal(t, id.ObjectID, ans.body["oid"])
	require.Equal(t, id.ClientID, ans.body["appid"])
	require.Equal(t, s.tenant, ans.body["tid"])
	require.Equal(t, []any{"reader"}, ans.body["roles"])

	// Azure's curl commands, as written but for the address, as this user
	// (uid 0, the identity's) and as another user (no identity).
	for _, tool := range []string{"bash", "curl", "grep", "cut", "tr", "cat"} {
		if _, err := exec.LookPath(tool); err != nil {
			roottest.Skipf(t, "%s is not installed", tool)
		}
	}
	script := strings.ReplaceAll(arcDocScript, "127.0.0.1:40342", ag.addr)
	out, err = exec.Command("bash", "-c", script).CombinedOutput()
	require.NoError(t, err, "%s", out)
	var doc map[string]string
	require.NoError(t, json.Unmarshal(out, &doc), "%s", out)
	require.Equal(t, arm, doc["resource"])
	ans = callAPI(t, api, doc["access_token"])
	require.Equal(t, http.StatusOK, ans.status, "%v", ans.body)
	require.Equal(t, id.ObjectID, ans.body["oid"])

	out, err = asUser(nobodyUID, "bash", "-c", script).CombinedOutput()
	require.NoError(t, err, "%s", out)
	require.JSONEq(t, `{"error":"invalid_request","error_description":"Identity not found"}`, string(out))

	// Without a token, with a token for another resource: 401.
	ans = callAPI(t, api, "")
	require.Equal(t, http.StatusUnauthorized, ans.status)
	require.Equal(t, "Bearer", ans.www)
	s.resource("other", "api://other")
	p := challengePath(t, ag.endpoint, "api://other")
	secret, err = os.ReadFile(p)
	require.NoError(t, err)
	resp, body = arcGet(t, ag.endpoint, "api://other", "Basic "+string(secret))
	require.Equal(t, http.StatusOK, resp.StatusCode, "%v", body)
	ans = callAPI(t, api, body["access_token"])
	require.Equal(t, http.StatusUnauthorized, ans.status)
	require.True(t, strings.HasPrefix(ans.www, `Bearer error="invalid_token", error_description="The audience`), ans.www)
}

func challengePath(t *testing.T, endpoint, resource string) string {
	t.Helper()
	resp, _ := arcGet(t, endpoint, resource, "")
	require.Equal(t, http.StatusUnauthorized, resp.StatusCode)
	return strings.TrimPrefix(resp.Header.Get("WWW-Authenticate"), "Basic realm=")
}

// asUser runs a command as uid (and gid) with a clean environment.
func asUser(uid uint32, name string, args ...string) *exec.Cmd {
	cmd := exec.Command(name, args...)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "NO_PROXY=*"}
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
	return cmd
}

// TestFlowFederation is workload identity federation with external
// identity providers: a token from an OIDC issuer outside the trust domain
// (GitHub Actions, Kubernetes, Google and AWS style subjects) is the client
// assertion at a real bridge process, which checks trust against the issuer
// itself (discovery and JWKS over TLS) under the identity's federated
// credentials, exactly as for the trust domain's own JWT-SVIDs; the access
// token is spent at demo-api.
func TestFlowFederation(t *testing.T) {
	iss, err := oidcissuer.Start(oidcissuer.Config{})
	require.NoError(t, err)
	defer iss.Close()
	ca := filepath.Join(t.TempDir(), "issuer-ca.pem")
	require.NoError(t, iss.WriteCA(ca))
	// The bridge trusts the issuer's CA, as it would a public CA.
	s := newFlowStack(t, "SSL_CERT_FILE="+ca)
	appID := s.resource("demo", "api://demo")
	api := s.demoAPI("api://demo", appID)

	const ghMain = "repo:contoso/app:ref:refs/heads/main"
	ids := map[string]flowIdentity{
		"github":     s.identity("gh-deploy", iss.URL(), ghMain, ""),
		"kubernetes": s.identity("k8s-payments", iss.URL(), "system:serviceaccount:payments:api", ""),
		"google":     s.identity("gcp-svc", iss.URL(), "113456789012345678901", ""),
		"aws":        s.identity("aws-app", iss.URL(), "arn:aws:iam::123456789012:role/app", ""),
		// Entra's flexible credential for GitHub: any branch of the repo, run by one of its workflows.
		"branches": s.identity("gh-branches", iss.URL(), "",
			"claims['sub'] matches 'repo:contoso/app:ref:refs/heads/*' and claims['job_workflow_ref'] matches 'contoso/app/.github/workflows/*'"),
	}
	for _, name := range []string{"gh-deploy", "k8s-payments", "gcp-svc", "aws-app", "gh-branches"} {
		s.cli("role", "assign", "--identity-name", name, "--resource", "api://demo", "--role", "reader")
	}
	noRole := s.identity("gh-tools", iss.URL(), "repo:contoso/tools:ref:refs/heads/main", "")

	mint := func(tok oidcissuer.Token) string {
		t.Helper()
		raw, err := iss.Mint(tok)
		require.NoError(t, err)
		return raw
	}
	spend := func(t *testing.T, id flowIdentity, tok oidcissuer.Token, v1 bool) apiAnswer {
		t.Helper()
		var tr tokenResponse
		// A credential just created reaches the bridge replica through the
		// directory stream; Entra too documents a short propagation delay.
		require.Eventually(t, func() bool {
			tr = s.exchange(v1, id.ClientID, mint(tok), "api://demo")
			return tr.status == http.StatusOK
		}, 10*time.Second, 100*time.Millisecond, "last answer: %+v", tr)
		return callAPI(t, api, tr.AccessToken)
	}

	for _, tc := range []struct {
		name string
		tok  oidcissuer.Token
	}{
		{"github", oidcissuer.GitHubActions("contoso/app", "refs/heads/main")},
		{"kubernetes", oidcissuer.KubernetesServiceAccount("payments", "api")},
		{"google", oidcissuer.Google("113456789012345678901", "svc@proj.iam.gserviceaccount.com")},
		{"aws", oidcissuer.AWS("123456789012", "app")},
		{"branches", oidcissuer.GitHubActions("contoso/app", "refs/heads/feature/x")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, v1 := range []bool{false, true} {
				ans := spend(t, ids[tc.name], tc.tok, v1)
				require.Equal(t, http.StatusOK, ans.status, "v1=%v %v", v1, ans.body)
				require.Equal(t, ids[tc.name].ObjectID, ans.body["oid"])
				require.Equal(t, ids[tc.name].ClientID, ans.body["appid"])
				require.Equal(t, []any{"reader"}, ans.body["roles"])
				want := map[bool]string{false: "2.0", true: "1.0"}[v1]
				require.Equal(t, want, ans.body["ver"], "v1 and v2 issuers are both accepted")
			}
		})
	}
	// Trust was checked against the issuer itself, and its keys are cached.
	require.GreaterOrEqual(t, iss.Requests("/.well-known/openid-configuration"), 1)
	keyFetches := iss.Requests("/keys")
	require.GreaterOrEqual(t, keyFetches, 1)

	// An identity without the role gets a token, which the API refuses: 403.
	ans := spend(t, noRole, oidcissuer.GitHubActions("contoso/tools", "refs/heads/main"), false)
	require.Equal(t, http.StatusForbidden, ans.status, "%v", ans.body)
	require.True(t, strings.HasPrefix(ans.www, `Bearer error="insufficient_scope"`), ans.www)

	gh := ids["github"]
	with := func(tok oidcissuer.Token, mut func(*oidcissuer.Token)) oidcissuer.Token {
		mut(&tok)
		return tok
	}
	onMain := oidcissuer.GitHubActions("contoso/app", "refs/heads/main")
	for _, tc := range []struct {
		name   string
		id     flowIdentity
		tok    oidcissuer.Token
		status int
		kind   string
		code   int
	}{
		{"wrong subject", gh, oidcissuer.GitHubActions("contoso/other", "refs/heads/main"), 401, "invalid_client", 700213},
		{"subject differs only in case", gh, oidcissuer.GitHubActions("Contoso/app", "refs/heads/main"), 401, "invalid_client", 7002138},
		{"wrong audience", gh, with(onMain, func(tk *oidcissuer.Token) { tk.Audience = "api://other" }), 401, "invalid_client", 700212},
		{"audience differs only in case", gh, with(onMain, func(tk *oidcissuer.Token) { tk.Audience = "api://azureadtokenexchange" }), 401, "invalid_client", 7002138},
		{"issuer with a trailing slash", gh, with(onMain, func(tk *oidcissuer.Token) { tk.Issuer = iss.URL() + "/" }), 401, "invalid_client", 700211},
		{"unknown kid", gh, with(onMain, func(tk *oidcissuer.Token) { tk.KID = "not-in-the-jwks" }), 401, "invalid_client", 7000272},
		{"expired", gh, with(onMain, func(tk *oidcissuer.Token) { tk.IssuedAt = time.Now().Add(-20 * time.Minute) }), 401, "invalid_client", 700024},
		{"expression: a tag is not a branch", ids["branches"], oidcissuer.GitHubActions("contoso/app", "refs/tags/v1"), 401, "invalid_client", 700213},
		{"expression: another workflow's job", ids["branches"], with(oidcissuer.GitHubActions("contoso/app", "refs/heads/dev"), func(tk *oidcissuer.Token) {
			tk.Claims["job_workflow_ref"] = "contoso/shared/.github/workflows/deploy.yml@refs/heads/main"
		}), 401, "invalid_client", 700213},
		{"a token of the right issuer for another identity", ids["kubernetes"], onMain, 401, "invalid_client", 700213},
	} {
		t.Run(tc.name, func(t *testing.T) {
			requireAADSTS(t, s.exchange(false, tc.id.ClientID, mint(tc.tok), "api://demo"), tc.status, tc.kind, tc.code)
		})
	}
	// Unknown kids do not make the bridge refetch the issuer's keys (at most
	// once per 5 minutes).
	for range 5 {
		requireAADSTS(t, s.exchange(false, gh.ClientID, mint(with(onMain, func(tk *oidcissuer.Token) { tk.KID = "made-up" })), "api://demo"), 401, "invalid_client", 7000272)
	}
	require.Equal(t, keyFetches, iss.Requests("/keys"))

	// The bridge's own access tokens are no federated credential.
	tr := s.exchange(false, gh.ClientID, mint(onMain), "api://demo")
	require.Equal(t, http.StatusOK, tr.status)
	requireAADSTS(t, s.exchange(false, gh.ClientID, tr.AccessToken, "api://demo"), 401, "invalid_client", 700229)
}
