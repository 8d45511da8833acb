// Package rotation drives the workloads of two federated trust domains
// against each other while their authorities rotate: rounds of go-spiffe
// mutual TLS and JWT-SVID calls in both directions (and any extra calls a test
// adds), every failure recorded from the moment the probe is armed, and the
// time each rotation step takes to show on the other side. test/e2e uses it
// with two ferry trust domains, test/interop/spire with ferry and SPIRE.
package rotation

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// Workload is one trust domain's workload as go-spiffe sees it through its
// agent's Workload API.
type Workload struct {
	ID   spiffeid.ID
	X509 *workloadapi.X509Source
	JWT  *workloadapi.JWTSource
}

// NewWorkload opens X.509 and JWT sources on the Workload API at addr
// (unix:///path), presenting the SVID with id, and waits until the workload
// holds its own bundle and peer's. Close the sources when done.
func NewWorkload(ctx context.Context, addr string, id spiffeid.ID, peer spiffeid.TrustDomain) (*Workload, error) {
	opts := workloadapi.WithClientOptions(workloadapi.WithAddr(addr))
	x, err := workloadapi.NewX509Source(ctx, opts, workloadapi.WithDefaultX509SVIDPicker(func(svids []*x509svid.SVID) *x509svid.SVID {
		for _, s := range svids {
			if s.ID == id {
				return s
			}
		}
		return svids[0]
	}))
	if err != nil {
		return nil, fmt.Errorf("rotation: X.509 source for %s: %w", id, err)
	}
	j, err := workloadapi.NewJWTSource(ctx, opts)
	if err != nil {
		x.Close()
		return nil, fmt.Errorf("rotation: JWT source for %s: %w", id, err)
	}
	w := &Workload{ID: id, X509: x, JWT: j}
	for {
		s, errS := x.GetX509SVID()
		_, errX := x.GetX509BundleForTrustDomain(peer)
		_, errJ := j.GetJWTBundleForTrustDomain(peer)
		if errS == nil && s.ID == id && errX == nil && errJ == nil {
			return w, nil
		}
		select {
		case <-ctx.Done():
			w.Close()
			return nil, fmt.Errorf("rotation: %s does not hold its SVID and %s's bundles (%v, %v, %v): %w", id, peer, errS, errX, errJ, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Close closes the workload's sources.
func (w *Workload) Close() {
	_ = w.X509.Close()
	_ = w.JWT.Close()
}

// TrustDomain is the workload's trust domain name.
func (w *Workload) TrustDomain() string { return w.ID.TrustDomain().Name() }

// SVIDAuthority is the ID (hex authority key ID) of the authority that
// signed the workload's current X509-SVID.
func (w *Workload) SVIDAuthority() string {
	s, err := w.X509.GetX509SVID()
	if err != nil {
		return ""
	}
	return hex.EncodeToString(s.Certificates[0].AuthorityKeyId)
}

// HoldsX509 reports whether the workload's bundle for td holds the X.509
// authority with the hex subject key ID id (case does not matter).
func (w *Workload) HoldsX509(td spiffeid.TrustDomain, id string) bool {
	b, err := w.X509.GetX509BundleForTrustDomain(td)
	if err != nil {
		return false
	}
	return slices.ContainsFunc(b.X509Authorities(), func(c *x509.Certificate) bool {
		return strings.EqualFold(hex.EncodeToString(c.SubjectKeyId), id)
	})
}

// HoldsJWT reports whether the workload's JWT bundle for td holds key kid.
func (w *Workload) HoldsJWT(td spiffeid.TrustDomain, kid string) bool {
	b, err := w.JWT.GetJWTBundleForTrustDomain(td)
	if err != nil {
		return false
	}
	_, ok := b.FindJWTAuthority(kid)
	return ok
}

// TokenKid is a JWT's header kid ("" when it has none).
func TokenKid(token string) string {
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

// MTLS has client dial server over go-spiffe mutual TLS, each authorizing the
// other's SPIFFE ID, and echo one message.
func MTLS(ctx context.Context, server, client *Workload) error {
	return Echo(ctx, server.X509, client.X509, server.ID, client.ID)
}

// Echo serves one echo over go-spiffe mutual TLS with serverSrc's SVID,
// authorizing clientID, and dials it with clientSrc's SVID, authorizing
// serverID.
func Echo(ctx context.Context, serverSrc, clientSrc *workloadapi.X509Source, serverID, clientID spiffeid.ID) error {
	lis, err := tls.Listen("tcp", "127.0.0.1:0", tlsconfig.MTLSServerConfig(serverSrc, serverSrc, tlsconfig.AuthorizeID(clientID)))
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
			served <- fmt.Errorf("%s serving %s: %w", serverID, clientID, err)
			return
		}
		_, err = conn.Write(buf)
		served <- err
	}()
	d := &tls.Dialer{Config: tlsconfig.MTLSClientConfig(clientSrc, clientSrc, tlsconfig.AuthorizeID(serverID))}
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	conn, err := d.DialContext(dctx, "tcp", lis.Addr().String())
	if err != nil {
		lis.Close()
		<-served
		return fmt.Errorf("%s dialing %s: %w", clientID, serverID, err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := conn.Write([]byte("ping")); err != nil {
		return fmt.Errorf("%s dialing %s: %w", clientID, serverID, err)
	}
	if _, err := io.ReadFull(conn, make([]byte, 4)); err != nil {
		return fmt.Errorf("%s dialing %s: %w", clientID, serverID, err)
	}
	return <-served
}

// JWT has from fetch a JWT-SVID for to's SPIFFE ID and to validate it with
// its own bundles, as a go-spiffe relying party does; it returns the token's
// kid.
func JWT(ctx context.Context, from, to *Workload) (string, error) {
	fctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	svid, err := from.JWT.FetchJWTSVID(fctx, jwtsvid.Params{Audience: to.ID.String(), Subject: from.ID})
	if err != nil {
		return "", fmt.Errorf("%s fetching a JWT-SVID: %w", from.ID, err)
	}
	tok := svid.Marshal()
	kid := TokenKid(tok)
	if _, err := jwtsvid.ParseAndValidate(tok, to.JWT, []string{to.ID.String()}); err != nil {
		return kid, fmt.Errorf("%s validating %s's JWT-SVID (kid %s): %w", to.ID, from.ID, kid, err)
	}
	return kid, nil
}

// Round is what one round of calls saw.
type Round struct {
	At time.Time
	OK bool
	// SVID maps a trust domain to the authority of its workload's SVID
	// presented in the round; Kid to the kid of its workload's JWT-SVID
	// validated by the other side. Extra calls add their own keys.
	SVID, Kid map[string]string
}

// Call is an extra call made every round: it returns the kid of the JWT it
// spent ("" if none) and records it under Round.Kid[Name].
type Call struct {
	Name string
	Do   func(ctx context.Context) (kid string, err error)
}

// Probe runs rounds of calls between two workloads until Finish.
type Probe struct {
	a, b  *Workload
	extra []Call

	mu       sync.Mutex
	armed    bool
	rounds   int
	failures []string
	results  []Round
	stop     context.CancelFunc
	done     chan struct{}
}

// Interval is the pause between two rounds.
const Interval = 100 * time.Millisecond

// Start runs rounds of calls until Finish: mutual TLS both ways (each side
// serving once), a JWT-SVID each way, then the extra calls.
func Start(ctx context.Context, a, b *Workload, extra ...Call) *Probe {
	ctx, cancel := context.WithCancel(ctx)
	p := &Probe{a: a, b: b, extra: extra, stop: cancel, done: make(chan struct{})}
	go func() {
		defer close(p.done)
		for ctx.Err() == nil {
			p.round(ctx)
			select {
			case <-ctx.Done():
			case <-time.After(Interval):
			}
		}
	}()
	return p
}

func (p *Probe) round(ctx context.Context) {
	r := Round{At: time.Now(), OK: true, SVID: map[string]string{}, Kid: map[string]string{}}
	var errs []string
	fail := func(what string, err error) {
		if err != nil && ctx.Err() == nil {
			r.OK = false
			errs = append(errs, what+": "+err.Error())
		}
	}
	ta, tb := p.a.TrustDomain(), p.b.TrustDomain()
	r.SVID[ta], r.SVID[tb] = p.a.SVIDAuthority(), p.b.SVIDAuthority()
	fail("mTLS "+tb+" -> "+ta, MTLS(ctx, p.a, p.b))
	fail("mTLS "+ta+" -> "+tb, MTLS(ctx, p.b, p.a))
	kid, err := JWT(ctx, p.a, p.b)
	fail("JWT-SVID "+ta+" -> "+tb, err)
	r.Kid[ta] = kid
	kid, err = JWT(ctx, p.b, p.a)
	fail("JWT-SVID "+tb+" -> "+ta, err)
	r.Kid[tb] = kid
	for _, c := range p.extra {
		kid, err := c.Do(ctx)
		fail(c.Name, err)
		r.Kid[c.Name] = kid
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
			p.failures = append(p.failures, r.At.Format("15:04:05.000")+" "+e)
		}
	}
}

// Arm waits for a round without failures and counts every failure from then
// on.
func (p *Probe) Arm(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		p.mu.Lock()
		n := len(p.results)
		if n > 0 && p.results[n-1].OK {
			p.armed = true
		}
		armed := p.armed
		var last string
		if n > 0 && !armed {
			last = fmt.Sprint(p.results[n-1])
		}
		p.mu.Unlock()
		if armed {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("rotation: no clean round of calls after %s (last: %s)", timeout, last)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// SawAfter reports whether a clean round that started after since
// satisfied cond.
func (p *Probe) SawAfter(since time.Time, cond func(Round) bool) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, r := range p.results {
		if r.OK && r.At.After(since) && cond(r) {
			return true
		}
	}
	return false
}

// Finish stops the rounds and returns how many ran and the failures seen
// since Arm.
func (p *Probe) Finish() (rounds int, failures []string) {
	p.stop()
	<-p.done
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.rounds, p.failures
}

// Check is one thing a rotation step must bring about.
type Check struct {
	Name string
	OK   func() bool
}

// Steps records how long each step took to show on the other side.
type Steps struct {
	mu    sync.Mutex
	order []string
	took  map[string]time.Duration
}

// Wait polls every check until all hold, recording when each first did,
// measured from since (the step's command); it fails t after timeout.
func (s *Steps) Wait(t testing.TB, since time.Time, timeout time.Duration, checks ...Check) {
	t.Helper()
	s.mu.Lock()
	if s.took == nil {
		s.took = map[string]time.Duration{}
	}
	for _, c := range checks {
		s.order = append(s.order, c.Name)
	}
	s.mu.Unlock()
	done := make([]bool, len(checks))
	deadline := time.Now().Add(timeout)
	for left := len(checks); ; {
		for i, c := range checks {
			if !done[i] && c.OK() {
				done[i] = true
				left--
				s.mu.Lock()
				s.took[c.Name] = time.Since(since)
				s.mu.Unlock()
			}
		}
		if left == 0 {
			return
		}
		if time.Now().After(deadline) {
			var missing []string
			for i, c := range checks {
				if !done[i] {
					missing = append(missing, c.Name)
				}
			}
			t.Fatalf("after %s, not yet: %s", timeout, strings.Join(missing, "; "))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Table lists every step and the time it took, in order.
func (s *Steps) Table() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var b strings.Builder
	for _, n := range s.order {
		fmt.Fprintf(&b, "  %-78s %6.1fs\n", n, s.took[n].Seconds())
	}
	return b.String()
}
