package chaos_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	mrand "math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/ferry-id/ferry/attestors/node/jointoken"
	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/api"
	"github.com/ferry-id/ferry/test/testcluster"
)

// stormAgent is one attested agent identity talking to the Agent service
// over mutual TLS with its own X509-SVID, as `ferry agent run` does.
type stormAgent struct {
	id      string
	cl      ferrypb.AgentClient
	key     crypto.Signer
	csr     []byte
	entries []string
}

type svidSource struct{ svid *x509svid.SVID }

func (s svidSource) GetX509SVID() (*x509svid.SVID, error) { return s.svid, nil }

func newCSR(t testing.TB) (crypto.Signer, []byte) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "storm"}}, key)
	require.NoError(t, err)
	return key, csr
}

// attestAgent attests id with a join token at addr and returns an Agent
// client that presents the agent SVID.
func attestAgent(ctx context.Context, t testing.TB, leader *testcluster.Node, addr, id string, bundle *x509bundle.Bundle) (ferrypb.AgentClient, error) {
	serverID := spiffeid.RequireFromString("spiffe://example.org/spire/server")
	tok, err := leader.Admin().CreateJoinToken(ctx, &ferrypb.CreateJoinTokenRequest{SpiffeId: id, TtlSeconds: 600})
	if err != nil {
		return nil, err
	}
	jt, err := jointoken.NewAgent(jointoken.AgentConfig{Token: tok.Token})
	if err != nil {
		return nil, err
	}
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(tlsconfig.TLSClientConfig(bundle, tlsconfig.AuthorizeID(serverID)))))
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	key, csr := newCSR(t)
	payload, err := jt.Payload(ctx)
	if err != nil {
		return nil, err
	}
	stream, err := ferrypb.NewAgentClient(conn).AttestAgent(ctx)
	if err != nil {
		return nil, err
	}
	if err := stream.Send(&ferrypb.AttestAgentRequest{Step: &ferrypb.AttestAgentRequest_Params{Params: &ferrypb.AttestParams{Attestor: jt.Name(), Payload: payload, Csr: csr}}}); err != nil {
		return nil, err
	}
	resp, err := stream.Recv()
	if err != nil {
		return nil, err
	}
	if resp.GetResult() == nil {
		return nil, fmt.Errorf("attestation of %s: no result", id)
	}
	var certs []*x509.Certificate
	for _, der := range resp.GetResult().SvidChain {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, err
		}
		certs = append(certs, c)
	}
	svid := &x509svid.SVID{ID: spiffeid.RequireFromString(id), Certificates: certs, PrivateKey: key}
	mconn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(
		tlsconfig.MTLSClientConfig(svidSource{svid}, bundle, tlsconfig.AuthorizeID(serverID)))))
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() { mconn.Close() })
	return ferrypb.NewAgentClient(mconn), nil
}

// TestCSRStorm: 40 agents, 250 workload entries each, all renew at once
// against one server, as when a partition heals and every agent's
// overdue renewal goes out together: 10,000 CSRs. The server must shed what
// it cannot take with ResourceExhausted, stay up with bounded memory, and
// sign every CSR once clients retry with backoff.
func TestCSRStorm(t *testing.T) {
	skipUnlessChaos(t)
	const agents, perAgent = 40, 250
	c := testcluster.New(t, testcluster.Options{Nodes: 3, LogLevel: "warn"})
	leader := c.WaitLeader(30*time.Second, nil)
	var target *testcluster.Node
	for _, n := range c.Nodes {
		if n != leader {
			target = n
			break
		}
	}
	// The bundle, once every node has published its CA.
	var bundle *x509bundle.Bundle
	require.Eventually(t, func() bool {
		out, err := leader.CLI("bundle", "show")
		if err != nil || strings.Count(out, "BEGIN CERTIFICATE") < len(c.Nodes) {
			return false
		}
		bundle, err = x509bundle.Parse(spiffeid.RequireTrustDomainFromString("example.org"), []byte(out))
		return err == nil
	}, 30*time.Second, 100*time.Millisecond)

	// Entries, parented on the agents.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	storm := make([]*stormAgent, agents)
	for a := range storm {
		sa := &stormAgent{id: fmt.Sprintf("spiffe://example.org/spire/agent/storm-%02d", a)}
		var batch []*ferrypb.Entry
		for e := range perAgent {
			id := fmt.Sprintf("storm-%02d-%03d", a, e)
			sa.entries = append(sa.entries, id)
			batch = append(batch, &ferrypb.Entry{Id: id, SpiffeId: "spiffe://example.org/storm/" + id, ParentId: sa.id,
				Selectors: []*ferrypb.Selector{{Type: "unix", Value: "uid:1000"}}})
		}
		resp, err := leader.Admin().BatchCreateEntry(ctx, &ferrypb.BatchCreateEntryRequest{Entries: batch, RequestId: "storm-entries-" + sa.id})
		require.NoError(t, err)
		for _, r := range resp.Results {
			require.EqualValues(t, codes.OK, r.GetCode(), r.GetMessage())
		}
		storm[a] = sa
	}
	// Every agent attested, with its connection to the target open.
	var wg sync.WaitGroup
	errs := make(chan error, agents)
	sem := make(chan struct{}, 32)
	for _, sa := range storm {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			var err error
			sa.cl, err = attestAgent(ctx, t, leader, target.AgentAddr, sa.id, bundle)
			if err != nil {
				errs <- fmt.Errorf("attest %s: %w", sa.id, err)
				return
			}
			sa.key, sa.csr = newCSR(t)
			// The connection is up before the storm: a sign-nothing call.
			if _, err := sa.cl.BatchNewX509SVID(ctx, &ferrypb.BatchNewX509SVIDRequest{}); err != nil {
				errs <- fmt.Errorf("ping %s: %w", sa.id, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}

	pids := map[string]int{}
	before := map[string]int64{}
	for _, n := range c.Nodes {
		pids[n.ID] = n.PID()
		rss, err := rssKiB(n.PID())
		require.NoError(t, err)
		before[n.ID] = rss
	}
	peak, stopSampling := samplePeakRSS(pids)

	var (
		firstOK, firstShed, retries, signed atomic.Int64
		otherMu                             sync.Mutex
		other                               = map[string]int{}
		shedMsg                             atomic.Value
	)
	certs := make([][]*ferrypb.X509SVIDResult, agents)
	release := make(chan struct{})
	began := time.Now()
	for a, sa := range storm {
		wg.Add(1)
		go func() {
			defer wg.Done()
			params := make([]*ferrypb.X509SVIDParams, len(sa.entries))
			for i, id := range sa.entries {
				params[i] = &ferrypb.X509SVIDParams{EntryId: id, Csr: sa.csr}
			}
			<-release
			for attempt := 0; ; attempt++ {
				cctx, ccancel := context.WithTimeout(ctx, 60*time.Second)
				resp, err := sa.cl.BatchNewX509SVID(cctx, &ferrypb.BatchNewX509SVIDRequest{Params: params})
				ccancel()
				switch code := status.Code(err); {
				case code == codes.OK:
					for _, r := range resp.Results {
						if codes.Code(r.GetStatus().GetCode()) != codes.OK {
							otherMu.Lock()
							other[fmt.Sprintf("result %s: %s", codes.Code(r.GetStatus().GetCode()), r.GetStatus().GetMessage())]++
							otherMu.Unlock()
						}
					}
					if attempt == 0 {
						firstOK.Add(int64(len(params)))
					}
					signed.Add(int64(len(resp.Results)))
					certs[a] = resp.Results
					return
				case code == codes.ResourceExhausted:
					if attempt == 0 {
						firstShed.Add(int64(len(params)))
						shedMsg.Store(status.Convert(err).Message())
					}
					retries.Add(1)
					time.Sleep(time.Duration(100+mrand.IntN(900)) * time.Millisecond)
				default:
					otherMu.Lock()
					other[fmt.Sprintf("%s: %v", code, err)]++
					otherMu.Unlock()
					return
				}
			}
		}()
	}
	close(release)
	wg.Wait()
	drained := time.Since(began)
	stopSampling()

	msg, _ := shedMsg.Load().(string)
	t.Logf("CSR storm: %d CSRs from %d agents on %s: %d signed at once, %d shed (%q), %d retried calls, all signed after %s",
		agents*perAgent, agents, target.ID, firstOK.Load(), firstShed.Load(), msg, retries.Load(), drained.Round(time.Millisecond))
	require.Empty(t, other, "the only refusal is ResourceExhausted")
	// What was signed at once fits the server's signing rate over the time
	// the storm took. Whether anything had to be shed depends on how fast
	// the calls arrived, which is the machine's business (the limits' own
	// test, server/api TestSigningLimitsShed, drives the clock); on a quiet
	// machine a storm this size arrives within a second and is shed in part.
	require.LessOrEqual(t, float64(firstOK.Load()), api.DefaultGlobalRate*(1+drained.Seconds()),
		"signed at once beyond the server's signing rate")
	if firstShed.Load() > 0 {
		require.Contains(t, msg, "retry later")
	} else {
		t.Logf("nothing shed: the storm arrived slower than %d CSRs/s", api.DefaultGlobalRate)
	}
	require.EqualValues(t, agents*perAgent, signed.Load())

	// Every CSR signed for its own entry's SPIFFE ID, chaining to the bundle.
	for a, sa := range storm {
		require.Len(t, certs[a], len(sa.entries))
		for i, r := range certs[a] {
			var chain []*x509.Certificate
			for _, der := range r.CertChain {
				cert, err := x509.ParseCertificate(der)
				require.NoError(t, err)
				chain = append(chain, cert)
			}
			id, _, err := x509svid.Verify(chain, bundle)
			require.NoError(t, err, "SVID of %s", sa.entries[i])
			require.Equal(t, "spiffe://example.org/storm/"+sa.entries[i], id.String())
		}
	}
	for _, n := range c.Nodes {
		require.Equal(t, pids[n.ID], n.PID())
		require.NoError(t, syscall.Kill(n.PID(), 0), "node %s died", n.ID)
	}
	const boundKiB = 512 << 10
	for _, n := range c.Nodes {
		fmt.Printf("csr storm: node %s RSS %d MiB before, %d MiB peak\n", n.ID, before[n.ID]>>10, peak()[n.ID]>>10)
		require.Less(t, peak()[n.ID], int64(boundKiB), "node %s RSS in KiB", n.ID)
	}
	fmt.Printf("csr storm: %d CSRs from %d agents at once on one follower: %d signed at once, %d shed with ResourceExhausted (%q), %d retried calls, all %d signed after %s\n",
		agents*perAgent, agents, firstOK.Load(), firstShed.Load(), msg, retries.Load(), signed.Load(), drained.Round(time.Millisecond))
}
