package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/test/rotation"
	"github.com/ferry-id/ferry/test/testcluster"
)

// fedDomain is one independent ferry trust domain: a one-node cluster that
// serves its bundle over https_spiffe, and one agent.
type fedDomain struct {
	td       spiffeid.TrustDomain
	c        *testcluster.Cluster
	srv      *testcluster.Node
	agent    *testcluster.Agent
	endpoint string
}

func startFedDomain(t *testing.T, td string) *fedDomain {
	t.Helper()
	return startFedDomainWith(t, td, "", "", "")
}

// startFedDomainWith is startFedDomain with the bundle endpoint's refresh
// hint (default when empty) and extra lines for the server and agent blocks.
func startFedDomainWith(t *testing.T, td, refreshHint, serverExtra, agentExtra string) *fedDomain {
	t.Helper()
	addr := testcluster.FreeAddr(t)
	hint := ""
	if refreshHint != "" {
		hint = fmt.Sprintf("\n      refresh_hint = %q", refreshHint)
	}
	c := testcluster.New(t, testcluster.Options{Nodes: 1, TrustDomain: td, LogLevel: "info",
		ExtraServerConfig: fmt.Sprintf(`  federation {
    bundle_endpoint {
      addr    = %q
      profile = "https_spiffe"%s
    }
  }
%s`, addr, hint, serverExtra)})
	d := &fedDomain{td: spiffeid.RequireTrustDomainFromString(td), c: c, srv: c.Nodes[0], endpoint: "https://" + addr}
	d.agent = c.StartAgentWith("node1", agentExtra)
	return d
}

func (d *fedDomain) cli(t *testing.T, args ...string) string {
	t.Helper()
	out, err := d.srv.CLI(args...)
	require.NoError(t, err, "ferry %s: %s\n%s", strings.Join(args, " "), out, d.srv.LogTail(40))
	return out
}

// federateWith makes d follow peer's bundle: the operator hands over peer's
// current bundle out of band, then d's leader refreshes it from peer's endpoint.
func (d *fedDomain) federateWith(t *testing.T, peer *fedDomain) {
	t.Helper()
	bundle := filepath.Join(t.TempDir(), peer.td.Name()+".pem")
	require.NoError(t, os.WriteFile(bundle, []byte(peer.cli(t, "bundle", "show", "--trust-domain", peer.td.Name())), 0o644))
	d.cli(t, "federation", "create", "--trust-domain", peer.td.Name(), "--bundle-endpoint-url", peer.endpoint,
		"--bundle-endpoint-profile", "https_spiffe", "--endpoint-spiffe-id", "spiffe://"+peer.td.Name()+"/spire/server",
		"--trust-domain-bundle-path", bundle)
	out := d.cli(t, "federation", "refresh", "--trust-domain", peer.td.Name())
	require.Contains(t, out, "Status:\t\t\tok", out)
}

func (d *fedDomain) createEntry(t *testing.T, name, federatesWith string) spiffeid.ID {
	t.Helper()
	id := spiffeid.RequireFromPath(d.td, "/"+name)
	d.cli(t, "entry", "create", "--entry-id", name, "--spiffe-id", id.String(), "--parent-id", d.agent.ID,
		"--selector", fmt.Sprintf("unix:uid:%d", os.Getuid()), "--federates-with", federatesWith)
	return id
}

// x509Source is this test process's view of an agent's Workload API, as any
// go-spiffe workload has it, presenting the SVID with the given ID (the
// process's uid matches several entries).
func x509Source(t *testing.T, ctx context.Context, a *testcluster.Agent, id spiffeid.ID) *workloadapi.X509Source {
	t.Helper()
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	src, err := workloadapi.NewX509Source(sctx, workloadapi.WithClientOptions(workloadapi.WithAddr(a.SocketAddr())),
		workloadapi.WithDefaultX509SVIDPicker(func(svids []*x509svid.SVID) *x509svid.SVID {
			for _, s := range svids {
				if s.ID == id {
					return s
				}
			}
			return svids[0]
		}))
	require.NoError(t, err)
	t.Cleanup(func() { src.Close() })
	waitSource(t, "the workload has "+id.String(), func() bool {
		s, err := src.GetX509SVID()
		return err == nil && s.ID == id
	})
	return src
}

// waitSource waits until the source satisfies ok.
func waitSource(t *testing.T, what string, ok func() bool) {
	t.Helper()
	require.Eventually(t, ok, 30*time.Second, 50*time.Millisecond, what)
}

func TestFederationBetweenTwoTrustDomains(t *testing.T) {
	if testing.Short() {
		t.Skip("starts two real trust domains with agents")
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	a := startFedDomain(t, "a.test")
	b := startFedDomain(t, "b.test")

	a.federateWith(t, b)
	b.federateWith(t, a)
	var list struct {
		Relationships []struct {
			Relationship struct {
				TrustDomain string `json:"trust_domain"`
				LastError   string `json:"last_error"`
			} `json:"relationship"`
		} `json:"relationships"`
	}
	out := b.cli(t, "federation", "list", "--output", "json")
	require.NoError(t, json.Unmarshal([]byte(out), &list), out)
	require.Len(t, list.Relationships, 1, out)
	require.Equal(t, a.td.Name(), list.Relationships[0].Relationship.TrustDomain)
	require.Empty(t, list.Relationships[0].Relationship.LastError)
	// With a federated bundle held, `bundle show` still shows the server's own.
	require.Equal(t, b.cli(t, "bundle", "show", "--trust-domain", b.td.Name()), b.cli(t, "bundle", "show"))

	serverID := a.createEntry(t, "api", b.td.Name())
	clientID := b.createEntry(t, "client", a.td.Name())
	srcA := x509Source(t, ctx, a.agent, serverID)
	srcB := x509Source(t, ctx, b.agent, clientID)
	federated := func(src *workloadapi.X509Source, td spiffeid.TrustDomain) func() bool {
		return func() bool { _, err := src.GetX509BundleForTrustDomain(td); return err == nil }
	}
	waitSource(t, "a's workload holds b's bundle", federated(srcA, b.td))
	waitSource(t, "b's workload holds a's bundle", federated(srcB, a.td))

	require.NoError(t, rotation.Echo(ctx, srcA, srcB, serverID, clientID))
	// The peers authorize by SPIFFE ID: the wrong ID is refused.
	require.Error(t, rotation.Echo(ctx, srcA, srcB, spiffeid.RequireFromPath(a.td, "/other"), clientID))

	// a rotates its CA: the new authority is published, b fetches it, then it
	// becomes active and signs a fresh SVID that only the new CA verifies.
	before, err := srcB.GetX509BundleForTrustDomain(a.td)
	require.NoError(t, err)
	var prepared struct {
		ID string `json:"id"`
	}
	require.NoError(t, json.Unmarshal([]byte(a.cli(t, "authority", "x509", "prepare", "--output", "json")), &prepared))
	require.NotEmpty(t, prepared.ID)
	b.cli(t, "federation", "refresh", "--trust-domain", a.td.Name())
	waitSource(t, "b's workload holds a's new CA", func() bool {
		bu, err := srcB.GetX509BundleForTrustDomain(a.td)
		return err == nil && len(bu.X509Authorities()) > len(before.X509Authorities())
	})
	a.cli(t, "authority", "x509", "activate", "--authority-id", prepared.ID)

	rotatedID := a.createEntry(t, "api-rotated", b.td.Name())
	srcRotated := x509Source(t, ctx, a.agent, rotatedID)
	svid, err := srcRotated.GetX509SVID()
	require.NoError(t, err)
	_, _, err = x509svid.Verify(svid.Certificates, before)
	require.Error(t, err, "the rotated SVID is signed by the new CA only")
	require.NoError(t, rotation.Echo(ctx, srcRotated, srcB, rotatedID, clientID))

	out = b.cli(t, "federation", "show", "--trust-domain", a.td.Name())
	require.Contains(t, out, "Status:\t\t\tok", out)
	// The refresher follows the hint a's endpoint serves (the default 5 min)
	// and says when it fetches next.
	require.Contains(t, out, "Served refresh hint:\t5m0s", out)
	require.Regexp(t, `Next refresh:\t\t\d{4}-\d\d-\d\dT`, out)
}

// TestFederationRefreshOnFollower: `ferry federation refresh` works on any
// server of a cluster, as every other admin command does. A follower has the
// leader fetch the bundle and answers once it has applied the outcome itself;
// the leader's refusals reach the operator with their codes.
func TestFederationRefreshOnFollower(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a 3-node cluster and a one-node peer")
	}
	peer := startFedDomain(t, "peer.test")
	c := testcluster.New(t, testcluster.Options{Nodes: 3, TrustDomain: "home.test", LogLevel: "info"})
	leader := c.WaitLeader(30*time.Second, nil)
	var follower *testcluster.Node
	for _, n := range c.Nodes {
		if n != leader {
			follower = n
			break
		}
	}
	cli := func(args ...string) (string, error) { return follower.CLI(args...) }
	bundle := filepath.Join(t.TempDir(), "peer.pem")
	require.NoError(t, os.WriteFile(bundle, []byte(peer.cli(t, "bundle", "show", "--trust-domain", peer.td.Name())), 0o644))
	out, err := cli("federation", "create", "--trust-domain", peer.td.Name(), "--bundle-endpoint-url", peer.endpoint,
		"--bundle-endpoint-profile", "https_spiffe", "--endpoint-spiffe-id", "spiffe://"+peer.td.Name()+"/spire/server",
		"--trust-domain-bundle-path", bundle)
	require.NoError(t, err, out)

	out, err = cli("federation", "refresh", "--trust-domain", peer.td.Name())
	require.NoError(t, err, "refresh on a follower: %s\n%s", out, follower.LogTail(30))
	require.Contains(t, out, "Status:\t\t\tok", out)
	// The follower's own answer already holds the leader's outcome.
	out, err = cli("federation", "show", "--trust-domain", peer.td.Name())
	require.NoError(t, err, out)
	require.Contains(t, out, "Status:\t\t\tok", out)

	out, err = cli("federation", "refresh", "--trust-domain", "nope.test")
	require.Error(t, err, out)
	require.Contains(t, out, "NotFound", "the leader's refusal, with its code")
	require.Contains(t, out, "no federation relationship with nope.test")

	// A peer that is down: the leader's Unavailable, the last good bundle kept.
	peer.srv.Stop()
	out, err = cli("federation", "refresh", "--trust-domain", peer.td.Name())
	require.Error(t, err, out)
	require.Contains(t, out, "Unavailable", out)
	require.Contains(t, out, "the last good bundle is kept", out)
}
