package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/test/rotation"
	"github.com/ferry-id/ferry/test/testcluster"
)

// rotationWorkload is a fedDomain's workload: an entry federating with the
// peer, and its go-spiffe sources.
func rotationWorkload(t *testing.T, ctx context.Context, d *fedDomain, peer spiffeid.TrustDomain) *rotation.Workload {
	t.Helper()
	id := d.createEntry(t, "wl", peer.Name())
	wctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	w, err := rotation.NewWorkload(wctx, d.agent.SocketAddr(), id, peer)
	require.NoError(t, err)
	t.Cleanup(w.Close)
	return w
}

// bridgeConsumer spends a trust domain's JWT-SVIDs at the bridge and the
// bridge's access tokens at demo-api.
type bridgeConsumer struct {
	s        *flowStack
	clientID string
	api      string
}

func (b *bridgeConsumer) call(ctx context.Context, w *rotation.Workload) (string, error) {
	fctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	svid, err := w.JWT.FetchJWTSVID(fctx, jwtsvid.Params{Audience: "api://AzureADTokenExchange", Subject: w.ID})
	if err != nil {
		return "", fmt.Errorf("fetching the assertion: %w", err)
	}
	assertion := svid.Marshal()
	kid := rotation.TokenKid(assertion)
	form := url.Values{
		"grant_type":            {"client_credentials"},
		"client_id":             {b.clientID},
		"client_assertion_type": {"urn:ietf:params:oauth:client-assertion-type:jwt-bearer"},
		"client_assertion":      {assertion},
		"scope":                 {"api://demo/.default"},
	}
	req, _ := http.NewRequestWithContext(fctx, http.MethodPost, b.s.bridge+"/"+b.s.tenant+"/oauth2/v2.0/token", strings.NewReader(form.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	resp, err := b.s.client.Do(req)
	if err != nil {
		return kid, fmt.Errorf("bridge: %w", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	var tr struct {
		AccessToken string `json:"access_token"`
	}
	if resp.StatusCode != http.StatusOK || json.Unmarshal(body, &tr) != nil || tr.AccessToken == "" {
		return kid, fmt.Errorf("bridge refused the JWT-SVID (kid %s): %d %s", kid, resp.StatusCode, body)
	}
	areq, _ := http.NewRequestWithContext(fctx, http.MethodGet, b.api, nil)
	areq.Header.Set("Authorization", "Bearer "+tr.AccessToken)
	aresp, err := http.DefaultClient.Do(areq)
	if err != nil {
		return kid, fmt.Errorf("demo-api: %w", err)
	}
	abody, _ := io.ReadAll(aresp.Body)
	aresp.Body.Close()
	if aresp.StatusCode != http.StatusOK {
		return kid, fmt.Errorf("demo-api refused the access token: %d %s", aresp.StatusCode, abody)
	}
	return kid, nil
}

// authorities lists a server node's authorities of a kind.
func (d *fedDomain) authorities(t *testing.T, kind string) []*ferrypb.LocalAuthority {
	t.Helper()
	var resp ferrypb.ListLocalAuthoritiesResponse
	out := d.cli(t, "authority", kind, "list", "--output", "json")
	require.NoError(t, protojson.Unmarshal([]byte(out), &resp), out)
	return resp.Authorities
}

func (d *fedDomain) authorityOp(t *testing.T, kind, op, id string) *ferrypb.LocalAuthority {
	t.Helper()
	args := []string{"authority", kind, op, "--output", "json"}
	if id != "" {
		args = append(args, "--authority-id", id)
	}
	var la ferrypb.LocalAuthority
	out := d.cli(t, args...)
	require.NoError(t, protojson.Unmarshal([]byte(out), &la), out)
	return &la
}

func (d *fedDomain) heldBy(t *testing.T, kind, id string) uint32 {
	t.Helper()
	for _, a := range d.authorities(t, kind) {
		if a.Id == id {
			return a.HoldingAgents
		}
	}
	return 0
}

// lastRefresh is when d's leader last fetched td's bundle successfully
// (zero while the last fetch failed).
func (d *fedDomain) lastRefresh(t *testing.T, td spiffeid.TrustDomain) time.Time {
	t.Helper()
	var st ferrypb.FederationRelationshipStatus
	out := d.cli(t, "federation", "show", "--trust-domain", td.Name(), "--output", "json")
	require.NoError(t, protojson.Unmarshal([]byte(out), &st), out)
	if st.Relationship.LastError != "" {
		return time.Time{}
	}
	return time.Unix(st.Relationship.LastRefresh, 0)
}

// rotateAuthorities takes owner's X.509 and JWT authorities through prepare,
// activate, taint and revoke while the probe's calls go on, waiting at each
// step until it has reached peer (the other trust domain) and timing it.
func rotateAuthorities(t *testing.T, owner, peer *fedDomain, wPeer *rotation.Workload, probe *rotation.Probe, steps *rotation.Steps) {
	td := owner.td.Name()
	oldX := byStatus(owner.authorities(t, "x509"), "active")[0].Id
	oldJ := byStatus(owner.authorities(t, "jwt"), "active")[0].Id
	const step = 2 * time.Minute
	usedKid := func(since time.Time, kid string) func() bool {
		return func() bool { return probe.SawAfter(since, func(r rotation.Round) bool { return r.Kid[td] == kid }) }
	}

	start := time.Now()
	newX := owner.authorityOp(t, "x509", "prepare", "").Id
	newJ := owner.authorityOp(t, "jwt", "prepare", "").Id
	steps.Wait(t, start, step,
		rotation.Check{Name: td + " x509 prepare: the peer's workloads hold the new CA", OK: func() bool { return wPeer.HoldsX509(owner.td, newX) }},
		rotation.Check{Name: td + " jwt prepare: the peer's workloads hold the new key", OK: func() bool { return wPeer.HoldsJWT(owner.td, newJ) }})

	start = time.Now()
	owner.authorityOp(t, "x509", "activate", newX)
	owner.authorityOp(t, "jwt", "activate", newJ)
	steps.Wait(t, start, step,
		rotation.Check{Name: td + " x509 activate: the peer fetched the bundle from the re-signed endpoint", OK: func() bool {
			return peer.lastRefresh(t, owner.td).After(start)
		}},
		rotation.Check{Name: td + " jwt activate: the peer validated a JWT-SVID of the new key", OK: usedKid(start, newJ)})

	start = time.Now()
	owner.authorityOp(t, "x509", "taint", oldX)
	owner.authorityOp(t, "jwt", "taint", oldJ)
	// JWT-SVIDs of the old key handed out a moment ago are still valid:
	// revoking it now would break them, and is refused.
	out, err := owner.srv.CLI("authority", "jwt", "revoke", "--authority-id", oldJ)
	require.Error(t, err, out)
	require.Contains(t, out, "still hold")
	steps.Wait(t, start, step,
		rotation.Check{Name: td + " x509 taint: the peer accepted the workload's SVID of the new CA", OK: func() bool {
			return probe.SawAfter(start, func(r rotation.Round) bool { return r.SVID[td] == newX })
		}},
		rotation.Check{Name: td + " x509 taint: no agent holds an SVID of the old CA", OK: func() bool { return owner.heldBy(t, "x509", oldX) == 0 }},
		rotation.Check{Name: td + " jwt taint: the peer validated a fresh JWT-SVID of the new key", OK: usedKid(start, newJ)},
		rotation.Check{Name: td + " jwt taint: every JWT-SVID of the old key handed out expired", OK: func() bool { return owner.heldBy(t, "jwt", oldJ) == 0 }})

	start = time.Now()
	owner.authorityOp(t, "x509", "revoke", oldX)
	owner.authorityOp(t, "jwt", "revoke", oldJ)
	steps.Wait(t, start, step,
		rotation.Check{Name: td + " x509 revoke: the peer's workloads no longer trust the old CA", OK: func() bool { return !wPeer.HoldsX509(owner.td, oldX) }},
		rotation.Check{Name: td + " jwt revoke: the peer's workloads no longer hold the old key", OK: func() bool { return !wPeer.HoldsJWT(owner.td, oldJ) }},
		// The endpoint still authenticates against the bundle the peer holds.
		rotation.Check{Name: td + " revoke: the peer fetched the bundle again", OK: func() bool { return peer.lastRefresh(t, owner.td).After(start) }})
}

// TestRotationBetweenTrustDomains rotates each of two federated trust
// domains' X.509 and JWT authorities (prepare, activate, taint, revoke) while
// their workloads call each other over mutual TLS and with JWT-SVIDs, and a
// workload of the first spends its JWT-SVIDs at the bridge and the access
// tokens at demo-api: not one call may fail from the first prepare on. The
// time each step takes to reach the other side is logged.
func TestRotationBetweenTrustDomains(t *testing.T) {
	if testing.Short() {
		t.Skip("starts two trust domains with agents, a bridge and demo-api")
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// Short JWT-SVIDs, so a JWT authority is released soon after its taint;
	// agents replace tainted SVIDs within 2 s; peers refresh every 10 s.
	oidcAddr := testcluster.FreeAddr(t)
	_, oidcPort, _ := net.SplitHostPort(oidcAddr)
	jwtIss := "https://localhost:" + oidcPort
	const agentConf = `  taint_jitter = "2s"`
	a := startFedDomainWith(t, "a.test", "10s", fmt.Sprintf(`  ca {
    jwt_svid_ttl = "30s"
  }
  oidc {
    addr   = %q
    issuer = %q
  }`, oidcAddr, jwtIss), agentConf)
	b := startFedDomainWith(t, "b.test", "10s", `  ca {
    jwt_svid_ttl = "30s"
  }`, agentConf)
	a.federateWith(t, b)
	b.federateWith(t, a)
	wa := rotationWorkload(t, ctx, a, b.td)
	wb := rotationWorkload(t, ctx, b, a.td)

	// a's workload exchanges its JWT-SVIDs at the bridge for demo-api.
	s := attachFlowStack(t, a.c, jwtIss)
	appID := s.resource("demo", "api://demo")
	api := s.demoAPI("api://demo", appID)
	idn := s.identity("wl-id", jwtIss, wa.ID.String(), "")
	s.cli("role", "assign", "--identity-name", "wl-id", "--resource", "api://demo", "--role", "reader")
	consumer := &bridgeConsumer{s: s, clientID: idn.ClientID, api: api}

	probe := rotation.Start(ctx, wa, wb, rotation.Call{Name: "a.test bridge and demo-api", Do: func(ctx context.Context) (string, error) {
		return consumer.call(ctx, wa)
	}})
	require.NoError(t, probe.Arm(60*time.Second))
	var steps rotation.Steps
	rotateAuthorities(t, a, b, wb, probe, &steps)
	rotateAuthorities(t, b, a, wa, probe, &steps)
	rounds, failures := probe.Finish()
	t.Logf("propagation of each step to the other side (%d rounds of calls):\n%s", rounds, steps.Table())
	require.Empty(t, failures, "calls failed during the rotations:\n%s", strings.Join(failures, "\n"))
	require.Greater(t, rounds, 10)
}
