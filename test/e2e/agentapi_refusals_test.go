package e2e

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net/url"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/ferry-id/ferry/attestors/node/jointoken"
	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/test/testcluster"
)

// TestAgentAPIRefusesBadInput drives the Agent service's entry points with
// what a broken or hostile agent sends: CSRs that are not CSRs or whose
// signature is wrong, at attestation and at renewal, and an agent
// certificate from a CA the trust domain never had.
func TestAgentAPIRefusesBadInput(t *testing.T) {
	if testing.Short() {
		t.Skip("real processes")
	}
	c := testcluster.New(t, testcluster.Options{Nodes: 1, LogLevel: "info"})
	api := newAgentAPI(t, c)
	s := c.Nodes[0]
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	_, good := newKeyCSR(t)
	badSig := append([]byte{}, good...)
	badSig[len(badSig)-1] ^= 0xff
	bad := map[string][]byte{
		"not a CSR":       []byte("not a certificate request"),
		"empty":           nil,
		"wrong signature": badSig,
	}

	t.Run("attestation", func(t *testing.T) {
		for name, csr := range bad {
			t.Run(name, func(t *testing.T) {
				api := *api
				api.t = t
				jt, err := jointoken.NewAgent(jointoken.AgentConfig{Token: api.token(s, "", time.Minute)})
				require.NoError(t, err)
				payload, err := jt.Payload(ctx)
				require.NoError(t, err)
				stream, err := api.client(s.AgentAddr, nil).AttestAgent(ctx)
				require.NoError(t, err)
				require.NoError(t, stream.Send(&ferrypb.AttestAgentRequest{Step: &ferrypb.AttestAgentRequest_Params{Params: &ferrypb.AttestParams{
					Attestor: jt.Name(), Payload: payload, Csr: csr,
				}}}))
				_, err = stream.Recv()
				requireCode(t, codes.InvalidArgument, err, "attestation with a bad CSR")
			})
		}
		t.Run("CSR naming another ID", func(t *testing.T) {
			api := *api
			api.t = t
			// What the CSR asks for is ignored: the ID comes from the
			// attestation.
			key, csr := newKeyCSR(t, "spiffe://example.org/spire/server")
			jt, err := jointoken.NewAgent(jointoken.AgentConfig{Token: api.token(s, "spiffe://example.org/spire/agent/csr-asks", time.Minute)})
			require.NoError(t, err)
			svid, err := api.attestOn(ctx, api.client(s.AgentAddr, nil), jt, key, csr)
			require.NoError(t, err)
			require.Equal(t, "spiffe://example.org/spire/agent/csr-asks", svid.ID.String())
		})
	})

	t.Run("renewal", func(t *testing.T) {
		api := *api
		api.t = t
		svid := api.mustAttest(ctx, s, "spiffe://example.org/spire/agent/renews-badly")
		cl := api.client(s.AgentAddr, svid)
		for name, csr := range bad {
			_, err := cl.RenewAgent(ctx, &ferrypb.RenewAgentRequest{Csr: csr})
			requireCode(t, codes.InvalidArgument, err, "renewal with a CSR that is ", name)
		}
		// The agent is unharmed: a good CSR still renews.
		_, csr := newKeyCSR(t)
		resp, err := cl.RenewAgent(ctx, &ferrypb.RenewAgentRequest{Csr: csr})
		require.NoError(t, err)
		require.NotEmpty(t, resp.GetSvidChain())
	})

	t.Run("agent certificate from a foreign CA", func(t *testing.T) {
		api := *api
		api.t = t
		forged := foreignAgentSVID(t, "spiffe://example.org/spire/agent/forged")
		cl := api.client(s.AgentAddr, forged)
		err := ping(ctx, cl)
		require.Error(t, err)
		// The handshake fails (Unavailable) or the call is refused as
		// unauthenticated; never served.
		code := status.Code(err)
		require.Contains(t, []codes.Code{codes.Unavailable, codes.Unauthenticated}, code, "%v", err)
		_, csr := newKeyCSR(t)
		_, err = cl.RenewAgent(ctx, &ferrypb.RenewAgentRequest{Csr: csr})
		require.Contains(t, []codes.Code{codes.Unavailable, codes.Unauthenticated}, status.Code(err), "%v", err)
		_, err = cl.NewJWTSVID(ctx, &ferrypb.NewJWTSVIDRequest{EntryId: "x", Audience: []string{"a"}})
		require.Contains(t, []codes.Code{codes.Unavailable, codes.Unauthenticated}, status.Code(err), "%v", err)
		require.Equal(t, false, agentKnown(t, s, forged.ID.String()), "the server never learned of the forged agent")
	})
}

// agentKnown reports whether the server lists the agent id.
func agentKnown(t *testing.T, n *testcluster.Node, id string) bool {
	t.Helper()
	_, err := n.CLI("agent", "show", "--spiffe-id", id, "--output", "json")
	return err == nil
}

// foreignAgentSVID is an agent SVID for id, well formed, signed by a CA of
// the same trust domain name that the servers never had.
func foreignAgentSVID(t *testing.T, id string) *x509svid.SVID {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "forged"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
		URIs: []*url.URL{{Scheme: "spiffe", Host: agentAPITD}},
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	require.NoError(t, err)
	caCert, err := x509.ParseCertificate(caDER)
	require.NoError(t, err)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	u, err := url.Parse(id)
	require.NoError(t, err)
	leafDER, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(2), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		URIs: []*url.URL{u},
	}, caCert, key.Public(), caKey)
	require.NoError(t, err)
	leaf, err := x509.ParseCertificate(leafDER)
	require.NoError(t, err)
	return &x509svid.SVID{ID: spiffeid.RequireFromString(id), Certificates: []*x509.Certificate{leaf, caCert}, PrivateKey: key}
}
