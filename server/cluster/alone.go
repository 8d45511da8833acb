package cluster

import (
	"github.com/hashicorp/raft"
)

// electAlone shortens the wait for the first election when this node is its
// cluster's only voter. A follower waits one to two heartbeat timeouts (1-2 s
// with the defaults) for a leader before standing, and a one-node cluster has
// no other leader to hear from: that wait was most of a one-node server's
// restart. Until the node leads, its heartbeat and election timeouts are the
// leader lease (the least Raft accepts); then the configured ones again, for
// the peers that may join later. Only the log's configuration counts: a node
// that was the only voter is still the only one, since no other node could
// have committed a change without it.
func (n *Node) electAlone(lease raft.ReloadableConfig) {
	f := n.raft.GetConfiguration()
	if f.Error() != nil {
		return
	}
	servers := f.Configuration().Servers
	if len(servers) != 1 || servers[0].ID != n.id || servers[0].Suffrage != raft.Voter {
		return
	}
	normal := n.raft.ReloadableConfig()
	if lease.HeartbeatTimeout >= normal.HeartbeatTimeout {
		return
	}
	fast := normal
	fast.HeartbeatTimeout, fast.ElectionTimeout = lease.HeartbeatTimeout, lease.ElectionTimeout
	if err := n.raft.ReloadConfig(fast); err != nil {
		n.log.Debug("cluster: could not shorten the first election", "error", err)
		return
	}
	n.wg.Add(1)
	go func() {
		defer n.wg.Done()
		for {
			n.seenMu.Lock()
			seen := n.leaderSeen
			n.seenMu.Unlock()
			if n.raft.State() == raft.Leader {
				break
			}
			select {
			case <-seen:
			case <-n.ctx.Done():
				return
			}
		}
		if err := n.raft.ReloadConfig(normal); err != nil {
			n.log.Warn("cluster: could not restore the heartbeat and election timeouts", "error", err)
		}
	}()
}
