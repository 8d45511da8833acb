package session_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"net/url"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/ferry-id/ferry/agent/session"
	"github.com/ferry-id/ferry/attestors/node/jointoken"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

// testCA is a CA built in code, for server certificates.
type testCA struct {
	cert *x509.Certificate
	key  crypto.Signer
}

func newTestCA(t *testing.T, name string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs:                  []*url.URL{{Scheme: "spiffe", Host: "example.org"}},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	require.NoError(t, err)
	cert, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	return &testCA{cert: cert, key: key}
}

// serverCert issues a TLS server certificate carrying the SPIFFE ID id.
func (ca *testCA) serverCert(t *testing.T, id string) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	u, err := url.Parse(id)
	require.NoError(t, err)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		URIs:         []*url.URL{u},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, key.Public(), ca.key)
	require.NoError(t, err)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// impostor is an agent API server that answers any attestation: an agent
// that talks to it has trusted a server it must not trust.
type impostor struct {
	ferrypb.UnimplementedAgentServer
	accepted atomic.Int64 // connections accepted
	attested atomic.Int64 // AttestAgent calls that reached the service
}

func (i *impostor) AttestAgent(stream grpc.BidiStreamingServer[ferrypb.AttestAgentRequest, ferrypb.AttestAgentResponse]) error {
	i.attested.Add(1)
	return status.Error(codes.PermissionDenied, "impostor")
}

type countingListener struct {
	net.Listener
	n *atomic.Int64
}

func (l countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

func startImpostor(t *testing.T, cert tls.Certificate) (*impostor, string) {
	t.Helper()
	imp := &impostor{}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12})))
	ferrypb.RegisterAgentServer(srv, imp)
	go func() { _ = srv.Serve(countingListener{Listener: ln, n: &imp.accepted}) }()
	t.Cleanup(srv.Stop)
	return imp, ln.Addr().String()
}

type nopSink struct{}

func (nopSink) SetEntries([]*ferrypb.Entry, uint64)                  {}
func (nopSink) TaintAuthorities([]*x509.Certificate, []string)       {}
func (nopSink) ApplyEntryChanges([]*ferrypb.Entry, []string, uint64) {}
func (nopSink) SetBundles(*spiffebundle.Bundle, map[spiffeid.TrustDomain]*spiffebundle.Bundle) {
}

// runAgainst runs a session against addr trusting ca until the server has
// seen the session connect twice (it tried, then tried again) or, when
// wantAttest, until an attestation reaches the service.
func runAgainst(t *testing.T, ca *testCA, imp *impostor, addr string, wantAttest bool) {
	t.Helper()
	jt, err := jointoken.NewAgent(jointoken.AgentConfig{Token: "impostor-test-token-0123456789"})
	require.NoError(t, err)
	s, err := session.New(session.Config{
		TrustDomain: spiffeid.RequireTrustDomainFromString("example.org"),
		Servers:     []string{addr},
		TrustBundle: []*x509.Certificate{ca.cert},
		DataDir:     t.TempDir(),
		Attestor:    jt,
		Sink:        nopSink{},
	})
	require.NoError(t, err)
	defer s.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	for {
		if wantAttest && imp.attested.Load() > 0 {
			break
		}
		if !wantAttest && imp.accepted.Load() >= 2 {
			break
		}
		select {
		case err := <-done:
			cancel()
			if wantAttest {
				require.Positive(t, imp.attested.Load(), "session ended without reaching the service: %v", err)
				return
			}
			t.Fatalf("session ended: %v", err)
		case <-time.After(10 * time.Millisecond):
		}
	}
	cancel()
	<-done
	select {
	case <-s.Ready():
		t.Fatal("the session became ready against an impostor")
	default:
	}
}

// TestAgentRefusesImpostorServer: the agent talks only to a server whose
// certificate chains to the trust bundle it was given and names the trust
// domain's server ID. Servers that fail either check never see a request.
func TestAgentRefusesImpostorServer(t *testing.T) {
	ca := newTestCA(t, "trusted")
	foreign := newTestCA(t, "foreign")

	// The control: a server the agent trusts gets its attestation, so the
	// counters below would see one if the agent trusted an impostor.
	ok, addr := startImpostor(t, ca.serverCert(t, "spiffe://example.org/spire/server"))
	runAgainst(t, ca, ok, addr, true)

	for name, cert := range map[string]tls.Certificate{
		"trusted CA, another SPIFFE ID":      ca.serverCert(t, "spiffe://example.org/workload"),
		"trusted CA, another trust domain":   ca.serverCert(t, "spiffe://other.org/spire/server"),
		"foreign CA, the server's SPIFFE ID": foreign.serverCert(t, "spiffe://example.org/spire/server"),
	} {
		t.Run(name, func(t *testing.T) {
			imp, addr := startImpostor(t, cert)
			runAgainst(t, ca, imp, addr, false)
			require.Zero(t, imp.attested.Load(), "an attestation reached an impostor")
		})
	}
}

// TestSessionsSpreadOverServers: agents that all list the same servers in
// the same order do not all connect to the first: each shuffles the list,
// so a fleet spreads over the servers, and the agents of a failed server
// over the others.
func TestSessionsSpreadOverServers(t *testing.T) {
	ca := newTestCA(t, "trusted")
	var servers []*impostor
	var addrs []string
	for range 3 {
		imp, addr := startImpostor(t, ca.serverCert(t, "spiffe://example.org/spire/server"))
		servers, addrs = append(servers, imp), append(addrs, addr)
	}
	jt, err := jointoken.NewAgent(jointoken.AgentConfig{Token: "spread-test-token-0123456789"})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	const agents = 24
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	for range agents {
		s, err := session.New(session.Config{
			TrustDomain: spiffeid.RequireTrustDomainFromString("example.org"),
			Servers:     addrs,
			TrustBundle: []*x509.Certificate{ca.cert},
			DataDir:     t.TempDir(),
			Attestor:    jt,
			Sink:        nopSink{},
		})
		require.NoError(t, err)
		wg.Add(1)
		go func() { defer wg.Done(); defer s.Close(); _ = s.Run(ctx) }()
	}
	used := func() (n int, total int64) {
		for _, imp := range servers {
			if c := imp.attested.Load(); c > 0 {
				n++
				total += c
			}
		}
		return n, total
	}
	require.Eventually(t, func() bool { _, total := used(); return total >= agents }, time.Minute, 10*time.Millisecond)
	// With the list as given, all 24 would reach the first server; shuffled,
	// all of them doing so has odds of 3 in 3^24.
	n, _ := used()
	require.Greater(t, n, 1, "every agent attested to the same server: %d, %d, %d", servers[0].attested.Load(), servers[1].attested.Load(), servers[2].attested.Load())
}
