package scale_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"log/slog"
	"math/big"
	mrand "math/rand/v2"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/ferry-id/ferry/agent/cache"
	"github.com/ferry-id/ferry/agent/session"
	"github.com/ferry-id/ferry/attestors/node"
	"github.com/ferry-id/ferry/attestors/node/jointoken"
	"github.com/ferry-id/ferry/attestors/node/x509pop"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

// The fleet's model. Every name encodes who may receive the entry, so each
// simulated agent checks every entry it is sent against what it should have:
//
//	a<agent>-<n>   parented on the agent's own ID: that agent only
//	g<group>-<n>   parented on the group's node alias (x509pop:san:group:g<group>):
//	               the x509pop agents of that group
//	f-<n>          parented on the fleet alias (x509pop:ca:fingerprint:<root>):
//	               every x509pop agent
//	i<n>           parented on agents that never connect: nobody here
const (
	trustDomain = "example.org"
	serverID    = "spiffe://example.org/spire/server"
	fleetID     = "spiffe://example.org/scale/fleet"
)

func groupID(g int) string     { return fmt.Sprintf("spiffe://example.org/scale/group/g%03d", g) }
func ownEntry(a, n int) string { return fmt.Sprintf("a%05d-%03d", a, n) }
func groupEntry(g, n int) string {
	return fmt.Sprintf("g%03d-%03d", g, n)
}
func fleetEntry(n int) string { return fmt.Sprintf("f-%03d", n) }

// simAgent is one simulated agent: the real agent session (agent/session:
// attestation, SVID renewal at half-life, the entry stream with its
// reconnects and failover between servers, workload CSRs) with a sink that
// checks what the server sends instead of the agent's cache.
type simAgent struct {
	f     *fleet
	idx   int
	id    string // SPIFFE ID
	pop   bool   // x509pop (in the fleet and a group) or join token
	group int
	sess  *session.Session
	att   node.AgentAttestor

	mu       sync.Mutex
	entries  map[string]uint64 // ID -> revision, as the server sent them
	parents  map[string]string // ID -> parent ID, as sent
	fulls    int               // full sets received
	lastFull time.Time
	server   string // the agent API address its entry stream last opened on
	bundle   bool
	probeSeq uint64 // last probe this agent reported

	// The workload: one SVID for the agent's first entry, renewed at half-life.
	svidMu    sync.Mutex
	svidUntil time.Time
}

// expected returns the entry IDs the agent must hold.
func (a *simAgent) expected() []string {
	cfg := a.f.cfg
	var out []string
	for n := range cfg.EntriesPerAgent {
		out = append(out, ownEntry(a.idx, n))
	}
	if a.pop {
		if cfg.Groups > 0 {
			for n := range cfg.GroupEntries {
				out = append(out, groupEntry(a.group, n))
			}
		}
		for n := range cfg.FleetEntries {
			out = append(out, fleetEntry(n))
		}
	}
	return out
}

// allowed reports whether the model lets the agent receive entry e, and why not.
func (a *simAgent) allowed(e *ferrypb.Entry) error {
	var wantParent string
	switch {
	case strings.HasPrefix(e.Id, "a"):
		var idx, n int
		if _, err := fmt.Sscanf(e.Id, "a%05d-%03d", &idx, &n); err != nil || idx != a.idx {
			return fmt.Errorf("entry %s belongs to another agent", e.Id)
		}
		wantParent = a.id
	case strings.HasPrefix(e.Id, "g"):
		var g, n int
		if _, err := fmt.Sscanf(e.Id, "g%03d-%03d", &g, &n); err != nil || !a.pop || g != a.group {
			return fmt.Errorf("entry %s belongs to a group the agent is not in", e.Id)
		}
		wantParent = groupID(g)
	case strings.HasPrefix(e.Id, "f-"):
		if !a.pop {
			return fmt.Errorf("fleet entry %s sent to a join-token agent", e.Id)
		}
		wantParent = fleetID
	default:
		return fmt.Errorf("entry %s is for no simulated agent", e.Id)
	}
	if e.ParentId != wantParent {
		return fmt.Errorf("entry %s has parent %s, want %s", e.Id, e.ParentId, wantParent)
	}
	return nil
}

// SetEntries implements session.Sink.
func (a *simAgent) SetEntries(all []*ferrypb.Entry, revision uint64) {
	now := time.Now()
	a.mu.Lock()
	a.entries = make(map[string]uint64, len(all))
	a.parents = make(map[string]string, len(all))
	for _, e := range all {
		if err := a.allowed(e); err != nil {
			a.f.violation(a, "full set: %v", err)
		}
		a.entries[e.Id] = e.Revision
	}
	a.fulls++
	a.lastFull = now
	a.mu.Unlock()
	a.f.observe(a, all, now)
}

// ApplyEntryChanges implements session.Sink.
func (a *simAgent) ApplyEntryChanges(upserts []*ferrypb.Entry, deletes []string, revision uint64) {
	now := time.Now()
	a.mu.Lock()
	if a.entries == nil {
		a.f.violation(a, "a change before any full set")
		a.entries = map[string]uint64{}
	}
	for _, e := range upserts {
		if err := a.allowed(e); err != nil {
			a.f.violation(a, "change: %v", err)
		}
		if old, ok := a.entries[e.Id]; ok && old > e.Revision {
			a.f.violation(a, "entry %s went back from revision %d to %d", e.Id, old, e.Revision)
		}
		a.entries[e.Id] = e.Revision
	}
	for _, id := range deletes {
		delete(a.entries, id)
	}
	a.mu.Unlock()
	a.f.updates.Add(1)
	a.f.observe(a, upserts, now)
}

// SetBundles implements session.Sink.
func (a *simAgent) SetBundles(own *spiffebundle.Bundle, _ map[spiffeid.TrustDomain]*spiffebundle.Bundle) {
	if len(own.X509Authorities()) == 0 {
		a.f.violation(a, "bundle without X.509 authorities")
	}
	a.mu.Lock()
	a.bundle = true
	a.mu.Unlock()
}

// TaintAuthorities: the harness rotates no authority, so a taint pushed to a
// simulated agent is a violation.
func (a *simAgent) TaintAuthorities(x509Authorities []*x509.Certificate, jwtKeyIDs []string) {
	if len(x509Authorities) > 0 || len(jwtKeyIDs) > 0 {
		a.f.violation(a, "authority tainted while none was rotated")
	}
}

// diff compares what the agent holds with want (ID -> revision) and returns
// the first differences, empty when equal.
func (a *simAgent) diff(want map[string]uint64) string {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []string
	for id, rev := range want {
		if got, ok := a.entries[id]; !ok {
			out = append(out, "missing "+id)
		} else if got != rev {
			out = append(out, fmt.Sprintf("%s at revision %d, want %d", id, got, rev))
		}
		if len(out) > 3 {
			break
		}
	}
	if len(a.entries) != len(want) {
		for id := range a.entries {
			if _, ok := want[id]; !ok {
				out = append(out, "extra "+id)
				break
			}
		}
	}
	if !a.bundle {
		out = append(out, "no bundle")
	}
	return strings.Join(out, ", ")
}

func (a *simAgent) fullSince(t time.Time) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return !a.lastFull.Before(t)
}

// workload keeps one X509-SVID for the agent's first entry, signed through
// the session as the agent's cache does, renewed at half its life; it
// records every failure and any moment the SVID was expired.
func (a *simAgent) workload(ctx context.Context) {
	entry := ownEntry(a.idx, 0)
	want := fmt.Sprintf("spiffe://%s/scale/a%05d/w000", trustDomain, a.idx)
	for attempt := 0; ctx.Err() == nil; {
		a.svidMu.Lock()
		until := a.svidUntil
		a.svidMu.Unlock()
		if !until.IsZero() && time.Now().After(until) {
			a.f.violation(a, "workload SVID expired %s ago", time.Since(until).Round(time.Millisecond))
		}
		chain, err := a.sign(ctx, entry)
		if err == nil && chain[0].URIs[0].String() != want {
			a.f.violation(a, "workload SVID for %s names %s", want, chain[0].URIs[0])
		}
		var wait time.Duration
		switch {
		case err == nil:
			attempt = 0
			a.f.signed.Add(1)
			life := chain[0].NotAfter.Sub(time.Now())
			a.svidMu.Lock()
			a.svidUntil = chain[0].NotAfter
			a.svidMu.Unlock()
			wait = life / 2
		case ctx.Err() != nil:
			return
		default:
			attempt++
			a.f.signFailures.Add(1)
			if status.Code(err) == codes.ResourceExhausted {
				a.f.shed.Add(1)
			}
			wait = backoff(attempt)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

// sign signs one fresh workload key's CSR for entry through the session.
func (a *simAgent) sign(ctx context.Context, entry string) ([]*x509.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		return nil, err
	}
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	res, err := a.sess.SignX509SVIDs(cctx, []cache.SignRequest{{EntryID: entry, CSR: csr}})
	if err != nil {
		return nil, err
	}
	if res[0].Err != nil {
		return nil, res[0].Err
	}
	if len(res[0].Chain) == 0 || len(res[0].Chain[0].URIs) != 1 {
		return nil, fmt.Errorf("workload SVID without one URI SAN")
	}
	return res[0].Chain, nil
}

// backoff is exponential with jitter, from 100 ms to 5 s, as a client that
// was shed retries.
func backoff(attempt int) time.Duration {
	d := min(100*time.Millisecond<<min(attempt, 6), 5*time.Second)
	return d/2 + mrand.N(d/2+1)
}

// fleet is every simulated agent, with the checks and probes they share.
type fleet struct {
	t      testing.TB
	cfg    config
	agents []*simAgent
	dir    string
	// root signs the x509pop agents' node certificates.
	rootFP string

	violations   atomic.Int64
	vmu          sync.Mutex
	firstViolate []string
	lastWarns    []string // the sessions' last warnings, for a failure's message

	updates, signed, signFailures, shed atomic.Int64
	logShed, logWarn                    atomic.Int64

	probe atomic.Pointer[probe]
}

func (f *fleet) violation(a *simAgent, format string, args ...any) {
	f.violations.Add(1)
	f.vmu.Lock()
	if len(f.firstViolate) < 20 {
		f.firstViolate = append(f.firstViolate, a.id+": "+fmt.Sprintf(format, args...))
	}
	f.vmu.Unlock()
}

// probe is one timed change: the agents in want report when they first hold
// entry id at revision rev or later.
type probe struct {
	seq   uint64
	id    string
	rev   atomic.Uint64 // 0 until the write is acknowledged
	start time.Time
	mu    sync.Mutex
	early map[*simAgent]time.Time // seen before the acknowledgement told rev
	lat   []time.Duration
	left  atomic.Int64
	done  chan struct{}
}

func (f *fleet) observe(a *simAgent, es []*ferrypb.Entry, now time.Time) {
	p := f.probe.Load()
	if p == nil {
		return
	}
	for _, e := range es {
		if e.Id != p.id {
			continue
		}
		a.mu.Lock()
		seen := a.probeSeq == p.seq
		a.mu.Unlock()
		if seen {
			return
		}
		rev := p.rev.Load()
		p.mu.Lock()
		if rev == 0 {
			// Not acknowledged yet: remember when, decide once it is.
			if p.early == nil {
				p.early = map[*simAgent]time.Time{}
			}
			p.early[a] = now
			p.mu.Unlock()
			return
		}
		p.mu.Unlock()
		if e.Revision >= rev {
			f.report(p, a, now)
		}
		return
	}
}

func (f *fleet) report(p *probe, a *simAgent, at time.Time) {
	a.mu.Lock()
	if a.probeSeq == p.seq {
		a.mu.Unlock()
		return
	}
	a.probeSeq = p.seq
	a.mu.Unlock()
	p.mu.Lock()
	p.lat = append(p.lat, at.Sub(p.start))
	p.mu.Unlock()
	if p.left.Add(-1) == 0 {
		close(p.done)
	}
}

var probeSeq atomic.Uint64

// timeChange runs write (which changes entry id and returns its new revision)
// and returns how long each of the n agents that must receive it took.
func (f *fleet) timeChange(id string, n int, timeout time.Duration, write func() (uint64, error)) ([]time.Duration, error) {
	p := &probe{seq: probeSeq.Add(1), id: id, done: make(chan struct{})}
	p.left.Store(int64(n))
	f.probe.Store(p)
	defer f.probe.Store(nil)
	p.start = time.Now()
	rev, err := write()
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	p.rev.Store(rev)
	early := p.early
	p.early = nil
	p.mu.Unlock()
	for a, at := range early {
		a.mu.Lock()
		got := a.entries[id]
		a.mu.Unlock()
		if got >= rev {
			f.report(p, a, at)
		}
	}
	// An agent may have applied it between the write and rev being known
	// without a second delivery: look at what each holds.
	for _, a := range f.agents {
		a.mu.Lock()
		got, has := a.entries[id]
		a.mu.Unlock()
		if has && got >= rev {
			f.report(p, a, time.Now())
		}
	}
	select {
	case <-p.done:
	case <-time.After(timeout):
		p.mu.Lock()
		got := len(p.lat)
		p.mu.Unlock()
		return nil, fmt.Errorf("change of %s reached %d of %d agents in %s", id, got, n, timeout)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.lat), nil
}

// countingHandler counts the sessions' warnings and the refusals with
// ResourceExhausted among them (a shed call the session retries), and notes
// the server agent a's entry stream opened on.
type countingHandler struct {
	f *fleet
	a *simAgent
}

func (h countingHandler) Enabled(_ context.Context, l slog.Level) bool { return l >= slog.LevelDebug }
func (h countingHandler) Handle(_ context.Context, r slog.Record) error {
	if r.Level < slog.LevelWarn {
		if r.Message == "entry stream open" {
			r.Attrs(func(at slog.Attr) bool {
				if at.Key == "server" {
					h.a.mu.Lock()
					h.a.server = at.Value.String()
					h.a.mu.Unlock()
				}
				return true
			})
		}
		return nil
	}
	h.f.logWarn.Add(1)
	var b strings.Builder
	b.WriteString(r.Message)
	r.Attrs(func(at slog.Attr) bool { fmt.Fprintf(&b, " %s=%v", at.Key, at.Value); return true })
	h.f.vmu.Lock()
	h.f.lastWarns = append(h.f.lastWarns, b.String())
	if len(h.f.lastWarns) > 10 {
		h.f.lastWarns = h.f.lastWarns[1:]
	}
	h.f.vmu.Unlock()
	r.Attrs(func(at slog.Attr) bool {
		if at.Key == "error" {
			if err, ok := at.Value.Any().(error); ok && status.Code(err) == codes.ResourceExhausted {
				h.f.logShed.Add(1)
			} else if strings.Contains(at.Value.String(), "ResourceExhausted") {
				h.f.logShed.Add(1)
			}
		}
		return true
	})
	return nil
}
func (h countingHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h countingHandler) WithGroup(string) slog.Handler      { return h }

// nodeCA is the CA of the x509pop agents' node certificates.
type nodeCA struct {
	cert *x509.Certificate
	key  crypto.Signer
}

func newNodeCA(t testing.TB, dir string) (*nodeCA, string) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "scale node CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(48 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	path := filepath.Join(dir, "node-ca.pem")
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		t.Fatal(err)
	}
	return &nodeCA{cert: cert, key: key}, path
}

// issue writes agent idx's node certificate (CN node-<idx>, URI SAN
// x509pop://<td>/group/g<group>) and key under dir and returns its x509pop
// agent and SPIFFE ID.
func (ca *nodeCA) issue(t testing.TB, dir string, idx, group int) (node.AgentAttestor, string) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	san, _ := url.Parse(fmt.Sprintf("x509pop://%s/group/g%03d", trustDomain, group))
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(int64(idx) + 2), Subject: pkix.Name{CommonName: fmt.Sprintf("node-%05d", idx)},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(48 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, URIs: []*url.URL{san}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, key.Public(), ca.key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certPath, keyPath := filepath.Join(dir, "node.pem"), filepath.Join(dir, "node-key.pem")
	if err := os.WriteFile(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		t.Fatal(err)
	}
	att, err := x509pop.NewAgent(x509pop.AgentConfig{CertificatePath: certPath, PrivateKeyPath: keyPath})
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(der)
	return att, fmt.Sprintf("spiffe://%s/spire/agent/x509pop/%s", trustDomain, x509pop.Fingerprint(leaf))
}

// joinAgent returns a join-token attestor for token.
func joinAgent(t testing.TB, token string) node.AgentAttestor {
	att, err := jointoken.NewAgent(jointoken.AgentConfig{Token: token})
	if err != nil {
		t.Fatal(err)
	}
	return att
}

func countingLogger(f *fleet, a *simAgent) *slog.Logger {
	return slog.New(countingHandler{f: f, a: a})
}

func x509popFingerprint(c *x509.Certificate) string { return x509pop.Fingerprint(c) }

// warnings returns the sessions' last warnings.
func (f *fleet) warnings() string {
	f.vmu.Lock()
	defer f.vmu.Unlock()
	return strings.Join(f.lastWarns, "\n  ")
}
