// Package dev runs a whole ferry on one machine in one process, for trying it out:
// a one-node server with everything it needs generated under a data directory.
// `make run` starts it. Nothing here is for production: the cluster CA key lives
// next to the data it protects.
package dev

import (
	"cmp"
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
	"sync"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/ferry-id/ferry/agent"
	"github.com/ferry-id/ferry/agent/imds"
	"github.com/ferry-id/ferry/attestors/node/jointoken"
	"github.com/ferry-id/ferry/bridge/service"
	"github.com/ferry-id/ferry/demoapi"
	"github.com/ferry-id/ferry/internal/securedir"
	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server"
	"github.com/ferry-id/ferry/server/api"
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
	IMDSVM  int `json:"imds_vm"`
	DemoAPI int `json:"demo_api"`
}

// openPorts opens a loopback listener for every port of the stack and keeps
// it for the role that serves there (listeners.Listen), so no other process
// can take a port between its choice and its use. A new data dir gets free
// ports; a restart gets the ports it had. A saved port another process has
// taken meanwhile is replaced, except the cluster port (it is in the Raft
// configuration) and the OIDC port (it is in the issuer URL every JWT-SVID
// and federated credential names).
func (s *Stack) openPorts() (ports, *listeners, error) {
	path := filepath.Join(s.cfg.DataDir, "ports.json")
	var p ports
	if data, err := os.ReadFile(path); err == nil {
		if err := json.Unmarshal(data, &p); err != nil {
			return p, nil, fmt.Errorf("dev: %s: %w", path, err)
		}
	}
	held := &listeners{held: map[string]net.Listener{}}
	changed := false
	for _, port := range []struct {
		name   string
		n      *int
		stable bool
	}{
		{"cluster", &p.Cluster, true}, {"oidc", &p.OIDC, true}, {"health", &p.Health, false}, {"agent", &p.Agent, false},
		{"bridge", &p.Bridge, false}, {"imds", &p.IMDS, false}, {"imds_vm", &p.IMDSVM, false}, {"demo_api", &p.DemoAPI, false},
	} {
		if *port.n != 0 {
			ln, err := net.Listen("tcp", loopback(*port.n))
			if err == nil {
				held.held[loopback(*port.n)] = ln
				continue
			}
			if port.stable || !errors.Is(err, syscall.EADDRINUSE) {
				held.closeRest()
				return p, nil, fmt.Errorf("dev: the %s port saved in %s: %w (stop what holds it, or remove %s to start afresh)", port.name, path, err, s.cfg.DataDir)
			}
			s.log.Warn("a port of the stack is taken by another process; using another", "port", port.name, "was", *port.n)
		}
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			held.closeRest()
			return p, nil, fmt.Errorf("dev: %w", err)
		}
		*port.n = ln.Addr().(*net.TCPAddr).Port
		held.held[loopback(*port.n)] = ln
		changed = true
	}
	if changed {
		data, _ := json.Marshal(p)
		if err := os.WriteFile(path, data, 0o600); err != nil {
			held.closeRest()
			return p, nil, fmt.Errorf("dev: %w", err)
		}
	}
	return p, held, nil
}

func loopback(port int) string { return fmt.Sprintf("127.0.0.1:%d", port) }

// listeners are the stack's listeners, opened before any role starts; each
// is handed to the role that asks for its address.
type listeners struct {
	mu   sync.Mutex
	held map[string]net.Listener
}

// Listen hands over the listener opened for address, or opens one.
func (l *listeners) Listen(network, address string) (net.Listener, error) {
	l.mu.Lock()
	ln, ok := l.held[address]
	delete(l.held, address)
	l.mu.Unlock()
	if ok && network == "tcp" {
		return ln, nil
	}
	if ok {
		ln.Close()
	}
	return net.Listen(network, address)
}

// closeRest closes the listeners no role took.
func (l *listeners) closeRest() {
	l.mu.Lock()
	defer l.mu.Unlock()
	for a, ln := range l.held {
		ln.Close()
		delete(l.held, a)
	}
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
	p, held, err := s.openPorts()
	if err != nil {
		return err
	}
	defer held.closeRest()
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
	issuer := fmt.Sprintf("https://localhost:%d", p.OIDC)
	srv, err := server.New(server.Config{
		NodeID:      "dev",
		TrustDomain: s.cfg.TrustDomain,
		DataDir:     filepath.Join(dir, "server"),
		AdminSocket: adminSocket,
		HealthAddr:  loopback(p.Health),
		AgentAddr:   loopback(p.Agent),
		// JWT-SVIDs name the trust domain's OIDC issuer, which is how the
		// bridge (and Entra) know whose keys verify them; the server serves
		// its discovery document and JWKS there.
		OIDC:   server.OIDCConfig{Addr: loopback(p.OIDC), Issuer: issuer},
		Logger: s.log.With("role", "server"),
		Listen: held.Listen,
		Cluster: server.ClusterConfig{
			BindAddr:  loopback(p.Cluster),
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
	// The first part to end ends them all; the others get a moment to
	// finish (the agent removes outstanding challenge files).
	g := &parts{errc: make(chan error, 4)}
	errc := g.errc
	defer g.stop(stop, 10*time.Second)
	g.start(func() error { return srv.Run(ctx) })
	// Everything below reads the server's state ("is there a tenant yet?"),
	// so it waits until the server has replayed its log: before that, a
	// restarted server holds only its last snapshot.
	for _, ch := range []<-chan struct{}{srv.Ready(), srv.CaughtUp()} {
		select {
		case err := <-errc:
			return err
		case <-ctx.Done():
			return nil
		case <-ch:
		}
	}
	conn, err := grpc.NewClient("unix://"+adminSocket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	dirc := ferrypb.NewDirectoryClient(conn)
	tenant, err := s.ensureTenant(ctx, dirc)
	if err != nil {
		return err
	}
	appID, err := s.ensureDemoResource(ctx, dirc, tenant)
	if err != nil {
		return err
	}

	br, err := s.startBridge(ctx, adminSocket, loopback(p.Bridge), held, g)
	if err != nil {
		return err
	}
	// The agent's managed-identity endpoint, Arc style and VM style, trades
	// JWT-SVIDs at the bridge.
	arc, err := chooseArc(imds.DefaultTokenDir, imds.DefaultArcAddress, dir)
	if err != nil {
		return err
	}
	defer arc.release()
	if arc.why != "" {
		s.log.Info("Azure SDKs will refuse the Arc endpoint", "reason", arc.why, "challenge_files", arc.dir)
	}
	ag, err := s.startAgent(ctx, srv, ferrypb.NewAdminClient(conn), loopback(p.Agent), &agent.IMDSConfig{
		ArcAddr:         loopback(p.IMDS),
		TokenDir:        arc.dir,
		VM:              true,
		VMAddr:          loopback(p.IMDSVM),
		Authority:       br.BaseURL(),
		AuthorityCAFile: br.CAFile(),
		AgentIdentities: true,
		Listen:          held.Listen,
	}, g)
	if err != nil {
		return err
	}
	demoURL, demoCmd, err := s.startDemoAPI(ctx, br, tenant, appID, loopback(p.DemoAPI), held, g)
	if err != nil {
		return err
	}
	agentSocket := filepath.Join(dir, "public", "api.sock")
	arcURL := "http://" + loopback(p.IMDS)
	env := map[string]string{
		"AZURE_AUTHORITY_HOST":   br.BaseURL(),
		"AZURE_TENANT_ID":        tenant,
		"FERRY_BRIDGE_CA":        br.CAFile(),
		"FERRY_JWT_ISSUER":       issuer,
		"FERRY_ADMIN_SOCKET":     adminSocket,
		"FERRY_TRUST_DOMAIN":     s.cfg.TrustDomain.String(),
		"SPIFFE_ENDPOINT_SOCKET": "unix://" + agentSocket,
		"FERRY_AGENT_ID":         ag.Session().SpiffeID().String(),
		"IDENTITY_ENDPOINT":      arcURL + imds.TokenPath,
		"IMDS_ENDPOINT":          arcURL,
		// The VM-style endpoint, for the SDKs that can be pointed at one
		// (@azure/identity, msal-node, Python's azure-identity and msal).
		"AZURE_POD_IDENTITY_AUTHORITY_HOST": "http://" + loopback(p.IMDSVM),
		"DEMO_API":                          demoURL,
	}
	envFile := filepath.Join(dir, "env")
	if err := writeEnv(envFile, env); err != nil {
		return err
	}
	fmt.Fprint(s.cfg.Out, s.walkthrough(envFile, demoCmd, arc))
	select {
	case err = <-errc:
		return err
	case <-ctx.Done():
		return nil
	}
}

// parts are the roles of a running stack, each in its own goroutine.
type parts struct {
	wg   sync.WaitGroup
	errc chan error // one slot per part, so none blocks on its way out
}

func (g *parts) start(f func() error) {
	g.wg.Add(1)
	go func() {
		defer g.wg.Done()
		g.errc <- f()
	}()
}

// stop cancels the parts' context and waits at most d for them to end.
func (g *parts) stop(cancel context.CancelFunc, d time.Duration) {
	cancel()
	done := make(chan struct{})
	go func() { g.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(d):
	}
}

// ensureTenant returns the stack's tenant, creating it when there is none.
// The tenant created has the ID every "create the default tenant" derives
// (api.DefaultTenantID), so no two starts can ever make two.
func (s *Stack) ensureTenant(ctx context.Context, dir ferrypb.DirectoryClient) (string, error) {
	list, err := dir.ListTenants(ctx, &ferrypb.ListTenantsRequest{})
	if err != nil {
		return "", fmt.Errorf("dev: tenants: %w", err)
	}
	switch ts := list.Tenants; {
	case len(ts) == 1:
		return ts[0].Id, nil
	case len(ts) > 1:
		// Earlier versions of ferry dev made one per start; the first one
		// is the one the first env file named.
		oldest := slices.MinFunc(ts, func(a, b *ferrypb.Tenant) int { return cmp.Compare(a.Revision, b.Revision) })
		s.log.Warn("the data dir holds several tenants; using the oldest", "tenants", len(ts), "tenant", oldest.Id)
		return oldest.Id, nil
	}
	id := api.DefaultTenantID(s.cfg.TrustDomain.Name())
	if _, err := dir.CreateTenant(ctx, &ferrypb.CreateTenantRequest{Id: id, Name: api.DefaultTenantName}); err != nil && status.Code(err) != codes.AlreadyExists {
		return "", fmt.Errorf("dev: tenant: %w", err)
	}
	return id, nil
}

// demoResourceRequestID makes the demo resource's creation a retry-safe
// write; identifier URIs are unique in a tenant, so there is only ever one.
const demoResourceRequestID = "ferry-dev/demo-resource"

// ensureDemoResource registers the demo API (once per data dir) and returns
// its app ID.
func (s *Stack) ensureDemoResource(ctx context.Context, dir ferrypb.DirectoryClient, tenant string) (string, error) {
	find := func() (string, error) {
		list, err := dir.ListResources(ctx, &ferrypb.ListResourcesRequest{TenantId: tenant})
		if err != nil {
			return "", fmt.Errorf("dev: resources: %w", err)
		}
		for _, r := range list.Resources {
			if slices.Contains(r.IdentifierUris, DemoResource) {
				return r.AppId, nil
			}
		}
		return "", nil
	}
	if appID, err := find(); err != nil || appID != "" {
		return appID, err
	}
	r, err := dir.CreateResource(ctx, &ferrypb.CreateResourceRequest{
		Name: "demo", TenantId: tenant, IdentifierUris: []string{DemoResource},
		AppRoles: []*ferrypb.AppRole{{Value: DemoRole}}, RequestId: demoResourceRequestID,
	})
	if status.Code(err) == codes.AlreadyExists {
		return find()
	}
	if err != nil {
		return "", fmt.Errorf("dev: demo resource: %w", err)
	}
	return r.AppId, nil
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
ferry is running (trust domain {td}). In another shell:

  export PATH="{bin}:$PATH"   # where the ferry binary is (make build puts it in bin/)
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
  # a token carries the roles its identity held when it was issued: this one
  # still has none, and a new one is needed (below, the agent gets one)
  curl -si -H "Authorization: Bearer $tok" $DEMO_API       # 403: "insufficient_scope"

  # or let the agent do all that, as Azure Arc's endpoint does for Azure SDKs
  # (IDENTITY_ENDPOINT and IMDS_ENDPOINT are in the env file): a request without
  # a secret is answered 401, naming a file that only the caller can read
{arc-note}
  curl -si -H Metadata:true "$IDENTITY_ENDPOINT?api-version=2020-06-01&resource=api://demo"   # 401: "Www-Authenticate: Basic realm=/"
  p=$(curl -s -D - -H Metadata:true "$IDENTITY_ENDPOINT?api-version=2020-06-01&resource=api://demo" | grep Www-Authenticate | cut -d "=" -f 2 | tr -d "[:cntrl:]")
  ls -l $p                                                 # "-rw-------": yours only
  # the second request sends the file's content, and gets the token
  curl -s -H Metadata:true -H "Authorization: Basic $(cat $p)" "$IDENTITY_ENDPOINT?api-version=2020-06-01&resource=api://demo"   # "access_token"
  # the same two steps as a shell function, and the API called with the token
  mi() { p=$(curl -s -D - -H Metadata:true "$IDENTITY_ENDPOINT?api-version=2020-06-01&resource=$1" | grep Www-Authenticate | cut -d "=" -f 2 | tr -d "[:cntrl:]"); curl -s -H Metadata:true -H "Authorization: Basic $(cat $p)" "$IDENTITY_ENDPOINT?api-version=2020-06-01&resource=$1"; }
  curl -si -H "Authorization: Bearer $(mi api://demo | sed -n 's/.*"access_token":"\([^"]*\)".*/\1/p')" $DEMO_API    # 200: who called, with "roles":["reader"]

  # the VM-style endpoint (what an Azure VM serves at 169.254.169.254) needs no
  # challenge. Azure SDKs that honour AZURE_POD_IDENTITY_AUTHORITY_HOST (in the
  # env file) call it once IDENTITY_ENDPOINT and IMDS_ENDPOINT are unset:
  # @azure/identity, msal-node, Python's azure-identity and msal. Go's azidentity
  # and MSAL always call 169.254.169.254:80 (a real agent can serve there:
  # imds { vm = true, add_loopback_address = true } in agent.conf)
  curl -s -H Metadata:true "$AZURE_POD_IDENTITY_AUTHORITY_HOST/metadata/identity/oauth2/token?api-version=2018-02-01&resource=api://demo"   # "access_token"

  # a token for another resource is refused by the API
  ferry resource create --name other --identifier-uri api://other
  curl -si -H "Authorization: Bearer $(mi api://other | sed -n 's/.*"access_token":"\([^"]*\)".*/\1/p')" $DEMO_API   # 401: "invalid_token", the audience is not accepted

  # another user's processes get nothing: they cannot read your challenge file,
  # and no entry selects them (as root: setpriv, from util-linux, runs a
  # command as another user; uid and gid 65534 are nobody's)
  p=$(curl -s -D - -H Metadata:true "$IDENTITY_ENDPOINT?api-version=2020-06-01&resource=api://demo" | grep Www-Authenticate | cut -d "=" -f 2 | tr -d "[:cntrl:]")
  setpriv --reuid=65534 --regid=65534 --clear-groups cat $p   # "Permission denied"
  setpriv --reuid=65534 --regid=65534 --clear-groups bash -c "$(declare -f mi); IDENTITY_ENDPOINT=$IDENTITY_ENDPOINT mi api://demo"   # "Identity not found"
  setpriv --reuid=65534 --regid=65534 --clear-groups curl -s -H Metadata:true "$AZURE_POD_IDENTITY_AUTHORITY_HOST/metadata/identity/oauth2/token?api-version=2018-02-01&resource=api://demo"   # "Identity not found"

Stop with Ctrl-C; start again with the same data dir to carry on where you left off
(what you created above is still there: running its create commands again says so).
`

// arcNoteReady and arcNoteRefused tell, once, whether unmodified Azure SDKs
// accept the Arc endpoint's challenge files.
const (
	arcNoteReady = `  # the challenge files are in ` + imds.DefaultTokenDir + `, so unmodified Azure SDKs
  # (azidentity, MSAL, @azure/identity, azure-identity) work against this endpoint`
	arcNoteRefused = `  # the challenge files are in {arc-dir}: Azure SDKs refuse this endpoint,
  # accepting challenge files only under ` + imds.DefaultTokenDir + `, and {why}.
  # Start ferry dev as root for that, or use the VM-style endpoint below`
)

func (s *Stack) walkthrough(envFile, demoCmd string, arc arcSetup) string {
	note := arcNoteReady
	if arc.why != "" {
		note = strings.NewReplacer("{arc-dir}", arc.dir, "{why}", arc.why).Replace(arcNoteRefused)
	}
	bin := "bin"
	if exe, err := os.Executable(); err == nil {
		bin = filepath.Dir(exe)
	}
	return strings.NewReplacer("{td}", s.cfg.TrustDomain.String(), "{env}", envFile, "{demo-cmd}", demoCmd,
		"{arc-note}", note, "{bin}", bin).Replace(walkthrough)
}

// startDemoAPI serves the demo API on addr, trusting the bridge's CA. It
// returns the API's URL and the equivalent ferry demo-api command.
func (s *Stack) startDemoAPI(ctx context.Context, br *service.Service, tenant, appID, addr string, held *listeners, g *parts) (string, string, error) {
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
	ln, err := held.Listen("tcp", addr)
	if err != nil {
		return "", "", fmt.Errorf("dev: demo API: %w", err)
	}
	g.start(func() error { return api.Serve(ctx, ln, nil) })
	cmd := fmt.Sprintf("ferry demo-api --listen %s --audience %s --audience %s --role %s", addr, DemoResource, appID, DemoRole)
	return "http://" + addr + "/", cmd, nil
}

// startAgent waits for the server's CA to publish its first keys and starts
// an agent in this process. The agent attests with a join token only when it
// has no usable SVID of its own; the token is made then, through the admin
// API.
func (s *Stack) startAgent(ctx context.Context, srv *server.Server, admin ferrypb.AdminClient, agentAddr string, imdsCfg *agent.IMDSConfig, g *parts) (*agent.Agent, error) {
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
		case err := <-g.errc:
			return nil, err
		case <-time.After(100 * time.Millisecond):
		}
	}
	ag, err := agent.New(agent.Config{
		TrustDomain: s.cfg.TrustDomain,
		Servers:     []string{agentAddr},
		TrustBundle: roots,
		DataDir:     filepath.Join(s.cfg.DataDir, "agent"),
		SocketPath:  filepath.Join(s.cfg.DataDir, "public", "api.sock"),
		NodeAttestor: joinTokenOnDemand{admin: admin,
			agentID: spiffeid.RequireFromPath(s.cfg.TrustDomain, "/spire/agent/dev").String()},
		IMDS:   imdsCfg,
		Logger: s.log.With("role", "agent"),
	})
	if err != nil {
		return nil, err
	}
	g.start(func() error { return ag.Run(ctx) })
	select {
	case <-ag.Session().Ready():
		return ag, nil
	case err := <-g.errc:
		return nil, err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// joinTokenOnDemand is the dev agent's node attestor: a join token for the
// dev agent's SPIFFE ID, made when the agent attests (a restarted agent with
// a valid SVID does not), so no start leaves an unused token behind.
type joinTokenOnDemand struct {
	admin   ferrypb.AdminClient
	agentID string
}

func (j joinTokenOnDemand) Name() string { return jointoken.Name }

func (j joinTokenOnDemand) Payload(ctx context.Context) ([]byte, error) {
	tok, err := j.admin.CreateJoinToken(ctx, &ferrypb.CreateJoinTokenRequest{SpiffeId: j.agentID, TtlSeconds: 600})
	if err != nil {
		return nil, fmt.Errorf("dev: join token: %w", err)
	}
	at, err := jointoken.NewAgent(jointoken.AgentConfig{Token: tok.Token})
	if err != nil {
		return nil, err
	}
	return at.Payload(ctx)
}

func (j joinTokenOnDemand) Respond(ctx context.Context, challenge []byte) ([]byte, error) {
	return (&jointoken.Agent{}).Respond(ctx, challenge)
}

// startBridge starts a bridge replica in this process, following the
// server's directory through the admin socket.
func (s *Stack) startBridge(ctx context.Context, adminSocket, addr string, held *listeners, g *parts) (*service.Service, error) {
	br, err := service.New(service.Config{
		ListenAddr:    addr,
		DataDir:       filepath.Join(s.cfg.DataDir, "bridge"),
		ServerSockets: []string{adminSocket},
		Name:          "dev",
		Logger:        s.log.With("role", "bridge"),
		Listen:        held.Listen,
	})
	if err != nil {
		return nil, err
	}
	g.start(func() error { return br.Run(ctx) })
	select {
	case <-br.Ready():
		return br, nil
	case err := <-g.errc:
		return nil, err
	case <-ctx.Done():
		return nil, ctx.Err()
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
