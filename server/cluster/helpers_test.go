package cluster_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/cluster"
	"github.com/ferry-id/ferry/server/state"
)

// recordFSM decodes every entry with state.DecodeCommand and records the
// request IDs it applied, answering a repeated request ID with the stored
// result as the real state store does.
type recordFSM struct {
	mu       sync.Mutex
	ids      []string
	results  map[string]*ferrypb.CommandResult
	index    uint64
	dupes    int
	restores int
	restored int // commands the last restore brought back
	changed  chan struct{}
}

var (
	_ raft.FSM        = (*recordFSM)(nil)
	_ cluster.Applied = (*recordFSM)(nil)
)

func newRecordFSM() *recordFSM {
	return &recordFSM{results: make(map[string]*ferrypb.CommandResult), changed: make(chan struct{})}
}

func (f *recordFSM) Apply(l *raft.Log) any {
	cmd, err := state.DecodeCommand(l.Data)
	f.mu.Lock()
	defer f.mu.Unlock()
	defer f.bump(l.Index)
	if err != nil {
		return err
	}
	// Group commits arrive as one entry; each command is answered on its own.
	if b := cmd.GetBatch(); b != nil {
		out := &ferrypb.CommandResult{Index: l.Index}
		for _, sub := range b.Commands {
			out.Batch = append(out.Batch, f.applyOne(sub, l.Index))
		}
		return out
	}
	return f.applyOne(cmd, l.Index)
}

// applyOne is called with mu held.
func (f *recordFSM) applyOne(cmd *ferrypb.Command, index uint64) *ferrypb.CommandResult {
	if r, ok := f.results[cmd.GetRequestId()]; ok {
		f.dupes++
		return r
	}
	r := &ferrypb.CommandResult{Index: index}
	f.results[cmd.GetRequestId()] = r
	f.ids = append(f.ids, cmd.GetRequestId())
	return r
}

// bump is called with mu held.
func (f *recordFSM) bump(index uint64) {
	f.index = index
	close(f.changed)
	f.changed = make(chan struct{})
}

type fsmImage struct {
	IDs     []string          `json:"ids"`
	Indexes map[string]uint64 `json:"indexes"`
	Index   uint64            `json:"index"`
}

func (f *recordFSM) Snapshot() (raft.FSMSnapshot, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	img := fsmImage{IDs: append([]string(nil), f.ids...), Indexes: make(map[string]uint64), Index: f.index}
	for id, r := range f.results {
		img.Indexes[id] = r.GetIndex()
	}
	return img, nil
}

func (img fsmImage) Persist(sink raft.SnapshotSink) error {
	if err := json.NewEncoder(sink).Encode(img); err != nil {
		sink.Cancel()
		return err
	}
	return sink.Close()
}

func (fsmImage) Release() {}

func (f *recordFSM) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	var img fsmImage
	if err := json.NewDecoder(rc).Decode(&img); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.ids = img.IDs
	f.results = make(map[string]*ferrypb.CommandResult)
	for id, idx := range img.Indexes {
		f.results[id] = &ferrypb.CommandResult{Index: idx}
	}
	f.restores++
	f.restored = len(img.IDs)
	f.bump(img.Index)
	return nil
}

func (f *recordFSM) AppliedIndex() uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.index
}

func (f *recordFSM) WaitForIndex(ctx context.Context, index uint64) error {
	for {
		f.mu.Lock()
		done, ch := f.index >= index, f.changed
		f.mu.Unlock()
		if done {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (f *recordFSM) IDs() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.ids...)
}

func (f *recordFSM) Has(id string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	_, ok := f.results[id]
	return ok
}

func (f *recordFSM) Count() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.ids)
}

// RestoredCount is how many commands the last restore brought back.
func (f *recordFSM) RestoredCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.restored
}

func (f *recordFSM) Restores() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.restores
}

func (f *recordFSM) Dupes() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.dupes
}

// testPKI is a cluster CA on disk with node certificates made on demand.
type testPKI struct {
	dir string
	ca  cluster.CAFiles
}

func newPKI(t testing.TB) *testPKI {
	t.Helper()
	dir := t.TempDir()
	ca, err := cluster.CreateCA(cluster.CAOptions{Dir: filepath.Join(dir, "ca")})
	if err != nil {
		t.Fatal(err)
	}
	return &testPKI{dir: dir, ca: ca}
}

func (p *testPKI) node(t testing.TB, id string, mod ...func(*cluster.CertOptions)) cluster.TLSFiles {
	t.Helper()
	opts := cluster.CertOptions{
		Dir:        filepath.Join(p.dir, "nodes", id),
		CACertFile: p.ca.CertFile,
		CAKeyFile:  p.ca.KeyFile,
		NodeID:     id,
		Force:      true,
	}
	for _, m := range mod {
		m(&opts)
	}
	files, err := cluster.CreateNodeCert(opts)
	if err != nil {
		t.Fatal(err)
	}
	return files
}

// tlogHandler sends slog records to t.Log until the test ends; raft goroutines
// may still log while shutting down.
type tlogHandler struct {
	t     testing.TB
	done  *atomic.Bool
	level slog.Level
	attrs string
}

func newTestLogger(t testing.TB, level slog.Level) *slog.Logger {
	done := new(atomic.Bool)
	t.Cleanup(func() { done.Store(true) })
	return slog.New(&tlogHandler{t: t, done: done, level: level})
}

func (h *tlogHandler) Enabled(_ context.Context, l slog.Level) bool { return l >= h.level }

func (h *tlogHandler) Handle(_ context.Context, r slog.Record) error {
	if h.done.Load() {
		return nil
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s%s", r.Level, r.Message, h.attrs)
	r.Attrs(func(a slog.Attr) bool {
		fmt.Fprintf(&b, " %s=%v", a.Key, a.Value)
		return true
	})
	h.t.Log(b.String())
	return nil
}

func (h *tlogHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	c := *h
	for _, a := range attrs {
		c.attrs += fmt.Sprintf(" %s=%v", a.Key, a.Value)
	}
	return &c
}

func (h *tlogHandler) WithGroup(string) slog.Handler { return h }

// testNode is a node with its FSM and the config it was started with.
type testNode struct {
	*cluster.Node
	fsm *recordFSM
	cfg cluster.Config
}

// fastConfig returns a config for tests: small WAL segments and a short
// commit timeout. Heartbeat and election timeouts stay at Raft's defaults
// (1 s): at 300 ms a loaded machine's scheduling stalls alone set off
// elections, over and over (TestCluster once went 20 s without a leader).
func fastConfig(t testing.TB, pki *testPKI, id string) cluster.Config {
	return cluster.Config{
		NodeID:         id,
		DataDir:        filepath.Join(t.TempDir(), id),
		BindAddr:       "127.0.0.1:0",
		TLS:            pki.node(t, id),
		Logger:         newTestLogger(t, testLogLevel).With("node", id),
		WALSegmentSize: 4 << 20,
		CommitTimeout:  10 * time.Millisecond,
	}
}

func startNode(t testing.TB, cfg cluster.Config) *testNode {
	t.Helper()
	fsm := newRecordFSM()
	cfg.FSM = fsm
	n, err := cluster.New(cfg)
	if err != nil {
		t.Fatalf("start %s: %v", cfg.NodeID, err)
	}
	t.Cleanup(func() { n.Close() })
	// Keep the bound address so a restart listens where peers expect it.
	cfg.BindAddr = n.Addr()
	return &testNode{Node: n, fsm: fsm, cfg: cfg}
}

// restart closes the node and starts it again from its data dir.
func (tn *testNode) restart(t testing.TB) *testNode {
	t.Helper()
	if err := tn.Close(); err != nil {
		t.Fatalf("close %s: %v", tn.ID(), err)
	}
	return startNode(t, tn.cfg)
}

// startCluster bootstraps nodes[0] and joins the others through it.
func startCluster(t testing.TB, size int, mod func(*cluster.Config)) ([]*testNode, *testPKI) {
	t.Helper()
	if size > 1 && testing.Short() {
		t.Skip("multi-node cluster test; skipped with -short")
	}
	pki := newPKI(t)
	nodes := make([]*testNode, size)
	for i := range nodes {
		cfg := fastConfig(t, pki, fmt.Sprintf("n%d", i+1))
		cfg.Bootstrap = i == 0
		if mod != nil {
			mod(&cfg)
		}
		nodes[i] = startNode(t, cfg)
		if i == 0 {
			waitLeader(t, nodes[:1])
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for _, n := range nodes[1:] {
		if err := n.Join(ctx, nodes[0].Addr()); err != nil {
			t.Fatalf("join %s: %v", n.ID(), err)
		}
	}
	waitMembers(t, nodes, size)
	return nodes, pki
}

// waitLeader waits until one of nodes is the ready leader and all of them
// agree on it.
func waitLeader(t testing.TB, nodes []*testNode) *testNode {
	t.Helper()
	var leader *testNode
	waitFor(t, 15*time.Second, "a ready leader all nodes agree on", func() bool {
		leader = nil
		for _, n := range nodes {
			if _, ok, _ := n.Leadership(); ok {
				leader = n
			}
		}
		if leader == nil {
			return false
		}
		for _, n := range nodes {
			if id, _ := n.Leader(); id != leader.ID() {
				return false
			}
		}
		return true
	})
	return leader
}

func waitMembers(t testing.TB, nodes []*testNode, want int) {
	t.Helper()
	waitFor(t, 15*time.Second, fmt.Sprintf("%d voters on every node", want), func() bool {
		for _, n := range nodes {
			ms, err := n.Members(context.Background())
			if err != nil || len(ms) != want {
				return false
			}
		}
		return true
	})
}

// waitConverged waits until every node's FSM holds exactly the same IDs, in
// the same order.
func waitConverged(t testing.TB, nodes []*testNode, want int) {
	t.Helper()
	waitFor(t, 20*time.Second, fmt.Sprintf("all FSMs hold the same %d entries", want), func() bool {
		first := nodes[0].fsm.IDs()
		if len(first) != want {
			return false
		}
		for _, n := range nodes[1:] {
			ids := n.fsm.IDs()
			if len(ids) != len(first) {
				return false
			}
			for i := range ids {
				if ids[i] != first[i] {
					return false
				}
			}
		}
		return true
	})
}

func waitFor(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func waitCaughtUp(t testing.TB, n *testNode) {
	t.Helper()
	select {
	case <-n.CaughtUp():
	case <-time.After(30 * time.Second):
		t.Fatalf("%s: not caught up after 30s", n.ID())
	}
}

func followers(nodes []*testNode, leader *testNode) []*testNode {
	var out []*testNode
	for _, n := range nodes {
		if n != leader {
			out = append(out, n)
		}
	}
	return out
}

// entryCommand makes a command of roughly size bytes.
func entryCommand(id string, size int) *ferrypb.Command {
	return &ferrypb.Command{Op: &ferrypb.Command_EntriesCreate{EntriesCreate: &ferrypb.EntriesCreate{
		Entries: []*ferrypb.Entry{{Id: id, SpiffeId: "spiffe://example.org/w/" + id, Hint: strings.Repeat("x", size)}},
	}}}
}

// applyN writes n commands through node and returns their request IDs.
func applyN(t testing.TB, node *testNode, n int) []string {
	t.Helper()
	return applySized(t, node, n, 64)
}

// applySized writes n commands of about size bytes through node.
func applySized(t testing.TB, node *testNode, n, size int) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ids := make([]string, 0, n)
	for i := 0; i < n; i++ {
		cmd := entryCommand(fmt.Sprintf("e%d", i), size)
		res, err := node.Apply(ctx, cmd)
		if err != nil {
			t.Fatalf("apply %d via %s: %v", i, node.ID(), err)
		}
		if res.GetIndex() == 0 {
			t.Fatalf("apply %d: result without index", i)
		}
		ids = append(ids, cmd.GetRequestId())
	}
	return ids
}

func sorted(s []string) []string {
	s = append([]string(nil), s...)
	sort.Strings(s)
	return s
}

var testLogLevel = slog.LevelWarn
