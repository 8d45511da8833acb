package api_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"log/slog"
	"math/big"
	"net"
	"net/url"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/ferry-id/ferry/attestors/node"
	"github.com/ferry-id/ferry/attestors/node/jointoken"
	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/api"
	"github.com/ferry-id/ferry/server/ca"
	"github.com/ferry-id/ferry/server/state"
)

// readySigner signs agent SVIDs (self-signed, enough for the API) once ready
// is set, and answers as a CA without an active authority before.
type readySigner struct {
	ready atomic.Bool
	key   *ecdsa.PrivateKey
}

func (s *readySigner) SignAgentX509SVID(pub crypto.PublicKey, id spiffeid.ID, ttl time.Duration) ([]*x509.Certificate, error) {
	if !s.ready.Load() {
		return nil, ca.ErrNoAuthority
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), URIs: []*url.URL{id.URL()},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(ttl)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, pub, s.key)
	if err != nil {
		return nil, err
	}
	c, err := x509.ParseCertificate(der)
	return []*x509.Certificate{c}, err
}

func (s *readySigner) SignWorkloadX509SVIDs(context.Context, []ca.X509SVIDRequest) []ca.X509SVIDResult {
	return nil
}

func (s *readySigner) MintJWTSVID(spiffeid.ID, []string, time.Duration, map[string]any) (*ca.JWTSVID, error) {
	return nil, ca.ErrNoAuthority
}

// TestJoinTokenSurvivesServerRefusal: an attestation the server cannot
// complete for its own reasons (here its CA has no active authority yet)
// leaves the token usable, so the agent's retry succeeds; the success spends
// it.
func TestJoinTokenSurvivesServerRefusal(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("example.org")
	store, err := state.New(state.Config{})
	require.NoError(t, err)
	fc := &fakeCluster{store: store}
	log := slog.New(slog.NewTextHandler(tlog{t}, nil))
	jt, err := jointoken.NewServer(jointoken.ServerConfig{TrustDomain: td, Tokens: api.ClusterTokens{Cluster: fc, Store: store}, Log: log})
	require.NoError(t, err)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	signer := &readySigner{key: key}
	agentAPI, err := api.NewAgent(api.AgentConfig{Cluster: fc, Store: store, Signer: signer, TrustDomain: td,
		Attestors: []node.ServerAttestor{jt}, Logger: log})
	require.NoError(t, err)
	admin, err := api.NewAdmin(api.Config{Cluster: fc, Store: store, TrustDomain: td, Logger: log})
	require.NoError(t, err)

	sock := filepath.Join(t.TempDir(), "agent.sock")
	lis, err := net.Listen("unix", sock)
	require.NoError(t, err)
	gs := grpc.NewServer()
	ferrypb.RegisterAgentServer(gs, agentAPI)
	go func() { _ = gs.Serve(lis) }()
	t.Cleanup(gs.Stop)
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	client := ferrypb.NewAgentClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	tok, err := admin.CreateJoinToken(ctx, &ferrypb.CreateJoinTokenRequest{SpiffeId: "spiffe://example.org/spire/agent/n1", TtlSeconds: 600})
	require.NoError(t, err)
	attest := func() (*ferrypb.AttestResult, error) {
		agentKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		require.NoError(t, err)
		csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, agentKey)
		require.NoError(t, err)
		stream, err := client.AttestAgent(ctx)
		require.NoError(t, err)
		require.NoError(t, stream.Send(&ferrypb.AttestAgentRequest{Step: &ferrypb.AttestAgentRequest_Params{Params: &ferrypb.AttestParams{
			Attestor: jointoken.Name, Payload: []byte(tok.Token), Csr: csr}}}))
		resp, err := stream.Recv()
		if err != nil {
			return nil, err
		}
		return resp.GetResult(), nil
	}

	_, err = attest()
	requireCode(t, codes.Unavailable, err, "the CA is not ready")
	require.NotNil(t, store.View().JoinToken(jointoken.Hash(tok.Token)), "the token was not spent")
	require.Nil(t, store.View().Node("spiffe://example.org/spire/agent/n1"))

	signer.ready.Store(true)
	res, err := attest()
	require.NoError(t, err, "the agent's retry")
	require.Equal(t, "spiffe://example.org/spire/agent/n1", res.SpiffeId)
	require.Nil(t, store.View().JoinToken(jointoken.Hash(tok.Token)), "spent by the attestation that succeeded")
	require.NotNil(t, store.View().Node("spiffe://example.org/spire/agent/n1"))

	_, err = attest()
	requireCode(t, codes.PermissionDenied, err, "used once")
}
