package e2e

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/ferry-id/ferry/internal/testcluster"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

// rotationWorkload is one trust domain's workload as go-spiffe sees it.
type rotationWorkload struct {
	d   *fedDomain
	id  spiffeid.ID
	x   *workloadapi.X509Source
	jwt *workloadapi.JWTSource
}

func newRotationWorkload(t *testing.T, ctx context.Context, d *fedDomain, peer spiffeid.TrustDomain) *rotationWorkload {
	t.Helper()
	id := d.createEntry(t, "wl", peer.Name())
	w := &rotationWorkload{d: d, id: id, x: x509Source(t, ctx, d.agent, id)}
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	js, err := workloadapi.NewJWTSource(sctx, workloadapi.WithClientOptions(workloadapi.WithAddr(d.agent.SocketAddr())))
	require.NoError(t, err)
	t.Cleanup(func() { js.Close() })
	w.jwt = js
	waitSource(t, d.td.Name()+"'s workload holds "+peer.Name()+"'s bundles", func() bool {
		_, errX := w.x.GetX509BundleForTrustDomain(peer)
		_, errJ := w.jwt.GetJWTBundleForTrustDomain(peer)
		return errX == nil && errJ == nil
	})
	return w
}

// svidAuthority is the ID of the authority that signed the workload's
// current X509-SVID.
func (w *rotationWorkload) svidAuthority() string {
	s, err := w.x.GetX509SVID()
	if err != nil {
		return ""
	}
	return hex.EncodeToString(s.Certificates[0].AuthorityKeyId)
}

// holdsX509 reports whether the workload's bundle for td holds the X.509
// authority id (hex subject key ID); holdsJWT the same for a JWT key.
func (w *rotationWorkload) holdsX509(td spiffeid.TrustDomain, id string) bool {
	b, err := w.x.GetX509BundleForTrustDomain(td)
	if err != nil {
		return false
	}
	return slices.ContainsFunc(b.X509Authorities(), func(c *x509.Certificate) bool { return hex.EncodeToString(c.SubjectKeyId) == id })
}

func (w *rotationWorkload) holdsJWT(td spiffeid.TrustDomain, kid string) bool {
	b, err := w.jwt.GetJWTBundleForTrustDomain(td)
	if err != nil {
		return false
	}
	_, ok := b.FindJWTAuthority(kid)
	return ok
}

// tokenKid is a JWT's header kid.
func tokenKid(token string) string {
	head, _, _ := strings.Cut(token, ".")
	raw, err := base64.RawURLEncoding.DecodeString(head)
	if err != nil {
		return ""
	}
	var h struct {
		Kid string `json:"kid"`
	}
	_ = json.Unmarshal(raw, &h)
	return h.Kid
}

// mtlsRound has client dial server over go-spiffe mutual TLS, each side
// authorizing the other's ID, and echo one message.
func mtlsRound(ctx context.Context, server, client *rotationWorkload) error {
	lis, err := tls.Listen("tcp", "127.0.0.1:0", tlsconfig.MTLSServerConfig(server.x, server.x, tlsconfig.AuthorizeID(client.id)))
	if err != nil {
		return err
	}
	defer lis.Close()
	served := make(chan error, 1)
	go func() {
		conn, err := lis.Accept()
		if err != nil {
			served <- err
			return
		}
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
		buf := make([]byte, 4)
		if _, err := io.ReadFull(conn, buf); err != nil {
			served <- fmt.Errorf("server side: %w", err)
			return
		}
		_, err = conn.Write(buf)
		served <- err
	}()
	d := &tls.Dialer{Config: tlsconfig.MTLSClientConfig(client.x, client.x, tlsconfig.AuthorizeID(server.id))}
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	conn, err := d.DialContext(dctx, "tcp", lis.Addr().String())
	if err != nil {
		lis.Close()
		<-served
		return fmt.Errorf("%s -> %s: %w", client.id, server.id, err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := conn.Write([]byte("ping")); err != nil {
		return err
	}
	if _, err := io.ReadFull(conn, make([]byte, 4)); err != nil {
		return fmt.Errorf("%s -> %s: %w", client.id, server.id, err)
	}
	return <-served
}

// jwtRound has from fetch a JWT-SVID for to's ID and to validate it with its
// own bundles, as a go-spiffe relying party does; it returns the token's kid.
func jwtRound(ctx context.Context, from, to *rotationWorkload) (string, error) {
	fctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	svid, err := from.jwt.FetchJWTSVID(fctx, jwtsvid.Params{Audience: to.id.String(), Subject: from.id})
	if err != nil {
		return "", fmt.Errorf("%s fetching a JWT-SVID: %w", from.id, err)
	}
	tok := svid.Marshal()
	if _, err := jwtsvid.ParseAndValidate(tok, to.jwt, []string{to.id.String()}); err != nil {
		return tokenKid(tok), fmt.Errorf("%s validating %s's JWT-SVID (kid %s): %w", to.id, from.id, tokenKid(tok), err)
	}
	return tokenKid(tok), nil
}

// bridgeConsumer spends a trust domain's JWT-SVIDs at the bridge and the
// bridge's access tokens at demo-api.
type bridgeConsumer struct {
	s        *flowStack
	clientID string
	api      string
}

func (b *bridgeConsumer) round(ctx context.Context, w *rotationWorkload) (string, error) {
	fctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	svid, err := w.jwt.FetchJWTSVID(fctx, jwtsvid.Params{Audience: "api://AzureADTokenExchange", Subject: w.id})
	if err != nil {
		return "", fmt.Errorf("fetching the assertion: %w", err)
	}
	assertion := svid.Marshal()
	kid := tokenKid(assertion)
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

// roundResult is what one round of calls saw.
type roundResult struct {
	at   time.Time
	ok   bool
	svid map[string]string // trust domain -> authority of its workload's SVID used
	kid  map[string]string // trust domain -> kid of its workload's JWT-SVID validated
}

// callProbe runs rounds of calls between the workloads of two trust domains
// (and through the bridge) until stopped, and records every failure once armed.
type callProbe struct {
	a, b   *rotationWorkload
	bridge *bridgeConsumer // consumes a's JWT-SVIDs

	mu       sync.Mutex
	armed    bool
	rounds   int
	failures []string
	results  []roundResult
	stop     context.CancelFunc
	done     chan struct{}
}

func startCallProbe(ctx context.Context, a, b *rotationWorkload, bridge *bridgeConsumer) *callProbe {
	ctx, cancel := context.WithCancel(ctx)
	p := &callProbe{a: a, b: b, bridge: bridge, stop: cancel, done: make(chan struct{})}
	go func() {
		defer close(p.done)
		for ctx.Err() == nil {
			p.round(ctx)
			select {
			case <-ctx.Done():
			case <-time.After(100 * time.Millisecond):
			}
		}
	}()
	return p
}

func (p *callProbe) round(ctx context.Context) {
	r := roundResult{at: time.Now(), ok: true, svid: map[string]string{}, kid: map[string]string{}}
	var errs []string
	fail := func(what string, err error) {
		if err != nil && ctx.Err() == nil {
			r.ok = false
			errs = append(errs, what+": "+err.Error())
		}
	}
	svidA, svidB := p.a.svidAuthority(), p.b.svidAuthority()
	fail("mTLS b->a", mtlsRound(ctx, p.a, p.b))
	fail("mTLS a->b", mtlsRound(ctx, p.b, p.a))
	r.svid[p.a.d.td.Name()], r.svid[p.b.d.td.Name()] = svidA, svidB
	kid, err := jwtRound(ctx, p.a, p.b)
	fail("JWT a->b", err)
	r.kid[p.a.d.td.Name()] = kid
	kid, err = jwtRound(ctx, p.b, p.a)
	fail("JWT b->a", err)
	r.kid[p.b.d.td.Name()] = kid
	if p.bridge != nil {
		kid, err := p.bridge.round(ctx, p.a)
		fail("bridge and demo-api", err)
		if kid != r.kid[p.a.d.td.Name()] && err == nil {
			r.kid[p.a.d.td.Name()+"/bridge"] = kid
		}
	}
	if ctx.Err() != nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.rounds++
	p.results = append(p.results, r)
	if p.armed {
		for _, e := range errs {
			p.failures = append(p.failures, r.at.Format("15:04:05.000")+" "+e)
		}
	}
}

// arm starts counting failures once a round succeeded.
func (p *callProbe) arm(t *testing.T) {
	t.Helper()
	require.Eventually(t, func() bool {
		p.mu.Lock()
		defer p.mu.Unlock()
		n := len(p.results)
		if n > 0 && p.results[n-1].ok {
			p.armed = true
		}
		return p.armed
	}, 60*time.Second, 50*time.Millisecond, "a first clean round of calls")
}

// sawAfter reports whether a clean round that started after since satisfied
// cond.
func (p *callProbe) sawAfter(since time.Time, cond func(roundResult) bool) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, r := range p.results {
		if r.ok && r.at.After(since) && cond(r) {
			return true
		}
	}
	return false
}

func (p *callProbe) finish() (rounds int, failures []string) {
	p.stop()
	<-p.done
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.rounds, p.failures
}

// stepTimes records how long each step took to reach the other side.
type stepTimes struct {
	mu    sync.Mutex
	order []string
	took  map[string]time.Duration
}

// check is one thing a step must bring about.
type check struct {
	name string
	ok   func() bool
}

// wait polls every check until all hold, recording when each first did
// (measured from since, the step's command).
func (s *stepTimes) wait(t *testing.T, since time.Time, timeout time.Duration, checks ...check) {
	t.Helper()
	s.mu.Lock()
	if s.took == nil {
		s.took = map[string]time.Duration{}
	}
	for _, c := range checks {
		s.order = append(s.order, c.name)
	}
	s.mu.Unlock()
	done := make([]bool, len(checks))
	deadline := time.Now().Add(timeout)
	for left := len(checks); left > 0; {
		for i, c := range checks {
			if !done[i] && c.ok() {
				done[i] = true
				left--
				s.mu.Lock()
				s.took[c.name] = time.Since(since)
				s.mu.Unlock()
			}
		}
		if left == 0 {
			break
		}
		if time.Now().After(deadline) {
			for i, c := range checks {
				if !done[i] {
					t.Fatalf("after %s: %s has not happened", timeout, c.name)
				}
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (s *stepTimes) table() string {
	var b strings.Builder
	for _, n := range s.order {
		fmt.Fprintf(&b, "  %-70s %6.1fs\n", n, s.took[n].Seconds())
	}
	return b.String()
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
// step until it has reached the other side (peer) and timing it.
func rotateAuthorities(t *testing.T, owner, peer *rotationWorkload, probe *callProbe, times *stepTimes) {
	td := owner.d.td.Name()
	oldX := byStatus(owner.d.authorities(t, "x509"), "active")[0].Id
	oldJ := byStatus(owner.d.authorities(t, "jwt"), "active")[0].Id
	const step = 2 * time.Minute

	start := time.Now()
	newX := owner.d.authorityOp(t, "x509", "prepare", "").Id
	newJ := owner.d.authorityOp(t, "jwt", "prepare", "").Id
	times.wait(t, start, step,
		check{td + " x509 prepare: the peer's workloads hold the new CA", func() bool { return peer.holdsX509(owner.d.td, newX) }},
		check{td + " jwt prepare: the peer's workloads hold the new key", func() bool { return peer.holdsJWT(owner.d.td, newJ) }})

	start = time.Now()
	owner.d.authorityOp(t, "x509", "activate", newX)
	owner.d.authorityOp(t, "jwt", "activate", newJ)
	times.wait(t, start, step,
		check{td + " x509 activate: the peer fetched the bundle from the re-signed endpoint", func() bool {
			return peer.d.lastRefresh(t, owner.d.td).After(start)
		}},
		check{td + " jwt activate: the peer validated a JWT-SVID of the new key", func() bool {
			return probe.sawAfter(start, func(r roundResult) bool { return r.kid[td] == newJ })
		}})

	start = time.Now()
	owner.d.authorityOp(t, "x509", "taint", oldX)
	owner.d.authorityOp(t, "jwt", "taint", oldJ)
	// JWT-SVIDs of the old key handed out a moment ago are still valid:
	// revoking it now would break them, and is refused.
	out, err := owner.d.srv.CLI("authority", "jwt", "revoke", "--authority-id", oldJ)
	require.Error(t, err, out)
	require.Contains(t, out, "still hold")
	times.wait(t, start, step,
		check{td + " x509 taint: the peer accepted the workload's SVID of the new CA", func() bool {
			return probe.sawAfter(start, func(r roundResult) bool { return r.svid[td] == newX })
		}},
		check{td + " x509 taint: no agent holds an SVID of the old CA", func() bool { return owner.d.heldBy(t, "x509", oldX) == 0 }},
		check{td + " jwt taint: the peer validated a fresh JWT-SVID of the new key", func() bool {
			return probe.sawAfter(start, func(r roundResult) bool { return r.kid[td] == newJ })
		}},
		check{td + " jwt taint: every JWT-SVID of the old key handed out expired", func() bool { return owner.d.heldBy(t, "jwt", oldJ) == 0 }})

	start = time.Now()
	owner.d.authorityOp(t, "x509", "revoke", oldX)
	owner.d.authorityOp(t, "jwt", "revoke", oldJ)
	// The endpoint still authenticates against what the peer holds now.
	times.wait(t, start, step,
		check{td + " x509 revoke: the peer's workloads no longer trust the old CA", func() bool { return !peer.holdsX509(owner.d.td, oldX) }},
		check{td + " jwt revoke: the peer's workloads no longer hold the old key", func() bool { return !peer.holdsJWT(owner.d.td, oldJ) }},
		check{td + " revoke: the peer fetched the bundle again", func() bool { return peer.d.lastRefresh(t, owner.d.td).After(start) }})
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
	wa := newRotationWorkload(t, ctx, a, b.td)
	wb := newRotationWorkload(t, ctx, b, a.td)

	// a's workload exchanges its JWT-SVIDs at the bridge for demo-api.
	s := attachFlowStack(t, a.c, jwtIss)
	appID := s.resource("demo", "api://demo")
	api := s.demoAPI("api://demo", appID)
	idn := s.identity("wl-id", jwtIss, wa.id.String(), "")
	s.cli("role", "assign", "--identity-name", "wl-id", "--resource", "api://demo", "--role", "reader")
	consumer := &bridgeConsumer{s: s, clientID: idn.ClientID, api: api}

	probe := startCallProbe(ctx, wa, wb, consumer)
	probe.arm(t)
	var times stepTimes
	rotateAuthorities(t, wa, wb, probe, &times)
	rotateAuthorities(t, wb, wa, probe, &times)
	rounds, failures := probe.finish()
	t.Logf("propagation of each step to the other side (%d rounds of calls):\n%s", rounds, times.table())
	require.Empty(t, failures, "calls failed during the rotations:\n%s", strings.Join(failures, "\n"))
	require.Greater(t, rounds, 10)
}
