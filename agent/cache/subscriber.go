package cache

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ferry-id/ferry/internal/selector"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

// subscriber follows one selector set. Its fields other than mu, ch, closed
// and stop are guarded by Cache.mu.
type subscriber struct {
	c    *Cache
	sels selector.Set

	matched []*entryState // in identity order
	sent    bool
	last    fingerprint

	mu     sync.Mutex // guards ch against send after close, and stop
	ch     chan *WorkloadUpdate
	closed bool
	stop   func() bool // unregisters the context.AfterFunc
	once   sync.Once
}

// fingerprint is what a subscriber was last sent, by identity: an update is
// only pushed when it differs.
type fingerprint struct {
	ids       []idPrint
	own       *spiffebundle.Bundle
	federated map[spiffeid.TrustDomain]*spiffebundle.Bundle
}

type idPrint struct {
	entry *ferrypb.Entry
	svid  *svidState
}

func (s *subscriber) Updates() <-chan *WorkloadUpdate { return s.ch }

// Finish ends the subscription and closes Updates. It may be called more
// than once.
func (s *subscriber) Finish() {
	s.once.Do(func() {
		s.mu.Lock()
		stop := s.stop
		s.mu.Unlock()
		if stop != nil {
			stop()
		}
		c := s.c
		c.mu.Lock()
		delete(c.subs, s)
		now := c.clock.Now()
		idle := false
		for _, es := range s.matched {
			idle = c.releaseLocked(es, now) || idle
		}
		s.matched = nil
		if idle {
			c.planLocked(now.Add(c.idle)) // the idle eviction
		}
		c.mu.Unlock()

		s.mu.Lock()
		s.closed = true
		close(s.ch)
		s.mu.Unlock()
	})
}

// push replaces any update the subscriber has not read yet with u, so a slow
// reader never blocks the cache and always gets the latest state.
func (s *subscriber) push(u *WorkloadUpdate) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	select {
	case <-s.ch:
	default:
	}
	s.ch <- u // cannot block: only this holder of s.mu sends, and the buffer is empty
}

// SubscribeToCacheChanges follows the identities of a workload with
// selectors. The first update is sent as soon as the own bundle is known and
// every matching entry has an SVID or has had a signing attempt fail; later
// ones on every change that alters what the subscriber receives. The
// subscription ends with Finish or when ctx ends. Identities and bundles in
// updates are shared and must not be modified.
func (c *Cache) SubscribeToCacheChanges(ctx context.Context, selectors []*ferrypb.Selector) (Subscriber, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("cache: subscribe: %w", err)
	}
	s := &subscriber{c: c, sels: selector.NewSet(selectors...), ch: make(chan *WorkloadUpdate, 1)}
	c.mu.Lock()
	c.subs[s] = struct{}{}
	now := c.clock.Now()
	c.rematchLocked(s, now)
	c.notifyLocked(s, now)
	c.mu.Unlock()
	stop := context.AfterFunc(ctx, s.Finish)
	s.mu.Lock()
	s.stop = stop
	s.mu.Unlock()
	return s, nil
}

// FetchWorkloadUpdate is a one-shot SubscribeToCacheChanges: it returns the
// update a new subscriber would get first. When that update is ready (every
// matching entry has an SVID, or has had a signing attempt fail) it is read
// directly, without registering a subscriber; otherwise this waits for it as
// a subscriber (or for ctx). Either way the matching entries count as used
// now, so their SVIDs are kept (and rotated) for the idle timeout.
func (c *Cache) FetchWorkloadUpdate(ctx context.Context, selectors []*ferrypb.Selector) (*WorkloadUpdate, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("cache: fetch workload update: %w", err)
	}
	w := selector.NewSet(selectors...)
	c.mu.Lock()
	now := c.clock.Now()
	matched := c.matchLocked(w)
	if c.readyLocked(matched, now) {
		u, _ := c.updateLocked(matched, now)
		idle := false
		for _, es := range matched {
			if es.subs == 0 {
				// As a subscriber letting go would (releaseLocked).
				es.lastUsed = now
				c.activateLocked(es)
				idle = true
			}
		}
		if idle {
			c.planLocked(now.Add(c.idle)) // the idle eviction
		}
		c.mu.Unlock()
		return u, nil
	}
	c.mu.Unlock()

	sub, err := c.SubscribeToCacheChanges(ctx, selectors)
	if err != nil {
		return nil, err
	}
	defer sub.Finish()
	select {
	case u, ok := <-sub.Updates():
		if !ok {
			return nil, fmt.Errorf("cache: fetch workload update: %w", context.Cause(ctx))
		}
		return u, nil
	case <-ctx.Done():
		return nil, fmt.Errorf("cache: fetch workload update: %w", context.Cause(ctx))
	}
}

// releaseLocked drops one subscriber's claim on es and reports whether it
// was the last.
func (c *Cache) releaseLocked(es *entryState, now time.Time) bool {
	if es.subs--; es.subs == 0 {
		es.lastUsed = now
		return true
	}
	return false
}

// identityCmp is the identity order: creation index, then ID. The first
// identity (the default) therefore stays the same as entries come and go,
// unless the oldest matching entry itself goes.
func identityCmp(a, b *entryState) int {
	if c := cmp.Compare(a.entry.GetCreatedIndex(), b.entry.GetCreatedIndex()); c != 0 {
		return c
	}
	return cmp.Compare(a.entry.GetId(), b.entry.GetId())
}

// rematchLocked recomputes the entries s matches, keeps the entries' claim
// counts right, and asks for SVIDs the new matches lack.
func (c *Cache) rematchLocked(s *subscriber, now time.Time) {
	matched := c.matchLocked(s.sels)
	for _, es := range matched {
		es.subs++
		c.activateLocked(es)
	}
	for _, es := range s.matched {
		c.releaseLocked(es, now)
	}
	s.matched = matched
	for _, es := range matched {
		c.demandLocked(es, now)
	}
}

// matchLocked returns the entries a workload with selectors w gets, in
// identity order.
func (c *Cache) matchLocked(w selector.Set) []*entryState {
	var matched []*entryState
	for _, sel := range w.Selectors() {
		for _, es := range c.index[selKey{sel.GetType(), sel.GetValue()}] {
			if matches(es.sels, w) {
				matched = append(matched, es)
			}
		}
	}
	slices.SortFunc(matched, identityCmp)
	return matched
}

// demandLocked queues es for signing when a subscriber needs an SVID it has
// never had a chance to get. Entries backing off after failures wait for the
// schedule.
func (c *Cache) demandLocked(es *entryState, now time.Time) {
	if es.svid != nil || es.lastErr != nil || es.queued || es.inflight || es.deleted {
		return
	}
	c.enqueueLocked(es)
}

func (c *Cache) enqueueLocked(es *entryState) {
	c.activateLocked(es)
	es.queued = true
	c.queue = append(c.queue, es)
	kick(c.signKick)
}

// entriesChangedLocked rematches and notifies the subscribers a set of
// changed (added, updated or removed) entries concerns.
func (c *Cache) entriesChangedLocked(changed []*entryState, now time.Time) {
	if len(changed) > 0 {
		kick(c.heldKick) // a removed or changed entry may have dropped its SVID
	}
	if len(c.subs) == 0 {
		return
	}
	for _, es := range changed {
		es.touched = true
	}
	var dirty []*subscriber
	for s := range c.subs {
		if c.concernsLocked(s, changed) {
			dirty = append(dirty, s)
		}
	}
	for _, es := range changed {
		es.touched = false
	}
	for _, s := range dirty {
		c.rematchLocked(s, now)
		c.notifyLocked(s, now)
	}
}

// concernsLocked reports whether s matched, or now matches, one of the
// touched entries.
func (c *Cache) concernsLocked(s *subscriber, changed []*entryState) bool {
	for _, es := range s.matched {
		if es.touched {
			return true
		}
	}
	for _, es := range changed {
		if !es.deleted && matches(es.sels, s.sels) {
			return true
		}
	}
	return false
}

// svidsChangedLocked notifies the subscribers that hold one of the entries
// whose SVID (or signing state) changed.
func (c *Cache) svidsChangedLocked(changed []*entryState, now time.Time) {
	if len(changed) == 0 {
		return
	}
	kick(c.heldKick)
	for _, es := range changed {
		es.touched = true
	}
	for s := range c.subs {
		for _, es := range s.matched {
			if es.touched {
				c.notifyLocked(s, now)
				break
			}
		}
	}
	for _, es := range changed {
		es.touched = false
	}
}

// servable reports whether es may be handed out at now.
func (es *entryState) servable(now time.Time) bool {
	exp := es.entry.GetExpiresAt()
	return !es.deleted && (exp == 0 || now.Before(time.Unix(exp, 0)))
}

// notifyLocked sends s its current update if it is ready and differs from
// the last one sent.
func (c *Cache) notifyLocked(s *subscriber, now time.Time) {
	if !c.readyLocked(s.matched, now) {
		return
	}
	u, fp := c.updateLocked(s.matched, now)
	if s.sent && fp.equal(s.last) {
		return
	}
	s.sent = true
	s.last = fp
	s.push(u)
}

// readyLocked reports whether a workload matching the entries matched can be
// sent its update: the own bundle is known and every servable entry has an
// SVID or has had its first signing attempt fail.
func (c *Cache) readyLocked(matched []*entryState, now time.Time) bool {
	if c.own == nil {
		return false
	}
	for _, es := range matched {
		if es.servable(now) && es.svid == nil && es.lastErr == nil {
			return false // first signing attempt still to come
		}
	}
	return true
}

// updateLocked builds the update of a workload matching the entries matched,
// and its fingerprint.
func (c *Cache) updateLocked(matched []*entryState, now time.Time) (*WorkloadUpdate, fingerprint) {
	fp := fingerprint{own: c.own}
	u := &WorkloadUpdate{Bundle: c.own}
	for _, es := range matched {
		if !es.servable(now) || es.svid == nil || !now.Before(es.svid.notAfter) {
			continue
		}
		fp.ids = append(fp.ids, idPrint{es.entry, es.svid})
		u.Identities = append(u.Identities, Identity{
			Entry: es.entry, SVID: es.svid.chain, PrivateKey: es.svid.key,
			SVIDDER: es.svid.chainDER, PrivateKeyDER: es.svid.keyDER,
		})
		for _, name := range es.entry.GetFederatesWith() {
			td, err := spiffeid.TrustDomainFromString(name)
			if err != nil {
				continue
			}
			if b := c.federated[td]; b != nil {
				if fp.federated == nil {
					fp.federated = make(map[spiffeid.TrustDomain]*spiffebundle.Bundle)
				}
				fp.federated[td] = b
			}
		}
	}
	u.FederatedBundles = fp.federated
	return u, fp
}

func (f fingerprint) equal(o fingerprint) bool {
	if f.own != o.own || len(f.federated) != len(o.federated) || !slices.Equal(f.ids, o.ids) {
		return false
	}
	for td, b := range f.federated {
		if o.federated[td] != b {
			return false
		}
	}
	return true
}
