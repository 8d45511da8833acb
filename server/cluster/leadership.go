package cluster

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/hashicorp/raft"
)

// ErrNotReadyLeader is returned by leader-only operations on a node that is not
// the leader, or is the leader but has not yet completed its post-election
// Barrier.
var ErrNotReadyLeader = errors.New("cluster: not the ready leader")

// LeadershipToken identifies one leadership of this node: the Raft term it won
// and the log index its post-election Barrier applied. Leader-only work (signing,
// key rotation, join-token consumption) takes a token when it starts and checks
// LeadershipCurrent before each step that must not run under a successor. A
// token is a fencing value, not a lease: it is never valid again once lost.
type LeadershipToken struct {
	Term  uint64
	Index uint64
}

// leadership holds the readiness state and wakes watchers on every change.
type leadership struct {
	mu      sync.Mutex
	token   LeadershipToken
	ready   bool
	changed chan struct{}
}

func (l *leadership) init() { l.changed = make(chan struct{}) }

func (l *leadership) set(tok LeadershipToken, ready bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.token == tok && l.ready == ready {
		return
	}
	l.token, l.ready = tok, ready
	close(l.changed)
	l.changed = make(chan struct{})
}

func (l *leadership) get() (LeadershipToken, bool, <-chan struct{}) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.token, l.ready, l.changed
}

// Leadership returns this node's leadership token, whether the node is the
// ready leader (the token is valid only then), and a channel closed at the next
// change. Components that run leader-only duties loop on it:
//
//	for {
//		tok, ok, changed := n.Leadership()
//		if ok { start(tok) } else { stop() }
//		<-changed
//	}
func (n *Node) Leadership() (LeadershipToken, bool, <-chan struct{}) {
	return n.lead.get()
}

// LeadershipCurrent reports whether tok is still this node's leadership: the
// node is the ready leader, in the same term, under the same token. It reads
// local state only; use VerifyRead to confirm leadership with a quorum.
func (n *Node) LeadershipCurrent(tok LeadershipToken) bool {
	cur, ok, _ := n.lead.get()
	return ok && cur == tok && n.raft.State() == raft.Leader && n.raft.CurrentTerm() == tok.Term
}

// leaderLoop follows Raft's leadership notifications. On gaining leadership it
// runs a Barrier, so every entry of earlier terms is applied to the FSM before
// the node declares itself ready; on losing it, readiness is revoked at once.
func (n *Node) leaderLoop(notify <-chan bool) {
	var stop context.CancelFunc
	var wg sync.WaitGroup
	defer func() {
		if stop != nil {
			stop()
		}
		wg.Wait()
	}()
	for {
		select {
		case <-n.ctx.Done():
			return
		case isLeader := <-notify:
			if stop != nil {
				stop()
				wg.Wait()
				stop = nil
			}
			n.lead.set(LeadershipToken{}, false)
			if !isLeader {
				n.log.Info("cluster: leadership lost")
				continue
			}
			ctx, cancel := context.WithCancel(n.ctx)
			stop = cancel
			wg.Add(1)
			go func() {
				defer wg.Done()
				n.establish(ctx)
			}()
		}
	}
}

// establish runs the post-election Barrier, retrying while this node stays
// leader, then publishes the leadership token.
func (n *Node) establish(ctx context.Context) {
	term := n.raft.CurrentTerm()
	delay := 50 * time.Millisecond
	for {
		if ctx.Err() != nil || n.raft.State() != raft.Leader || n.raft.CurrentTerm() != term {
			return
		}
		err := n.raft.Barrier(n.cfg.BarrierTimeout).Error()
		if err == nil {
			break
		}
		n.log.Warn("cluster: post-election barrier failed", "err", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(delay):
		}
		if delay < time.Second {
			delay *= 2
		}
	}
	// The FSM has applied every entry up to the barrier: AppliedIndex is at
	// least the barrier's index.
	// leaderLoop waits for this goroutine before it revokes readiness, so a
	// loss racing with this check still ends with readiness revoked.
	tok := LeadershipToken{Term: term, Index: n.raft.AppliedIndex()}
	if ctx.Err() == nil && n.raft.State() == raft.Leader && n.raft.CurrentTerm() == term {
		n.lead.set(tok, true)
		n.log.Info("cluster: leadership established", "term", tok.Term, "index", tok.Index)
	}
}
