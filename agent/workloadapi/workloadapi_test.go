package workloadapi_test

import (
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/exp/svid/witsvid"
	workloadpb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	ferrywl "github.com/ferry-id/ferry/agent/workloadapi"
	"github.com/ferry-id/ferry/internal/hostilecaller"
	"github.com/ferry-id/ferry/internal/roottest"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

// Child process modes: the test binary re-executes itself to act as another
// process (another uid, or a caller that dies mid-call).
const (
	childModeEnv   = "FERRY_WLAPI_CHILD"
	childSocketEnv = "FERRY_WLAPI_SOCKET"
)

func TestMain(m *testing.M) {
	hostilecaller.Main()
	switch os.Getenv(childModeEnv) {
	case "":
		os.Exit(m.Run())
	case "fetch":
		// Report the gRPC code FetchX509SVID gets, and the SVID's ID if any.
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		svid, err := workloadapi.FetchX509SVID(ctx, workloadapi.WithAddr("unix://"+os.Getenv(childSocketEnv)))
		if err != nil {
			fmt.Printf("code=%s\n", status.Code(err))
			os.Exit(0)
		}
		fmt.Printf("code=OK id=%s\n", svid.ID)
		os.Exit(0)
	case "setuid":
		// Fetch as root, drop to uid 65534, fetch again on the same
		// connection: report both codes.
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		c, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+os.Getenv(childSocketEnv)))
		if err != nil {
			fmt.Printf("client: %v\n", err)
			os.Exit(1)
		}
		_, err = c.FetchX509SVID(ctx)
		fmt.Printf("before=%s\n", status.Code(err))
		if err := syscall.Setgid(65534); err != nil {
			fmt.Printf("setgid: %v\n", err)
			os.Exit(1)
		}
		if err := syscall.Setuid(65534); err != nil {
			fmt.Printf("setuid: %v\n", err)
			os.Exit(1)
		}
		_, err = c.FetchX509SVID(ctx)
		fmt.Printf("after=%s %s\n", status.Code(err), status.Convert(err).Message())
		_, err = c.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "a"})
		fmt.Printf("jwt=%s\n", status.Code(err))
		os.Exit(0)
	case "hold":
		// Call and wait: the parent kills this process while it is attested.
		ctx := context.Background()
		_, _ = workloadapi.FetchX509SVID(ctx, workloadapi.WithAddr("unix://"+os.Getenv(childSocketEnv)))
		time.Sleep(time.Minute)
		os.Exit(0)
	}
}

func clientOpt(f *fixture) workloadapi.ClientOption { return workloadapi.WithAddr(f.addr) }

// testCtx is the context of a test's calls: it ends with the test, or
// shortly before the test binary's own deadline (-timeout), so a call that
// hangs fails the test with its own error rather than a timeout panic. No
// shorter bound: on a loaded machine a slow call is not a failure.
func testCtx(t *testing.T) context.Context {
	ctx := t.Context()
	if d, ok := t.Deadline(); ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, d.Add(-30*time.Second))
		t.Cleanup(cancel)
	}
	return ctx
}

// rawClient is the generated gRPC client, which sends no security header
// unless the context carries it.
func rawClient(t *testing.T, f *fixture) workloadpb.SpiffeWorkloadAPIClient {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+f.socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	return workloadpb.NewSpiffeWorkloadAPIClient(conn)
}

func withHeader(ctx context.Context) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "workload.spiffe.io", "true")
}

func requireCode(t *testing.T, err error, code codes.Code, msg string) {
	t.Helper()
	require.Error(t, err)
	st, ok := status.FromError(err)
	require.True(t, ok, "not a gRPC status: %v", err)
	require.Equal(t, code, st.Code(), "message: %s", st.Message())
	if msg != "" {
		require.Contains(t, st.Message(), msg)
	}
}

func TestX509SourceServesDefaultIdentityAndBundles(t *testing.T) {
	f := startServer(t)
	ctx := testCtx(t)

	src, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(clientOpt(f)))
	require.NoError(t, err)
	defer src.Close()

	svid, err := src.GetX509SVID()
	require.NoError(t, err)
	require.Equal(t, "spiffe://example.org/web", svid.ID.String(), "first identity is the default")
	require.Equal(t, "internal", svid.Hint)

	// The SVID chains to the served bundle of its own trust domain.
	ownBundle, err := src.GetX509BundleForTrustDomain(ownTD)
	require.NoError(t, err)
	_, _, err = x509svid.Verify(svid.Certificates, ownBundle)
	require.NoError(t, err)
	// The key is the one the certificate was issued for.
	require.True(t, publicEqual(svid.PrivateKey.Public(), svid.Certificates[0].PublicKey))

	// other.org is federated by the entry; third.org is offered by the cache
	// but no entry federates with it.
	fed, err := src.GetX509BundleForTrustDomain(otherTD)
	require.NoError(t, err)
	require.True(t, fed.X509Authorities()[0].Equal(f.fedCA.cert))
	_, err = src.GetX509BundleForTrustDomain(thirdTD)
	require.Error(t, err)

	// Both identities come back from FetchX509SVIDs, in the cache's order.
	client, err := workloadapi.New(ctx, clientOpt(f))
	require.NoError(t, err)
	defer client.Close()
	all, err := client.FetchX509SVIDs(ctx)
	require.NoError(t, err)
	require.Len(t, all, 2)
	require.Equal(t, "spiffe://example.org/admin", all[1].ID.String())

	bundles, err := client.FetchX509Bundles(ctx)
	require.NoError(t, err)
	require.True(t, bundles.Has(ownTD))
	require.True(t, bundles.Has(otherTD))
	require.False(t, bundles.Has(thirdTD))
}

func TestRawX509SVIDResponse(t *testing.T) {
	f := startServer(t)
	// Two more identities: one reusing a hint, one without any.
	f.mgr.setEntries(
		entry("e1", "spiffe://example.org/web", "internal", "spiffe://other.org"),
		entry("e2", "spiffe://example.org/admin", "external"),
		entry("e3", "spiffe://example.org/web2", "internal"),
		entry("e4", "spiffe://example.org/plain", ""),
		entry("e5", "spiffe://example.org/plain2", ""),
	)
	c := rawClient(t, f)
	stream, err := c.FetchX509SVID(withHeader(testCtx(t)), &workloadpb.X509SVIDRequest{})
	require.NoError(t, err)
	resp, err := stream.Recv()
	require.NoError(t, err)

	var ids []string
	for _, s := range resp.Svids {
		ids = append(ids, s.SpiffeId)
		certs, err := x509.ParseCertificates(s.X509Svid)
		require.NoError(t, err)
		require.Len(t, certs, 1)
		require.Equal(t, s.SpiffeId, certs[0].URIs[0].String())
		_, err = x509.ParsePKCS8PrivateKey(s.X509SvidKey)
		require.NoError(t, err)
		bundle, err := x509.ParseCertificates(s.Bundle)
		require.NoError(t, err)
		require.True(t, bundle[0].Equal(f.ca.cert))
	}
	// The second "internal" identity is dropped: hints are unique per response.
	require.Equal(t, []string{
		"spiffe://example.org/web", "spiffe://example.org/admin",
		"spiffe://example.org/plain", "spiffe://example.org/plain2",
	}, ids)
	// Federated bundles are keyed by trust domain ID, DER encoded.
	require.Len(t, resp.FederatedBundles, 1)
	fed, err := x509.ParseCertificates(resp.FederatedBundles["spiffe://other.org"])
	require.NoError(t, err)
	require.True(t, fed[0].Equal(f.fedCA.cert))
}

func TestWatchX509ContextGetsPushedUpdates(t *testing.T) {
	f := startServer(t)
	ctx := testCtx(t)
	client, err := workloadapi.New(ctx, clientOpt(f))
	require.NoError(t, err)
	defer client.Close()

	w := &x509Watcher{updates: make(chan *workloadapi.X509Context, 10)}
	watchCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- client.WatchX509Context(watchCtx, w) }()

	first := recvContext(t, w)
	require.Len(t, first.SVIDs, 2)

	rotated := f.mgr.rotate("e1")
	second := recvContext(t, w)
	require.Equal(t, rotated.SerialNumber, second.SVIDs[0].Certificates[0].SerialNumber)
	require.NotEqual(t, first.SVIDs[0].Certificates[0].SerialNumber, rotated.SerialNumber)

	// An identity removed from the cache disappears from the next message.
	f.mgr.setEntries(entry("e2", "spiffe://example.org/admin", "external"))
	third := recvContext(t, w)
	require.Len(t, third.SVIDs, 1)
	require.Equal(t, "spiffe://example.org/admin", third.SVIDs[0].ID.String())

	stop()
	require.Equal(t, codes.Canceled, status.Code(<-done))
	require.Eventually(t, func() bool { return f.mgr.activeSubscribers() == 0 }, 5*time.Second, 10*time.Millisecond)
}

type x509Watcher struct {
	updates chan *workloadapi.X509Context
}

func (w *x509Watcher) OnX509ContextUpdate(c *workloadapi.X509Context) { w.updates <- c }
func (w *x509Watcher) OnX509ContextWatchError(error)                  {}

func recvContext(t *testing.T, w *x509Watcher) *workloadapi.X509Context {
	t.Helper()
	select {
	case c := <-w.updates:
		return c
	case <-time.After(10 * time.Second):
		t.Fatal("no X509 context update")
		return nil
	}
}

func TestJWTSourceFetchAndValidate(t *testing.T) {
	f := startServer(t)
	ctx := testCtx(t)

	src, err := workloadapi.NewJWTSource(ctx, workloadapi.WithClientOptions(clientOpt(f)))
	require.NoError(t, err)
	defer src.Close()

	svid, err := src.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "api://AzureADTokenExchange"})
	require.NoError(t, err)
	require.Equal(t, "spiffe://example.org/web", svid.ID.String())

	// The JWT bundle the source received verifies the token: JWKS with
	// kid and use "jwt-svid" as go-spiffe's jwtbundle parses it.
	verified, err := jwtsvid.ParseAndValidate(svid.Marshal(), src, []string{"api://AzureADTokenExchange"})
	require.NoError(t, err)
	require.Equal(t, svid.ID, verified.ID)
	b, err := src.GetJWTBundleForTrustDomain(ownTD)
	require.NoError(t, err)
	require.Len(t, b.JWTAuthorities(), 2, "EC and RSA authorities")
	rsaPub, ok := b.FindJWTAuthority("example.org-jwt-rsa")
	require.True(t, ok)
	require.True(t, f.ca.rsaJWT.PublicKey.Equal(rsaPub))
	_, err = src.GetJWTBundleForTrustDomain(otherTD)
	require.NoError(t, err, "federated JWT bundle")
	_, err = src.GetJWTBundleForTrustDomain(thirdTD)
	require.Error(t, err)

	// A specific identity, and all of them.
	admin, err := src.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "a", Subject: spiffeid.RequireFromString("spiffe://example.org/admin")})
	require.NoError(t, err)
	require.Equal(t, "spiffe://example.org/admin", admin.ID.String())
	all, err := src.FetchJWTSVIDs(ctx, jwtsvid.Params{Audience: "a", ExtraAudiences: []string{"b"}})
	require.NoError(t, err)
	require.Len(t, all, 2)
	require.Equal(t, []string{"a", "b"}, all[1].Audience)

	_, err = src.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "a", Subject: spiffeid.RequireFromString("spiffe://example.org/nope")})
	requireCode(t, err, codes.PermissionDenied, "no identity issued")

	// ValidateJWTSVID through the client.
	client, err := workloadapi.New(ctx, clientOpt(f))
	require.NoError(t, err)
	defer client.Close()
	got, err := client.ValidateJWTSVID(ctx, svid.Marshal(), "api://AzureADTokenExchange")
	require.NoError(t, err)
	require.Equal(t, svid.ID, got.ID)

	// The raw response carries the SPIFFE ID and the claims.
	raw := rawClient(t, f)
	resp, err := raw.ValidateJWTSVID(withHeader(ctx), &workloadpb.ValidateJWTSVIDRequest{Svid: svid.Marshal(), Audience: "api://AzureADTokenExchange"})
	require.NoError(t, err)
	require.Equal(t, "spiffe://example.org/web", resp.SpiffeId)
	claims := resp.Claims.AsMap()
	require.Equal(t, "spiffe://example.org/web", claims["sub"])
	require.Equal(t, []any{"api://AzureADTokenExchange"}, claims["aud"])
	require.Equal(t, "https://oidc.example.org", claims["iss"])
	require.InDelta(t, float64(svid.Expiry.Unix()), claims["exp"], 1)

	// The log never holds the token.
	require.NotContains(t, f.log.String(), svid.Marshal())
	require.NotContains(t, f.log.String(), strings.Split(svid.Marshal(), ".")[2])
}

func TestJWTArgumentErrors(t *testing.T) {
	f := startServer(t)
	ctx := withHeader(testCtx(t))
	c := rawClient(t, f)

	_, err := c.FetchJWTSVID(ctx, &workloadpb.JWTSVIDRequest{})
	requireCode(t, err, codes.InvalidArgument, "audience must be specified")
	_, err = c.FetchJWTSVID(ctx, &workloadpb.JWTSVIDRequest{Audience: []string{""}})
	requireCode(t, err, codes.InvalidArgument, "audience must not be empty")
	_, err = c.FetchJWTSVID(ctx, &workloadpb.JWTSVIDRequest{Audience: []string{"a"}, SpiffeId: "not-an-id"})
	requireCode(t, err, codes.InvalidArgument, "invalid requested SPIFFE ID")
	_, err = c.ValidateJWTSVID(ctx, &workloadpb.ValidateJWTSVIDRequest{Svid: "x"})
	requireCode(t, err, codes.InvalidArgument, "audience must be specified")
	_, err = c.ValidateJWTSVID(ctx, &workloadpb.ValidateJWTSVIDRequest{Audience: "a"})
	requireCode(t, err, codes.InvalidArgument, "svid must be specified")
}

func TestFetchJWTSVIDHintsUnique(t *testing.T) {
	f := startServer(t)
	f.mgr.setEntries(
		entry("e1", "spiffe://example.org/web", "internal"),
		entry("e2", "spiffe://example.org/web2", "internal"),
		entry("e3", "spiffe://example.org/admin", "external"),
	)
	resp, err := rawClient(t, f).FetchJWTSVID(withHeader(testCtx(t)), &workloadpb.JWTSVIDRequest{Audience: []string{"a"}})
	require.NoError(t, err)
	var got []string
	for _, s := range resp.Svids {
		got = append(got, s.SpiffeId+"|"+s.Hint)
	}
	require.Equal(t, []string{"spiffe://example.org/web|internal", "spiffe://example.org/admin|external"}, got)
}

func TestValidateJWTSVIDRejects(t *testing.T) {
	f := startServer(t)
	ctx := withHeader(testCtx(t))
	c := rawClient(t, f)
	exp := time.Now().Add(time.Minute)

	good, err := f.ca.signJWT("spiffe://example.org/x", []string{"aud1"}, exp, nil)
	require.NoError(t, err)
	_, err = c.ValidateJWTSVID(ctx, &workloadpb.ValidateJWTSVIDRequest{Svid: good, Audience: "other"})
	requireCode(t, err, codes.InvalidArgument, "audience")

	expired, err := f.ca.signJWT("spiffe://example.org/x", []string{"aud1"}, time.Now().Add(-time.Hour), nil)
	require.NoError(t, err)
	_, err = c.ValidateJWTSVID(ctx, &workloadpb.ValidateJWTSVIDRequest{Svid: expired, Audience: "aud1"})
	requireCode(t, err, codes.InvalidArgument, "expired")

	// Signed by a key no visible bundle holds (same kid, different key).
	impostor := newCA(t, ownTD)
	forged, err := impostor.signJWT("spiffe://example.org/x", []string{"aud1"}, exp, nil)
	require.NoError(t, err)
	_, err = c.ValidateJWTSVID(ctx, &workloadpb.ValidateJWTSVIDRequest{Svid: forged, Audience: "aud1"})
	requireCode(t, err, codes.InvalidArgument, "")

	// A trust domain no entry federates with is not trusted, though the
	// cache offers its bundle.
	thirdTok, err := f.thirdCA.signJWT("spiffe://third.org/x", []string{"aud1"}, exp, nil)
	require.NoError(t, err)
	_, err = c.ValidateJWTSVID(ctx, &workloadpb.ValidateJWTSVIDRequest{Svid: thirdTok, Audience: "aud1"})
	requireCode(t, err, codes.InvalidArgument, "no bundle found")

	// A federated token validates, and keeps only sub, aud, exp.
	fedTok, err := f.fedCA.signJWT("spiffe://other.org/svc", []string{"aud1"}, exp, map[string]any{"role": "admin"})
	require.NoError(t, err)
	resp, err := c.ValidateJWTSVID(ctx, &workloadpb.ValidateJWTSVIDRequest{Svid: fedTok, Audience: "aud1"})
	require.NoError(t, err)
	require.Equal(t, "spiffe://other.org/svc", resp.SpiffeId)
	keys := make([]string, 0)
	for k := range resp.Claims.AsMap() {
		keys = append(keys, k)
	}
	require.ElementsMatch(t, []string{"sub", "aud", "exp"}, keys)

	// A local token keeps every claim.
	local, err := f.ca.signJWT("spiffe://example.org/x", []string{"aud1"}, exp, map[string]any{"role": "admin"})
	require.NoError(t, err)
	resp, err = c.ValidateJWTSVID(ctx, &workloadpb.ValidateJWTSVIDRequest{Svid: local, Audience: "aud1"})
	require.NoError(t, err)
	require.Equal(t, "admin", resp.Claims.AsMap()["role"])
}

func TestAllowedForeignClaims(t *testing.T) {
	f := startServer(t, func(c *ferrywl.Config) { c.AllowedForeignJWTClaims = []string{"role"} })
	fedTok, err := f.fedCA.signJWT("spiffe://other.org/svc", []string{"aud1"}, time.Now().Add(time.Minute), map[string]any{"role": "admin", "iat2": 1})
	require.NoError(t, err)
	resp, err := rawClient(t, f).ValidateJWTSVID(withHeader(testCtx(t)), &workloadpb.ValidateJWTSVIDRequest{Svid: fedTok, Audience: "aud1"})
	require.NoError(t, err)
	m := resp.Claims.AsMap()
	require.Equal(t, "admin", m["role"])
	require.NotContains(t, m, "iat2")
}

func TestBundleSource(t *testing.T) {
	f := startServer(t)
	ctx := testCtx(t)
	src, err := workloadapi.NewBundleSource(ctx, workloadapi.WithClientOptions(clientOpt(f)))
	require.NoError(t, err)
	defer src.Close()

	b, err := src.GetBundleForTrustDomain(ownTD)
	require.NoError(t, err)
	require.True(t, b.X509Authorities()[0].Equal(f.ca.cert))
	pub, ok := b.FindJWTAuthority(f.ca.jwtKid)
	require.True(t, ok)
	require.True(t, publicEqual(f.ca.jwtKey.Public(), pub))
	_, err = src.GetBundleForTrustDomain(otherTD)
	require.NoError(t, err)

	// Raw JWKS: kid, use, and the SPIFFE bundle members.
	stream, err := rawClient(t, f).FetchJWTBundles(withHeader(ctx), &workloadpb.JWTBundlesRequest{})
	require.NoError(t, err)
	resp, err := stream.Recv()
	require.NoError(t, err)
	var doc struct {
		Keys []struct {
			Kty, Kid, Use string
		} `json:"keys"`
		RefreshHint int64 `json:"spiffe_refresh_hint"`
		Sequence    int64 `json:"spiffe_sequence"`
	}
	require.NoError(t, json.Unmarshal(resp.Bundles["spiffe://example.org"], &doc))
	require.Len(t, doc.Keys, 2)
	for _, k := range doc.Keys {
		require.Equal(t, "jwt-svid", k.Use)
		require.NotEmpty(t, k.Kid)
	}
	require.Equal(t, int64(90), doc.RefreshHint)
	require.Equal(t, int64(7), doc.Sequence)
	parsed, err := jwtbundle.Parse(ownTD, resp.Bundles["spiffe://example.org"])
	require.NoError(t, err)
	require.Len(t, parsed.JWTAuthorities(), 2)
}

func TestWITSourceAndBundles(t *testing.T) {
	for _, keyType := range []string{"ec", "rsa"} {
		t.Run(keyType, func(t *testing.T) {
			f := startServer(t)
			f.mgr.setWIT(keyType, 0)
			ctx := testCtx(t)
			src, err := workloadapi.NewWITSource(ctx, workloadapi.WithClientOptions(clientOpt(f)))
			require.NoError(t, err)
			defer src.Close()

			svid, err := src.GetWITSVIDForID(spiffeid.RequireFromString("spiffe://example.org/web"))
			require.NoError(t, err)
			// The private key the client parsed matches the cnf key.
			signer, ok := svid.PrivateKey.(crypto.Signer)
			require.True(t, ok, "private key type %T", svid.PrivateKey)
			require.True(t, publicEqual(signer.Public(), svid.PublicKey))
			// The WIT bundle verifies the token.
			verified, err := witsvid.ParseAndValidate(svid.Marshal(), src)
			require.NoError(t, err)
			require.Equal(t, svid.ID, verified.ID)
			wb, err := src.GetWITBundleForTrustDomain(ownTD)
			require.NoError(t, err)
			require.True(t, wb.HasWITAuthority(f.ca.witKid))

			client, err := workloadapi.New(ctx, clientOpt(f))
			require.NoError(t, err)
			defer client.Close()
			all, err := client.FetchWITSVIDs(ctx, "")
			require.NoError(t, err)
			require.Len(t, all, 2)
			one, err := client.FetchWITSVIDs(ctx, "spiffe://example.org/admin")
			require.NoError(t, err)
			require.Len(t, one, 1)
			require.Equal(t, "spiffe://example.org/admin", one[0].ID.String())
		})
	}
}

func TestWITUnimplementedWithoutSource(t *testing.T) {
	f := startServer(t, func(c *ferrywl.Config) { c.Manager = onlyManager{c.Manager} })
	ctx := testCtx(t)
	client, err := workloadapi.New(ctx, clientOpt(f))
	require.NoError(t, err)
	defer client.Close()
	_, err = client.FetchWITSVID(ctx, "")
	requireCode(t, err, codes.Unimplemented, "")
	_, err = client.FetchWITBundles(ctx)
	requireCode(t, err, codes.Unimplemented, "")
	// The X.509 profile is unaffected.
	_, err = client.FetchX509SVID(ctx)
	require.NoError(t, err)
}

func TestSecurityHeaderRequired(t *testing.T) {
	f := startServer(t)
	c := rawClient(t, f)
	ctx := testCtx(t)
	const msg = "security header missing from request"

	cases := map[string]context.Context{
		"missing":   ctx,
		"false":     metadata.AppendToOutgoingContext(ctx, "workload.spiffe.io", "false"),
		"TRUE":      metadata.AppendToOutgoingContext(ctx, "workload.spiffe.io", "TRUE"),
		"duplicate": metadata.AppendToOutgoingContext(ctx, "workload.spiffe.io", "true", "workload.spiffe.io", "true"),
	}
	for name, hctx := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := c.FetchJWTSVID(hctx, &workloadpb.JWTSVIDRequest{Audience: []string{"a"}})
			requireCode(t, err, codes.InvalidArgument, msg)
			_, err = c.ValidateJWTSVID(hctx, &workloadpb.ValidateJWTSVIDRequest{Audience: "a", Svid: "b"})
			requireCode(t, err, codes.InvalidArgument, msg)
			x, err := c.FetchX509SVID(hctx, &workloadpb.X509SVIDRequest{})
			require.NoError(t, err)
			_, err = x.Recv()
			requireCode(t, err, codes.InvalidArgument, msg)
			xb, err := c.FetchX509Bundles(hctx, &workloadpb.X509BundlesRequest{})
			require.NoError(t, err)
			_, err = xb.Recv()
			requireCode(t, err, codes.InvalidArgument, msg)
			jb, err := c.FetchJWTBundles(hctx, &workloadpb.JWTBundlesRequest{})
			require.NoError(t, err)
			_, err = jb.Recv()
			requireCode(t, err, codes.InvalidArgument, msg)
			w, err := c.FetchWITSVID(hctx, &workloadpb.WITSVIDRequest{})
			require.NoError(t, err)
			_, err = w.Recv()
			requireCode(t, err, codes.InvalidArgument, msg)
			wb, err := c.FetchWITBundles(hctx, &workloadpb.WITBundlesRequest{})
			require.NoError(t, err)
			_, err = wb.Recv()
			requireCode(t, err, codes.InvalidArgument, msg)
		})
	}
	// Nothing was attested for header-less calls.
	require.Zero(t, f.mgr.subscribes.Load())
}

func TestNoIdentityForOtherUser(t *testing.T) {
	roottest.Require(t)
	f := startServer(t)

	// The test binary sits in a directory only root may enter; copy it where
	// uid 65534 can execute it.
	cmd := exec.Command(callerBinary(t))
	cmd.Env = []string{childModeEnv + "=fetch", childSocketEnv + "=" + f.socket, "HOME=/"}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "child output: %s", out)
	require.Contains(t, string(out), "code=PermissionDenied")

	line := f.log.waitCall(t, "FetchX509SVID", cmd.ProcessState.Pid())
	require.Equal(t, float64(65534), line["uid"])
	require.Equal(t, "PermissionDenied", line["code"])

	// The test's own uid gets its SVID from the same server.
	svid, err := workloadapi.FetchX509SVID(testCtx(t), clientOpt(f))
	require.NoError(t, err)
	require.Equal(t, "spiffe://example.org/web", svid.ID.String())
}

// TestCallerChangesCredentials: a caller that drops its uid keeps its
// connection, and with it the agent's pin on its process, but its next calls
// are refused: its ids are no longer those the kernel recorded when it
// connected, even though an entry would match the uid it now has.
func TestCallerChangesCredentials(t *testing.T) {
	roottest.Require(t)
	f := startServer(t)
	f.mgr.setEntries(
		entry("e1", "spiffe://example.org/web", "internal", "other.org"),
		uidEntry("e-nobody", "spiffe://example.org/nobody", 65534),
	)
	exe, err := os.Executable()
	require.NoError(t, err)
	cmd := exec.Command(exe)
	cmd.Env = []string{childModeEnv + "=setuid", childSocketEnv + "=" + f.socket, "HOME=/"}
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "child output: %s", out)
	require.Contains(t, string(out), "before=OK")
	require.Contains(t, string(out), "after=PermissionDenied workload: caller's ids are not the ids it connected with: uids (real/effective/saved/fs) 65534/65534/65534/65534, connected as uid 0")
	require.Contains(t, string(out), "jwt=PermissionDenied")
}

func TestBundlesNeedIdentityUnlessAllowed(t *testing.T) {
	f := startServer(t)
	f.mgr.setEntries() // nothing for anyone
	ctx := testCtx(t)
	client, err := workloadapi.New(ctx, clientOpt(f))
	require.NoError(t, err)
	defer client.Close()
	_, err = client.FetchX509Bundles(ctx)
	requireCode(t, err, codes.PermissionDenied, "no identity issued")
	_, err = client.FetchJWTBundles(ctx)
	requireCode(t, err, codes.PermissionDenied, "no identity issued")
	_, err = client.FetchX509SVID(ctx)
	requireCode(t, err, codes.PermissionDenied, "no identity issued")
	_, err = client.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "a"})
	requireCode(t, err, codes.PermissionDenied, "no identity issued")

	g := startServer(t, func(c *ferrywl.Config) { c.AllowUnauthenticatedVerifiers = true })
	g.mgr.setEntries()
	client2, err := workloadapi.New(ctx, clientOpt(g))
	require.NoError(t, err)
	defer client2.Close()
	set, err := client2.FetchX509Bundles(ctx)
	require.NoError(t, err)
	require.True(t, set.Has(ownTD))
	require.False(t, set.Has(otherTD), "federated bundles only come with an identity")
	_, err = client2.FetchX509SVID(ctx)
	requireCode(t, err, codes.PermissionDenied, "no identity issued")
}

// TestPIDReuseGuard drives the guard through its seam, a procfs root laid out
// by the test: the attestor runs while the "process" behind the caller's PID
// changes its start time (the PID was recycled) or becomes a zombie.
func TestPIDReuseGuard(t *testing.T) {
	pid := os.Getpid()
	statLine := func(state string, start int) string {
		// pid (comm) state, then fields 4..22 with starttime last.
		return fmt.Sprintf("%d (with ) parens) %s 1 1 1 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 %d 1000 100\n", pid, state, start)
	}
	cases := []struct {
		name     string
		after    string // stat content written during attestation ("" = unchanged)
		wantCode codes.Code
	}{
		{"unchanged", "", codes.OK},
		{"pid reused", statLine("S", 999999), codes.Unauthenticated},
		{"zombie", statLine("Z", 4242), codes.Unauthenticated},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			procRoot := t.TempDir()
			statPath := filepath.Join(procRoot, fmt.Sprint(pid), "stat")
			require.NoError(t, os.MkdirAll(filepath.Dir(statPath), 0o755))
			require.NoError(t, os.WriteFile(statPath, []byte(statLine("S", 4242)), 0o644))
			// The caller is this process: its credentials are its own.
			status, err := os.ReadFile("/proc/self/status")
			require.NoError(t, err)
			require.NoError(t, os.WriteFile(filepath.Join(procRoot, fmt.Sprint(pid), "status"), status, 0o644))

			f := startServer(t, func(c *ferrywl.Config) {
				inner := c.Attestor
				c.ProcRoot = procRoot
				c.Attestor = ferrywl.AttestorFunc(func(ctx context.Context, p int32) ([]*ferrypb.Selector, error) {
					sels, err := inner.Attest(ctx, p)
					if tc.after != "" {
						require.NoError(t, os.WriteFile(statPath, []byte(tc.after), 0o644))
					}
					return sels, err
				})
			})
			_, err = workloadapi.FetchX509SVID(testCtx(t), clientOpt(f))
			if tc.wantCode == codes.OK {
				require.NoError(t, err)
				return
			}
			requireCode(t, err, tc.wantCode, "could not verify existence of the original caller")
			require.Zero(t, f.mgr.subscribes.Load(), "no identity looked up for a changed caller")
		})
	}
}

// TestCallerExitsDuringAttestation uses a real process: the caller is killed
// and reaped while its call is being attested, and the attestor then returns
// selectors that would grant an identity.
func TestCallerExitsDuringAttestation(t *testing.T) {
	exe, err := os.Executable()
	require.NoError(t, err)
	cmd := exec.Command(exe)
	var childPID atomic.Int64
	reaped := make(chan struct{})

	f := startServer(t, func(c *ferrywl.Config) {
		inner := c.Attestor
		c.Attestor = ferrywl.AttestorFunc(func(ctx context.Context, pid int32) ([]*ferrypb.Selector, error) {
			if int64(pid) != childPID.Load() {
				return inner.Attest(ctx, pid)
			}
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
			close(reaped)
			return []*ferrypb.Selector{{Type: "unix", Value: fmt.Sprintf("uid:%d", os.Getuid())}}, nil
		})
	})
	cmd.Env = []string{childModeEnv + "=hold", childSocketEnv + "=" + f.socket}
	require.NoError(t, cmd.Start())
	childPID.Store(int64(cmd.Process.Pid))
	select {
	case <-reaped:
	case <-time.After(20 * time.Second):
		_ = cmd.Process.Kill()
		t.Fatal("child never called")
	}
	line := f.log.waitCall(t, "FetchX509SVID", int(childPID.Load()))
	require.Equal(t, "Unauthenticated", line["code"])
	require.Contains(t, line["error"], "could not verify existence of the original caller")
	require.Zero(t, f.mgr.subscribes.Load())
}

func TestLogLinePerCall(t *testing.T) {
	f := startServer(t)
	ctx := testCtx(t)
	svid, err := workloadapi.FetchX509SVID(ctx, clientOpt(f))
	require.NoError(t, err)
	_, err = rawClient(t, f).FetchJWTSVID(ctx, &workloadpb.JWTSVIDRequest{Audience: []string{"a"}})
	requireCode(t, err, codes.InvalidArgument, "")

	x := f.log.waitCall(t, "FetchX509SVID", os.Getpid())
	assert.Equal(t, "OK", x["code"])
	assert.Equal(t, "DEBUG", x["level"], "a call served is logged at Debug")
	assert.Equal(t, float64(os.Getuid()), x["uid"])
	assert.Equal(t, float64(1), x["sent"])
	j := f.log.waitCall(t, "FetchJWTSVID", os.Getpid())
	assert.Equal(t, "InvalidArgument", j["code"])
	assert.Equal(t, "INFO", j["level"], "a refusal is logged at Info")
	assert.Equal(t, "security header missing from request", j["error"])

	// No key material: neither the PKCS#8 key nor the certificate's bytes.
	keyDER, err := x509.MarshalPKCS8PrivateKey(svid.PrivateKey)
	require.NoError(t, err)
	logText := f.log.String()
	for _, enc := range []string{fmt.Sprintf("%x", keyDER[len(keyDER)-32:]), string(keyDER[len(keyDER)-32:])} {
		require.NotContains(t, logText, enc)
	}
}

func TestStreamsEndWhenClientLeaves(t *testing.T) {
	f := startServer(t)
	// One call first, on a connection of its own: the server is serving,
	// its workers started, before goroutines are counted.
	{
		conn, err := grpc.NewClient("unix://"+f.socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
		require.NoError(t, err)
		_, err = workloadpb.NewSpiffeWorkloadAPIClient(conn).FetchJWTSVID(withHeader(testCtx(t)), &workloadpb.JWTSVIDRequest{Audience: []string{"a"}})
		require.NoError(t, err)
		require.NoError(t, conn.Close())
	}
	before := runtime.NumGoroutine()
	for range 50 { // the fewest over a moment: that connection's goroutines end
		time.Sleep(2 * time.Millisecond)
		before = min(before, runtime.NumGoroutine())
	}

	conn, err := grpc.NewClient("unix://"+f.socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	c := workloadpb.NewSpiffeWorkloadAPIClient(conn)
	ctx, cancel := context.WithCancel(withHeader(testCtx(t)))
	x, err := c.FetchX509SVID(ctx, &workloadpb.X509SVIDRequest{})
	require.NoError(t, err)
	_, err = x.Recv()
	require.NoError(t, err)
	xb, err := c.FetchX509Bundles(ctx, &workloadpb.X509BundlesRequest{})
	require.NoError(t, err)
	_, err = xb.Recv()
	require.NoError(t, err)
	jb, err := c.FetchJWTBundles(ctx, &workloadpb.JWTBundlesRequest{})
	require.NoError(t, err)
	_, err = jb.Recv()
	require.NoError(t, err)
	w, err := c.FetchWITSVID(ctx, &workloadpb.WITSVIDRequest{})
	require.NoError(t, err)
	_, err = w.Recv()
	require.NoError(t, err)
	wb, err := c.FetchWITBundles(ctx, &workloadpb.WITBundlesRequest{})
	require.NoError(t, err)
	_, err = wb.Recv()
	require.NoError(t, err)
	require.Equal(t, 5, f.mgr.activeSubscribers())

	cancel()
	require.Eventually(t, func() bool { return f.mgr.activeSubscribers() == 0 }, 5*time.Second, 10*time.Millisecond)
	require.NoError(t, conn.Close())
	// Polled here, not with require.Eventually, which runs the condition on
	// a goroutine of its own.
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	require.LessOrEqual(t, runtime.NumGoroutine(), before, "goroutines left behind:\n%s", allStacks())
}

func TestStopEndsStreams(t *testing.T) {
	f := startServer(t)
	c := rawClient(t, f)
	x, err := c.FetchX509SVID(withHeader(testCtx(t)), &workloadpb.X509SVIDRequest{})
	require.NoError(t, err)
	_, err = x.Recv()
	require.NoError(t, err)

	f.srv.Stop()
	_, err = x.Recv()
	requireCode(t, err, codes.Unavailable, "")
	require.Equal(t, 0, f.mgr.activeSubscribers())
}

func TestBundleStreamsSkipUnchangedState(t *testing.T) {
	f := startServer(t)
	ctx := withHeader(testCtx(t))
	c := rawClient(t, f)
	xb, err := c.FetchX509Bundles(ctx, &workloadpb.X509BundlesRequest{})
	require.NoError(t, err)
	_, err = xb.Recv()
	require.NoError(t, err)
	x, err := c.FetchX509SVID(ctx, &workloadpb.X509SVIDRequest{})
	require.NoError(t, err)
	_, err = x.Recv()
	require.NoError(t, err)

	// A rotated SVID changes the SVID stream but not the bundles.
	rotated := f.mgr.rotate("e1")
	resp, err := x.Recv()
	require.NoError(t, err)
	certs, err := x509.ParseCertificates(resp.Svids[0].X509Svid)
	require.NoError(t, err)
	require.True(t, certs[0].Equal(rotated))

	// A new federation changes the bundles.
	f.mgr.setEntries(
		entry("e1", "spiffe://example.org/web", "internal", "other.org", "third.org"),
		entry("e2", "spiffe://example.org/admin", "external"),
	)
	got, err := xb.Recv()
	require.NoError(t, err)
	require.Len(t, got.Bundles, 3)
}

func publicEqual(a, b crypto.PublicKey) bool {
	eq, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && eq.Equal(b)
}

func allStacks() string {
	buf := make([]byte, 1<<20)
	return string(buf[:runtime.Stack(buf, true)])
}

func TestJWKSKeyTypes(t *testing.T) {
	f := startServer(t)
	edPub, _, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	p521 := mustEC(t, elliptic.P521())
	f.mgr.addJWTAuthority("ed", edPub)
	f.mgr.addJWTAuthority("p521", p521.Public())

	set, err := workloadapi.FetchJWTBundles(testCtx(t), clientOpt(f))
	require.NoError(t, err)
	b, err := set.GetJWTBundleForTrustDomain(ownTD)
	require.NoError(t, err)
	want := map[string]crypto.PublicKey{
		f.ca.jwtKid:           f.ca.jwtKey.Public(),
		"example.org-jwt-rsa": f.ca.rsaJWT.Public(),
		"ed":                  edPub,
		"p521":                p521.Public(),
	}
	got := b.JWTAuthorities()
	require.Len(t, got, len(want))
	for kid, pub := range want {
		require.True(t, publicEqual(pub, got[kid]), "authority %s", kid)
	}
}

// TestWITStreamRenewsBeforeExpiry checks that a WIT-SVID stream sends a fresh
// token before the current one expires, without any cache update.
func TestWITStreamRenewsBeforeExpiry(t *testing.T) {
	f := startServer(t)
	// Renewed at about half the remaining life (5 s), which leaves the
	// stream 5 s to deliver the new token before the first one expires.
	f.mgr.setWIT("ec", 10*time.Second)
	ctx := withHeader(testCtx(t))
	stream, err := rawClient(t, f).FetchWITSVID(ctx, &workloadpb.WITSVIDRequest{SpiffeId: "spiffe://example.org/web"})
	require.NoError(t, err)
	first, err := stream.Recv()
	require.NoError(t, err)
	require.Len(t, first.Svids, 1)
	second, err := stream.Recv()
	require.NoError(t, err)
	require.NotEqual(t, first.Svids[0].WitSvid, second.Svids[0].WitSvid)
	require.NotEqual(t, first.Svids[0].WitSvidKey, second.Svids[0].WitSvidKey)
	// The second token was sent while the first was still valid: the stream
	// renews before expiry, not after.
	a, err := witsvid.ParseInsecure(first.Svids[0].WitSvid)
	require.NoError(t, err)
	got, err := witsvid.ParseInsecure(second.Svids[0].WitSvid)
	require.NoError(t, err)
	require.Equal(t, "spiffe://example.org/web", got.ID.String())
	require.True(t, got.Expiry.Add(-10*time.Second).Before(a.Expiry), "second token issued at %v, first expired at %v", got.Expiry.Add(-10*time.Second), a.Expiry)
}

func TestAttestationFailureIsUnavailable(t *testing.T) {
	f := startServer(t, func(c *ferrywl.Config) {
		c.Attestor = ferrywl.AttestorFunc(func(context.Context, int32) ([]*ferrypb.Selector, error) {
			return nil, errors.New("cgroup unreadable")
		})
	})
	_, err := workloadapi.FetchX509SVID(testCtx(t), clientOpt(f))
	requireCode(t, err, codes.Unavailable, "workload attestation failed")
	require.Zero(t, f.mgr.subscribes.Load())
}

func TestStreamEndsWhenLastIdentityIsRemoved(t *testing.T) {
	f := startServer(t)
	x, err := rawClient(t, f).FetchX509SVID(withHeader(testCtx(t)), &workloadpb.X509SVIDRequest{})
	require.NoError(t, err)
	_, err = x.Recv()
	require.NoError(t, err)
	f.mgr.setEntries()
	_, err = x.Recv()
	requireCode(t, err, codes.PermissionDenied, "no identity issued")
}
