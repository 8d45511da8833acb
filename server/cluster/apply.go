package cluster

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"time"

	"github.com/hashicorp/raft"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/state"
)

// enqueueLimit bounds how long a write waits to enter the leader's apply
// queue (Consul and Nomad use 30 s).
const enqueueLimit = 30 * time.Second

// Retry pacing while there is no leader or the leader changes.
const (
	retryMin = 5 * time.Millisecond
	retryMax = 200 * time.Millisecond
)

// Apply commits cmd to the replicated log and returns the FSM's result. It
// fills cmd.RequestId (random) and cmd.TimeUnixNano (now) when they are empty,
// so the caller can see what was sent. On the leader the command goes to Raft;
// on a follower it is forwarded to the leader. When leadership changes or a
// forward fails, the same encoded bytes are sent again until ctx ends: the FSM
// answers a repeated request ID with the stored result, so a retry of a write
// that did commit is not applied twice.
//
// Commands larger than state.MaxCommandSize are refused before any network or
// Raft call, with an error wrapping state.ErrCommandTooLarge.
func (n *Node) Apply(ctx context.Context, cmd *ferrypb.Command) (*ferrypb.CommandResult, error) {
	if cmd == nil {
		return nil, errors.New("cluster: nil command")
	}
	if cmd.RequestId == "" {
		var b [16]byte
		if _, err := rand.Read(b[:]); err != nil {
			return nil, fmt.Errorf("cluster: request ID: %w", err)
		}
		cmd.RequestId = hex.EncodeToString(b[:])
	}
	if cmd.TimeUnixNano == 0 {
		cmd.TimeUnixNano = time.Now().UnixNano()
	}
	data, err := state.EncodeCommand(cmd)
	if err != nil {
		return nil, fmt.Errorf("cluster: %w", err)
	}
	return n.applyEncoded(ctx, data)
}

func (n *Node) applyEncoded(ctx context.Context, data []byte) (*ferrypb.CommandResult, error) {
	delay := retryMin
	var last error
	for {
		var (
			res *ferrypb.CommandResult
			err error
		)
		if n.raft.State() == raft.Leader {
			res, err = n.applyLocal(ctx, data)
			if errors.Is(err, raft.ErrRaftShutdown) {
				return nil, fmt.Errorf("cluster: apply: %w", err)
			}
		} else {
			res, err = n.forwardApply(ctx, data)
		}
		if err == nil {
			return res, nil
		}
		if !retryable(ctx, err) {
			if ctx.Err() != nil && last != nil {
				return nil, fmt.Errorf("cluster: apply: %w (last error: %v)", ctx.Err(), last)
			}
			return nil, fmt.Errorf("cluster: apply: %w", err)
		}
		last = err
		n.log.Debug("cluster: apply retry", "err", err)
		if err := n.sleep(ctx, delay); err != nil {
			return nil, fmt.Errorf("cluster: apply: %w (last error: %v)", err, last)
		}
		delay = min(delay*2, retryMax)
	}
}

// sleep waits d, or less if this node's leadership changes or a new leader
// becomes known first.
func (n *Node) sleep(ctx context.Context, d time.Duration) error {
	_, _, changed := n.lead.get()
	n.seenMu.Lock()
	seen := n.leaderSeen
	n.seenMu.Unlock()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-n.ctx.Done():
		return raft.ErrRaftShutdown
	case <-changed:
		return nil
	case <-seen:
		return nil
	case <-t.C:
		return nil
	}
}

// forwardApply has the leader commit data, then waits until this node has
// applied it too: a client that wrote through this node reads its write
// here (an agent attested through a follower is known to it at once).
func (n *Node) forwardApply(ctx context.Context, data []byte) (*ferrypb.CommandResult, error) {
	res, err := n.forward.submit(ctx, data)
	if err != nil {
		return nil, err
	}
	if err := n.waitApplied(ctx, res.GetIndex()); err != nil {
		return nil, err
	}
	return res, nil
}

// applyLocal submits data to Raft on this node (which must be the leader),
// through the group committer, and waits for the FSM's response or ctx.
func (n *Node) applyLocal(ctx context.Context, data []byte) (*ferrypb.CommandResult, error) {
	return n.commit.submit(ctx, data)
}

// waitFuture waits for a Raft future or ctx. The future still completes in the
// background when ctx ends first; its outcome is then unknown to the caller.
func waitFuture(ctx context.Context, fut raft.Future) error {
	if ctx.Done() == nil {
		return fut.Error()
	}
	done := make(chan error, 1)
	go func() { done <- fut.Error() }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// VerifyRead is the barrier for a linearizable read: when it returns nil, the
// local FSM reflects every write acknowledged anywhere in the cluster before
// VerifyRead was called. On the leader it waits until the post-election Barrier
// has completed, then confirms leadership with a quorum. On a follower it asks
// the leader for its applied index (ReadIndex) and waits until the local FSM
// has applied that far.
func (n *Node) VerifyRead(ctx context.Context) error {
	delay := retryMin
	var last error
	for {
		var err error
		if n.raft.State() == raft.Leader {
			_, err = n.leaderReadIndex(ctx)
		} else {
			err = n.followerRead(ctx)
		}
		if err == nil {
			return nil
		}
		if !retryable(ctx, err) {
			if ctx.Err() != nil && last != nil {
				return fmt.Errorf("cluster: verify read: %w (last error: %v)", ctx.Err(), last)
			}
			return fmt.Errorf("cluster: verify read: %w", err)
		}
		last = err
		if err := n.sleep(ctx, delay); err != nil {
			return fmt.Errorf("cluster: verify read: %w (last error: %v)", err, last)
		}
		delay = min(delay*2, retryMax)
	}
}

// leaderReadIndex confirms this node is the ready leader and returns the
// index its FSM has applied. That index covers every acknowledged write: a
// write is acknowledged only after the leader's FSM applied it, and writes of
// earlier terms were applied by the post-election Barrier. It is an index the
// FSM itself saw (unlike the commit index, which may point at a no-op or
// barrier entry the FSM never receives), so a follower waiting for it cannot
// wait forever on an idle cluster.
func (n *Node) leaderReadIndex(ctx context.Context) (uint64, error) {
	for {
		_, ok, changed := n.lead.get()
		if ok {
			break
		}
		if n.raft.State() != raft.Leader {
			return 0, raft.ErrNotLeader
		}
		// A new leader is not ready until its Barrier completes. The timer
		// catches a step-down that leaves readiness unchanged (never ready).
		select {
		case <-changed:
		case <-time.After(20 * time.Millisecond):
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-n.ctx.Done():
			return 0, raft.ErrRaftShutdown
		}
	}
	if err := waitFuture(ctx, n.raft.VerifyLeader()); err != nil {
		return 0, err
	}
	return n.appliedIndex(), nil
}

// appliedIndex is the local FSM's applied index when the FSM reports it, else
// the index Raft last handed to the FSM.
func (n *Node) appliedIndex() uint64 {
	if n.cfg.Applied != nil {
		return n.cfg.Applied.AppliedIndex()
	}
	return n.raft.AppliedIndex()
}

func (n *Node) followerRead(ctx context.Context) error {
	_, addr := n.Leader()
	if addr == "" || addr == n.advertise {
		return errNoLeader
	}
	c, err := n.pool.cluster(addr)
	if err != nil {
		return err
	}
	resp, err := c.ReadIndex(ctx, &ferrypb.ReadIndexRequest{})
	if err != nil {
		return fmt.Errorf("read index from %s: %w", addr, err)
	}
	return n.waitApplied(ctx, resp.GetIndex())
}

// waitApplied waits until the local FSM has applied index.
func (n *Node) waitApplied(ctx context.Context, index uint64) error {
	if n.cfg.Applied != nil {
		if err := n.cfg.Applied.WaitForIndex(ctx, index); err != nil {
			return fmt.Errorf("cluster: wait for index %d: %w", index, err)
		}
		return nil
	}
	// Without an Applied hook, Raft's applied index (entries handed to the FSM)
	// is the best available signal.
	t := time.NewTicker(2 * time.Millisecond)
	defer t.Stop()
	for n.raft.AppliedIndex() < index {
		select {
		case <-ctx.Done():
			return fmt.Errorf("cluster: wait for index %d: %w", index, ctx.Err())
		case <-t.C:
		}
	}
	return nil
}

// LeaderTask is work only the leader does, registered with HandleLeaderTask
// and run through RunOnLeader. A gRPC status error it returns reaches the
// caller with its code, from any node.
type LeaderTask func(ctx context.Context, arg []byte) error

// HandleLeaderTask registers f under name; every server of the cluster
// registers the same tasks before it serves.
func (n *Node) HandleLeaderTask(name string, f LeaderTask) {
	n.tasksMu.Lock()
	defer n.tasksMu.Unlock()
	n.tasks[name] = f
}

func (n *Node) task(name string) LeaderTask {
	n.tasksMu.Lock()
	defer n.tasksMu.Unlock()
	return n.tasks[name]
}

// RunOnLeader runs the task name with arg on the leader: here when this node
// leads, else on the leader through the Cluster service, after which it
// waits until this node has applied everything the leader had when the task
// ended, so what the task wrote reads here too. It does not retry: a task
// may have effects outside the log (a fetch), so the caller decides.
func (n *Node) RunOnLeader(ctx context.Context, name string, arg []byte) error {
	f := n.task(name)
	if f == nil {
		return fmt.Errorf("cluster: no leader task %q", name)
	}
	if n.IsLeader() {
		return f(ctx, arg)
	}
	cc, err := n.forwardTarget(ctx)
	if err != nil {
		return toStatus(err)
	}
	resp, err := ferrypb.NewClusterClient(cc).LeaderTask(markForwarded(ctx), &ferrypb.LeaderTaskRequest{Name: name, Arg: arg})
	if err != nil {
		return err
	}
	return n.waitApplied(ctx, resp.GetIndex())
}
