// Package dev runs a whole ferry on one machine in one process, for trying it out:
// a one-node server with everything it needs generated under a data directory.
// `make run` starts it. Nothing here is for production: the cluster CA key lives
// next to the data it protects.
package dev

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/ferry-id/ferry/agent"
	"github.com/ferry-id/ferry/attestors/node/jointoken"
	"github.com/ferry-id/ferry/bridge/service"
	"github.com/ferry-id/ferry/demoapi"
	"github.com/ferry-id/ferry/internal/securedir"
	"github.com/ferry-id/ferry/proto/ferrypb"

	"github.com/ferry-id/ferry/server"
	"github.com/ferry-id/ferry/server/cluster"
)

// Config configures a dev stack.
type Config struct {
	DataDir     string
	TrustDomain spiffeid.TrustDomain
	Logger      *slog.Logger
	// Out receives the "what to try next" text once the stack is ready.
	Out io.Writer
}

// Stack is a running dev stack.
type Stack struct {
	cfg Config
	log *slog.Logger
}

// New prepares a dev stack; Run starts it.
func New(cfg Config) (*Stack, error) {
	if cfg.DataDir == "" {
		return nil, errors.New("dev: data dir is required")
	}
	if cfg.TrustDomain.IsZero() {
		cfg.TrustDomain = spiffeid.RequireTrustDomainFromString("example.org")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Out == nil {
		cfg.Out = io.Discard
	}
	abs, err := filepath.Abs(cfg.DataDir)
	if err != nil {
		return nil, err
	}
	cfg.DataDir = abs
	return &Stack{cfg: cfg, log: cfg.Logger}, nil
}

// ports remembers the loopback ports the stack chose the first time, so a
// restart from the same data dir finds its one-node Raft cluster where it left it.
type ports struct {
	Cluster int `json:"cluster"`
	Health  int `json:"health"`
	Agent   int `json:"agent"`
	Bridge  int `json:"bridge"`
	OIDC    int `json:"oidc"`
	IMDS    int `json:"imds"`
	DemoAPI int `json:"demo_api"`
}

func (s *Stack) ports() (ports, error) {
	path := filepath.Join(s.cfg.DataDir, "ports.json")
	var p ports
	if data, err := os.ReadFile(path); err == nil {
		if err := json.Unmarshal(data, &p); err != nil {
			return p, fmt.Errorf("dev: %s: %w", path, err)
		}
	}
	// A new data dir gets every port; one from an earlier version gets the
	// ports it lacks, and keeps the others.
	changed := false
	for _, port := range []*int{&p.Cluster, &p.Health, &p.Agent, &p.Bridge, &p.OIDC, &p.IMDS, &p.DemoAPI} {
		if *port != 0 {
			continue
		}
		var err error
		if *port, err = freePort(); err != nil {
			return p, err
		}
		changed = true
	}
	if !changed {
		return p, nil
	}
	data, _ := json.Marshal(p)
	return p, os.WriteFile(path, data, 0o600)
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("dev: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// Run starts the stack and blocks until ctx ends.
func (s *Stack) Run(ctx context.Context) error {
	ctx, stop := context.WithCancel(ctx)
	defer stop()
	dir := s.cfg.DataDir
	// Other users may traverse (not list) the data dir to reach the Workload
	// API socket in public/; everything secret is in 0700 directories below.
	// Keys and sockets live here: no other user may be able to change it or
	// any directory above it.
	if err := securedir.MkdirAll(dir, 0o711); err != nil {
		return fmt.Errorf("dev: data dir: %w", err)
	}
	if err := os.Chmod(dir, 0o711); err != nil {
		return fmt.Errorf("dev: %w", err)
	}
	p, err := s.ports()
	if err != nil {
		return err
	}
	tlsDir := filepath.Join(dir, "cluster-tls")
	if _, err := os.Stat(filepath.Join(tlsDir, "ca.pem")); err != nil {
		if _, err := cluster.CreateCA(cluster.CAOptions{Dir: tlsDir}); err != nil {
			return err
		}
	}
	nodeDir := filepath.Join(tlsDir, "dev")
	if _, err := os.Stat(filepath.Join(nodeDir, "node.pem")); err != nil {
		if _, err := cluster.CreateNodeCert(cluster.CertOptions{
			Dir: nodeDir, NodeID: "dev",
			CACertFile: filepath.Join(tlsDir, "ca.pem"), CAKeyFile: filepath.Join(tlsDir, "ca-key.pem"),
		}); err != nil {
			return err
		}
	}
	adminSocket := filepath.Join(dir, "admin.sock")
	srv, err := server.New(server.Config{
		NodeID:      "dev",
		TrustDomain: s.cfg.TrustDomain,
		DataDir:     filepath.Join(dir, "server"),
		AdminSocket: adminSocket,
		HealthAddr:  fmt.Sprintf("127.0.0.1:%d", p.Health),
		AgentAddr:   fmt.Sprintf("127.0.0.1:%d", p.Agent),
		// JWT-SVIDs name the trust domain's OIDC issuer, which is how the
		// bridge (and Entra) know whose keys verify them; the server serves
		// its discovery document and JWKS there.
		OIDC:   server.OIDCConfig{Addr: fmt.Sprintf("127.0.0.1:%d", p.OIDC), Issuer: fmt.Sprintf("https://localhost:%d", p.OIDC)},
		Logger: s.log.With("role", "server"),
		Cluster: server.ClusterConfig{
			BindAddr:  fmt.Sprintf("127.0.0.1:%d", p.Cluster),
			Bootstrap: true,
			TLS: cluster.TLSFiles{
				CAFile:   filepath.Join(tlsDir, "ca.pem"),
				CertFile: filepath.Join(nodeDir, "node.pem"),
				KeyFile:  filepath.Join(nodeDir, "node-key.pem"),
			},
		},
	})
	if err != nil {
		return err
	}
	errc := make(chan error, 4)
	go func() { errc <- srv.Run(ctx) }()
	select {
	case err := <-errc:
		return err
	case <-srv.Ready():
	}

	br, tenant, err := s.startBridge(ctx, adminSocket, fmt.Sprintf("127.0.0.1:%d", p.Bridge), errc)
	if err != nil {
		return err
	}
	// The agent's managed-identity endpoint (Arc style) trades JWT-SVIDs at
	// the bridge. Arc clients insist on challenge files under
	// /var/opt/azcmagent/tokens; the dev stack keeps its own elsewhere so the
	// host stays untouched (curl and VM-style clients do not care).
	imdsAddr := fmt.Sprintf("127.0.0.1:%d", p.IMDS)
	tokens, err := TokenDir(dir)
	if err != nil {
		return err
	}
	ag, err := s.startAgent(ctx, srv, adminSocket, fmt.Sprintf("127.0.0.1:%d", p.Agent), &agent.IMDSConfig{
		ArcAddr:         imdsAddr,
		TokenDir:        tokens,
		Authority:       br.BaseURL(),
		AuthorityCAFile: br.CAFile(),
		AgentIdentities: true,
	}, errc)
	if err != nil {
		return err
	}
	demoURL, demoCmd, err := s.startDemoAPI(ctx, adminSocket, br, tenant, fmt.Sprintf("127.0.0.1:%d", p.DemoAPI), errc)
	if err != nil {
		return err
	}
	agentSocket := filepath.Join(dir, "public", "api.sock")
	env := map[string]string{
		"AZURE_AUTHORITY_HOST":   br.BaseURL(),
		"AZURE_TENANT_ID":        tenant,
		"FERRY_BRIDGE_CA":        br.CAFile(),
		"FERRY_JWT_ISSUER":       fmt.Sprintf("https://localhost:%d", p.OIDC),
		"FERRY_ADMIN_SOCKET":     adminSocket,
		"FERRY_TRUST_DOMAIN":     s.cfg.TrustDomain.String(),
		"SPIFFE_ENDPOINT_SOCKET": "unix://" + agentSocket,
		"FERRY_AGENT_ID":         ag.Session().SpiffeID().String(),
		"IDENTITY_ENDPOINT":      "http://" + imdsAddr + "/metadata/identity/oauth2/token",
		"IMDS_ENDPOINT":          "http://" + imdsAddr,
		"DEMO_API":               demoURL,
	}
	envFile := filepath.Join(dir, "env")
	if err := writeEnv(envFile, env); err != nil {
		return err
	}
	td := s.cfg.TrustDomain.String()
	fmt.Fprint(s.cfg.Out, strings.NewReplacer("{td}", td, "{env}", envFile, "{demo-cmd}", demoCmd).Replace(walkthrough))
	// The first part to end ends them all; the others get a moment to
	// finish (the agent removes outstanding challenge files).
	err = <-errc
	stop()
	for range 3 {
		select {
		case <-errc:
		case <-time.After(10 * time.Second):
			return err
		}
	}
	return err
}

// DemoResource is the API ferry dev registers and serves with the demo API:
// its identifier URI and the app role callers need.
const (
	DemoResource = "api://demo"
	DemoRole     = "reader"
)

// walkthrough is printed once the stack is ready. Every indented line that is
// not a comment runs as printed, in order, in bash (test/e2e runs it so). A
// trailing comment that starts with an HTTP status, or with a quoted string,
// says what the command shows.
const walkthrough = `
ferry is running (trust domain {td}). In another shell (bin/ on your PATH):

  . {env}
  # an identity for this user's processes, delivered by the Workload API
  ferry entry create --spiffe-id spiffe://{td}/web --parent-id $FERRY_AGENT_ID --selector unix:uid:$(id -u)
  ferry api fetch x509
  ferry api fetch jwt --audience api://AzureADTokenExchange

  # an Entra-style managed identity federated to that SPIFFE ID
  ferry identity create --name web-id
  ferry identity federated-credential create --identity-name web-id --name web \
      --issuer $FERRY_JWT_ISSUER --subject spiffe://{td}/web

  # ferry dev registered the API api://demo (app role reader) and serves it at
  # $DEMO_API, as this command would with the env file sourced:
  #   {demo-cmd}
  # trade the JWT-SVID for an access token at the bridge, and call the API:
  tok=$(curl -s --cacert $FERRY_BRIDGE_CA $AZURE_AUTHORITY_HOST/$AZURE_TENANT_ID/oauth2/v2.0/token \
      -d grant_type=client_credentials -d scope=api://demo/.default \
      -d client_id=$(ferry identity show --name web-id --output json | sed -n 's/.*"client_id": "\(.*\)".*/\1/p') \
      -d client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer \
      -d client_assertion=$(ferry api fetch jwt --audience api://AzureADTokenExchange) | sed -n 's/.*"access_token":"\([^"]*\)".*/\1/p')
  curl -si -H "Authorization: Bearer $tok" $DEMO_API       # 403: "insufficient_scope", web-id does not hold the role yet
  ferry role assign --identity-name web-id --resource api://demo --role reader

  # or let the agent do all that, as Azure Arc's endpoint does for Azure SDKs
  # (IDENTITY_ENDPOINT and IMDS_ENDPOINT are in the env file): a request without
  # a secret is answered 401, naming a file that only the caller can read
  curl -si -H Metadata:true "$IDENTITY_ENDPOINT?api-version=2020-06-01&resource=api://demo"   # 401: "Www-Authenticate: Basic realm=/"
  p=$(curl -s -D - -H Metadata:true "$IDENTITY_ENDPOINT?api-version=2020-06-01&resource=api://demo" | grep Www-Authenticate | cut -d "=" -f 2 | tr -d "[:cntrl:]")
  ls -l $p                                                 # "-rw-------": yours only
  # the second request sends the file's content, and gets the token
  curl -s -H Metadata:true -H "Authorization: Basic $(cat $p)" "$IDENTITY_ENDPOINT?api-version=2020-06-01&resource=api://demo"   # "access_token"
  # the same two steps as a shell function, and the API called with the token
  mi() { p=$(curl -s -D - -H Metadata:true "$IDENTITY_ENDPOINT?api-version=2020-06-01&resource=$1" | grep Www-Authenticate | cut -d "=" -f 2 | tr -d "[:cntrl:]"); curl -s -H Metadata:true -H "Authorization: Basic $(cat $p)" "$IDENTITY_ENDPOINT?api-version=2020-06-01&resource=$1"; }
  curl -si -H "Authorization: Bearer $(mi api://demo | sed -n 's/.*"access_token":"\([^"]*\)".*/\1/p')" $DEMO_API    # 200: who called, with "roles":["reader"]

  # a token for another resource is refused by the API
  ferry resource create --name other --identifier-uri api://other
  curl -si -H "Authorization: Bearer $(mi api://other | sed -n 's/.*"access_token":"\([^"]*\)".*/\1/p')" $DEMO_API   # 401: "invalid_token", the audience is not accepted

  # another user's processes get nothing: they cannot read your challenge file,
  # and no entry selects them
  p=$(curl -s -D - -H Metadata:true "$IDENTITY_ENDPOINT?api-version=2020-06-01&resource=api://demo" | grep Www-Authenticate | cut -d "=" -f 2 | tr -d "[:cntrl:]")
  sudo -u nobody cat $p                                    # "Permission denied"
  sudo -u nobody bash -c "$(declare -f mi); IDENTITY_ENDPOINT=$IDENTITY_ENDPOINT mi api://demo"   # "Identity not found"

Stop with Ctrl-C; start again with the same data dir to carry on where you left off.
`

// startDemoAPI registers the demo resource (once per data dir) and serves the
// demo API on addr, trusting the bridge's CA. It returns the API's URL and the
// equivalent ferry demo-api command.
func (s *Stack) startDemoAPI(ctx context.Context, adminSocket string, br *service.Service, tenant, addr string, errc chan error) (string, string, error) {
	conn, err := grpc.NewClient("unix://"+adminSocket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return "", "", err
	}
	defer conn.Close()
	dir := ferrypb.NewDirectoryClient(conn)
	list, err := dir.ListResources(ctx, &ferrypb.ListResourcesRequest{TenantId: tenant})
	if err != nil {
		return "", "", fmt.Errorf("dev: resources: %w", err)
	}
	var appID string
	for _, r := range list.Resources {
		if slices.Contains(r.IdentifierUris, DemoResource) {
			appID = r.AppId
		}
	}
	if appID == "" {
		r, err := dir.CreateResource(ctx, &ferrypb.CreateResourceRequest{
			Name: "demo", TenantId: tenant, IdentifierUris: []string{DemoResource},
			AppRoles: []*ferrypb.AppRole{{Value: DemoRole}},
		})
		if err != nil {
			return "", "", fmt.Errorf("dev: demo resource: %w", err)
		}
		appID = r.AppId
	}
	client, err := demoapi.HTTPClient(br.CAFile())
	if err != nil {
		return "", "", err
	}
	api, err := demoapi.New(demoapi.Config{
		Authority: br.BaseURL(), Tenant: tenant, Audiences: []string{DemoResource, appID}, Role: DemoRole,
		HTTPClient: client, Logger: s.log.With("role", "demo-api"),
	})
	if err != nil {
		return "", "", err
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return "", "", fmt.Errorf("dev: demo API: %w", err)
	}
	go func() { errc <- api.Serve(ctx, ln, nil) }()
	cmd := fmt.Sprintf("ferry demo-api --listen %s --audience %s --audience %s --role %s", addr, DemoResource, appID, DemoRole)
	return "http://" + addr + "/", cmd, nil
}

// startAgent waits for the server's CA to publish its first keys, gets a join
// token through the admin socket, and starts an agent in this process.
func (s *Stack) startAgent(ctx context.Context, srv *server.Server, adminSocket, agentAddr string, imdsCfg *agent.IMDSConfig, errc chan error) (*agent.Agent, error) {
	var roots []*x509.Certificate
	for len(roots) == 0 {
		if b := srv.Store().View().Bundle(s.cfg.TrustDomain.String()); b != nil {
			for _, a := range b.X509Authorities {
				if c, err := x509.ParseCertificate(a.Certificate); err == nil {
					roots = append(roots, c)
				}
			}
		}
		if len(roots) > 0 {
			break
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case err := <-errc:
			return nil, err
		case <-time.After(100 * time.Millisecond):
		}
	}
	conn, err := grpc.NewClient("unix://"+adminSocket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	tok, err := ferrypb.NewAdminClient(conn).CreateJoinToken(ctx, &ferrypb.CreateJoinTokenRequest{
		SpiffeId:   spiffeid.RequireFromPath(s.cfg.TrustDomain, "/spire/agent/dev").String(),
		TtlSeconds: 600,
	})
	if err != nil {
		return nil, fmt.Errorf("dev: join token: %w", err)
	}
	at, err := jointoken.NewAgent(jointoken.AgentConfig{Token: tok.Token})
	if err != nil {
		return nil, err
	}
	ag, err := agent.New(agent.Config{
		TrustDomain:  s.cfg.TrustDomain,
		Servers:      []string{agentAddr},
		TrustBundle:  roots,
		DataDir:      filepath.Join(s.cfg.DataDir, "agent"),
		SocketPath:   filepath.Join(s.cfg.DataDir, "public", "api.sock"),
		NodeAttestor: at,
		IMDS:         imdsCfg,
		Logger:       s.log.With("role", "agent"),
	})
	if err != nil {
		return nil, err
	}
	go func() { errc <- ag.Run(ctx) }()
	select {
	case <-ag.Session().Ready():
		return ag, nil
	case err := <-errc:
		return nil, err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// startBridge makes sure a tenant exists and starts a bridge replica in this
// process, following the server's directory through the admin socket.
func (s *Stack) startBridge(ctx context.Context, adminSocket, addr string, errc chan error) (*service.Service, string, error) {
	conn, err := grpc.NewClient("unix://"+adminSocket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, "", err
	}
	defer conn.Close()
	dir := ferrypb.NewDirectoryClient(conn)
	tenants, err := dir.ListTenants(ctx, &ferrypb.ListTenantsRequest{})
	if err != nil {
		return nil, "", fmt.Errorf("dev: tenants: %w", err)
	}
	var tenant string
	if len(tenants.Tenants) > 0 {
		tenant = tenants.Tenants[0].Id
	} else {
		t, err := dir.CreateTenant(ctx, &ferrypb.CreateTenantRequest{Name: "default"})
		if err != nil {
			return nil, "", fmt.Errorf("dev: tenant: %w", err)
		}
		tenant = t.Id
	}
	br, err := service.New(service.Config{
		ListenAddr:    addr,
		DataDir:       filepath.Join(s.cfg.DataDir, "bridge"),
		ServerSockets: []string{adminSocket},
		Name:          "dev",
		Logger:        s.log.With("role", "bridge"),
	})
	if err != nil {
		return nil, "", err
	}
	go func() { errc <- br.Run(ctx) }()
	select {
	case <-br.Ready():
		return br, tenant, nil
	case err := <-errc:
		return nil, "", err
	case <-ctx.Done():
		return nil, "", ctx.Err()
	}
}

// TokenDir is where the agent writes Arc challenge files: every caller must
// open the file named to it, so the directory must be reachable by every
// user. That is dataDir/tokens when each directory above it lets others
// traverse it; otherwise (home directories often are 0750) a directory of
// this user's under the system temp dir, one per data dir.
func TokenDir(dataDir string) (string, error) {
	if traversable(dataDir) {
		return filepath.Join(dataDir, "tokens"), nil
	}
	sum := sha256.Sum256([]byte(dataDir))
	parent := filepath.Join(os.TempDir(), fmt.Sprintf("ferry-dev-%d-%x", os.Geteuid(), sum[:6]))
	// In a shared temp dir the name may have been taken by someone else:
	// securedir refuses it then.
	if err := securedir.MkdirAll(parent, 0o711); err != nil {
		return "", fmt.Errorf("dev: %w", err)
	}
	return filepath.Join(parent, "tokens"), nil
}

// traversable reports whether every user may traverse dir and each
// directory above it.
func traversable(dir string) bool {
	for d := dir; ; d = filepath.Dir(d) {
		fi, err := os.Stat(d)
		if err != nil || fi.Mode().Perm()&0o001 == 0 {
			return false
		}
		if d == filepath.Dir(d) {
			return true
		}
	}
}

// writeEnv writes lines of `export NAME=value`, sorted, quoted for sh.
func writeEnv(path string, env map[string]string) error {
	names := make([]string, 0, len(env))
	for k := range env {
		names = append(names, k)
	}
	sort.Strings(names)
	var b strings.Builder
	for _, k := range names {
		fmt.Fprintf(&b, "export %s='%s'\n", k, strings.ReplaceAll(env[k], "'", `'\''`))
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(b.String()), 0o600); err != nil {
		return fmt.Errorf("dev: %w", err)
	}
	return os.Rename(tmp, path)
}
