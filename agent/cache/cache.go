package cache

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/proto"

	"github.com/ferry-id/ferry/internal/selector"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

// Defaults for the zero values of Config.
const (
	DefaultIdleTimeout = 10 * time.Minute
	DefaultMaxBatch    = 500
	DefaultSignTimeout = 30 * time.Second
	DefaultRetryMin    = 2 * time.Second
	DefaultRetryMax    = 5 * time.Minute
	DefaultMaxTokens   = 1000
)

// Errors returned by the cache. They are wrapped; test with errors.Is.
var (
	// ErrUnknownEntry means the entry asked for is not (or no longer) one this
	// agent serves, or it has expired.
	ErrUnknownEntry = errors.New("cache: unknown entry")
	// ErrNoAudience means a JWT-SVID was asked for without an audience.
	ErrNoAudience = errors.New("cache: audience is required")
)

// SignRequest asks the server to sign one workload CSR. The server takes the
// SPIFFE ID, DNS names and TTL from the entry, never from the CSR.
type SignRequest struct {
	EntryID string
	CSR     []byte // DER
}

// SignResult is the outcome of one SignRequest: the leaf followed by its
// intermediates, or the reason this one request failed.
type SignResult struct {
	Chain []*x509.Certificate
	Err   error
}

// Signer is what the cache needs from the server. It is implemented over the
// agent's mTLS connection to the server. Implementations must be safe for
// concurrent use; the cache calls SignX509SVIDs from one goroutine at a time
// but the token methods from any number.
type Signer interface {
	// SignX509SVIDs signs a batch of CSRs and returns one result per request,
	// in order. An error means the whole call failed.
	SignX509SVIDs(ctx context.Context, reqs []SignRequest) ([]SignResult, error)
	// MintJWTSVID returns a JWT-SVID for the entry's SPIFFE ID and audience.
	MintJWTSVID(ctx context.Context, entryID string, audience []string) (string, error)
	// MintWITSVID returns a WIT-SVID for the entry's SPIFFE ID, bound to
	// publicKey.
	MintWITSVID(ctx context.Context, entryID string, publicKey crypto.PublicKey) (string, error)
}

// Clock is the cache's time source. Tests inject a fake one to drive
// rotation.
type Clock interface {
	Now() time.Time
	// Until delivers the time on the returned channel once the clock reads
	// t or later.
	Until(t time.Time) <-chan time.Time
}

type realClock struct{}

func (realClock) Now() time.Time                     { return time.Now() }
func (realClock) Until(t time.Time) <-chan time.Time { return time.After(time.Until(t)) }

// Config configures a Cache.
type Config struct {
	// Signer signs SVIDs; required.
	Signer Signer
	// Logger; default slog.Default().
	Logger *slog.Logger
	// Clock; default the system clock.
	Clock Clock
	// IdleTimeout is how long the X509-SVID of an entry is kept (and
	// rotated) after the last subscriber or one-shot fetch that needed it
	// has gone. Default DefaultIdleTimeout.
	IdleTimeout time.Duration
	// MaxBatch caps the CSRs sent in one SignX509SVIDs call. Default
	// DefaultMaxBatch. After a failed call the next batch is half as large
	// (down to 1), doubling back on success.
	MaxBatch int
	// SignTimeout bounds one Signer call. Default DefaultSignTimeout.
	SignTimeout time.Duration
	// RetryMin and RetryMax bound the exponential backoff after failed
	// signing of an entry. Defaults DefaultRetryMin, DefaultRetryMax.
	RetryMin, RetryMax time.Duration
	// MaxTokens caps the cached JWT-SVIDs, and separately the cached
	// WIT-SVIDs. Default DefaultMaxTokens.
	MaxTokens int
	// TaintJitter is the window over which X509-SVIDs chained to a newly
	// tainted authority are signed again (see TaintAuthorities). Default
	// DefaultTaintJitter.
	TaintJitter time.Duration
}

// Cache is the agent's SVID cache. It implements Manager and WITSource.
//
// Entries (small) are all kept; X509-SVIDs are minted lazily, only for
// entries a subscriber or a one-shot fetch matches, and forgotten once no one
// has needed them for IdleTimeout. Keys are P-256 and generated here; CSRs go
// to the Signer in batches. Each SVID is rotated at half its lifetime, ±10%
// of that half; failures are retried with exponential backoff while the
// cached SVID is served until it expires.
//
// Run must be running for SVIDs to be minted and rotated. A Cache is safe
// for concurrent use.
type Cache struct {
	signer      Signer
	log         *slog.Logger
	clock       Clock
	idle        time.Duration
	maxBatch    int
	signTimeout time.Duration
	retryMin    time.Duration
	retryMax    time.Duration
	taintJitter time.Duration

	running   atomic.Bool
	signKick  chan struct{} // the signing loop has work
	schedKick chan struct{} // the schedule changed; recompute the next wake-up
	heldKick  chan struct{} // SVIDs were minted or dropped (HeldChanged)

	mu       sync.Mutex
	revision uint64
	haveSet  bool // SetEntries was called: the entries are known
	entries  map[string]*entryState
	index    map[selKey][]*entryState // see indexLocked
	// active holds the entries a pass of the schedule must look at: those
	// demanded since they were last idle (see activateLocked). Entries no
	// workload asks for stay out of it, so they cost a pass nothing.
	active map[*entryState]struct{}
	// expiry orders the entries that have an expiry time, soonest first.
	expiry expiryHeap
	// wakeAt is when the schedule loop runs its next pass (zero: only when
	// kicked); see planLocked.
	wakeAt    time.Time
	kinds     map[string]int
	subs      map[*subscriber]struct{}
	queue     []*entryState // waiting for the signing loop, FIFO
	batchSize int
	own       *spiffebundle.Bundle
	federated map[spiffeid.TrustDomain]*spiffebundle.Bundle
	// taintedX509 are the own trust domain's tainted X.509 authorities,
	// by hex subject key ID.
	taintedX509 map[string]*x509.Certificate

	jwts *tokenCache
	wits *tokenCache
}

var (
	_ Manager   = (*Cache)(nil)
	_ WITSource = (*Cache)(nil)
)

// selKey is a selector as a comparable map key.
type selKey struct{ typ, value string }

// entryState is one entry and the X509-SVID minted for it, if any. All fields
// are guarded by Cache.mu.
type entryState struct {
	entry *ferrypb.Entry
	// sels are the entry's own selectors in canonical order, deduplicated:
	// pointers into entry, not copies, as entries are what the cache holds
	// most of.
	sels []*ferrypb.Selector
	slot int // position in its index bucket
	// expSlot is the position in Cache.expiry, -1 when not in it.
	expSlot int
	active  bool // in Cache.active

	svid *svidState

	subs     int       // subscribers that currently match this entry
	lastUsed time.Time // when the last subscriber let go

	queued, inflight bool
	gen              uint64 // bumped whenever the SVID must be re-minted
	failures         int
	lastErr          error // last signing error since the SVID (or its absence) was last settled
	nextAttempt      time.Time
	deleted          bool
	touched          bool // scratch mark while finding the subscribers a change concerns
}

type svidState struct {
	chain    []*x509.Certificate
	key      *ecdsa.PrivateKey
	chainDER []byte // chain concatenated in DER
	keyDER   []byte // key in PKCS #8; nil if it did not encode
	notAfter time.Time
	rotateAt time.Time
}

// New returns an empty Cache.
func New(c Config) (*Cache, error) {
	if c.Signer == nil {
		return nil, errors.New("cache: Config.Signer is required")
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.Clock == nil {
		c.Clock = realClock{}
	}
	if c.IdleTimeout <= 0 {
		c.IdleTimeout = DefaultIdleTimeout
	}
	if c.MaxBatch <= 0 {
		c.MaxBatch = DefaultMaxBatch
	}
	if c.SignTimeout <= 0 {
		c.SignTimeout = DefaultSignTimeout
	}
	if c.RetryMin <= 0 {
		c.RetryMin = DefaultRetryMin
	}
	if c.RetryMax <= 0 {
		c.RetryMax = DefaultRetryMax
	}
	if c.RetryMax < c.RetryMin {
		return nil, fmt.Errorf("cache: RetryMax %s is below RetryMin %s", c.RetryMax, c.RetryMin)
	}
	if c.MaxTokens <= 0 {
		c.MaxTokens = DefaultMaxTokens
	}
	if c.TaintJitter <= 0 {
		c.TaintJitter = DefaultTaintJitter
	}
	heldKick := make(chan struct{}, 1)
	return &Cache{
		signer: c.Signer, log: c.Logger, clock: c.Clock, idle: c.IdleTimeout,
		maxBatch: c.MaxBatch, batchSize: c.MaxBatch, signTimeout: c.SignTimeout,
		retryMin: c.RetryMin, retryMax: c.RetryMax, taintJitter: c.TaintJitter,
		signKick:  make(chan struct{}, 1),
		schedKick: make(chan struct{}, 1),
		heldKick:  heldKick,
		entries:   make(map[string]*entryState),
		index:     make(map[selKey][]*entryState),
		active:    make(map[*entryState]struct{}),
		kinds:     make(map[string]int),
		subs:      make(map[*subscriber]struct{}),
		federated: make(map[spiffeid.TrustDomain]*spiffebundle.Bundle),
		jwts:      newTokenCache(c.MaxTokens, c.Clock, c.SignTimeout, func() { kick(heldKick) }),
		wits:      newTokenCache(c.MaxTokens, c.Clock, c.SignTimeout, func() { kick(heldKick) }),
	}, nil
}

// Run mints and rotates X509-SVIDs until ctx ends. It returns nil once every
// goroutine it started has stopped. Run may be called again after it
// returned, but not while it runs.
func (c *Cache) Run(ctx context.Context) error {
	if !c.running.CompareAndSwap(false, true) {
		return errors.New("cache: Run called while running")
	}
	defer c.running.Store(false)
	var wg sync.WaitGroup
	wg.Go(func() { c.signLoop(ctx) })
	wg.Go(func() { c.scheduleLoop(ctx) })
	wg.Wait()
	return nil
}

// Stats counts what the cache holds.
type Stats struct {
	Entries     int // entries served
	X509SVIDs   int // entries with a minted X509-SVID
	Subscribers int
	JWTSVIDs    int
	WITSVIDs    int
}

// Stats returns current counts. It walks every entry; call it for metrics,
// not per request.
func (c *Cache) Stats() Stats {
	c.mu.Lock()
	st := Stats{Entries: len(c.entries), Subscribers: len(c.subs)}
	for _, es := range c.entries {
		if es.svid != nil {
			st.X509SVIDs++
		}
	}
	c.mu.Unlock()
	st.JWTSVIDs = c.jwts.len()
	st.WITSVIDs = c.wits.len()
	return st
}

// Revision returns the revision of the last entry set or change applied, so
// the caller can resume the server's change stream from it.
func (c *Cache) Revision() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.revision
}

// SetEntries replaces the entries with all (initial sync or resync at
// revision). Entries whose revision did not change keep their SVIDs. The
// cache keeps the entries it is given (here and in ApplyEntryChanges); the
// caller must not modify them afterwards.
func (c *Cache) SetEntries(all []*ferrypb.Entry, revision uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.haveSet = true
	keep := make(map[string]bool, len(all))
	for _, e := range all {
		if e != nil {
			keep[e.GetId()] = true
		}
	}
	var deletes []string
	for id := range c.entries {
		if !keep[id] {
			deletes = append(deletes, id)
		}
	}
	c.applyLocked(all, deletes, revision, true)
}

// ApplyEntryChanges applies one change from the server's entry stream. A
// change older than the cache's revision is ignored (a revision of 0 is
// always applied).
func (c *Cache) ApplyEntryChanges(upserts []*ferrypb.Entry, deletes []string, revision uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if revision != 0 && revision < c.revision {
		c.log.Debug("stale entry change ignored", "revision", revision, "have", c.revision)
		return
	}
	c.applyLocked(upserts, deletes, revision, false)
}

func (c *Cache) applyLocked(upserts []*ferrypb.Entry, deletes []string, revision uint64, full bool) {
	now := c.clock.Now()
	if revision > c.revision || full {
		c.revision = revision
	}
	var changed []*entryState
	for _, id := range deletes {
		if es := c.entries[id]; es != nil {
			c.removeLocked(es)
			changed = append(changed, es)
		}
	}
	for _, e := range upserts {
		if e == nil || e.GetId() == "" {
			continue
		}
		es := c.entries[e.GetId()]
		if es != nil && (e == es.entry || !full && e.GetRevision() < es.entry.GetRevision() ||
			(full || e.GetRevision() == es.entry.GetRevision()) && proto.Equal(e, es.entry)) {
			// Unchanged, or (in a change, not a full set, which is
			// authoritative) older than what we hold.
			continue
		}
		if exp := e.GetExpiresAt(); exp != 0 && !now.Before(time.Unix(exp, 0)) {
			if es != nil {
				c.removeLocked(es)
				changed = append(changed, es)
			}
			continue
		}
		if es == nil {
			es = &entryState{expSlot: -1}
			c.entries[e.GetId()] = es
		} else {
			c.unindexLocked(es)
			if needsRemint(es.entry, e) {
				c.resetSVIDLocked(es)
			}
		}
		es.entry = e
		es.sels = canonical(e.GetSelectors())
		c.indexLocked(es)
		c.expiry.file(es)
		changed = append(changed, es)
	}
	if len(changed) == 0 {
		return
	}
	c.entriesChangedLocked(changed, now)
	kick(c.schedKick)
}

// canonical returns sels sorted and deduplicated (selector.Compare), without
// copying the selectors.
func canonical(sels []*ferrypb.Selector) []*ferrypb.Selector {
	out := make([]*ferrypb.Selector, 0, len(sels))
	for _, s := range sels {
		if s != nil {
			out = append(out, s)
		}
	}
	slices.SortFunc(out, selector.Compare)
	return slices.Clip(slices.CompactFunc(out, selector.Equal))
}

// matches reports whether an entry with the canonical selectors sels applies
// to a workload with selectors w: SPIRE's AND semantics, and an entry without
// selectors matches nothing (as selector.Set.Match).
func matches(sels []*ferrypb.Selector, w selector.Set) bool {
	if len(sels) == 0 || len(sels) > w.Len() {
		return false
	}
	for _, s := range sels {
		if !w.Contains(s) {
			return false
		}
	}
	return true
}

// expiresAt is when es stops being served; zero: never.
func (es *entryState) expiresAt() time.Time {
	if exp := es.entry.GetExpiresAt(); exp != 0 {
		return time.Unix(exp, 0)
	}
	return time.Time{}
}

// needsRemint reports whether an entry change invalidates SVIDs minted for
// the old version: anything the server copies into the certificate.
func needsRemint(old, cur *ferrypb.Entry) bool {
	return old.GetSpiffeId() != cur.GetSpiffeId() ||
		old.GetX509SvidTtl() != cur.GetX509SvidTtl() ||
		!slices.Equal(old.GetDnsNames(), cur.GetDnsNames())
}

// resetSVIDLocked forgets es's SVID and any signing state; an in-flight
// result for the old generation will be discarded.
func (c *Cache) resetSVIDLocked(es *entryState) {
	es.svid = nil
	es.gen++
	es.failures = 0
	es.lastErr = nil
	es.nextAttempt = time.Time{}
}

func (c *Cache) removeLocked(es *entryState) {
	c.unindexLocked(es)
	c.expiry.remove(es)
	c.deactivateLocked(es)
	delete(c.entries, es.entry.GetId())
	es.deleted = true
	es.svid = nil
}

// indexLocked files es under one of its selectors: a workload can only
// match es if it has all of them, so looking up the workload's selectors
// finds es exactly once. The selector chosen is the one with the fewest
// entries filed under it so far, so that a selector most entries share
// (unix:gid:100, k8s:ns:prod) does not make every lookup walk them all.
func (c *Cache) indexLocked(es *entryState) {
	for _, s := range es.sels {
		c.kinds[Kind(s)]++
	}
	if len(es.sels) == 0 {
		return // matches nothing
	}
	var best selKey
	n := -1
	for _, s := range es.sels {
		k := selKey{s.GetType(), s.GetValue()}
		if l := len(c.index[k]); n < 0 || l <= n {
			best, n = k, l
		}
	}
	es.slot = n
	c.index[best] = append(c.index[best], es)
}

func (c *Cache) unindexLocked(es *entryState) {
	for _, s := range es.sels {
		k := Kind(s)
		if c.kinds[k]--; c.kinds[k] <= 0 {
			delete(c.kinds, k)
		}
	}
	for _, s := range es.sels {
		k := selKey{s.GetType(), s.GetValue()}
		b := c.index[k]
		if es.slot >= len(b) || b[es.slot] != es {
			continue
		}
		last := b[len(b)-1]
		b[es.slot], last.slot = last, es.slot
		b[len(b)-1] = nil
		if b = b[:len(b)-1]; len(b) == 0 {
			delete(c.index, k)
		} else {
			c.index[k] = b
		}
		return
	}
}

// Kind is the selector kind SelectorKinds reports: the type, a ':', and the
// value up to its first ':' ("unix:uid" for unix:uid:1000, "systemd:id" for
// systemd:id:ferry.service). A value without ':' has the bare type as kind
// ("unix" for unix:root).
func Kind(s *ferrypb.Selector) string {
	prefix, _, ok := strings.Cut(s.GetValue(), ":")
	if !ok {
		return s.GetType()
	}
	return s.GetType() + ":" + prefix
}

// SelectorKinds returns the kinds (see Kind) of every selector of every entry
// held; nil until the first entry set (SetEntries) arrived, as until then any
// kind may be in use. The map is the caller's.
func (c *Cache) SelectorKinds() map[string]bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.haveSet {
		return nil
	}
	out := make(map[string]bool, len(c.kinds))
	for k := range c.kinds {
		out[k] = true
	}
	return out
}

// SetBundles replaces the own trust domain's bundle and the federated ones.
// Subscribers hear of it only when a bundle they receive really changed.
func (c *Cache) SetBundles(own *spiffebundle.Bundle, federated map[spiffeid.TrustDomain]*spiffebundle.Bundle) {
	c.mu.Lock()
	defer c.mu.Unlock()
	changed := false
	if !bundleEqual(c.own, own) {
		c.own = own
		changed = true
	}
	for td, b := range federated {
		if !bundleEqual(c.federated[td], b) {
			c.federated[td] = b
			changed = true
		}
	}
	for td := range c.federated {
		if _, ok := federated[td]; !ok {
			delete(c.federated, td)
			changed = true
		}
	}
	if !changed {
		return
	}
	now := c.clock.Now()
	for s := range c.subs {
		c.notifyLocked(s, now)
	}
}

func bundleEqual(a, b *spiffebundle.Bundle) bool {
	if a == nil || b == nil {
		return a == b
	}
	return a == b || a.Equal(b)
}

// kick wakes a loop without blocking; one pending wake-up is enough.
func kick(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}
