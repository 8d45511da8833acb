package api_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"net/url"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/api"
	"github.com/ferry-id/ferry/server/federation"
	"github.com/ferry-id/ferry/server/state"
)

// fakeRefresher answers Refresh as the test sets it and records the calls.
type fakeRefresher struct {
	mu    sync.Mutex
	err   error
	calls []spiffeid.TrustDomain
}

func (f *fakeRefresher) Refresh(_ context.Context, td spiffeid.TrustDomain) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, td)
	return f.err
}

func (f *fakeRefresher) set(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.err = err
}

type fedEnv struct {
	store     *state.Store
	refresher *fakeRefresher
	client    ferrypb.FederationClient
	ctx       context.Context
}

func newFedEnv(t *testing.T) *fedEnv {
	t.Helper()
	store, err := state.New(state.Config{})
	require.NoError(t, err)
	fr := &fakeRefresher{}
	svc, err := api.NewFederation(api.FederationConfig{Cluster: &fakeCluster{store: store}, Store: store,
		TrustDomain: spiffeid.RequireTrustDomainFromString("ours.org"), Refresher: fr,
		Leader: func() (string, string) { return "s2", "10.0.0.2:8301" }, Logger: slog.New(slog.NewTextHandler(tlog{t}, nil))})
	require.NoError(t, err)
	sock := filepath.Join(t.TempDir(), "admin.sock")
	lis, err := net.Listen("unix", sock)
	require.NoError(t, err)
	gs := grpc.NewServer()
	ferrypb.RegisterFederationServer(gs, svc)
	go func() { _ = gs.Serve(lis) }()
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(func() { cancel(); conn.Close(); gs.Stop() })
	return &fedEnv{store: store, refresher: fr, client: ferrypb.NewFederationClient(conn), ctx: ctx}
}

// caBundle is a bundle with one self-signed CA certificate of td.
func caBundle(t *testing.T, td string) *ferrypb.Bundle {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	u, _ := url.Parse("spiffe://" + td)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: td}, NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour),
		URIs: []*url.URL{u}, BasicConstraintsValid: true, IsCA: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	require.NoError(t, err)
	return &ferrypb.Bundle{TrustDomain: td, X509Authorities: []*ferrypb.X509Authority{{Certificate: der}}}
}

func TestFederationRelationshipsAPI(t *testing.T) {
	e := newFedEnv(t)
	spiffeRel := &ferrypb.FederationRelationship{TrustDomain: "spiffe://other.org", BundleEndpointUrl: "https://other.org:8443",
		Profile: state.ProfileHTTPSSPIFFE, EndpointSpiffeId: "spiffe://other.org/spire/server"}

	_, err := e.client.CreateFederationRelationship(e.ctx, &ferrypb.PutFederationRelationshipRequest{Relationship: spiffeRel})
	requireCode(t, codes.FailedPrecondition, err, "https_spiffe without a bundle")
	_, err = e.client.CreateFederationRelationship(e.ctx, &ferrypb.PutFederationRelationshipRequest{Relationship: spiffeRel, TrustDomainBundle: caBundle(t, "third.org")})
	requireCode(t, codes.InvalidArgument, err, "a bundle of another trust domain")
	_, err = e.client.CreateFederationRelationship(e.ctx, &ferrypb.PutFederationRelationshipRequest{Relationship: spiffeRel,
		TrustDomainBundle: &ferrypb.Bundle{X509Authorities: []*ferrypb.X509Authority{{Certificate: []byte("junk")}}}})
	requireCode(t, codes.InvalidArgument, err, "an unparsable bundle")

	got, err := e.client.CreateFederationRelationship(e.ctx, &ferrypb.PutFederationRelationshipRequest{Relationship: spiffeRel, TrustDomainBundle: caBundle(t, "other.org")})
	require.NoError(t, err)
	require.Equal(t, "other.org", got.Relationship.TrustDomain, "stored in canonical form")
	require.Len(t, got.Bundle.X509Authorities, 1)
	_, err = e.client.CreateFederationRelationship(e.ctx, &ferrypb.PutFederationRelationshipRequest{Relationship: spiffeRel})
	requireCode(t, codes.AlreadyExists, err)

	for name, r := range map[string]*ferrypb.FederationRelationship{
		"our own trust domain": {TrustDomain: "ours.org", BundleEndpointUrl: "https://x", Profile: state.ProfileHTTPSWeb},
		"plain http":           {TrustDomain: "web.org", BundleEndpointUrl: "http://web.org/bundle", Profile: state.ProfileHTTPSWeb},
		"no trust domain":      {BundleEndpointUrl: "https://web.org/bundle", Profile: state.ProfileHTTPSWeb},
	} {
		_, err = e.client.CreateFederationRelationship(e.ctx, &ferrypb.PutFederationRelationshipRequest{Relationship: r})
		requireCode(t, codes.InvalidArgument, err, name)
	}

	web := &ferrypb.FederationRelationship{TrustDomain: "web.org", BundleEndpointUrl: "https://web.org/bundle", Profile: state.ProfileHTTPSWeb}
	_, err = e.client.UpdateFederationRelationship(e.ctx, &ferrypb.PutFederationRelationshipRequest{Relationship: web})
	requireCode(t, codes.NotFound, err)
	_, err = e.client.CreateFederationRelationship(e.ctx, &ferrypb.PutFederationRelationshipRequest{Relationship: web})
	require.NoError(t, err)
	web.BundleEndpointUrl = "https://web.org/v2/bundle"
	got, err = e.client.UpdateFederationRelationship(e.ctx, &ferrypb.PutFederationRelationshipRequest{Relationship: web})
	require.NoError(t, err)
	require.Equal(t, "https://web.org/v2/bundle", got.Relationship.BundleEndpointUrl)
	require.Nil(t, got.Bundle)

	list, err := e.client.ListFederationRelationships(e.ctx, &ferrypb.ListFederationRelationshipsRequest{})
	require.NoError(t, err)
	require.Len(t, list.Relationships, 2)
	require.Equal(t, "other.org", list.Relationships[0].Relationship.TrustDomain)
	require.NotNil(t, list.Relationships[0].Bundle)

	_, err = e.client.DeleteFederationRelationship(e.ctx, &ferrypb.DeleteFederationRelationshipRequest{TrustDomain: "web.org"})
	require.NoError(t, err)
	_, err = e.client.GetFederationRelationship(e.ctx, &ferrypb.GetFederationRelationshipRequest{TrustDomain: "web.org"})
	requireCode(t, codes.NotFound, err)
	_, err = e.client.DeleteFederationRelationship(e.ctx, &ferrypb.DeleteFederationRelationshipRequest{TrustDomain: "web.org"})
	requireCode(t, codes.NotFound, err)
}

func TestFederationRefreshBundleAPI(t *testing.T) {
	e := newFedEnv(t)
	_, err := e.client.CreateFederationRelationship(e.ctx, &ferrypb.PutFederationRelationshipRequest{Relationship: &ferrypb.FederationRelationship{
		TrustDomain: "web.org", BundleEndpointUrl: "https://web.org/bundle", Profile: state.ProfileHTTPSWeb}})
	require.NoError(t, err)

	got, err := e.client.RefreshBundle(e.ctx, &ferrypb.RefreshBundleRequest{TrustDomain: "web.org"})
	require.NoError(t, err)
	require.Equal(t, "web.org", got.Relationship.TrustDomain)
	require.Equal(t, []spiffeid.TrustDomain{spiffeid.RequireTrustDomainFromString("web.org")}, e.refresher.calls)

	e.refresher.set(federation.ErrNotLeader)
	_, err = e.client.RefreshBundle(e.ctx, &ferrypb.RefreshBundleRequest{TrustDomain: "web.org"})
	requireCode(t, codes.FailedPrecondition, err)
	require.ErrorContains(t, err, "s2 (10.0.0.2:8301)", "names the leader")

	e.refresher.set(fmt.Errorf("%w: web.org", federation.ErrNoRelationship))
	_, err = e.client.RefreshBundle(e.ctx, &ferrypb.RefreshBundleRequest{TrustDomain: "web.org"})
	requireCode(t, codes.NotFound, err)

	e.refresher.set(errors.New("federation: could not GET bundle: connection refused"))
	_, err = e.client.RefreshBundle(e.ctx, &ferrypb.RefreshBundleRequest{TrustDomain: "web.org"})
	requireCode(t, codes.Unavailable, err)
	require.ErrorContains(t, err, "connection refused")

	_, err = e.client.RefreshBundle(e.ctx, &ferrypb.RefreshBundleRequest{TrustDomain: "ours.org"})
	requireCode(t, codes.InvalidArgument, err)
}
