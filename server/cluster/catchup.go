package cluster

import (
	"time"
)

// CaughtUp is closed once this node's state machine reflects every write the
// cluster acknowledged before the node started: on a leader, after its
// post-election Barrier (which applies every entry of earlier terms, the log
// this node had on disk included); on a follower, once it has applied the
// leader's applied index (ReadIndex). Until then the local state is whatever
// the last snapshot held, which on a restarted node can be far behind: a
// "create if missing" that read it would create a second copy of something
// that exists. Startup work and readiness wait for this; it is never reopened.
func (n *Node) CaughtUp() <-chan struct{} { return n.caughtUp }

// catchUp closes caughtUp after the first successful VerifyRead.
func (n *Node) catchUp(lastAtStart uint64) {
	start := time.Now()
	for {
		err := n.VerifyRead(n.ctx)
		if err == nil {
			break
		}
		if n.ctx.Err() != nil {
			return
		}
		// VerifyRead retries while there is no leader; what ends it early (a
		// leader that refuses ReadIndex, say) is worth another try later.
		n.log.Debug("cluster: catching up", "err", err)
		if n.sleep(n.ctx, retryMax) != nil {
			return
		}
	}
	close(n.caughtUp)
	n.log.Info("cluster: caught up with the log", "applied_index", n.appliedIndex(), "last_index_at_start", lastAtStart, "took", time.Since(start).Round(time.Millisecond))
}
