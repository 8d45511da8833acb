package cache

import (
	"container/heap"
	"context"
	"time"
)

// The schedule: expiring entries, idle SVIDs, rotations and retries. A pass
// looks only at the entries something can be due for: those with an expiry
// time (through a heap, soonest first) and the active ones (demanded by a
// workload since they were last idle). Entries no workload asks for cost a
// pass nothing, so a call does not get slower with the entries held for other
// workloads.

// activateLocked puts es in the set a pass looks at. Every path that makes es
// demanded (a subscriber matching it, a one-shot fetch, a signing request)
// calls it; a pass takes es out again once it is idle.
func (c *Cache) activateLocked(es *entryState) {
	if !es.active && !es.deleted {
		es.active = true
		c.active[es] = struct{}{}
	}
}

func (c *Cache) deactivateLocked(es *entryState) {
	if es.active {
		es.active = false
		delete(c.active, es)
	}
}

// planLocked makes sure a pass runs by t: it wakes the schedule loop unless
// a pass is already planned at or before t. Subscribers letting go and
// one-shot fetches call it with their idle deadline, which lies after the
// planned wake-up nearly always, so they seldom wake the loop.
func (c *Cache) planLocked(t time.Time) {
	if c.wakeAt.IsZero() || t.Before(c.wakeAt) {
		c.wakeAt = t // the kicked pass sets it right
		kick(c.schedKick)
	}
}

// scheduleLoop runs a pass whenever something is due or the schedule
// changed.
func (c *Cache) scheduleLoop(ctx context.Context) {
	for {
		next := c.pass()
		var wake <-chan time.Time
		if !next.IsZero() {
			wake = c.clock.Until(next)
		}
		select {
		case <-ctx.Done():
			return
		case <-c.schedKick:
		case <-wake:
		}
	}
}

// pass drops expired entries and SVIDs, evicts idle SVIDs, queues rotations
// and retries that are due, and returns when the next thing is due (zero:
// nothing is). Its cost is linear in the active entries, plus logarithmic in
// the entries with an expiry time for each that expired.
func (c *Cache) pass() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.clock.Now()
	var next time.Time
	consider := func(t time.Time) {
		if t.After(now) && (next.IsZero() || t.Before(next)) {
			next = t
		}
	}
	var expired, svidGone []*entryState
	for len(c.expiry) > 0 {
		es := c.expiry[0]
		if exp := es.expiresAt(); now.Before(exp) {
			consider(exp)
			break
		}
		heap.Pop(&c.expiry)
		expired = append(expired, es)
	}
	for es := range c.active {
		if !es.servable(now) {
			continue // expired: removed below
		}
		demanded := es.subs > 0 || c.recentlyUsed(es, now)
		if !demanded {
			if !es.queued && !es.inflight {
				// Idle: forget the SVID and key; they are minted again on
				// demand, which makes es active again.
				if es.svid != nil {
					kick(c.heldKick) // what the agent holds changed
				}
				if es.svid != nil || es.lastErr != nil {
					c.resetSVIDLocked(es)
				}
				es.lastUsed = time.Time{}
				c.deactivateLocked(es)
			}
			continue
		}
		if es.subs == 0 {
			consider(es.lastUsed.Add(c.idle))
		}
		if es.svid != nil && !now.Before(es.svid.notAfter) {
			es.svid = nil
			svidGone = append(svidGone, es)
		}
		if es.svid != nil {
			consider(es.svid.notAfter) // drop it from updates even while a rotation retries
		}
		if es.queued || es.inflight {
			continue
		}
		switch {
		case es.svid == nil && es.lastErr == nil:
			c.enqueueLocked(es)
		case es.svid == nil || !now.Add(rotationSlack).Before(es.svid.rotateAt):
			if now.Before(es.nextAttempt) {
				consider(es.nextAttempt)
			} else {
				c.enqueueLocked(es)
			}
		default:
			consider(es.svid.rotateAt)
		}
	}
	for _, es := range expired {
		c.removeLocked(es)
	}
	c.entriesChangedLocked(expired, now)
	c.svidsChangedLocked(svidGone, now)
	c.wakeAt = next
	return next
}

// expiryHeap holds the entries with an expiry time, soonest first. Each
// entry's expSlot is its position.
type expiryHeap []*entryState

func (h expiryHeap) Len() int { return len(h) }
func (h expiryHeap) Less(i, j int) bool {
	return h[i].entry.GetExpiresAt() < h[j].entry.GetExpiresAt()
}

func (h expiryHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].expSlot, h[j].expSlot = i, j
}

func (h *expiryHeap) Push(x any) {
	es := x.(*entryState)
	es.expSlot = len(*h)
	*h = append(*h, es)
}

func (h *expiryHeap) Pop() any {
	old := *h
	es := old[len(old)-1]
	old[len(old)-1] = nil
	*h = old[:len(old)-1]
	es.expSlot = -1
	return es
}

// file puts es in the heap, moves it, or takes it out, after its entry (and
// so its expiry time) changed.
func (h *expiryHeap) file(es *entryState) {
	switch exp := es.entry.GetExpiresAt(); {
	case exp == 0:
		h.remove(es)
	case es.expSlot < 0:
		heap.Push(h, es)
	default:
		heap.Fix(h, es.expSlot)
	}
}

func (h *expiryHeap) remove(es *entryState) {
	if es.expSlot >= 0 {
		heap.Remove(h, es.expSlot)
	}
}
