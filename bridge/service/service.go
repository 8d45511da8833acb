// Package service runs the bridge as a process: it follows the server's
// directory (bridge/replica), holds this replica's signing key, publishes the
// key's public half through the server, and serves the token endpoints over
// HTTPS.
package service

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"

	"github.com/ferry-id/ferry/bridge"
	"github.com/ferry-id/ferry/bridge/replica"
	"github.com/ferry-id/ferry/bridge/signing"
	"github.com/ferry-id/ferry/internal/securedir"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

// Config configures a bridge replica.
type Config struct {
	// ListenAddr is the HTTPS address, e.g. 127.0.0.1:8443.
	ListenAddr string
	// BaseURL is the public https://host:port clients use (the authority
	// host); default https://<ListenAddr>.
	BaseURL string
	// TLSCertFile and TLSKeyFile hold the HTTPS certificate. When empty the
	// service makes its own CA and certificate under DataDir and writes the CA
	// to DataDir/tls-ca.pem for clients to trust (SSL_CERT_FILE).
	TLSCertFile, TLSKeyFile string
	// DataDir holds the signing key (0600) and any generated TLS material.
	DataDir string
	// ServerSockets are servers' admin sockets, where the Directory service
	// is (a replica on a server's machine). The replica talks only to a
	// socket owned by root or by its own user, in directories no other user
	// can change (securedir.CheckSocket), unless InsecureSocket is set: for a
	// socket mounted into a container from a host whose uids it does not know.
	ServerSockets  []string
	InsecureSocket bool
	// ServerAddresses are servers' admin_addr, reached over mutual TLS with
	// the X509-SVID this replica gets from its local agent's Workload API at
	// WorkloadAPI (a replica on any machine; its entry must be marked admin).
	// Give either sockets or addresses. With several servers the replica
	// keeps a connection to each and follows the directory through any that
	// answers, so it goes on following while servers die and come back.
	ServerAddresses []string
	WorkloadAPI     string
	// Name names this replica in its signing key's certificate.
	Name string
	// KeyLifetime is the validity of each signing key (90 days by default);
	// keys rotate as signing.Ring describes. KeyRetireAfter is how long a
	// replaced key stays published (2 h by default).
	KeyLifetime, KeyRetireAfter time.Duration
	Logger                      *slog.Logger
	// Listen opens the HTTPS listener; default net.Listen.
	Listen func(network, address string) (net.Listener, error)
}

// Service is a running bridge replica.
type Service struct {
	cfg    Config
	log    *slog.Logger
	lis    net.Listener
	tls    *tls.Config
	caFile string
	ring   *signing.Ring
	ready  chan struct{}
}

// New validates cfg, loads (or creates) the signing key and TLS material, and
// binds the listener; Run serves.
func New(cfg Config) (*Service, error) {
	if cfg.ListenAddr == "" || cfg.DataDir == "" || (len(cfg.ServerSockets) == 0) == (len(cfg.ServerAddresses) == 0) {
		return nil, errors.New("service: listen address, data dir and either server sockets or server addresses are required")
	}
	for _, a := range append(slices.Clone(cfg.ServerSockets), cfg.ServerAddresses...) {
		if a == "" {
			return nil, errors.New("service: an empty server socket or address")
		}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Name == "" {
		cfg.Name, _ = os.Hostname()
	}
	// The data dir holds the signing key.
	if err := securedir.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("service: data dir: %w", err)
	}
	// A socket already there that another user could have put there is
	// refused at start; one that appears later is checked at each dial.
	for _, p := range cfg.ServerSockets {
		if err := checkSocket(p, cfg.InsecureSocket); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
	}
	listen := cfg.Listen
	if listen == nil {
		listen = net.Listen
	}
	lis, err := listen("tcp", cfg.ListenAddr)
	if err != nil {
		return nil, fmt.Errorf("service: %w", err)
	}
	if cfg.BaseURL == "" {
		cfg.BaseURL = "https://" + lis.Addr().String()
	}
	s := &Service{cfg: cfg, log: cfg.Logger, lis: lis, ready: make(chan struct{})}
	if s.ring, err = signing.OpenRing(signing.RingConfig{Dir: cfg.DataDir, Owner: cfg.Name, Lifetime: cfg.KeyLifetime, RetireAfter: cfg.KeyRetireAfter}); err != nil {
		lis.Close()
		return nil, err
	}
	if err := s.loadTLS(); err != nil {
		lis.Close()
		return nil, err
	}
	return s, nil
}

// Addr is the bound HTTPS address.
func (s *Service) Addr() string { return s.lis.Addr().String() }

// BaseURL is the authority host clients use.
func (s *Service) BaseURL() string { return s.cfg.BaseURL }

// CAFile is the PEM file of the CA that issued the generated HTTPS
// certificate, or "" when the certificate came from files.
func (s *Service) CAFile() string { return s.caFile }

// Ready is closed once the replica has its first copy of the directory.
func (s *Service) Ready() <-chan struct{} { return s.ready }

// Run follows the directory and serves until ctx ends.
func (s *Service) Run(ctx context.Context) error {
	defer s.lis.Close()
	opts := []grpc.DialOption{
		// Come back quickly after a server restart (gRPC's default waits up
		// to two minutes between attempts).
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 5 * time.Second}, MinConnectTimeout: 5 * time.Second}),
		// A connection to every server; calls go to those that are up.
		grpc.WithDefaultServiceConfig(`{"loadBalancingConfig":[{"round_robin":{}}]}`),
	}
	addrs := s.cfg.ServerAddresses
	if len(addrs) == 0 {
		addrs = s.cfg.ServerSockets
		var d net.Dialer
		var refused sync.Map // path -> the refusal last logged
		opts = append(opts, grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithContextDialer(func(ctx context.Context, path string) (net.Conn, error) {
				if err := checkSocket(path, s.cfg.InsecureSocket); err != nil {
					// Redialled with backoff: say it once per change.
					if prev, _ := refused.Swap(path, err.Error()); prev != err.Error() {
						s.log.Error("refusing the server's admin socket", "error", err)
					}
					return nil, err
				}
				refused.Delete(path)
				return d.DialContext(ctx, "unix", path)
			}))
	} else {
		src, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(workloadapi.WithAddr(s.cfg.WorkloadAPI)))
		if err != nil {
			return fmt.Errorf("service: X509-SVID from the Workload API: %w", err)
		}
		defer src.Close()
		svid, err := src.GetX509SVID()
		if err != nil {
			return fmt.Errorf("service: %w", err)
		}
		serverID := spiffeid.RequireFromPath(svid.ID.TrustDomain(), "/spire/server")
		opts = append(opts, grpc.WithTransportCredentials(credentials.NewTLS(tlsconfig.MTLSClientConfig(src, src, tlsconfig.AuthorizeID(serverID)))))
		s.log.Info("following the directory over mutual TLS", "servers", addrs, "spiffe_id", svid.ID.String())
	}
	res := manual.NewBuilderWithScheme("ferry-bridge-servers")
	state := resolver.State{}
	for _, a := range addrs {
		state.Addresses = append(state.Addresses, resolver.Address{Addr: a})
	}
	res.InitialState(state)
	conn, err := grpc.NewClient(res.Scheme()+":///servers", append(opts, grpc.WithResolvers(res))...)
	if err != nil {
		return fmt.Errorf("service: %w", err)
	}
	defer conn.Close()
	rep, err := replica.New(replica.Config{Source: ferrypb.NewDirectoryClient(conn), Logger: s.log.With("component", "replica")})
	if err != nil {
		return err
	}
	rep.SetKeys(s.ring.Published())
	errc := make(chan error, 2)
	go func() { errc <- rep.Run(ctx) }()
	select {
	case <-rep.Ready():
	case err := <-errc:
		return err
	case <-ctx.Done():
		return nil
	}
	b, err := bridge.New(bridge.Config{
		Directory: rep,
		Key:       s.ring.Current(),
		BaseURL:   s.cfg.BaseURL,
		Listener:  s.lis,
		TLSConfig: s.tls,
		Logger:    s.log,
	})
	if err != nil {
		return err
	}
	close(s.ready)
	s.log.Info("bridge serving", "base_url", s.cfg.BaseURL, "kid", s.ring.Current().KID())
	go func() { errc <- b.Run(ctx) }()
	go s.rotate(ctx, rep, b)
	select {
	case <-ctx.Done():
		s.log.Info("bridge stopped")
		return nil
	case err := <-errc:
		if ctx.Err() != nil {
			s.log.Info("bridge stopped")
			return nil
		}
		return err
	}
}

// rotate drives the signing key ring: a new key is published long before it
// signs, and a replaced key is withdrawn once its tokens have expired.
func (s *Service) rotate(ctx context.Context, rep *replica.Replica, b *bridge.Bridge) {
	life := s.cfg.KeyLifetime
	if life <= 0 {
		life = signing.DefaultLifetime
	}
	every := min(time.Minute, max(life/100, 100*time.Millisecond))
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		rot, err := s.ring.Tick()
		if err != nil {
			s.log.Error("signing key rotation", "error", err)
			continue
		}
		if rot.Prepared != nil {
			s.log.Info("next signing key prepared and published", "kid", rot.Prepared.KID())
		}
		if rot.Activated != nil {
			b.SetKey(rot.Activated)
			s.log.Info("signing key rotated", "kid", rot.Activated.KID())
		}
		if rot.Retired != "" {
			if err := rep.Retire(ctx, rot.Retired); err != nil {
				s.log.Warn("retiring signing key", "kid", rot.Retired, "error", err)
			}
		}
		if rot.Prepared != nil || rot.Activated != nil || rot.Retired != "" {
			rep.SetKeys(s.ring.Published())
		}
	}
}

func (s *Service) loadTLS() error {
	if s.cfg.TLSCertFile != "" || s.cfg.TLSKeyFile != "" {
		cert, err := tls.LoadX509KeyPair(s.cfg.TLSCertFile, s.cfg.TLSKeyFile)
		if err != nil {
			return fmt.Errorf("service: TLS certificate: %w", err)
		}
		s.tls = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
		return nil
	}
	certFile := filepath.Join(s.cfg.DataDir, "tls-cert.pem")
	keyFile := filepath.Join(s.cfg.DataDir, "tls-key.pem")
	s.caFile = filepath.Join(s.cfg.DataDir, "tls-ca.pem")
	if cert, err := tls.LoadX509KeyPair(certFile, keyFile); err == nil {
		if leaf, err := x509.ParseCertificate(cert.Certificate[0]); err == nil && time.Until(leaf.NotAfter) > 24*time.Hour && coversHost(leaf, s.cfg.BaseURL) {
			s.tls = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
			return nil
		}
	}
	if err := generateTLS(s.caFile, certFile, keyFile, s.cfg.BaseURL); err != nil {
		return err
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return fmt.Errorf("service: %w", err)
	}
	s.tls = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	return nil
}

func coversHost(leaf *x509.Certificate, baseURL string) bool {
	u, err := url.Parse(baseURL)
	if err != nil {
		return false
	}
	return leaf.VerifyHostname(u.Hostname()) == nil
}

// generateTLS makes a small CA and an HTTPS certificate for localhost, the
// loopback addresses and the base URL's host.
func generateTLS(caFile, certFile, keyFile, baseURL string) error {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber: serial(), Subject: pkix.Name{Organization: []string{"ferry"}, CommonName: "ferry bridge CA"},
		NotBefore: now.Add(-time.Minute), NotAfter: now.Add(5 * 365 * 24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	if err != nil {
		return err
	}
	ca, _ := x509.ParseCertificate(caDER)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(), Subject: pkix.Name{Organization: []string{"ferry"}, CommonName: "ferry bridge"},
		NotBefore: now.Add(-time.Minute), NotAfter: now.Add(365 * 24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames: []string{"localhost"}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
	}
	if u, err := url.Parse(baseURL); err == nil && u.Hostname() != "" {
		if ip := net.ParseIP(u.Hostname()); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else if u.Hostname() != "localhost" {
			tmpl.DNSNames = append(tmpl.DNSNames, u.Hostname())
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, key.Public(), caKey)
	if err != nil {
		return err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		return err
	}
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		return err
	}
	return os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), 0o644)
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	return n
}

// checkSocket refuses an admin socket that is not the server's: one owned by
// another user, or in a directory another user could change (they could move
// the server's socket aside and relay the directory, altered, through
// theirs). insecure skips the check.
func checkSocket(path string, insecure bool) error {
	if insecure {
		return nil
	}
	if err := securedir.CheckSocket(path); err != nil {
		return fmt.Errorf("service: server socket %s: %w (insecure_socket = true to skip this check)", path, err)
	}
	return nil
}
