package federation

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"google.golang.org/grpc/codes"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/ca"
	"github.com/ferry-id/ferry/server/cluster"
	"github.com/ferry-id/ferry/server/state"
)

// Refresh bounds and defaults. A peer's spiffe_refresh_hint is honoured on
// every fetch, whether the bundle changed or not, within [DefaultMinRefresh,
// DefaultMaxRefresh]: no peer makes the leader fetch more often than every
// 10 s, and none is left unchecked for more than an hour (a hint of days
// would miss its own rotations). A bundle served without a hint is fetched
// every DefaultRefreshHint (5 min), as SPIRE does.
const (
	DefaultMinRefresh   = 10 * time.Second
	DefaultMaxRefresh   = time.Hour
	DefaultRetryBackoff = 5 * time.Second
	DefaultFetchTimeout = 30 * time.Second
)

// Errors of Refresh.
var (
	// ErrNotLeader: only the ready Raft leader fetches bundles.
	ErrNotLeader = errors.New("federation: this node is not the leader")
	// ErrNoRelationship: no federation relationship with that trust domain.
	ErrNoRelationship = errors.New("federation: no such federation relationship")
)

// Cluster is what the refresher needs from the Raft node: committing commands
// and leader-only fencing. *cluster.Node implements it; it is safe for
// concurrent use.
type Cluster interface {
	Apply(ctx context.Context, cmd *ferrypb.Command) (*ferrypb.CommandResult, error)
	// Leadership returns the node's leadership token, whether it is the ready
	// leader, and a channel closed at the next change.
	Leadership() (cluster.LeadershipToken, bool, <-chan struct{})
	// LeadershipCurrent reports whether tok is still this node's leadership.
	LeadershipCurrent(tok cluster.LeadershipToken) bool
}

// State is the replicated state the refresher reads. *state.Store implements it.
type State interface {
	View() *state.View
	ChangesSince(ctx context.Context, index uint64, tables ...string) ([]state.Change, error)
}

// RefresherConfig configures a Refresher.
type RefresherConfig struct {
	// TrustDomain is ours: a relationship with it is ignored.
	TrustDomain spiffeid.TrustDomain
	State       State
	Cluster     Cluster
	// WebPKIRoots authenticate https_web endpoints; nil uses the system roots.
	WebPKIRoots *x509.CertPool
	// MinRefresh and MaxRefresh bound a bundle's refresh hint (defaults 10 s
	// and 1 h); DefaultRefresh applies to a bundle without one (5 min).
	MinRefresh, MaxRefresh, DefaultRefresh time.Duration
	// RetryBackoff is the wait after a first failed fetch, doubled per failure
	// up to the refresh interval (default 5 s).
	RetryBackoff time.Duration
	// FetchTimeout bounds one fetch (default 30 s).
	FetchTimeout time.Duration
	// Metrics, when set, receives refresh counters and bundle gauges.
	Metrics prometheus.Registerer
	Logger  *slog.Logger
	// Now is the clock (default time.Now).
	Now func() time.Time
}

// Refresher keeps the bundles of federated trust domains current. It works
// only while this node is the ready Raft leader: one worker per relationship
// fetches the foreign bundle at its refresh hint and commits it through the
// log; on leadership loss every worker stops, and no command is submitted
// under a lost leadership token.
type Refresher struct {
	cfg RefresherConfig
	log *slog.Logger
	met *metrics

	mu      sync.Mutex
	leading bool
	workers map[string]*worker

	// observe, when set, is told of paths taken that leave no other trace,
	// so that a test can wait for one instead of waiting for time to pass.
	observe atomic.Pointer[observer]
}

// observer is told what the refresher did.
type observer struct {
	// following: Run waits for the next leadership change without leading
	// (every worker of a previous leadership has returned).
	following func()
	// workerStopped: the worker of trust domain td returned.
	workerStopped func(td string)
}

// NewRefresher validates cfg.
func NewRefresher(cfg RefresherConfig) (*Refresher, error) {
	if cfg.TrustDomain.IsZero() || cfg.State == nil || cfg.Cluster == nil {
		return nil, errors.New("federation: trust domain, state and cluster are required")
	}
	if cfg.MinRefresh <= 0 {
		cfg.MinRefresh = DefaultMinRefresh
	}
	if cfg.MaxRefresh <= 0 {
		cfg.MaxRefresh = DefaultMaxRefresh
	}
	if cfg.MaxRefresh < cfg.MinRefresh {
		return nil, fmt.Errorf("federation: max refresh %s is below min refresh %s", cfg.MaxRefresh, cfg.MinRefresh)
	}
	if cfg.DefaultRefresh <= 0 {
		cfg.DefaultRefresh = DefaultRefreshHint
	}
	if cfg.RetryBackoff <= 0 {
		cfg.RetryBackoff = DefaultRetryBackoff
	}
	if cfg.FetchTimeout <= 0 {
		cfg.FetchTimeout = DefaultFetchTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	met, err := newMetrics(cfg.Metrics)
	if err != nil {
		return nil, err
	}
	return &Refresher{cfg: cfg, log: cfg.Logger, met: met, workers: map[string]*worker{}}, nil
}

// Run refreshes while this node leads, until ctx ends.
func (r *Refresher) Run(ctx context.Context) error {
	for {
		tok, ok, changed := r.cfg.Cluster.Leadership()
		var stop func()
		if ok {
			lctx, cancel := context.WithCancel(ctx)
			done := make(chan struct{})
			go func() { defer close(done); r.lead(lctx, tok) }()
			stop = func() { cancel(); <-done }
		} else if o := r.observe.Load(); o != nil && o.following != nil {
			o.following()
		}
		select {
		case <-ctx.Done():
			if stop != nil {
				stop()
			}
			return nil
		case <-changed:
			if stop != nil {
				stop()
			}
		}
	}
}

// Refresh fetches td's bundle now, waits for the outcome to be committed, and
// returns the fetch's error. It returns ErrNotLeader on a node that is not
// the leader and ErrNoRelationship for an unknown trust domain.
func (r *Refresher) Refresh(ctx context.Context, td spiffeid.TrustDomain) error {
	r.mu.Lock()
	leading, w := r.leading, r.workers[td.Name()]
	r.mu.Unlock()
	if !leading {
		return ErrNotLeader
	}
	if w == nil {
		return fmt.Errorf("%w: %s", ErrNoRelationship, td)
	}
	reply := make(chan error, 1)
	select {
	case w.requests <- reply:
	case <-w.ctx.Done():
		return ErrNotLeader
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case err := <-reply:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// lead runs one worker per relationship for one leadership, following
// relationship changes, until ctx ends.
func (r *Refresher) lead(ctx context.Context, tok cluster.LeadershipToken) {
	r.log.Info("federation refresher started", "term", tok.Term)
	var wg sync.WaitGroup
	r.mu.Lock()
	r.leading = true
	r.mu.Unlock()
	defer func() {
		r.mu.Lock()
		r.leading = false
		for td, w := range r.workers {
			w.cancel()
			delete(r.workers, td)
		}
		r.mu.Unlock()
		wg.Wait()
		r.log.Info("federation refresher stopped", "term", tok.Term)
	}()
	for {
		v := r.cfg.State.View()
		r.reconcile(ctx, tok, v, &wg)
		_, err := r.cfg.State.ChangesSince(ctx, v.Index(), state.TableFederation)
		if ctx.Err() != nil {
			return
		}
		if err != nil && !errors.Is(err, state.ErrCompacted) {
			r.log.Warn("federation: watching relationships", "error", err)
			select {
			case <-ctx.Done():
				return
			case <-time.After(time.Second):
			}
		}
	}
}

// reconcile starts a worker for each new relationship, stops those of deleted
// ones, and wakes those whose endpoint changed.
func (r *Refresher) reconcile(ctx context.Context, tok cluster.LeadershipToken, v *state.View, wg *sync.WaitGroup) {
	r.mu.Lock()
	defer r.mu.Unlock()
	seen := map[string]bool{}
	for _, rel := range v.FederationRelationships() {
		if rel.TrustDomain == r.cfg.TrustDomain.Name() {
			continue
		}
		seen[rel.TrustDomain] = true
		if w := r.workers[rel.TrustDomain]; w != nil {
			if !sameEndpoint(w.endpoint, rel) {
				w.endpoint = rel
				select {
				case w.kick <- struct{}{}:
				default:
				}
			}
			continue
		}
		td, err := spiffeid.TrustDomainFromString(rel.TrustDomain)
		if err != nil {
			continue // the FSM validated it
		}
		wctx, cancel := context.WithCancel(ctx)
		w := &worker{r: r, td: td, tok: tok, ctx: wctx, cancel: cancel, endpoint: rel,
			kick: make(chan struct{}, 1), requests: make(chan chan error)}
		r.workers[rel.TrustDomain] = w
		wg.Add(1)
		go func() { defer wg.Done(); w.run(rel) }()
	}
	for td, w := range r.workers {
		if !seen[td] {
			w.cancel()
			delete(r.workers, td)
			r.met.forget(td)
		}
	}
}

func sameEndpoint(a, b *ferrypb.FederationRelationship) bool {
	return a.BundleEndpointUrl == b.BundleEndpointUrl && a.Profile == b.Profile && a.EndpointSpiffeId == b.EndpointSpiffeId
}

// worker refreshes one trust domain's bundle.
type worker struct {
	r        *Refresher
	td       spiffeid.TrustDomain
	tok      cluster.LeadershipToken
	ctx      context.Context
	cancel   context.CancelFunc
	endpoint *ferrypb.FederationRelationship // guarded by r.mu
	kick     chan struct{}
	requests chan chan error
}

func (w *worker) run(rel *ferrypb.FederationRelationship) {
	if o := w.r.observe.Load(); o != nil && o.workerStopped != nil {
		defer o.workerStopped(w.td.Name())
	}
	cfg := w.r.cfg
	// A new leader continues the schedule its predecessor recorded instead of
	// fetching every bundle at once.
	due := cfg.Now()
	switch {
	case rel.NextRefresh > 0:
		due = time.Unix(rel.NextRefresh, 0)
	case rel.LastRefresh > 0 && rel.LastError == "":
		due = time.Unix(rel.LastRefresh, 0).Add(w.interval(cfg.State.View().Bundle(w.td.Name()).GetRefreshHintSeconds()))
	}
	failures := 0
	timer := time.NewTimer(max(due.Sub(cfg.Now()), 0))
	defer timer.Stop()
	for {
		var reply chan error
		select {
		case <-w.ctx.Done():
			return
		case <-timer.C:
		case <-w.kick:
		case reply = <-w.requests:
		}
		out := w.refresh()
		wait := out.interval
		if out.err != nil {
			wait = min(cfg.RetryBackoff<<min(failures, 16), out.interval)
			failures++
		} else {
			failures = 0
		}
		err := out.err
		if !errors.Is(err, errLostLeadership) && !errors.Is(err, ErrNoRelationship) {
			if serr := w.recordStatus(out, cfg.Now().Add(wait)); serr != nil {
				if errors.Is(serr, errLostLeadership) {
					err = serr
				} else {
					w.r.log.Warn("federation: recording refresh status", "trust_domain", w.td.Name(), "error", serr)
				}
			}
		}
		if errors.Is(err, errLostLeadership) {
			if reply != nil {
				reply <- ErrNotLeader
			}
			return
		}
		if reply != nil {
			reply <- err
		}
		if !timer.Stop() {
			select {
			case <-timer.C:
			default:
			}
		}
		timer.Reset(wait)
	}
}

// interval is the refresh interval for a refresh hint in seconds (0: none
// served): the hint within the configured bounds.
func (w *worker) interval(hintSeconds int64) time.Duration {
	cfg := w.r.cfg
	hint := cfg.DefaultRefresh
	if hintSeconds > 0 {
		hint = time.Duration(hintSeconds) * time.Second
	}
	return min(max(hint, cfg.MinRefresh), cfg.MaxRefresh)
}

var errLostLeadership = errors.New("federation: leadership lost")

// refreshOutcome is what one refresh found.
type refreshOutcome struct {
	at time.Time
	// interval is the wait until the next refresh after a success: the
	// hint the endpoint served with this very fetch (changed bundle or
	// not), within bounds; after a failure, the held bundle's.
	interval time.Duration
	hint     int64 // seconds, as last served; 0: none
	err      error
}

// refresh fetches, checks and commits the bundle and says when to refresh
// next; the caller records the outcome on the relationship.
func (w *worker) refresh() refreshOutcome {
	v := w.r.cfg.State.View()
	rel := v.FederationRelationship(w.td.Name())
	held := v.Bundle(w.td.Name())
	start := w.r.cfg.Now()
	if rel == nil {
		return refreshOutcome{at: start, interval: w.interval(held.GetRefreshHintSeconds()), err: fmt.Errorf("%w: %s", ErrNoRelationship, w.td)}
	}
	next, hint, committed, err := w.fetchAndCommit(rel, held)
	if errors.Is(err, errLostLeadership) {
		return refreshOutcome{at: start, err: err}
	}
	if err != nil {
		w.r.met.failure(w.td.Name())
		args := []any{"trust_domain", w.td.Name(), "url", rel.BundleEndpointUrl, "error", err}
		if held != nil {
			args = append(args, "kept_sequence", held.SequenceNumber)
		}
		w.r.log.Warn("federated bundle refresh failed; keeping the last good bundle", args...)
	} else {
		w.r.met.success(w.td.Name(), next.GetSequenceNumber(), start)
		if committed {
			w.r.log.Info("federated bundle updated", "trust_domain", w.td.Name(), "sequence", next.SequenceNumber,
				"x509_authorities", len(next.X509Authorities), "jwt_authorities", len(next.JwtAuthorities))
		} else {
			w.r.log.Debug("federated bundle unchanged", "trust_domain", w.td.Name(), "sequence", next.GetSequenceNumber(), "refresh_hint", hint)
		}
	}
	if err != nil {
		// The last hint served still tells how often to try.
		last := rel.RefreshHintSeconds
		if last == 0 {
			last = held.GetRefreshHintSeconds()
		}
		return refreshOutcome{at: start, interval: w.interval(last), hint: rel.RefreshHintSeconds, err: err}
	}
	return refreshOutcome{at: start, interval: w.interval(hint), hint: hint}
}

// fetchAndCommit returns the bundle now held (the fetched one, or the held one
// when the fetch changed nothing), the refresh hint the endpoint served with
// it (seconds; 0 for none), and whether a new bundle was committed.
func (w *worker) fetchAndCommit(rel *ferrypb.FederationRelationship, held *ferrypb.Bundle) (*ferrypb.Bundle, int64, bool, error) {
	sb, err := w.fetch(rel)
	if err != nil {
		return nil, 0, false, err
	}
	if err := CheckBundle(w.td, sb); err != nil {
		return nil, 0, false, err
	}
	fetched, err := ca.FromSPIFFEBundle(sb)
	if err != nil {
		return nil, 0, false, fmt.Errorf("federation: %w", err)
	}
	hint := fetched.RefreshHintSeconds
	_, hasSeq := sb.SequenceNumber()
	if held != nil {
		same := sameAuthorities(fetched, held)
		switch {
		case hasSeq && fetched.SequenceNumber < held.SequenceNumber:
			return nil, 0, false, fmt.Errorf("federation: refused bundle with sequence number %d: older than the held %d", fetched.SequenceNumber, held.SequenceNumber)
		case same && (!hasSeq || fetched.SequenceNumber == held.SequenceNumber):
			// Nothing to commit, but the hint served now is the one to
			// follow (the held copy may be the operator's, without one).
			return held, hint, false, nil
		case hasSeq && fetched.SequenceNumber == held.SequenceNumber:
			return nil, 0, false, fmt.Errorf("federation: refused bundle with sequence number %d: same as the held one but with different authorities", fetched.SequenceNumber)
		}
	}
	if !w.r.cfg.Cluster.LeadershipCurrent(w.tok) {
		return nil, 0, false, errLostLeadership
	}
	// Without a sequence number (a peer that serves none) the content decides,
	// and the bundle replaces the held one as it is.
	res, err := w.r.cfg.Cluster.Apply(w.ctx, &ferrypb.Command{Op: &ferrypb.Command_BundleSet{BundleSet: &ferrypb.BundleSet{Bundle: fetched, RequireNewer: hasSeq}}})
	if err != nil {
		return nil, 0, false, fmt.Errorf("federation: committing bundle: %w", err)
	}
	if st := res.GetStatus(); codes.Code(st.GetCode()) != codes.OK {
		return nil, 0, false, fmt.Errorf("federation: bundle refused: %s", st.GetMessage())
	}
	return res.Bundle, hint, true, nil
}

// maxBundleSize bounds a bundle endpoint's answer: a bundle is committed in
// one Raft command, which cannot be larger.
const maxBundleSize = state.MaxCommandSize

// fetch GETs rel's bundle, as go-spiffe's federation.FetchBundle does (same
// TLS for each profile), and also refuses an answer that is not 200 OK or is
// larger than maxBundleSize, before parsing it: a peer cannot make the leader
// hold more than that.
func (w *worker) fetch(rel *ferrypb.FederationRelationship) (*spiffebundle.Bundle, error) {
	transport := http.DefaultTransport.(*http.Transport).Clone()
	switch rel.Profile {
	case ProfileHTTPSWeb:
		if w.r.cfg.WebPKIRoots != nil {
			transport.TLSClientConfig = &tls.Config{RootCAs: w.r.cfg.WebPKIRoots, MinVersion: tls.VersionTLS12}
		}
	case ProfileHTTPSSPIFFE:
		id, err := spiffeid.FromString(rel.EndpointSpiffeId)
		if err != nil {
			return nil, fmt.Errorf("federation: endpoint SPIFFE ID: %w", err)
		}
		transport.TLSClientConfig = tlsconfig.TLSClientConfig(heldX509{w.r.cfg.State}, tlsconfig.AuthorizeID(id))
	default:
		return nil, fmt.Errorf("federation: unknown bundle endpoint profile %q", rel.Profile)
	}
	defer transport.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(w.ctx, w.r.cfg.FetchTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, rel.BundleEndpointUrl, http.NoBody)
	if err != nil {
		return nil, fmt.Errorf("federation: could not create request: %w", err)
	}
	resp, err := (&http.Client{Transport: transport}).Do(req)
	if err != nil {
		return nil, fmt.Errorf("federation: could not GET bundle: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("federation: bundle endpoint answered HTTP status %d", resp.StatusCode)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxBundleSize+1))
	if err != nil {
		return nil, fmt.Errorf("federation: could not read bundle: %w", err)
	}
	if len(body) > maxBundleSize {
		return nil, fmt.Errorf("federation: bundle endpoint answered more than a bundle may be (larger than %d bytes)", maxBundleSize)
	}
	sb, err := spiffebundle.Parse(w.td, body)
	if err != nil {
		// go-spiffe's errors start with "spiffebundle: ".
		return nil, fmt.Errorf("federation: %w", err)
	}
	return sb, nil
}

const maxLastError = 512

// recordStatus commits a refresh's outcome and the time of the next one on
// the relationship: what `ferry federation show` prints, and where a new
// leader resumes the schedule.
func (w *worker) recordStatus(out refreshOutcome, next time.Time) error {
	if !w.r.cfg.Cluster.LeadershipCurrent(w.tok) {
		return errLostLeadership
	}
	msg := ""
	if out.err != nil {
		msg = out.err.Error()
		if len(msg) > maxLastError {
			msg = msg[:maxLastError]
		}
	}
	res, err := w.r.cfg.Cluster.Apply(w.ctx, &ferrypb.Command{Op: &ferrypb.Command_FederationStatusSet{
		FederationStatusSet: &ferrypb.FederationStatusSet{TrustDomain: w.td.Name(), LastRefresh: out.at.Unix(), LastError: msg,
			NextRefresh: next.Unix(), RefreshHintSeconds: out.hint}}})
	if err != nil {
		return err
	}
	if st := res.GetStatus(); codes.Code(st.GetCode()) != codes.OK {
		return errors.New(st.GetMessage())
	}
	return nil
}

// CheckBundle refuses a fetched bundle that cannot be td's: one without any
// authority, or with an X.509 authority that is not a CA or names another
// trust domain in its SPIFFE ID (a CA certificate of a SPIFFE trust domain
// carries the trust domain's ID; authorities without one, such as upstream
// roots, are accepted).
func CheckBundle(td spiffeid.TrustDomain, sb *spiffebundle.Bundle) error {
	if len(sb.X509Authorities()) == 0 && len(sb.JWTAuthorities()) == 0 {
		return fmt.Errorf("federation: bundle for %s has no authorities", td)
	}
	for _, c := range sb.X509Authorities() {
		if c.BasicConstraintsValid && !c.IsCA {
			return fmt.Errorf("federation: bundle for %s has an X.509 authority that is not a CA (serial %s)", td, c.SerialNumber)
		}
		for _, u := range c.URIs {
			id, err := spiffeid.FromURI(u)
			if err != nil {
				continue
			}
			if id.TrustDomain() != td {
				return fmt.Errorf("federation: refused bundle: the endpoint serves authorities of trust domain %s, not %s", id.TrustDomain(), td)
			}
		}
	}
	return nil
}

func sameAuthorities(a, b *ferrypb.Bundle) bool {
	x := func(bu *ferrypb.Bundle) [][]byte {
		var out [][]byte
		for _, au := range bu.X509Authorities {
			out = append(out, au.Certificate)
		}
		slices.SortFunc(out, bytes.Compare)
		return out
	}
	j := func(bu *ferrypb.Bundle) map[string][]byte {
		out := map[string][]byte{}
		for _, k := range bu.JwtAuthorities {
			out[k.KeyId] = k.PublicKey
		}
		return out
	}
	xa, xb := x(a), x(b)
	ja, jb := j(a), j(b)
	if len(xa) != len(xb) || len(ja) != len(jb) {
		return false
	}
	for i := range xa {
		if !bytes.Equal(xa[i], xb[i]) {
			return false
		}
	}
	for k, v := range ja {
		if w, ok := jb[k]; !ok || !bytes.Equal(v, w) {
			return false
		}
	}
	return true
}

// heldX509 authenticates https_spiffe endpoints with the bundles held in the
// replicated state: the relationship's initial bundle, then the last fetched.
type heldX509 struct{ s State }

func (h heldX509) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	b := h.s.View().Bundle(td.Name())
	if b == nil {
		return nil, fmt.Errorf("federation: no bundle held for %s to authenticate its endpoint", td)
	}
	return ca.ToX509Bundle(b)
}
