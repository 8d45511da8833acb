package cluster

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/ferry-id/ferry/proto/ferrypb"
)

// membershipTimeout bounds one configuration change on the leader.
const membershipTimeout = 30 * time.Second

var errInvalidMember = errors.New("cluster: invalid member")

// Member is one server in the Raft configuration.
type Member struct {
	ID        string
	Address   string
	Voter     bool
	Leader    bool
	LastIndex uint64 // the member's last log index; 0 when unreachable
	Reachable bool   // whether the member answered (always true for this node)
}

// Join asks the cluster member at addr to add this node as a voter. The member
// forwards the request to the leader when it is a follower. This node must not
// have bootstrapped a cluster of its own. Join retries while the cluster has no
// leader, until ctx ends; it is idempotent.
func (n *Node) Join(ctx context.Context, addr string) error {
	if addr == n.advertise {
		return fmt.Errorf("cluster: join: %s is this node", addr)
	}
	// A node with a configuration that does not include addr belongs to
	// another cluster (it bootstrapped, or joined elsewhere); joining would
	// overwrite its log.
	cf := n.raft.GetConfiguration()
	if err := cf.Error(); err != nil {
		return fmt.Errorf("cluster: join: %w", err)
	}
	if servers := cf.Configuration().Servers; len(servers) > 0 {
		known := false
		for _, s := range servers {
			known = known || string(s.Address) == addr
		}
		if !known {
			return fmt.Errorf("cluster: join: this node already belongs to a cluster of %d server(s) that does not include %s; start it with an empty data dir and without bootstrap to join", len(servers), addr)
		}
	}
	c, err := n.pool.cluster(addr)
	if err != nil {
		return err
	}
	req := &ferrypb.JoinRequest{Id: n.cfg.NodeID, Address: n.advertise}
	delay := retryMin
	for {
		_, err := c.Join(ctx, req)
		if err == nil {
			n.log.Info("cluster: joined", "via", addr)
			return nil
		}
		if !retryable(ctx, err) || authFailure(err) {
			return fmt.Errorf("cluster: join via %s: %w", addr, err)
		}
		n.log.Debug("cluster: join retry", "via", addr, "err", err)
		if err := n.sleep(ctx, delay); err != nil {
			return fmt.Errorf("cluster: join via %s: %w", addr, err)
		}
		delay = min(delay*4, time.Second)
	}
}

// authFailure reports whether err comes from a TLS handshake the peer or this
// node refused (wrong CA, wrong cluster, wrong name), which no retry can fix.
func authFailure(err error) bool {
	msg := err.Error()
	for _, s := range []string{"remote error: tls:", "x509:", "tls: failed to verify", "is not a node of cluster"} {
		if strings.Contains(msg, s) {
			return true
		}
	}
	return false
}

// addServer adds (or re-addresses) a server; leader only.
func (n *Node) addServer(id, addr string, nonVoter bool) (uint64, error) {
	cf := n.raft.GetConfiguration()
	if err := cf.Error(); err != nil {
		return 0, fmt.Errorf("cluster: configuration: %w", err)
	}
	for _, s := range cf.Configuration().Servers {
		switch {
		case string(s.ID) == id && string(s.Address) == addr:
			if nonVoter || s.Suffrage == raft.Voter {
				return cf.Index(), nil // already a member
			}
		case string(s.Address) == addr:
			// Another ID at the same address is a server that was rebuilt:
			// it is gone, and two entries for one address would split votes.
			n.log.Info("cluster: removing stale server at joining address", "id", string(s.ID), "address", addr)
			if err := n.raft.RemoveServer(s.ID, 0, membershipTimeout).Error(); err != nil {
				return 0, fmt.Errorf("cluster: remove stale %s: %w", s.ID, err)
			}
		}
	}
	var f raft.IndexFuture
	if nonVoter {
		f = n.raft.AddNonvoter(raft.ServerID(id), raft.ServerAddress(addr), 0, membershipTimeout)
	} else {
		f = n.raft.AddVoter(raft.ServerID(id), raft.ServerAddress(addr), 0, membershipTimeout)
	}
	if err := f.Error(); err != nil {
		return 0, fmt.Errorf("cluster: add %s: %w", id, err)
	}
	n.log.Info("cluster: server added", "id", id, "address", addr, "voter", !nonVoter)
	return f.Index(), nil
}

func (n *Node) removeServer(id string) (uint64, error) {
	if id == "" {
		return 0, fmt.Errorf("%w: empty ID", errInvalidMember)
	}
	cf := n.raft.GetConfiguration()
	if err := cf.Error(); err != nil {
		return 0, fmt.Errorf("cluster: configuration: %w", err)
	}
	found := false
	for _, s := range cf.Configuration().Servers {
		found = found || string(s.ID) == id
	}
	if !found {
		return 0, fmt.Errorf("%w: %q is not a member", errInvalidMember, id)
	}
	f := n.raft.RemoveServer(raft.ServerID(id), 0, membershipTimeout)
	if err := f.Error(); err != nil {
		return 0, fmt.Errorf("cluster: remove %s: %w", id, err)
	}
	n.log.Info("cluster: server removed", "id", id)
	return f.Index(), nil
}

// Remove takes the server id out of the Raft configuration. On a follower the
// request is forwarded to the leader. Removing the leader itself makes it step
// down once the change commits.
func (n *Node) Remove(ctx context.Context, id string) error {
	delay := retryMin
	for {
		var err error
		if n.IsLeader() {
			_, err = n.removeServer(id)
		} else {
			err = n.forwardRemove(ctx, id)
		}
		if err == nil {
			return nil
		}
		if !retryable(ctx, err) {
			return fmt.Errorf("cluster: remove %s: %w", id, err)
		}
		if err := n.sleep(ctx, delay); err != nil {
			return fmt.Errorf("cluster: remove %s: %w", id, err)
		}
		delay = min(delay*2, retryMax)
	}
}

func (n *Node) forwardRemove(ctx context.Context, id string) error {
	_, addr := n.Leader()
	if addr == "" || addr == n.advertise {
		return errNoLeader
	}
	cc, err := n.pool.get(addr)
	if err != nil {
		return err
	}
	return cc.Invoke(ctx, "/"+opsServiceName+"/Remove", wrapperspb.String(id), new(wrapperspb.UInt64Value))
}

// Members lists the Raft configuration as this node knows it, with each
// member's last log index asked of the member itself (in parallel, bounded by ctx).
func (n *Node) Members(ctx context.Context) ([]Member, error) {
	cf := n.raft.GetConfiguration()
	if err := cf.Error(); err != nil {
		return nil, fmt.Errorf("cluster: configuration: %w", err)
	}
	leaderID, _ := n.Leader()
	servers := cf.Configuration().Servers
	out := make([]Member, len(servers))
	var wg sync.WaitGroup
	for i, s := range servers {
		out[i] = Member{
			ID:      string(s.ID),
			Address: string(s.Address),
			Voter:   s.Suffrage == raft.Voter,
			Leader:  string(s.ID) == leaderID,
		}
		if s.ID == n.id {
			out[i].LastIndex, out[i].Reachable = n.raft.LastIndex(), true
			continue
		}
		wg.Add(1)
		go func(m *Member) {
			defer wg.Done()
			cc, err := n.pool.get(m.Address)
			if err != nil {
				return
			}
			v := new(wrapperspb.UInt64Value)
			if err := cc.Invoke(ctx, "/"+opsServiceName+"/Status", &emptypb.Empty{}, v); err != nil {
				n.log.Debug("cluster: member status", "id", m.ID, "err", err)
				return
			}
			m.LastIndex, m.Reachable = v.GetValue(), true
		}(&out[i])
	}
	wg.Wait()
	return out, nil
}
