package agent

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"

	"github.com/ferry-id/ferry/agent/identities"
	"github.com/ferry-id/ferry/agent/imds"
	"github.com/ferry-id/ferry/agent/peer"
	"github.com/ferry-id/ferry/agent/tokens"
	"github.com/ferry-id/ferry/agent/workloadapi"
	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/ca"
)

// IMDSConfig configures the agent's managed-identity token endpoint (agent.conf
// `imds` block).
type IMDSConfig struct {
	// ArcAddr is the Arc-style listener; "" disables it.
	ArcAddr string
	// VM enables the VM-style listener on VMAddr; AddLoopbackAddress adds
	// VMAddr's IP to lo first (needs CAP_NET_ADMIN).
	VM                 bool
	VMAddr             string
	AddLoopbackAddress bool
	// TokenDir holds the Arc challenge files.
	TokenDir string
	// Authority is the Entra-style token service (https URL); AuthorityCAFile,
	// when set, holds the only roots trusted for it.
	Authority       string
	AuthorityCAFile string
	// TenantID overrides the identity's tenant in exchanges.
	TenantID string
	// AllowedGroups, when set, admits only root and members of these groups
	// (imds.Config.AllowedGroups; agent.conf allowed_groups).
	AllowedGroups []uint32
	// AgentIdentities lets every admitted caller use the agent's own
	// identities too (identities.Config.Agent; agent.conf agent_identities,
	// on by default).
	AgentIdentities bool
	// Listen opens the endpoint's listeners; default net.Listen.
	Listen func(network, address string) (net.Listener, error)
	// IdentityCacheTTL is how long the servers' answer about the identities
	// a SPIFFE ID may use is reused while the agent's entries stay the same
	// (identities.Config.TTL; agent.conf identity_cache_ttl); zero takes
	// the default, 30 s.
	IdentityCacheTTL time.Duration
}

// agentSelf gives the identities resolver the agent's own SPIFFE ID and
// JWT-SVIDs: the session knows the ID, the cache keeps the tokens.
type agentSelf struct{ a *Agent }

func (s agentSelf) SPIFFEID() string {
	id := s.a.session.SpiffeID()
	if id.IsZero() {
		return ""
	}
	return id.String()
}

func (s agentSelf) JWTSVID(ctx context.Context, agentID string, audience []string) (string, error) {
	svid, err := s.a.cache.FetchAgentJWTSVID(ctx, agentID, audience)
	if err != nil {
		return "", err
	}
	return svid.Token, nil
}

func loadCertPool(path string) (*x509.CertPool, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("agent: imds: authority_ca_file: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(data) {
		return nil, fmt.Errorf("agent: imds: authority_ca_file %s holds no PEM certificate", path)
	}
	return pool, nil
}

// imdsListeners are the token endpoint's listeners (nil: that style is off).
type imdsListeners struct{ arc, vm net.Listener }

// bindIMDS binds the token endpoint's listeners. Run calls it before the
// agent opens any connection of its own: the Arc port, 40342, lies in Linux's
// ephemeral port range, and one of the agent's connections to the servers
// could otherwise hold it as its local port when the endpoint binds.
func (a *Agent) bindIMDS() (imdsListeners, error) {
	var l imdsListeners
	c := a.cfg.IMDS
	if c == nil {
		return l, nil
	}
	var err error
	if c.ArcAddr != "" {
		if l.arc, err = listenIMDS(c.Listen, c.ArcAddr, false); err != nil {
			return imdsListeners{}, err
		}
	}
	if c.VM {
		if l.vm, err = listenIMDS(c.Listen, c.VMAddr, c.AddLoopbackAddress); err != nil {
			l.close()
			return imdsListeners{}, err
		}
	}
	return l, nil
}

func (l imdsListeners) close() {
	for _, ln := range []net.Listener{l.arc, l.vm} {
		if ln != nil {
			_ = ln.Close()
		}
	}
}

// startIMDS builds the token endpoint's servers on lns and the connection it
// asks the servers through; the caller runs them and closes the connection.
// The servers own lns from then on; on an error they are closed.
func (a *Agent) startIMDS(attestor workloadapi.Attestor, lns imdsListeners) (servers []*imds.Server, _ *grpc.ClientConn, err error) {
	defer func() {
		if err != nil {
			lns.close()
		}
	}()
	c := a.cfg.IMDS
	httpClient := &http.Client{Timeout: 30 * time.Second}
	if c.AuthorityCAFile != "" {
		pool, err := loadCertPool(c.AuthorityCAFile)
		if err != nil {
			return nil, nil, err
		}
		tr := http.DefaultTransport.(*http.Transport).Clone()
		tr.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
		httpClient.Transport = tr
	}
	exch, err := tokens.NewExchanger(tokens.ExchangerConfig{
		Authority: c.Authority, HTTPClient: httpClient, Logger: a.log,
	})
	if err != nil {
		return nil, nil, fmt.Errorf("agent: %w", err)
	}
	conn, err := a.dialServers()
	if err != nil {
		return nil, nil, err
	}
	finder := peer.New(peer.Config{})
	// The endpoint binds Arc challenges to the caller's uid (Azure's curl
	// example answers the challenge from a second process); Conns finds the
	// process for attestation.
	conns := identities.NewConns(finder)
	var self identities.Agent
	if c.AgentIdentities {
		self = agentSelf{a}
	}
	res, err := identities.New(identities.Config{
		Agent:     self,
		Attestor:  attestor,
		Workloads: a.cache,
		Directory: ferrypb.NewAgentClient(conn),
		Processes: finder,
		Conns:     conns,
		TenantID:  c.TenantID,
		TTL:       c.IdentityCacheTTL,
		Logger:    a.log,
	})
	if err != nil {
		conn.Close()
		return nil, nil, fmt.Errorf("agent: %w", err)
	}
	prov, err := tokens.New(tokens.Config{Identities: res, Assertions: res, Exchange: exch, Logger: a.log})
	if err != nil {
		conn.Close()
		return nil, nil, fmt.Errorf("agent: %w", err)
	}
	add := func(ic imds.Config, ln net.Listener) error {
		// Bound already (bindIMDS), the loopback address added.
		ic.Listener, ic.AddLoopbackAddress = conns.Listen(ln), false
		ic.Tokens, ic.Peers, ic.Logger = prov, finder, a.log
		ic.AllowedGroups = c.AllowedGroups
		s, err := imds.New(ic)
		if err != nil {
			return err
		}
		servers = append(servers, s)
		return nil
	}
	if lns.arc != nil {
		err = add(imds.Config{Mode: imds.ModeArc, Address: c.ArcAddr, TokenDir: c.TokenDir}, lns.arc)
	}
	if err == nil && lns.vm != nil {
		err = add(imds.Config{Mode: imds.ModeVM, Address: c.VMAddr}, lns.vm)
	}
	if err != nil {
		// Release what was built: Run with a done context closes the
		// listener and removes challenge files.
		done, cancel := context.WithCancel(context.Background())
		cancel()
		for _, s := range servers {
			_ = s.Run(done)
		}
		conn.Close()
		return nil, nil, fmt.Errorf("agent: %w", err)
	}
	return servers, conn, nil
}

// dialServers opens a connection to the servers' agent API that presents the
// session's current agent SVID on every handshake.
func (a *Agent) dialServers() (*grpc.ClientConn, error) {
	serverID := spiffeid.RequireFromPath(a.cfg.TrustDomain, ca.ServerPath)
	tlsCfg := tlsconfig.MTLSClientConfig(a.session, a.session, tlsconfig.AuthorizeID(serverID))
	res := manual.NewBuilderWithScheme("ferry-imds-servers")
	var addrs []resolver.Address
	for _, s := range a.cfg.Servers {
		addrs = append(addrs, resolver.Address{Addr: s})
	}
	res.InitialState(resolver.State{Addresses: addrs})
	conn, err := grpc.NewClient(res.Scheme()+":///servers",
		grpc.WithResolvers(res),
		grpc.WithTransportCredentials(credentials.NewTLS(tlsCfg)))
	if err != nil {
		return nil, fmt.Errorf("agent: %w", err)
	}
	return conn, nil
}

// runIMDS serves every endpoint server until ctx ends; errc gets the first
// failure.
func runIMDS(ctx context.Context, servers []*imds.Server, errc chan<- error) {
	for _, s := range servers {
		go func() { errc <- s.Run(ctx) }()
	}
}

// listenIMDS listens on addr, first adding its IP to lo when asked.
func listenIMDS(listen func(network, address string) (net.Listener, error), addr string, addLoopback bool) (net.Listener, error) {
	if listen == nil {
		listen = net.Listen
	}
	if addLoopback {
		ap, err := netip.ParseAddrPort(addr)
		if err != nil {
			return nil, fmt.Errorf("agent: imds address %q: %w", addr, err)
		}
		if err := imds.AddLoopbackAddress(ap.Addr()); err != nil {
			return nil, fmt.Errorf("agent: %w", err)
		}
	}
	ln, err := listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("agent: imds: %w", err)
	}
	return ln, nil
}
