package cluster

import (
	"context"

	"fmt"
	"time"

	"github.com/hashicorp/raft"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/state"
)

// Group commit. Every command that reaches the leader (from its own API or
// forwarded by a follower) queues here; one goroutine takes everything queued
// and submits it as a single Raft log entry (a state.CommandBatch), with at most
// maxInFlight entries outstanding. While those are in flight, new commands pile
// up and leave together as the next entry, so under load the per-entry costs of
// Raft (encoding, replication, fsync, FSM dispatch) are paid once per batch, and
// an idle cluster still sends a lone command at once.
const (
	maxInFlight   = 4
	maxBatchCount = 512
	// maxBatchBytes leaves room under state.MaxCommandSize for framing.
	maxBatchBytes = state.MaxCommandSize - 16*1024
	queueLength   = 8192
)

type pendingApply struct {
	ctx  context.Context
	data []byte
	done chan applyOutcome // buffered: the committer never blocks on it
}

type applyOutcome struct {
	res *ferrypb.CommandResult
	err error
}

// committer groups queued commands and hands each group to send: on the
// leader, send commits one log entry; on a follower, send forwards the group to
// the leader in one call.
type committer struct {
	n     *Node
	queue chan *pendingApply
	slots chan struct{}
	send  func([]*pendingApply)
}

func newCommitter(n *Node) *committer {
	c := &committer{n: n, queue: make(chan *pendingApply, queueLength), slots: make(chan struct{}, maxInFlight)}
	c.send = c.commit
	return c
}

// newForwarder groups a follower's writes into one forward to the leader.
func newForwarder(n *Node) *committer {
	c := &committer{n: n, queue: make(chan *pendingApply, queueLength), slots: make(chan struct{}, maxInFlight)}
	c.send = c.forward
	return c
}

// submit queues data and waits for its own result.
func (c *committer) submit(ctx context.Context, data []byte) (*ferrypb.CommandResult, error) {
	p := &pendingApply{ctx: ctx, data: data, done: make(chan applyOutcome, 1)}
	select {
	case c.queue <- p:
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-c.n.ctx.Done():
		return nil, raft.ErrRaftShutdown
	}
	select {
	case out := <-p.done:
		return out.res, out.err
	case <-ctx.Done():
		// The command may still commit; the caller's retry (same request ID)
		// is answered from the FSM's record.
		return nil, ctx.Err()
	}
}

// run is the committer loop; it ends with the node.
func (c *committer) run() {
	var carry *pendingApply
	for {
		first := carry
		carry = nil
		if first == nil {
			select {
			case first = <-c.queue:
			case <-c.n.ctx.Done():
				c.failQueued()
				return
			}
		}
		// Wait for a free slot first: what arrives meanwhile joins this batch.
		select {
		case c.slots <- struct{}{}:
		case <-c.n.ctx.Done():
			first.done <- applyOutcome{err: raft.ErrRaftShutdown}
			c.failQueued()
			return
		}
		batch := []*pendingApply{first}
		size := len(first.data)
	drain:
		for len(batch) < maxBatchCount {
			select {
			case p := <-c.queue:
				if size+len(p.data)+8 > maxBatchBytes {
					carry = p
					break drain
				}
				batch = append(batch, p)
				size += len(p.data) + 8
			default:
				break drain
			}
		}
		go func() {
			defer func() { <-c.slots }()
			c.send(batch)
		}()
	}
}

func (c *committer) failQueued() {
	for {
		select {
		case p := <-c.queue:
			p.done <- applyOutcome{err: raft.ErrRaftShutdown}
		default:
			return
		}
	}
}

// stillWaiting answers the waiters that gave up before their command was sent
// and returns the others.
func stillWaiting(batch []*pendingApply) []*pendingApply {
	live := batch[:0]
	for _, p := range batch {
		if p.ctx.Err() != nil {
			p.done <- applyOutcome{err: p.ctx.Err()}
			continue
		}
		live = append(live, p)
	}
	return live
}

// commit sends one log entry and hands every waiter its own result.
func (c *committer) commit(batch []*pendingApply) {
	live := stillWaiting(batch)
	if len(live) == 0 {
		return
	}
	if len(live) == 1 {
		res, err := c.n.raftApply(live[0].ctx, live[0].data)
		live[0].done <- applyOutcome{res, err}
		return
	}
	parts := make([][]byte, len(live))
	for i, p := range live {
		parts[i] = p.data
	}
	data, err := state.EncodeBatch(parts)
	if err != nil {
		for _, p := range live {
			p.done <- applyOutcome{err: err}
		}
		return
	}
	res, err := c.n.raftApply(context.Background(), data)
	if err == nil && len(res.GetBatch()) != len(live) {
		err = fmt.Errorf("cluster: batch of %d got %d results", len(live), len(res.GetBatch()))
	}
	for i, p := range live {
		if err != nil {
			p.done <- applyOutcome{err: err}
			continue
		}
		r := res.Batch[i]
		if r.Index == 0 {
			r.Index = res.Index
		}
		p.done <- applyOutcome{res: r}
	}
}

// forward sends a group of commands to the leader in one call and hands every
// waiter its own result (or the call's error: the waiter's retry loop resends).
func (c *committer) forward(batch []*pendingApply) {
	live := stillWaiting(batch)
	if len(live) == 0 {
		return
	}
	fail := func(err error) {
		for _, p := range live {
			p.done <- applyOutcome{err: err}
		}
	}
	_, addr := c.n.Leader()
	if addr == "" || addr == c.n.advertise {
		fail(errNoLeader)
		return
	}
	client, err := c.n.pool.cluster(addr)
	if err != nil {
		fail(err)
		return
	}
	ctx, cancel := context.WithTimeout(c.n.ctx, enqueueLimit)
	defer cancel()
	if len(live) == 1 {
		resp, err := client.Apply(live[0].ctx, &ferrypb.ApplyRequest{Command: live[0].data})
		switch {
		case err != nil:
			err = fmt.Errorf("forward to %s: %w", addr, err)
		case resp.GetResult() == nil:
			err = fmt.Errorf("cluster: leader %s returned no result", addr)
		}
		live[0].done <- applyOutcome{res: resp.GetResult(), err: err}
		return
	}
	req := &ferrypb.ApplyRequest{Commands: make([][]byte, len(live))}
	for i, p := range live {
		req.Commands[i] = p.data
	}
	resp, err := client.Apply(ctx, req)
	if err != nil {
		fail(fmt.Errorf("forward to %s: %w", addr, err))
		return
	}
	if len(resp.GetResults()) != len(live) {
		fail(fmt.Errorf("cluster: leader %s returned %d results for %d commands", addr, len(resp.GetResults()), len(live)))
		return
	}
	for i, p := range live {
		p.done <- applyOutcome{res: resp.Results[i]}
	}
}

// raftApply submits one log entry to Raft and waits for the FSM's result.
func (n *Node) raftApply(ctx context.Context, data []byte) (*ferrypb.CommandResult, error) {
	timeout := enqueueLimit
	if dl, ok := ctx.Deadline(); ok {
		timeout = min(timeout, max(time.Until(dl), time.Millisecond))
	}
	fut := n.raft.Apply(data, timeout)
	if err := waitFuture(ctx, fut); err != nil {
		return nil, err
	}
	switch r := fut.Response().(type) {
	case *ferrypb.CommandResult:
		if r.Index == 0 {
			r.Index = fut.Index()
		}
		return r, nil
	case error:
		return nil, fmt.Errorf("cluster: FSM: %w", r)
	case nil:
		return &ferrypb.CommandResult{Index: fut.Index()}, nil
	default:
		return nil, fmt.Errorf("cluster: FSM returned %T, want *ferrypb.CommandResult", r)
	}
}
