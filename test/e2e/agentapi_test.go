package e2e

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/ferry-id/ferry/attestors/node"
	"github.com/ferry-id/ferry/attestors/node/jointoken"
	"github.com/ferry-id/ferry/attestors/node/x509pop"
	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/test/testcluster"
)

const agentAPITD = "example.org"

var (
	agentAPIServerID = spiffeid.RequireFromString("spiffe://example.org/spire/server")
	agentAPITDID     = spiffeid.RequireTrustDomainFromString(agentAPITD)
)

// agentAPI talks to the Agent service of a cluster the way an agent does, with
// keys, CSRs and TLS built here.
type agentAPI struct {
	t      *testing.T
	c      *testcluster.Cluster
	bundle *x509bundle.Bundle
}

// newAgentAPI waits until the trust bundle holds an X.509 authority of every
// node (each signs with its own key) and returns the client side.
func newAgentAPI(t *testing.T, c *testcluster.Cluster) *agentAPI {
	t.Helper()
	leader := c.WaitLeader(30*time.Second, nil)
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, err := leader.CLI("bundle", "show")
		if err == nil && strings.Count(out, "BEGIN CERTIFICATE") >= len(c.Nodes) {
			b, err := x509bundle.Parse(agentAPITDID, []byte(out))
			require.NoError(t, err)
			return &agentAPI{t: t, c: c, bundle: b}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no trust bundle published: %v %s", err, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// token runs `ferry token generate` on n and returns the token.
func (a *agentAPI) token(n *testcluster.Node, id string, ttl time.Duration) string {
	a.t.Helper()
	args := []string{"token", "generate", "--ttl", ttl.String(), "--output", "json"}
	if id != "" {
		args = append(args, "--spiffe-id", id)
	}
	out, err := n.CLI(args...)
	require.NoError(a.t, err, out)
	var resp struct {
		Token string `json:"token"`
	}
	require.NoError(a.t, json.Unmarshal([]byte(out), &resp), out)
	require.NotEmpty(a.t, resp.Token)
	return resp.Token
}

type svidSource struct{ svid *x509svid.SVID }

func (s svidSource) GetX509SVID() (*x509svid.SVID, error) { return s.svid, nil }

// client dials the Agent service at addr, presenting svid when it is not nil,
// and authenticating the server as the trust domain's server ID.
func (a *agentAPI) client(addr string, svid *x509svid.SVID) ferrypb.AgentClient {
	a.t.Helper()
	var cfg = tlsconfig.TLSClientConfig(a.bundle, tlsconfig.AuthorizeID(agentAPIServerID))
	if svid != nil {
		cfg = tlsconfig.MTLSClientConfig(svidSource{svid}, a.bundle, tlsconfig.AuthorizeID(agentAPIServerID))
	}
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	require.NoError(a.t, err)
	a.t.Cleanup(func() { conn.Close() })
	return ferrypb.NewAgentClient(conn)
}

func newKeyCSR(t testing.TB, uris ...string) (crypto.Signer, []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.CertificateRequest{Subject: pkix.Name{CommonName: "workload"}}
	for _, u := range uris {
		parsed, err := url.Parse(u)
		require.NoError(t, err)
		tmpl.URIs = append(tmpl.URIs, parsed)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	require.NoError(t, err)
	return key, csr
}

// attestWith runs one attestation through the given attestor against addr and
// returns the agent SVID.
func (a *agentAPI) attestWith(ctx context.Context, addr string, at node.AgentAttestor) (*x509svid.SVID, error) {
	key, csr := newKeyCSR(a.t)
	return a.attestOn(ctx, a.client(addr, nil), at, key, csr)
}

// attestOn is attestWith on an existing connection with a given key; it calls
// no test helpers, so it may run on any goroutine.
func (a *agentAPI) attestOn(ctx context.Context, cl ferrypb.AgentClient, at node.AgentAttestor, key crypto.Signer, csr []byte) (*x509svid.SVID, error) {
	payload, err := at.Payload(ctx)
	if err != nil {
		return nil, err
	}
	stream, err := cl.AttestAgent(ctx)
	if err != nil {
		return nil, err
	}
	if err := stream.Send(&ferrypb.AttestAgentRequest{Step: &ferrypb.AttestAgentRequest_Params{Params: &ferrypb.AttestParams{
		Attestor: at.Name(), Payload: payload, Csr: csr,
	}}}); err != nil {
		return nil, err
	}
	for {
		resp, err := stream.Recv()
		if err != nil {
			return nil, err
		}
		if c := resp.GetChallenge(); c != nil {
			answer, err := at.Respond(ctx, c)
			if err != nil {
				return nil, err
			}
			if err := stream.Send(&ferrypb.AttestAgentRequest{Step: &ferrypb.AttestAgentRequest_ChallengeResponse{ChallengeResponse: answer}}); err != nil {
				return nil, err
			}
			continue
		}
		r := resp.GetResult()
		if r == nil {
			return nil, fmt.Errorf("empty attestation response")
		}
		return a.svidFrom(r.SvidChain, key)
	}
}

func (a *agentAPI) attest(ctx context.Context, addr, token string) (*x509svid.SVID, error) {
	a.t.Helper()
	jt, err := jointoken.NewAgent(jointoken.AgentConfig{Token: token})
	require.NoError(a.t, err)
	return a.attestWith(ctx, addr, jt)
}

func (a *agentAPI) svidFrom(chain [][]byte, key crypto.Signer) (*x509svid.SVID, error) {
	var certs []*x509.Certificate
	for _, der := range chain {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, err
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, fmt.Errorf("empty SVID chain")
	}
	id, err := x509svid.IDFromCert(certs[0])
	if err != nil {
		return nil, err
	}
	s := &x509svid.SVID{ID: id, Certificates: certs, PrivateKey: key}
	if _, _, err := x509svid.Verify(certs, a.bundle); err != nil {
		return nil, fmt.Errorf("SVID does not verify against the bundle: %w", err)
	}
	return s, nil
}

// mustAttest makes a token for id on n and attests with it at n's agent address.
func (a *agentAPI) mustAttest(ctx context.Context, n *testcluster.Node, id string) *x509svid.SVID {
	a.t.Helper()
	svid, err := a.attest(ctx, n.AgentAddr, a.token(n, id, 10*time.Minute))
	require.NoError(a.t, err)
	require.Equal(a.t, id, svid.ID.String())
	return svid
}

// ping makes an authenticated call that signs nothing.
func ping(ctx context.Context, c ferrypb.AgentClient) error {
	_, err := c.BatchNewX509SVID(ctx, &ferrypb.BatchNewX509SVIDRequest{})
	return err
}

func requireCode(t *testing.T, want codes.Code, err error, what ...any) {
	t.Helper()
	label := fmt.Sprint(what...)
	require.Error(t, err, label)
	require.Equal(t, want.String(), status.Code(err).String(), "%s: %v", label, err)
}

func agentShow(t *testing.T, n *testcluster.Node, id string) map[string]any {
	t.Helper()
	out, err := n.CLI("agent", "show", "--spiffe-id", id, "--output", "json")
	require.NoError(t, err, out)
	var m map[string]any
	require.NoError(t, json.Unmarshal([]byte(out), &m), out)
	return m
}

func createEntries(t *testing.T, n *testcluster.Node, entries ...*ferrypb.Entry) {
	t.Helper()
	resp, err := n.Admin().BatchCreateEntry(context.Background(), &ferrypb.BatchCreateEntryRequest{Entries: entries})
	require.NoError(t, err)
	for i, r := range resp.Results {
		require.Equal(t, codes.OK.String(), codes.Code(r.Code).String(), "entry %s: %s", entries[i].Id, r.Message)
	}
}

func apiEntry(id, spiffeID, parentID string) *ferrypb.Entry {
	return &ferrypb.Entry{Id: id, SpiffeId: spiffeID, ParentId: parentID, Selectors: []*ferrypb.Selector{{Type: "unix", Value: "uid:1000"}}}
}

// TestAgentAPI drives the Agent service of a one-node cluster directly:
// attestation and its rejections, renewal, CSR signing and JWT minting for
// authorized entries only.
func TestAgentAPI(t *testing.T) {
	if testing.Short() {
		t.Skip("real processes")
	}
	c := testcluster.New(t, testcluster.Options{Nodes: 1, LogLevel: "info"})
	api := newAgentAPI(t, c)
	s := c.Nodes[0]
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	t.Run("join token is single use", func(t *testing.T) {
		api := *api
		api.t = t
		id := "spiffe://example.org/spire/agent/once"
		tok := api.token(s, id, 10*time.Minute)
		svid, err := api.attest(ctx, s.AgentAddr, tok)
		require.NoError(t, err)
		require.Equal(t, id, svid.ID.String())
		require.NoError(t, ping(ctx, api.client(s.AgentAddr, svid)))
		require.Equal(t, "join_token", agentShow(t, s, id)["attestation_type"])

		_, err = api.attest(ctx, s.AgentAddr, tok)
		requireCode(t, codes.PermissionDenied, err, "second use of a join token")
	})

	t.Run("README agent example", func(t *testing.T) {
		// The README's agent walkthrough, as written: its token generate
		// line, then an agent attesting with that token.
		readme, err := os.ReadFile("../../README.md")
		require.NoError(t, err)
		var args []string
		for _, line := range strings.Split(string(readme), "\n") {
			if strings.HasPrefix(line, "ferry token generate ") {
				cmd, _, _ := strings.Cut(line, "#")
				args = strings.Fields(cmd)[1:]
				break
			}
		}
		require.NotEmpty(t, args, "the README shows ferry token generate")
		i := slices.Index(args, "--spiffe-id")
		require.GreaterOrEqual(t, i, 0, "the README's example names an agent ID")
		id := args[i+1]
		out, err := s.CLI(args...)
		require.NoError(t, err, out)
		token := strings.TrimSpace(between(out, "Token: ", "\n"))
		require.NotEmpty(t, token, out)
		bundle, err := s.CLI("bundle", "show")
		require.NoError(t, err, bundle)
		require.Contains(t, bundle, "BEGIN CERTIFICATE")

		c.StartAgentToken("readme", id, token)
		deadline := time.Now().Add(30 * time.Second)
		for {
			out, err := s.CLI("agent", "show", "--spiffe-id", id, "--output", "json")
			if err == nil {
				require.Contains(t, out, `"attestation_type": "join_token"`)
				break
			}
			require.True(t, time.Now().Before(deadline), "the README's agent never attested: %s", out)
			time.Sleep(100 * time.Millisecond)
		}
	})

	t.Run("expired join token", func(t *testing.T) {
		api := *api
		api.t = t
		tok := api.token(s, "spiffe://example.org/spire/agent/late", time.Second)
		time.Sleep(2100 * time.Millisecond)
		_, err := api.attest(ctx, s.AgentAddr, tok)
		requireCode(t, codes.PermissionDenied, err)
		_, err = s.CLI("agent", "show", "--spiffe-id", "spiffe://example.org/spire/agent/late")
		require.Error(t, err, "an expired token must not create an agent")
	})

	t.Run("unknown token", func(t *testing.T) {
		api := *api
		api.t = t
		tok, err := jointoken.Generate()
		require.NoError(t, err)
		_, err = api.attest(ctx, s.AgentAddr, tok)
		requireCode(t, codes.PermissionDenied, err)
	})

	t.Run("token for an ID no agent can have", func(t *testing.T) {
		// Refused when the token is made, by the CLI and by the server: an
		// attestation with it would be refused.
		for id, why := range map[string]string{
			agentAPIServerID.String():           `"spiffe://example.org/spire/server" is not an agent ID: agent IDs are under spiffe://example.org/spire/agent/`,
			"spiffe://example.org/agent/node1":  `"spiffe://example.org/agent/node1" is not an agent ID: agent IDs are under spiffe://example.org/spire/agent/, e.g. spiffe://example.org/spire/agent/node1`,
			"spiffe://other.org/spire/agent/x":  `"spiffe://other.org/spire/agent/x" is not a member of trust domain "example.org"`,
			"spiffe://example.org/spire/agent/": "trailing slash",
		} {
			out, err := s.CLI("token", "generate", "--spiffe-id", id)
			require.Error(t, err, id)
			require.Contains(t, out, why)
			_, err = s.Admin().CreateJoinToken(ctx, &ferrypb.CreateJoinTokenRequest{SpiffeId: id, TtlSeconds: 60})
			requireCode(t, codes.InvalidArgument, err, id)
			require.Contains(t, status.Convert(err).Message(), why)
		}
	})

	t.Run("banned agent", func(t *testing.T) {
		api := *api
		api.t = t
		id := "spiffe://example.org/spire/agent/banned"
		svid := api.mustAttest(ctx, s, id)
		cl := api.client(s.AgentAddr, svid)
		require.NoError(t, ping(ctx, cl))
		out, err := s.CLI("agent", "ban", "--spiffe-id", id)
		require.NoError(t, err, out)
		require.Equal(t, true, agentShow(t, s, id)["banned"])

		requireCode(t, codes.PermissionDenied, ping(ctx, cl))
		_, key := newKeyCSR(t)
		_, err = cl.RenewAgent(ctx, &ferrypb.RenewAgentRequest{Csr: key})
		requireCode(t, codes.PermissionDenied, err, "renewal by a banned agent")
		tok := api.token(s, id, time.Minute)
		_, err = api.attest(ctx, s.AgentAddr, tok)
		requireCode(t, codes.PermissionDenied, err, "attestation of a banned agent")

		// The refusal was the operator's doing, not the agent's: the token
		// is still good once the ban is lifted.
		out, err = s.CLI("agent", "ban", "--unban", "--spiffe-id", id)
		require.NoError(t, err, out)
		svid, err = api.attest(ctx, s.AgentAddr, tok)
		require.NoError(t, err, "the token survives a refused attestation")
		require.Equal(t, id, svid.ID.String())
		_, err = api.attest(ctx, s.AgentAddr, tok)
		requireCode(t, codes.PermissionDenied, err, "and is spent by the one that succeeded")
	})

	t.Run("evicted agent", func(t *testing.T) {
		api := *api
		api.t = t
		id := "spiffe://example.org/spire/agent/evicted"
		svid := api.mustAttest(ctx, s, id)
		cl := api.client(s.AgentAddr, svid)
		require.NoError(t, ping(ctx, cl))
		out, err := s.CLI("agent", "evict", "--spiffe-id", id)
		require.NoError(t, err, out)
		requireCode(t, codes.PermissionDenied, ping(ctx, cl))

		// Attesting again with a new token gives a new SVID; the one from
		// before the eviction stays refused.
		again := api.mustAttest(ctx, s, id)
		require.NoError(t, ping(ctx, api.client(s.AgentAddr, again)))
		requireCode(t, codes.PermissionDenied, ping(ctx, cl))
	})

	t.Run("no client certificate", func(t *testing.T) {
		api := *api
		api.t = t
		cl := api.client(s.AgentAddr, nil)
		_, csr := newKeyCSR(t)
		_, err := cl.BatchNewX509SVID(ctx, &ferrypb.BatchNewX509SVIDRequest{Params: []*ferrypb.X509SVIDParams{{EntryId: "x", Csr: csr}}})
		requireCode(t, codes.Unauthenticated, err)
		_, err = cl.RenewAgent(ctx, &ferrypb.RenewAgentRequest{Csr: csr})
		requireCode(t, codes.Unauthenticated, err)
		_, err = cl.NewJWTSVID(ctx, &ferrypb.NewJWTSVIDRequest{EntryId: "x", Audience: []string{"a"}})
		requireCode(t, codes.Unauthenticated, err)
	})

	t.Run("renewal", func(t *testing.T) {
		api := *api
		api.t = t
		id := "spiffe://example.org/spire/agent/renewing"
		svid0 := api.mustAttest(ctx, s, id)
		serial0 := svid0.Certificates[0].SerialNumber.String()
		require.Equal(t, serial0, agentShow(t, s, id)["cert_serial"])

		renew := func(with *x509svid.SVID) *x509svid.SVID {
			key, csr := newKeyCSR(t)
			resp, err := api.client(s.AgentAddr, with).RenewAgent(ctx, &ferrypb.RenewAgentRequest{Csr: csr})
			require.NoError(t, err)
			svid, err := api.svidFrom(resp.SvidChain, key)
			require.NoError(t, err)
			require.Equal(t, id, svid.ID.String())
			return svid
		}
		svid1 := renew(svid0)
		serial1 := svid1.Certificates[0].SerialNumber.String()
		require.NotEqual(t, serial0, serial1)
		require.Equal(t, serial1, agentShow(t, s, id)["cert_serial"])

		// The SVID an agent renewed with stays accepted until the agent uses
		// the new one (a lost response cannot lock it out); from then on only
		// the new one is.
		require.NoError(t, ping(ctx, api.client(s.AgentAddr, svid0)), "the previous SVID before the new one is used")
		require.NoError(t, ping(ctx, api.client(s.AgentAddr, svid0)), "the previous SVID before the new one is used, again")
		require.NoError(t, ping(ctx, api.client(s.AgentAddr, svid1)), "the new SVID")
		requireCode(t, codes.PermissionDenied, ping(ctx, api.client(s.AgentAddr, svid0)), "the previous SVID after the new one was used")
		rec := agentShow(t, s, id)
		require.Equal(t, serial1, rec["cert_serial"])
		require.Empty(t, rec["new_cert_serial"])

		// A renewal whose response was lost: the agent renews again with the
		// SVID it still holds, and the first renewal's SVID is never accepted.
		svid2 := renew(svid1)
		_, csr := newKeyCSR(t)
		_, err := api.client(s.AgentAddr, svid1).RenewAgent(ctx, &ferrypb.RenewAgentRequest{Csr: csr})
		require.NoError(t, err, "renewing again with the SVID renewed with")
		requireCode(t, codes.PermissionDenied, ping(ctx, api.client(s.AgentAddr, svid2)), "the SVID of a superseded renewal")
		require.NoError(t, ping(ctx, api.client(s.AgentAddr, svid1)))
	})

	t.Run("signing", func(t *testing.T) {
		api := *api
		api.t = t
		idA, idB := "spiffe://example.org/spire/agent/sign-a", "spiffe://example.org/spire/agent/sign-b"
		svidA := api.mustAttest(ctx, s, idA)
		api.mustAttest(ctx, s, idB)
		createEntries(t, s,
			apiEntry("sign-mine", "spiffe://example.org/w/mine", idA),
			apiEntry("sign-child", "spiffe://example.org/w/child", "spiffe://example.org/w/mine"),
			apiEntry("sign-theirs", "spiffe://example.org/w/theirs", idB),
			apiEntry("sign-via-alias", "spiffe://example.org/w/via-alias", "spiffe://example.org/alias/pop"),
		)
		// A node alias keyed on selectors no enabled node attestor produces
		// could never apply: refused (x509pop is enabled further down).
		alias := &ferrypb.Entry{Id: "sign-alias", SpiffeId: "spiffe://example.org/alias/pop", ParentId: agentAPIServerID.String(),
			Selectors: []*ferrypb.Selector{{Type: "x509pop", Value: "subject:cn:node-1"}}}
		resp0, err := s.Admin().BatchCreateEntry(ctx, &ferrypb.BatchCreateEntryRequest{Entries: []*ferrypb.Entry{alias}})
		require.NoError(t, err)
		require.Equal(t, codes.InvalidArgument.String(), codes.Code(resp0.Results[0].GetCode()).String())
		require.Contains(t, resp0.Results[0].GetMessage(), `"x509pop:subject:cn:node-1": the x509pop attestor is not enabled here`)
		cl := api.client(s.AgentAddr, svidA)
		var params []*ferrypb.X509SVIDParams
		keys := map[string]crypto.Signer{}
		for _, e := range []string{"sign-mine", "sign-child", "sign-theirs", "sign-via-alias", "sign-alias", "nope"} {
			// Every CSR asks for another ID: the signed ID must come from the entry.
			key, csr := newKeyCSR(t, "spiffe://example.org/i-want-this", idB)
			keys[e] = key
			params = append(params, &ferrypb.X509SVIDParams{EntryId: e, Csr: csr})
		}
		resp, err := cl.BatchNewX509SVID(ctx, &ferrypb.BatchNewX509SVIDRequest{Params: params})
		require.NoError(t, err)
		require.Len(t, resp.Results, len(params))
		want := map[string]string{"sign-mine": "spiffe://example.org/w/mine", "sign-child": "spiffe://example.org/w/child"}
		for i, r := range resp.Results {
			e := params[i].EntryId
			if wantID, ok := want[e]; ok {
				require.Equal(t, codes.OK.String(), codes.Code(r.Status.GetCode()).String(), "%s: %s", e, r.Status.GetMessage())
				svid, err := api.svidFrom(r.CertChain, keys[e])
				require.NoError(t, err, e)
				require.Equal(t, wantID, svid.ID.String(), e)
				require.Len(t, svid.Certificates[0].URIs, 1, "%s: one URI SAN", e)
				continue
			}
			// A join_token agent has no node selectors, so no node alias applies.
			require.Equal(t, codes.PermissionDenied.String(), codes.Code(r.Status.GetCode()).String(), "%s: %s", e, r.Status.GetMessage())
			require.Empty(t, r.CertChain, e)
		}

		// A CSR that is not one (or whose signature is wrong) is refused per item.
		_, csr := newKeyCSR(t)
		csr[len(csr)-1] ^= 0xff
		resp, err = cl.BatchNewX509SVID(ctx, &ferrypb.BatchNewX509SVIDRequest{Params: []*ferrypb.X509SVIDParams{{EntryId: "sign-mine", Csr: csr}}})
		require.NoError(t, err)
		require.Equal(t, codes.InvalidArgument.String(), codes.Code(resp.Results[0].Status.GetCode()).String())

		t.Run("jwt", func(t *testing.T) {
			tok, err := cl.NewJWTSVID(ctx, &ferrypb.NewJWTSVIDRequest{EntryId: "sign-mine", Audience: []string{"aud-1"}})
			require.NoError(t, err)
			parsed, err := jwtsvid.ParseInsecure(tok.Token, []string{"aud-1"})
			require.NoError(t, err)
			require.Equal(t, "spiffe://example.org/w/mine", parsed.ID.String())

			_, err = cl.NewJWTSVID(ctx, &ferrypb.NewJWTSVIDRequest{EntryId: "sign-theirs", Audience: []string{"aud-1"}})
			requireCode(t, codes.PermissionDenied, err, "another agent's entry")
			_, err = cl.NewJWTSVID(ctx, &ferrypb.NewJWTSVIDRequest{EntryId: "sign-via-alias", Audience: []string{"aud-1"}})
			requireCode(t, codes.PermissionDenied, err, "node-alias child for an agent without those node selectors")
			_, err = cl.NewJWTSVID(ctx, &ferrypb.NewJWTSVIDRequest{EntryId: "sign-mine"})
			requireCode(t, codes.InvalidArgument, err, "no audience")

			// The agent's own JWT-SVID: for the token exchange only, and only
			// while a managed identity accepts the agent (the success path:
			// TestLifecycleAgentIdentity).
			exchange := []string{"api://AzureADTokenExchange"}
			_, err = cl.NewJWTSVID(ctx, &ferrypb.NewJWTSVIDRequest{Agent: true, Audience: exchange})
			requireCode(t, codes.PermissionDenied, err, "no identity accepts the agent")
			_, err = cl.NewJWTSVID(ctx, &ferrypb.NewJWTSVIDRequest{Agent: true, Audience: []string{"aud-1"}})
			requireCode(t, codes.InvalidArgument, err, "another audience")
			_, err = cl.NewJWTSVID(ctx, &ferrypb.NewJWTSVIDRequest{Agent: true, Audience: append(exchange, "aud-1")})
			requireCode(t, codes.InvalidArgument, err, "another audience besides")
			_, err = cl.NewJWTSVID(ctx, &ferrypb.NewJWTSVIDRequest{Agent: true, EntryId: "sign-mine", Audience: exchange})
			requireCode(t, codes.InvalidArgument, err, "an entry as well")
		})

		t.Run("node alias", func(t *testing.T) {
			// An x509pop agent whose certificate has CN node-1 carries the
			// selector x509pop:subject:cn:node-1, which the alias entry needs.
			popAgent := enableX509PoP(t, c, "node-1")
			api := newAgentAPI(t, c)
			createEntries(t, s, alias)
			svid, err := api.attestWith(ctx, s.AgentAddr, popAgent)
			require.NoError(t, err)
			n := agentShow(t, s, svid.ID.String())
			require.Equal(t, "x509pop", n["attestation_type"])
			require.Contains(t, fmt.Sprint(n["selectors"]), "subject:cn:node-1")

			cl := api.client(s.AgentAddr, svid)
			var params []*ferrypb.X509SVIDParams
			for _, e := range []string{"sign-via-alias", "sign-mine", "sign-alias"} {
				_, csr := newKeyCSR(t)
				params = append(params, &ferrypb.X509SVIDParams{EntryId: e, Csr: csr})
			}
			resp, err := cl.BatchNewX509SVID(ctx, &ferrypb.BatchNewX509SVIDRequest{Params: params})
			require.NoError(t, err)
			require.Equal(t, codes.OK.String(), codes.Code(resp.Results[0].Status.GetCode()).String(), resp.Results[0].Status.GetMessage())
			leaf, err := x509.ParseCertificate(resp.Results[0].CertChain[0])
			require.NoError(t, err)
			require.Equal(t, "spiffe://example.org/w/via-alias", leaf.URIs[0].String())
			require.Equal(t, codes.PermissionDenied.String(), codes.Code(resp.Results[1].Status.GetCode()).String(), "another agent's entry")
			require.Equal(t, codes.PermissionDenied.String(), codes.Code(resp.Results[2].Status.GetCode()).String(), "the alias entry itself is not a workload entry")
			_, err = cl.NewJWTSVID(ctx, &ferrypb.NewJWTSVIDRequest{EntryId: "sign-via-alias", Audience: []string{"a"}})
			require.NoError(t, err)
		})
	})
}

// enableX509PoP restarts the cluster's only node with an x509pop CA bundle and
// returns the agent half for a node certificate with the given common name.
func enableX509PoP(t *testing.T, c *testcluster.Cluster, cn string) node.AgentAttestor {
	t.Helper()
	dir := t.TempDir()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "x509pop test CA"},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	require.NoError(t, err)
	caCert, err := x509.ParseCertificate(caDER)
	require.NoError(t, err)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	leafDER, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}, caCert, &key.PublicKey, caKey)
	require.NoError(t, err)
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	require.NoError(t, err)
	write := func(name, typ string, der []byte) string {
		p := filepath.Join(dir, name)
		require.NoError(t, os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600))
		return p
	}
	caPath := write("ca.pem", "CERTIFICATE", caDER)
	certPath := write("node.pem", "CERTIFICATE", leafDER)
	keyPath := write("node-key.pem", "PRIVATE KEY", keyDER)

	s := c.Nodes[0]
	conf, err := os.ReadFile(s.Config)
	require.NoError(t, err)
	patched := strings.Replace(string(conf), "server {\n", fmt.Sprintf("server {\n  x509pop {\n    ca_bundle_file = %q\n  }\n", caPath), 1)
	require.NoError(t, os.WriteFile(s.Config, []byte(patched), 0o600))
	s.Stop()
	s.Start()
	c.WaitLeader(30*time.Second, nil)

	at, err := x509pop.NewAgent(x509pop.AgentConfig{CertificatePath: certPath, PrivateKeyPath: keyPath})
	require.NoError(t, err)
	return at
}

// TestJoinTokenRace attests with one token concurrently on every server of a
// three-node cluster: consumption goes through the log, so exactly one wins.
func TestJoinTokenRace(t *testing.T) {
	if testing.Short() {
		t.Skip("real processes")
	}
	c := testcluster.New(t, testcluster.Options{Nodes: 3, LogLevel: "info"})
	api := newAgentAPI(t, c)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for round := 0; round < 3; round++ {
		id := fmt.Sprintf("spiffe://example.org/spire/agent/race-%d", round)
		tok := api.token(c.Nodes[round%3], id, 10*time.Minute)
		const attempts = 12
		var wg sync.WaitGroup
		errs := make([]error, attempts)
		svids := make([]*x509svid.SVID, attempts)
		start := make(chan struct{})
		for i := 0; i < attempts; i++ {
			// Each attempt has its own connection, made before the start.
			jt, err := jointoken.NewAgent(jointoken.AgentConfig{Token: tok})
			require.NoError(t, err)
			cl := api.client(c.Nodes[i%3].AgentAddr, nil)
			key, csr := newKeyCSR(t)
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				svids[i], errs[i] = api.attestOn(ctx, cl, jt, key, csr)
			}()
		}
		close(start)
		wg.Wait()
		var won int
		for i, err := range errs {
			if err == nil {
				won++
				require.Equal(t, id, svids[i].ID.String())
				continue
			}
			requireCode(t, codes.PermissionDenied, err, fmt.Sprintf("attempt %d on %s", i, c.Nodes[i%3].ID))
		}
		require.Equal(t, 1, won, "round %d: exactly one attestation must win", round)
		for _, n := range c.Nodes {
			require.Eventually(t, func() bool {
				_, err := n.CLI("agent", "show", "--spiffe-id", id)
				return err == nil
			}, 10*time.Second, 50*time.Millisecond, "the winner is known on %s", n.ID)
		}
	}
}

// TestAgentRenewsShortSVID runs a real agent whose SVID lives 8 seconds: it
// renews several times, each renewal retires the SVID before it, and the
// agent keeps serving workloads and minting through the server throughout.
func TestAgentRenewsShortSVID(t *testing.T) {
	if testing.Short() {
		t.Skip("real processes")
	}
	c := testcluster.New(t, testcluster.Options{Nodes: 1, LogLevel: "info"})
	s := c.Nodes[0]
	conf, err := os.ReadFile(s.Config)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(s.Config, []byte(strings.Replace(string(conf), "server {\n", "server {\n  ca {\n    agent_svid_ttl = \"8s\"\n  }\n", 1)), 0o600))
	s.Stop()
	s.Start()
	a := c.StartAgent("renewer")
	out, err := s.CLI("entry", "create", "--entry-id", "renewer-w", "--spiffe-id", "spiffe://example.org/renewer-w",
		"--parent-id", a.ID, "--selector", fmt.Sprintf("unix:uid:%d", os.Getuid()), "--jwt-ttl", "60")
	require.NoError(t, err, out)

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	client, err := workloadapi.New(ctx, workloadapi.WithAddr(a.SocketAddr()))
	require.NoError(t, err)
	defer client.Close()
	var serials []string
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		// Every JWT-SVID is minted by the server at the agent's request, so
		// each fetch proves the agent's current SVID is accepted.
		_, err := client.FetchJWTSVID(ctx, jwtsvid.Params{Audience: fmt.Sprintf("aud-%d", time.Now().UnixNano())})
		require.NoError(t, err)
		serial, _ := agentShow(t, s, a.ID)["cert_serial"].(string)
		if len(serials) == 0 || serials[len(serials)-1] != serial {
			serials = append(serials, serial)
		}
		time.Sleep(500 * time.Millisecond)
	}
	require.GreaterOrEqual(t, len(serials), 3, "the agent renewed at least twice in 20s")
	require.NotContains(t, a.LogTail(400), "renewal failed")
	require.NotContains(t, s.LogTail(400), "no longer current")
}

func between(s, start, end string) string {
	_, after, ok := strings.Cut(s, start)
	if !ok {
		return ""
	}
	v, _, _ := strings.Cut(after, end)
	return v
}
