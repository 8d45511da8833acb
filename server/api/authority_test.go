package api_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"log/slog"
	"math/big"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/api"
	"github.com/ferry-id/ferry/server/ca"
	"github.com/ferry-id/ferry/server/state"
)

var td = spiffeid.RequireTrustDomainFromString("example.org")

type adminEnv struct {
	store  *state.Store
	ca     *ca.CA
	client ferrypb.AdminClient
	ctx    context.Context
}

// newAdminEnv serves an Admin with a real CA (publishing through a one-node
// fake cluster into a real store) on a real unix socket. A nil caCfg serves
// no authority.
func newAdminEnv(t *testing.T, caCfg *ca.Config) *adminEnv {
	t.Helper()
	store, err := state.New(state.Config{})
	require.NoError(t, err)
	fc := &fakeCluster{store: store}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	cfg := api.Config{Cluster: fc, Store: store, Logger: slog.New(slog.NewTextHandler(tlog{t}, nil))}
	e := &adminEnv{store: store, ctx: ctx}
	if caCfg != nil {
		caCfg.TrustDomain, caCfg.DataDir, caCfg.NodeID = td, t.TempDir(), "s1"
		caCfg.Publisher = api.BundlePublisher{Cluster: fc, TrustDomain: td}
		e.ca, err = ca.New(*caCfg)
		require.NoError(t, err)
		require.NoError(t, e.ca.Rotate(ctx))
		cfg.Authority = e.ca
	} else {
		cfg.TrustDomain = td
	}
	admin, err := api.NewAdmin(cfg)
	require.NoError(t, err)
	sock := filepath.Join(t.TempDir(), "admin.sock")
	lis, err := net.Listen("unix", sock)
	require.NoError(t, err)
	gs := grpc.NewServer()
	ferrypb.RegisterAdminServer(gs, admin)
	go func() { _ = gs.Serve(lis) }()
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() {
		cancel()
		conn.Close()
		gs.Stop()
	})
	e.client = ferrypb.NewAdminClient(conn)
	return e
}

func (e *adminEnv) bundle() *ferrypb.Bundle { return e.store.View().Bundle(td.Name()) }

// inBundle reports whether the authority's public half is in the replicated
// bundle, and whether it is tainted there.
func (e *adminEnv) inBundle(t *testing.T, a *ferrypb.LocalAuthority) (present, tainted bool) {
	t.Helper()
	b := e.bundle()
	require.NotNil(t, b)
	switch a.Kind {
	case "x509":
		for _, x := range b.X509Authorities {
			if string(x.Certificate) == string(a.Certificate) {
				return true, x.Tainted
			}
		}
	case "jwt":
		for _, k := range b.JwtAuthorities {
			if k.KeyId == a.Id {
				require.Equal(t, a.PublicKey, k.PublicKey)
				return true, k.Tainted
			}
		}
	}
	return false, false
}

func TestLocalAuthorityLifecycle(t *testing.T) {
	for _, kind := range []string{"x509", "jwt"} {
		t.Run(kind, func(t *testing.T) {
			e := newAdminEnv(t, &ca.Config{})
			list := func() []*ferrypb.LocalAuthority {
				resp, err := e.client.ListLocalAuthorities(e.ctx, &ferrypb.ListLocalAuthoritiesRequest{Kind: kind})
				require.NoError(t, err)
				for _, a := range resp.Authorities {
					require.Equal(t, kind, a.Kind)
				}
				return resp.Authorities
			}
			as := list()
			require.Len(t, as, 1)
			first := as[0]
			require.Equal(t, "active", first.Status)
			require.True(t, first.Published)
			require.False(t, first.Tainted)
			require.Greater(t, first.NotAfter, time.Now().Unix())
			require.NotEmpty(t, first.PublicKey)
			if kind == "x509" {
				cert, err := x509.ParseCertificate(first.Certificate)
				require.NoError(t, err)
				require.True(t, cert.IsCA)
				require.Equal(t, first.NotAfter, cert.NotAfter.Unix())
			}
			present, _ := e.inBundle(t, first)
			require.True(t, present)

			// Activate with nothing prepared.
			_, err := e.client.ActivateLocalAuthority(e.ctx, &ferrypb.LocalAuthorityRequest{Kind: kind})
			requireCode(t, codes.FailedPrecondition, err)

			next, err := e.client.PrepareLocalAuthority(e.ctx, &ferrypb.LocalAuthorityRequest{Kind: kind})
			require.NoError(t, err)
			require.Equal(t, "prepared", next.Status)
			require.NotEqual(t, first.Id, next.Id)
			present, _ = e.inBundle(t, next)
			require.True(t, present, "a prepared authority is published before it signs")

			// Only an old authority can be tainted.
			_, err = e.client.TaintLocalAuthority(e.ctx, &ferrypb.LocalAuthorityRequest{Kind: kind, AuthorityId: first.Id})
			requireCode(t, codes.FailedPrecondition, err)

			// Activate picks the prepared authority when none is named.
			act, err := e.client.ActivateLocalAuthority(e.ctx, &ferrypb.LocalAuthorityRequest{Kind: kind})
			require.NoError(t, err)
			require.Equal(t, next.Id, act.Id)
			require.Equal(t, "active", act.Status)
			as = list()
			require.Len(t, as, 2)
			require.Equal(t, first.Id, as[0].Id)
			require.Equal(t, "old", as[0].Status)
			present, _ = e.inBundle(t, as[0])
			require.True(t, present, "an old authority stays published")

			_, err = e.client.TaintLocalAuthority(e.ctx, &ferrypb.LocalAuthorityRequest{Kind: kind})
			requireCode(t, codes.InvalidArgument, err, "taint needs an ID")
			_, err = e.client.TaintLocalAuthority(e.ctx, &ferrypb.LocalAuthorityRequest{Kind: kind, AuthorityId: "nope"})
			requireCode(t, codes.NotFound, err)
			_, err = e.client.RevokeLocalAuthority(e.ctx, &ferrypb.LocalAuthorityRequest{Kind: kind, AuthorityId: first.Id})
			requireCode(t, codes.FailedPrecondition, err, "revoke needs a tainted authority")

			tainted, err := e.client.TaintLocalAuthority(e.ctx, &ferrypb.LocalAuthorityRequest{Kind: kind, AuthorityId: first.Id})
			require.NoError(t, err)
			require.True(t, tainted.Tainted)
			present, isTainted := e.inBundle(t, first)
			require.True(t, present)
			require.True(t, isTainted, "the taint reaches the bundle")

			revoked, err := e.client.RevokeLocalAuthority(e.ctx, &ferrypb.LocalAuthorityRequest{Kind: kind, AuthorityId: first.Id})
			require.NoError(t, err)
			require.Equal(t, first.Id, revoked.Id)
			present, _ = e.inBundle(t, first)
			require.False(t, present, "a revoked authority leaves the bundle")
			as = list()
			require.Len(t, as, 1)
			require.Equal(t, next.Id, as[0].Id)
		})
	}
}

func TestLocalAuthorityArguments(t *testing.T) {
	e := newAdminEnv(t, &ca.Config{})
	resp, err := e.client.ListLocalAuthorities(e.ctx, &ferrypb.ListLocalAuthoritiesRequest{})
	require.NoError(t, err)
	require.Len(t, resp.Authorities, 2, "both kinds when none is named")
	require.Equal(t, "x509", resp.Authorities[0].Kind)
	require.Equal(t, "jwt", resp.Authorities[1].Kind)

	_, err = e.client.ListLocalAuthorities(e.ctx, &ferrypb.ListLocalAuthoritiesRequest{Kind: "pgp"})
	requireCode(t, codes.InvalidArgument, err)
	_, err = e.client.PrepareLocalAuthority(e.ctx, &ferrypb.LocalAuthorityRequest{})
	requireCode(t, codes.InvalidArgument, err)
	_, err = e.client.RevokeLocalAuthority(e.ctx, &ferrypb.LocalAuthorityRequest{Kind: "jwt"})
	requireCode(t, codes.InvalidArgument, err)

	// A server without a local authority says so.
	none := newAdminEnv(t, nil)
	_, err = none.client.ListLocalAuthorities(none.ctx, &ferrypb.ListLocalAuthoritiesRequest{})
	requireCode(t, codes.Unimplemented, err)
	_, err = none.client.MintJWTSVID(none.ctx, &ferrypb.MintJWTSVIDRequest{SpiffeId: "spiffe://example.org/w", Audience: []string{"a"}})
	requireCode(t, codes.Unimplemented, err)
}

func newCSR(t *testing.T) (*ecdsa.PrivateKey, []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	require.NoError(t, err)
	return key, csr
}

func TestMintX509SVID(t *testing.T) {
	e := newAdminEnv(t, &ca.Config{})
	key, csr := newCSR(t)
	resp, err := e.client.MintX509SVID(e.ctx, &ferrypb.MintX509SVIDRequest{
		Csr: csr, SpiffeId: "spiffe://example.org/ops/tool", TtlSeconds: 600, DnsNames: []string{"tool.example.org"},
	})
	require.NoError(t, err)
	require.NotEmpty(t, resp.SvidChain)
	require.Len(t, resp.RootCas, len(e.bundle().X509Authorities))

	leaf, err := x509.ParseCertificate(resp.SvidChain[0])
	require.NoError(t, err)
	require.True(t, key.PublicKey.Equal(leaf.PublicKey), "the SVID certifies the caller's key")
	require.Len(t, leaf.URIs, 1)
	require.Equal(t, "spiffe://example.org/ops/tool", leaf.URIs[0].String())
	require.Equal(t, []string{"tool.example.org"}, leaf.DNSNames)
	require.Equal(t, leaf.NotAfter.Unix(), resp.ExpiresAt)
	require.WithinDuration(t, time.Now().Add(10*time.Minute), leaf.NotAfter, time.Minute)

	roots := x509.NewCertPool()
	for _, der := range resp.RootCas {
		c, err := x509.ParseCertificate(der)
		require.NoError(t, err)
		roots.AddCert(c)
	}
	inter := x509.NewCertPool()
	for _, der := range resp.SvidChain[1:] {
		c, err := x509.ParseCertificate(der)
		require.NoError(t, err)
		inter.AddCert(c)
	}
	_, err = leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	require.NoError(t, err, "the SVID chains to the returned bundle")

	for name, req := range map[string]*ferrypb.MintX509SVIDRequest{
		"no id":          {Csr: csr},
		"bad id":         {Csr: csr, SpiffeId: "https://example.org/x"},
		"foreign domain": {Csr: csr, SpiffeId: "spiffe://other.org/x"},
		"reserved path":  {Csr: csr, SpiffeId: "spiffe://example.org/spire/agent/x"},
		"no path":        {Csr: csr, SpiffeId: "spiffe://example.org"},
		"bad csr":        {Csr: []byte("junk"), SpiffeId: "spiffe://example.org/x"},
		"negative ttl":   {Csr: csr, SpiffeId: "spiffe://example.org/x", TtlSeconds: -1},
		"huge ttl":       {Csr: csr, SpiffeId: "spiffe://example.org/x", TtlSeconds: 365 * 24 * 3600},
		"bad dns":        {Csr: csr, SpiffeId: "spiffe://example.org/x", DnsNames: []string{"not a name"}},
	} {
		_, err := e.client.MintX509SVID(e.ctx, req)
		requireCode(t, codes.InvalidArgument, err, name)
	}
}

func TestMintJWTSVID(t *testing.T) {
	e := newAdminEnv(t, &ca.Config{JWTIssuer: "https://oidc.example.org", JWTAlgorithm: ca.RS256})
	resp, err := e.client.MintJWTSVID(e.ctx, &ferrypb.MintJWTSVIDRequest{
		SpiffeId: "spiffe://example.org/ops/tool", Audience: []string{"api://one", "api://two"}, TtlSeconds: 120,
	})
	require.NoError(t, err)
	require.WithinDuration(t, time.Now().Add(2*time.Minute), time.Unix(resp.ExpiresAt, 0), 5*time.Second)

	jb, err := ca.ToJWTBundle(e.bundle())
	require.NoError(t, err)
	svid, err := jwtsvid.ParseAndValidate(resp.Token, jwtbundle.NewSet(jb), []string{"api://two"})
	require.NoError(t, err, "the token verifies against the replicated bundle")
	require.Equal(t, "spiffe://example.org/ops/tool", svid.ID.String())
	require.Equal(t, "https://oidc.example.org", svid.Claims["iss"])
	_, known := jb.FindJWTAuthority(resp.KeyId)
	require.True(t, known)

	for name, req := range map[string]*ferrypb.MintJWTSVIDRequest{
		"no audience":    {SpiffeId: "spiffe://example.org/x"},
		"empty audience": {SpiffeId: "spiffe://example.org/x", Audience: []string{""}},
		"foreign domain": {SpiffeId: "spiffe://other.org/x", Audience: []string{"a"}},
		"reserved path":  {SpiffeId: "spiffe://example.org/spire/server", Audience: []string{"a"}},
		"huge ttl":       {SpiffeId: "spiffe://example.org/x", Audience: []string{"a"}, TtlSeconds: 365 * 24 * 3600},
	} {
		_, err := e.client.MintJWTSVID(e.ctx, req)
		requireCode(t, codes.InvalidArgument, err, name)
	}
}

func testCA(t *testing.T, isCA bool) []byte {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "other CA"},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		BasicConstraintsValid: true, IsCA: isCA, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	require.NoError(t, err)
	return der
}

func TestFederatedBundle(t *testing.T) {
	e := newAdminEnv(t, nil)
	jwtKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	jwtDER, err := x509.MarshalPKIXPublicKey(jwtKey.Public())
	require.NoError(t, err)
	in := &ferrypb.Bundle{
		TrustDomain:     "spiffe://other.org",
		X509Authorities: []*ferrypb.X509Authority{{Certificate: testCA(t, true)}},
		JwtAuthorities:  []*ferrypb.JWTAuthority{{KeyId: "k1", PublicKey: jwtDER}},
		SequenceNumber:  3, RefreshHintSeconds: 300,
	}
	got, err := e.client.SetFederatedBundle(e.ctx, &ferrypb.SetFederatedBundleRequest{Bundle: in})
	require.NoError(t, err)
	require.Equal(t, "other.org", got.TrustDomain, "stored under the trust domain's name")
	stored := e.store.View().Bundle("other.org")
	require.NotNil(t, stored)
	require.Equal(t, in.X509Authorities[0].Certificate, stored.X509Authorities[0].Certificate)
	require.Equal(t, "k1", stored.JwtAuthorities[0].KeyId)
	require.EqualValues(t, 3, stored.SequenceNumber)

	// Set replaces.
	in2 := &ferrypb.Bundle{TrustDomain: "other.org", X509Authorities: []*ferrypb.X509Authority{{Certificate: testCA(t, true)}}}
	_, err = e.client.SetFederatedBundle(e.ctx, &ferrypb.SetFederatedBundleRequest{Bundle: in2})
	require.NoError(t, err)
	stored = e.store.View().Bundle("other.org")
	require.Len(t, stored.X509Authorities, 1)
	require.Equal(t, in2.X509Authorities[0].Certificate, stored.X509Authorities[0].Certificate)
	require.Empty(t, stored.JwtAuthorities)

	for name, b := range map[string]*ferrypb.Bundle{
		"own trust domain":    {TrustDomain: "example.org", X509Authorities: in2.X509Authorities},
		"own as a SPIFFE URI": {TrustDomain: "spiffe://example.org", X509Authorities: in2.X509Authorities},
		"no trust domain":     {X509Authorities: in2.X509Authorities},
		"bad trust domain":    {TrustDomain: "Not A Domain", X509Authorities: in2.X509Authorities},
		"no authorities":      {TrustDomain: "third.org"},
		"not a CA":            {TrustDomain: "third.org", X509Authorities: []*ferrypb.X509Authority{{Certificate: testCA(t, false)}}},
		"junk certificate":    {TrustDomain: "third.org", X509Authorities: []*ferrypb.X509Authority{{Certificate: []byte("junk")}}},
		"junk JWT key":        {TrustDomain: "third.org", JwtAuthorities: []*ferrypb.JWTAuthority{{KeyId: "k", PublicKey: []byte("junk")}}},
		"JWT key without kid": {TrustDomain: "third.org", JwtAuthorities: []*ferrypb.JWTAuthority{{PublicKey: jwtDER}}},
		"duplicate kid":       {TrustDomain: "third.org", JwtAuthorities: []*ferrypb.JWTAuthority{{KeyId: "k", PublicKey: jwtDER}, {KeyId: "k", PublicKey: jwtDER}}},
	} {
		_, err := e.client.SetFederatedBundle(e.ctx, &ferrypb.SetFederatedBundleRequest{Bundle: b})
		requireCode(t, codes.InvalidArgument, err, name)
	}
	require.Nil(t, e.store.View().Bundle("third.org"))
	require.Nil(t, e.store.View().Bundle("example.org"))

	_, err = e.client.DeleteFederatedBundle(e.ctx, &ferrypb.DeleteFederatedBundleRequest{TrustDomain: "example.org"})
	requireCode(t, codes.InvalidArgument, err)
	deleted, err := e.client.DeleteFederatedBundle(e.ctx, &ferrypb.DeleteFederatedBundleRequest{TrustDomain: "other.org"})
	require.NoError(t, err)
	require.Equal(t, "other.org", deleted.TrustDomain)
	require.Nil(t, e.store.View().Bundle("other.org"))
	_, err = e.client.DeleteFederatedBundle(e.ctx, &ferrypb.DeleteFederatedBundleRequest{TrustDomain: "other.org"})
	requireCode(t, codes.NotFound, err)
}

func TestFederatedBundleRefusesOwnDomainFromAuthority(t *testing.T) {
	// With no TrustDomain in Config, the authority's is ours.
	e := newAdminEnv(t, &ca.Config{})
	own := e.bundle()
	_, err := e.client.SetFederatedBundle(e.ctx, &ferrypb.SetFederatedBundleRequest{Bundle: &ferrypb.Bundle{
		TrustDomain: "example.org", X509Authorities: []*ferrypb.X509Authority{{Certificate: testCA(t, true)}},
	}})
	requireCode(t, codes.InvalidArgument, err)
	require.Equal(t, own.Revision, e.bundle().Revision, "our bundle is untouched")
}

// TestRevokeRefusedWhileAgentsHold: an authority an agent reports holding
// unexpired SVIDs from is not revoked unless forced; list shows who holds
// what; an expired report or a report without it lets the revoke through.
func TestRevokeRefusedWhileAgentsHold(t *testing.T) {
	for _, kind := range []string{"x509", "jwt"} {
		t.Run(kind, func(t *testing.T) {
			e := newAdminEnv(t, &ca.Config{})
			old := e.ca.List(ca.Kind(kind))[0]
			next, err := e.client.PrepareLocalAuthority(e.ctx, &ferrypb.LocalAuthorityRequest{Kind: kind})
			require.NoError(t, err)
			_, err = e.client.ActivateLocalAuthority(e.ctx, &ferrypb.LocalAuthorityRequest{Kind: kind, AuthorityId: next.Id})
			require.NoError(t, err)
			_, err = e.client.TaintLocalAuthority(e.ctx, &ferrypb.LocalAuthorityRequest{Kind: kind, AuthorityId: old.ID})
			require.NoError(t, err)

			const agent = "spiffe://example.org/spire/agent/a"
			apply := func(cmd *ferrypb.Command) {
				t.Helper()
				res, err := (&fakeCluster{store: e.store}).Apply(e.ctx, cmd)
				require.NoError(t, err)
				require.EqualValues(t, codes.OK, res.GetStatus().GetCode(), res.GetStatus().GetMessage())
			}
			// The agent's own SVID has expired: it is gone, and only what it
			// reported as unexpired counts.
			apply(&ferrypb.Command{Op: &ferrypb.Command_NodePut{NodePut: &ferrypb.NodePut{Node: &ferrypb.AttestedNode{SpiffeId: agent, CertSerial: "1",
				CertNotAfter: time.Now().Add(-time.Minute).Unix()}}}})
			report := func(exp time.Time, ids ...string) {
				t.Helper()
				r := &ferrypb.AgentReport{SpiffeId: agent}
				for _, id := range ids {
					r.Authorities = append(r.Authorities, &ferrypb.HeldAuthority{Kind: kind, AuthorityId: id, Count: 3, ExpiresAt: exp.Unix()})
				}
				apply(&ferrypb.Command{Op: &ferrypb.Command_AgentReportPut{AgentReportPut: &ferrypb.AgentReportPut{Report: r}}})
			}
			until := time.Now().Add(time.Hour).Truncate(time.Second)
			report(until, old.ID, next.Id)

			list, err := e.client.ListLocalAuthorities(e.ctx, &ferrypb.ListLocalAuthoritiesRequest{Kind: kind})
			require.NoError(t, err)
			for _, a := range list.Authorities {
				require.EqualValues(t, 1, a.HoldingAgents, a.Id)
				require.Equal(t, until.Unix(), a.HeldUntil)
			}
			_, err = e.client.RevokeLocalAuthority(e.ctx, &ferrypb.LocalAuthorityRequest{Kind: kind, AuthorityId: old.ID})
			requireCode(t, codes.FailedPrecondition, err)
			require.ErrorContains(t, err, "1 agent(s) still hold")
			require.Len(t, e.ca.List(ca.Kind(kind)), 2, "nothing revoked")

			// Reported expired: nothing is held any more.
			report(time.Now().Add(-time.Second), old.ID, next.Id)
			list, err = e.client.ListLocalAuthorities(e.ctx, &ferrypb.ListLocalAuthoritiesRequest{Kind: kind})
			require.NoError(t, err)
			require.Zero(t, list.Authorities[0].HoldingAgents)
			// Unless the agent is alive: it renews what it holds without
			// reporting each renewal, so it holds what it listed until it
			// reports otherwise.
			alive := time.Now().Add(30 * time.Minute).Truncate(time.Second)
			apply(&ferrypb.Command{Op: &ferrypb.Command_NodePut{NodePut: &ferrypb.NodePut{Node: &ferrypb.AttestedNode{SpiffeId: agent, CertSerial: "2",
				CertNotAfter: alive.Unix()}}}})
			list, err = e.client.ListLocalAuthorities(e.ctx, &ferrypb.ListLocalAuthoritiesRequest{Kind: kind})
			require.NoError(t, err)
			require.EqualValues(t, 1, list.Authorities[0].HoldingAgents)
			require.Equal(t, alive.Unix(), list.Authorities[0].HeldUntil)
			_, err = e.client.RevokeLocalAuthority(e.ctx, &ferrypb.LocalAuthorityRequest{Kind: kind, AuthorityId: old.ID})
			requireCode(t, codes.FailedPrecondition, err)
			report(until, old.ID, next.Id)
			// The agent replaced what the old authority signed.
			report(until, next.Id)
			got, err := e.client.RevokeLocalAuthority(e.ctx, &ferrypb.LocalAuthorityRequest{Kind: kind, AuthorityId: old.ID})
			require.NoError(t, err)
			require.Equal(t, old.ID, got.Id)

			// Forced: revoked although held.
			third, err := e.client.PrepareLocalAuthority(e.ctx, &ferrypb.LocalAuthorityRequest{Kind: kind})
			require.NoError(t, err)
			_, err = e.client.ActivateLocalAuthority(e.ctx, &ferrypb.LocalAuthorityRequest{Kind: kind, AuthorityId: third.Id})
			require.NoError(t, err)
			_, err = e.client.TaintLocalAuthority(e.ctx, &ferrypb.LocalAuthorityRequest{Kind: kind, AuthorityId: next.Id})
			require.NoError(t, err)
			_, err = e.client.RevokeLocalAuthority(e.ctx, &ferrypb.LocalAuthorityRequest{Kind: kind, AuthorityId: next.Id})
			requireCode(t, codes.FailedPrecondition, err)
			_, err = e.client.RevokeLocalAuthority(e.ctx, &ferrypb.LocalAuthorityRequest{Kind: kind, AuthorityId: next.Id, Force: true})
			require.NoError(t, err)
			require.Len(t, e.ca.List(ca.Kind(kind)), 1)
		})
	}
}
