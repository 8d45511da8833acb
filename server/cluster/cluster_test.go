package cluster_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/ferry-id/ferry/server/cluster"
	"github.com/ferry-id/ferry/server/state"
)

// TestCluster runs the non-destructive scenarios on one 3-node cluster.
func TestCluster(t *testing.T) {
	nodes, _ := startCluster(t, 3, nil)
	leader := waitLeader(t, nodes)
	fs := followers(nodes, leader)
	total := 0

	t.Run("WritesThroughLeaderAndFollowersConverge", func(t *testing.T) {
		term := readyLeader(nodes).Stats()["term"]
		var wg sync.WaitGroup
		errs := make(chan error, 3)
		for _, n := range nodes {
			wg.Add(1)
			go func(n *testNode) {
				defer wg.Done()
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				defer cancel()
				for i := 0; i < 30; i++ {
					if _, err := n.Apply(ctx, entryCommand(fmt.Sprintf("%s-%d", n.ID(), i), 100)); err != nil {
						errs <- fmt.Errorf("%s: %w", n.ID(), err)
						return
					}
				}
			}(n)
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		total += 90
		waitConverged(t, nodes, total)
		// Each write applied once (waitConverged counts distinct IDs). A
		// retry reaches the log only after an ambiguous failure, a leader
		// lost while committing: with one leader throughout there is none.
		if l := readyLeader(nodes); l != nil && l.Stats()["term"] == term {
			for _, n := range nodes {
				if d := n.fsm.Dupes(); d != 0 {
					t.Errorf("%s applied %d duplicate request IDs under one leader", n.ID(), d)
				}
			}
		}
	})

	t.Run("ApplyKeepsGivenRequestID", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		cmd := entryCommand("given", 10)
		cmd.RequestId = "req-given-1"
		cmd.TimeUnixNano = 42
		first, err := fs[0].Apply(ctx, cmd)
		if err != nil {
			t.Fatal(err)
		}
		total++
		// The same request again is answered with the stored result.
		again, err := fs[1].Apply(ctx, cmd)
		if err != nil {
			t.Fatal(err)
		}
		if again.GetIndex() != first.GetIndex() {
			t.Fatalf("retried request applied at %d, first at %d", again.GetIndex(), first.GetIndex())
		}
		if cmd.GetRequestId() != "req-given-1" || cmd.GetTimeUnixNano() != 42 {
			t.Fatalf("Apply changed given fields: %q %d", cmd.GetRequestId(), cmd.GetTimeUnixNano())
		}
		waitConverged(t, nodes, total)
	})

	t.Run("LeaderTasksRunOnTheLeader", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		ran := make(chan string, 10)
		for _, n := range nodes {
			n.HandleLeaderTask("test.write", func(ctx context.Context, arg []byte) error {
				ran <- n.ID()
				if string(arg) == "refuse" {
					return status.Error(codes.NotFound, "no such thing")
				}
				_, err := n.Apply(ctx, entryCommand(string(arg), 10))
				return err
			})
		}
		// Each call must run on the node that leads throughout it; a call
		// during which leadership moved is made again. The caller has
		// applied the task's write when RunOnLeader returns.
		attempt := 0
		runTask := func(caller func(leader *testNode) *testNode, name string) {
			onLeader(t, nodes, func(leader *testNode) error {
				n := caller(leader)
				drain(ran)
				before := n.fsm.Count()
				attempt++
				if err := n.RunOnLeader(ctx, "test.write", []byte(fmt.Sprintf("%s-%d", name, attempt))); err != nil {
					if readyLeader(nodes) != leader {
						return err
					}
					t.Fatal(err)
				}
				total++
				got := <-ran
				if readyLeader(nodes) != leader {
					return errors.New("leadership moved")
				}
				if got != leader.ID() {
					t.Fatalf("the task ran on %s, the leader is %s", got, leader.ID())
				}
				if got := n.fsm.Count(); got != before+1 {
					t.Fatalf("%s had applied %d commands when RunOnLeader returned, want %d", n.ID(), got, before+1)
				}
				return nil
			})
		}
		runTask(func(leader *testNode) *testNode { return followers(nodes, leader)[0] }, "task-1")
		runTask(func(leader *testNode) *testNode { return leader }, "task-2")
		onLeader(t, nodes, func(leader *testNode) error {
			err := followers(nodes, leader)[0].RunOnLeader(ctx, "test.write", []byte("refuse"))
			if status.Code(err) == codes.NotFound && strings.Contains(err.Error(), "no such thing") {
				return nil
			}
			if readyLeader(nodes) != leader {
				return errors.New("leadership moved")
			}
			t.Fatalf("the leader's refusal reached the follower as %v", err)
			return nil
		})
		if err := fs[0].RunOnLeader(ctx, "test.unknown", nil); err == nil {
			t.Fatal("an unregistered task ran")
		}
		waitConverged(t, nodes, total)
	})

	t.Run("VerifyReadOnFollowerSeesLeaderWrite", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		for i := 0; i < 40; i++ {
			cmd := entryCommand(fmt.Sprintf("read-%d", i), 10)
			if _, err := leader.Apply(ctx, cmd); err != nil {
				t.Fatal(err)
			}
			total++
			f := fs[i%len(fs)]
			if err := f.VerifyRead(ctx); err != nil {
				t.Fatalf("VerifyRead on %s: %v", f.ID(), err)
			}
			if !f.fsm.Has(cmd.GetRequestId()) {
				t.Fatalf("write %d acknowledged by the leader is not visible on %s after VerifyRead", i, f.ID())
			}
		}
		if err := leader.VerifyRead(ctx); err != nil {
			t.Fatalf("VerifyRead on leader: %v", err)
		}
	})

	t.Run("WriteThroughFollowerVisibleThereAtOnce", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		for i := 0; i < 40; i++ {
			cmd := entryCommand(fmt.Sprintf("ryw-%d", i), 10)
			f := fs[i%len(fs)]
			if _, err := f.Apply(ctx, cmd); err != nil {
				t.Fatal(err)
			}
			total++
			if !f.fsm.Has(cmd.GetRequestId()) {
				t.Fatalf("write %d acknowledged through %s is not applied there yet", i, f.ID())
			}
		}
	})

	t.Run("OversizeCommandRefusedBeforeRaft", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		onLeader(t, nodes, func(leader *testNode) error {
			term, before := leader.Stats()["term"], leader.Stats()["last_log_index"]
			for _, n := range nodes {
				_, err := n.Apply(ctx, entryCommand("big", state.MaxCommandSize))
				if !errors.Is(err, state.ErrCommandTooLarge) {
					t.Fatalf("Apply of %d bytes on %s: got %v, want ErrCommandTooLarge", state.MaxCommandSize, n.ID(), err)
				}
			}
			// A new leader appends an entry of its own: compare within a term.
			if readyLeader(nodes) != leader || leader.Stats()["term"] != term {
				return errors.New("leadership moved")
			}
			if after := leader.Stats()["last_log_index"]; after != before {
				t.Fatalf("leader log moved from %s to %s", before, after)
			}
			return nil
		})
		// Just under the limit still goes through.
		if _, err := fs[0].Apply(ctx, entryCommand("almost", state.MaxCommandSize-1024)); err != nil {
			t.Fatalf("Apply just under the limit: %v", err)
		}
		total++
		waitConverged(t, nodes, total)
	})

	t.Run("Members", func(t *testing.T) {
		// On a loaded machine leadership may move between subtests: every
		// node must name the same one leader, the ready one.
		waitFor(t, 20*time.Second, "every node to list 3 reachable voters and the ready leader", func() bool {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			leader := readyLeader(nodes)
			if leader == nil {
				return false
			}
			for _, n := range nodes {
				ms, err := n.Members(ctx)
				if err != nil {
					return false
				}
				var leaders []string
				for _, m := range ms {
					if m.Leader {
						leaders = append(leaders, m.ID)
					}
					if !m.Voter || !m.Reachable || m.LastIndex == 0 {
						return false
					}
				}
				if len(ms) != 3 || len(leaders) != 1 || leaders[0] != leader.ID() {
					return false
				}
			}
			return true
		})
	})

	t.Run("SnapshotSaveRestoreRoundTrip", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		waitConverged(t, nodes, total)
		saved := nodes[0].fsm.IDs()
		var archive bytes.Buffer
		if err := nodes[0].SnapshotSave(ctx, &archive); err != nil {
			t.Fatal(err)
		}
		hdr, err := cluster.ReadSnapshotHeader(bytes.NewReader(archive.Bytes()))
		if err != nil {
			t.Fatal(err)
		}
		if hdr.Node != nodes[0].ID() || hdr.Index == 0 || len(hdr.Configuration) != 3 {
			t.Fatalf("header %+v", hdr)
		}
		applyN(t, nodes[1], 20)
		total += 20
		waitConverged(t, nodes, total)

		// A follower refuses, naming the leader (asked again if leadership
		// moved meanwhile).
		onLeader(t, nodes, func(leader *testNode) error {
			f := followers(nodes, leader)[0]
			err := f.SnapshotRestore(ctx, bytes.NewReader(archive.Bytes()))
			if err == nil {
				// Only a leader restores: it was elected in between, and
				// the state is the archive's from now on.
				total = len(saved)
				return errors.New("the follower became the leader")
			}
			if !errors.Is(err, raft.ErrNotLeader) {
				t.Fatalf("restore on follower: %v", err)
			}
			if !strings.Contains(err.Error(), leader.ID()) {
				return err // it named a newer leader
			}
			return nil
		})

		// Tampered or truncated archives are refused and change nothing.
		var bads [][]byte
		for _, pos := range []int{3, 20, archive.Len() / 2, archive.Len() - 40, archive.Len() - 1} {
			bad := bytes.Clone(archive.Bytes())
			bad[pos] ^= 0x01
			bads = append(bads, bad)
		}
		bads = append(bads, archive.Bytes()[:archive.Len()-1], archive.Bytes()[:archive.Len()/2], append(bytes.Clone(archive.Bytes()), 0))
		for i, bad := range bads {
			onLeader(t, nodes, func(leader *testNode) error {
				term, lastIndex := leader.Stats()["term"], leader.Stats()["last_log_index"]
				err := leader.SnapshotRestore(ctx, bytes.NewReader(bad))
				if errors.Is(err, raft.ErrNotLeader) {
					return err
				}
				if !errors.Is(err, cluster.ErrSnapshotCorrupt) {
					t.Fatalf("damaged archive %d: got %v, want ErrSnapshotCorrupt", i, err)
				}
				// A new term appends the new leader's entry; within one
				// term nothing may have been appended.
				if leader.Stats()["term"] == term && leader.Stats()["last_log_index"] != lastIndex {
					t.Fatalf("refused restore moved the log from %s to %s", lastIndex, leader.Stats()["last_log_index"])
				}
				return nil
			})
		}
		waitConverged(t, nodes, total)

		onLeader(t, nodes, func(leader *testNode) error {
			return leader.SnapshotRestore(ctx, bytes.NewReader(archive.Bytes()))
		})
		total = len(saved)
		waitConverged(t, nodes, total)
		got := nodes[0].fsm.IDs()
		for i := range saved {
			if got[i] != saved[i] {
				t.Fatalf("restored entry %d = %s, want %s", i, got[i], saved[i])
			}
		}
		// The cluster keeps working after a restore.
		applyN(t, nodes[1], 5)
		total += 5
		waitConverged(t, nodes, total)
	})
}

// onLeader runs f on the ready leader, again on the new one while f fails
// because leadership moved (raft.ErrNotLeader, or f says so), as an operator
// would run a leader-only command again.
func onLeader(t *testing.T, nodes []*testNode, f func(leader *testNode) error) {
	t.Helper()
	var err error
	for range 20 {
		if err = f(waitLeader(t, nodes)); err == nil {
			return
		}
	}
	t.Fatalf("leadership kept moving: %v", err)
}

// drain empties ch.
func drain(ch chan string) {
	for len(ch) > 0 {
		<-ch
	}
}

// readyLeader is the node that holds ready leadership, or nil.
func readyLeader(nodes []*testNode) *testNode {
	for _, n := range nodes {
		if _, ok, _ := n.Leadership(); ok {
			return n
		}
	}
	return nil
}

// TestCloseReleasesEverything: a closed node leaves no goroutines behind and
// its data dir can be opened again at once.
func TestCloseReleasesEverything(t *testing.T) {
	before := runtime.NumGoroutine()
	pki := newPKI(t)
	cfg := fastConfig(t, pki, "n1")
	cfg.Bootstrap = true
	n := startNode(t, cfg)
	waitLeader(t, []*testNode{n})
	applyN(t, n, 5)
	if err := n.VerifyRead(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "goroutines to end", func() bool { return runtime.NumGoroutine() <= before })
	again := startNode(t, n.cfg)
	waitLeader(t, []*testNode{again})
	waitConverged(t, []*testNode{again}, 5)
}
