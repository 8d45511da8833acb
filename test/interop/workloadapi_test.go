package interop

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// entryFor registers an identity for processes of this test's uid, once.
func entryFor(t *testing.T, name string) spiffeid.ID {
	t.Helper()
	id := spiffeid.RequireFromPath(spiffeid.RequireTrustDomainFromString(dev.env["FERRY_TRUST_DOMAIN"]), "/interop/"+name)
	out := dev.ferry(t, "entry", "list", "--spiffe-id", id.String())
	if !strings.Contains(out, "Found 0 entries") {
		return id
	}
	dev.ferry(t, "entry", "create", "--spiffe-id", id.String(), "--parent-id", dev.env["FERRY_AGENT_ID"],
		"--selector", fmt.Sprintf("unix:uid:%d", os.Getuid()))
	return id
}

func addr() workloadapi.ClientOption { return workloadapi.WithAddr(dev.env["SPIFFE_ENDPOINT_SOCKET"]) }

func TestX509Source(t *testing.T) {
	id := entryFor(t, "x509")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	src, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(addr()))
	require.NoError(t, err)
	defer src.Close()
	// The default SVID is one of ours; the one for this test is among them.
	x, err := workloadapi.FetchX509Context(ctx, addr())
	require.NoError(t, err)
	var found bool
	for _, s := range x.SVIDs {
		found = found || s.ID == id
		_, _, err := x509svid.Verify(s.Certificates, src)
		require.NoError(t, err, s.ID)
		leaf := s.Certificates[0]
		require.Len(t, leaf.URIs, 1)
		require.False(t, leaf.IsCA)
	}
	require.True(t, found, "SVID for %s", id)
	b, err := src.GetX509BundleForTrustDomain(id.TrustDomain())
	require.NoError(t, err)
	require.NotEmpty(t, b.X509Authorities())
}

func TestJWTSourceAndValidate(t *testing.T) {
	id := entryFor(t, "jwt")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	src, err := workloadapi.NewJWTSource(ctx, workloadapi.WithClientOptions(addr()))
	require.NoError(t, err)
	defer src.Close()
	svid, err := src.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "spiffe://example.org/service", Subject: id})
	require.NoError(t, err)
	require.Equal(t, id, svid.ID)
	// Offline validation against the JWT bundle the source holds ...
	parsed, err := jwtsvid.ParseAndValidate(svid.Marshal(), src, []string{"spiffe://example.org/service"})
	require.NoError(t, err)
	require.Equal(t, id, parsed.ID)
	// ... and through the agent's ValidateJWTSVID.
	client, err := workloadapi.New(ctx, addr())
	require.NoError(t, err)
	defer client.Close()
	v, err := client.ValidateJWTSVID(ctx, svid.Marshal(), "spiffe://example.org/service")
	require.NoError(t, err)
	require.Equal(t, id, v.ID)
	_, err = client.ValidateJWTSVID(ctx, svid.Marshal(), "spiffe://example.org/other")
	require.Error(t, err, "wrong audience")
	_, err = src.FetchJWTSVID(ctx, jwtsvid.Params{})
	require.Error(t, err, "audience is required")
}

func TestBundleWatch(t *testing.T) {
	entryFor(t, "bundles")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	src, err := workloadapi.NewBundleSource(ctx, workloadapi.WithClientOptions(addr()))
	require.NoError(t, err)
	defer src.Close()
	td := spiffeid.RequireTrustDomainFromString(dev.env["FERRY_TRUST_DOMAIN"])
	xb, err := src.GetX509BundleForTrustDomain(td)
	require.NoError(t, err)
	require.NotEmpty(t, xb.X509Authorities())
	jb, err := src.GetJWTBundleForTrustDomain(td)
	require.NoError(t, err)
	require.NotEmpty(t, jb.JWTAuthorities())

	// The bundle the CLI prints is the one workloads get.
	pemOut := dev.ferry(t, "bundle", "show")
	path := filepath.Join(t.TempDir(), "b.pem")
	require.NoError(t, os.WriteFile(path, []byte(pemOut), 0o600))
	fromCLI, err := x509bundle.Load(td, path)
	require.NoError(t, err)
	require.True(t, fromCLI.Equal(xb))
}

func TestSecurityHeaderRequired(t *testing.T) {
	entryFor(t, "header")
	conn, err := grpc.NewClient(dev.env["SPIFFE_ENDPOINT_SOCKET"], grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream, err := workload.NewSpiffeWorkloadAPIClient(conn).FetchX509SVID(ctx, &workload.X509SVIDRequest{})
	require.NoError(t, err)
	_, err = stream.Recv()
	require.Equal(t, codes.InvalidArgument, status.Code(err), "%v", err)
}

// TestOtherUserGetsNothing runs a go-spiffe client as uid 65534, which no entry
// selects: the agent answers PermissionDenied.
func TestOtherUserGetsNothing(t *testing.T) {
	requireRoot(t) // runs a child as another user
	entryFor(t, "root-only")
	cmd := exec.Command(filepath.Join(filepath.Dir(dev.bin), "interop.test"), "-test.run", "^$")
	cmd.Env = append(os.Environ(), "INTEROP_CHILD=fetch-x509", "SPIFFE_ENDPOINT_SOCKET="+dev.env["SPIFFE_ENDPOINT_SOCKET"])
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	cmd.Dir = "/"
	out, _ := cmd.CombinedOutput()
	require.Contains(t, string(out), "code=PermissionDenied", string(out))
}

// child is what a re-executed test binary does instead of running tests.
func child() int {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	switch os.Getenv("INTEROP_CHILD") {
	case "fetch-x509":
		client, err := workloadapi.New(ctx)
		if err != nil {
			fmt.Println("error:", err)
			return 1
		}
		defer client.Close()
		_, err = client.FetchX509SVID(ctx)
		fmt.Printf("code=%s err=%v\n", status.Code(err), err)
		return 0
	}
	return 2
}
