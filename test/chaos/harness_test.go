package chaos_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/test/chaos"
	"github.com/ferry-id/ferry/test/testcluster"
)

// harness is one cluster under a nemesis, with its writer and observer.
type harness struct {
	t   *testing.T
	c   *testcluster.Cluster
	net *chaos.Net
	rng *rand.Rand

	pmu    sync.Mutex
	paused map[*testcluster.Node]bool

	w   *writer
	obs *observer

	faults []faultRecord
}

// faultRecord is one fault the nemesis drove and how the cluster took it.
type faultRecord struct {
	kind     string
	at       time.Time
	old, new string        // leader before and after
	election time.Duration // until another node was leader; 0 when none was needed
}

func newHarness(t *testing.T, nodes int, logStore string, seed uint64) *harness {
	h := &harness{t: t, rng: rand.New(rand.NewPCG(seed, seed^0x5eed)), paused: map[*testcluster.Node]bool{}}
	var cl atomic.Pointer[testcluster.Cluster]
	h.net = chaos.NewNet(chaos.Config{Identify: func(remote, local *net.TCPAddr) string {
		c := cl.Load()
		if c == nil {
			return ""
		}
		pids := map[int]string{}
		for _, n := range c.Nodes {
			if pid := n.PID(); pid != 0 {
				pids[pid] = n.ID
			}
		}
		name, _ := chaos.SocketOwner(remote, local, pids)
		return name
	}})
	t.Cleanup(h.net.Close)
	h.c = testcluster.New(t, testcluster.Options{
		Nodes:    nodes,
		LogStore: logStore,
		LogLevel: "info",
		// Small, so that snapshots are taken all through the run and a node
		// that was down a few seconds must catch up from one.
		SnapshotThreshold: 256,
		TrailingLogs:      128,
		SnapshotInterval:  "1s",
		// JWT-SVIDs name an issuer the bridge maps to the trust domain.
		ExtraServerConfig: oidcBlock,
		AdvertiseAddr: func(id, bind string) string {
			addr, err := h.net.AddOn(id, testcluster.FreeAddr(t), bind)
			if err != nil {
				t.Fatal(err)
			}
			return addr
		},
	})
	cl.Store(h.c)
	// Registered after the cluster's own cleanup, so it runs first: a stopped
	// process would not take the SIGTERM that stops the cluster.
	t.Cleanup(func() { h.net.Heal(); h.resumeAll() })
	h.obs = newObserver(h.c)
	return h
}

// ---- node helpers ----

func (h *harness) pause(n *testcluster.Node) {
	h.pmu.Lock()
	defer h.pmu.Unlock()
	if pid := n.PID(); pid != 0 && syscall.Kill(pid, syscall.SIGSTOP) == nil {
		h.paused[n] = true
	}
}

func (h *harness) resume(n *testcluster.Node) {
	h.pmu.Lock()
	defer h.pmu.Unlock()
	if pid := n.PID(); pid != 0 {
		_ = syscall.Kill(pid, syscall.SIGCONT)
	}
	delete(h.paused, n)
}

func (h *harness) resumeAll() {
	h.pmu.Lock()
	ns := make([]*testcluster.Node, 0, len(h.paused))
	for n := range h.paused {
		ns = append(ns, n)
	}
	h.pmu.Unlock()
	for _, n := range ns {
		h.resume(n)
	}
}

// usable reports whether n is running and not paused.
func (h *harness) usable(n *testcluster.Node) bool {
	h.pmu.Lock()
	defer h.pmu.Unlock()
	return n.Running() && !h.paused[n]
}

var httpClient = &http.Client{Timeout: 500 * time.Millisecond}

// raftGauges scrapes a node's /metrics for its Raft term and whether it is leader.
func raftGauges(n *testcluster.Node) (term uint64, leader bool, err error) {
	resp, err := httpClient.Get("http://" + n.HealthAddr + "/metrics")
	if err != nil {
		return 0, false, err
	}
	defer resp.Body.Close()
	found := 0
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		name, val, ok := strings.Cut(line, " ")
		if !ok {
			continue
		}
		switch name {
		case "ferry_raft_term":
			f, err := strconv.ParseFloat(val, 64)
			if err != nil {
				return 0, false, err
			}
			term = uint64(f)
			found++
		case "ferry_raft_leader":
			leader = val == "1"
			found++
		}
	}
	if found != 2 {
		return 0, false, fmt.Errorf("metrics of %s lack the raft gauges", n.ID)
	}
	return term, leader, sc.Err()
}

// leaderAmong returns the node of among (other than not) that says it is the
// Raft leader, or nil.
func (h *harness) leaderAmong(among []*testcluster.Node, not *testcluster.Node) *testcluster.Node {
	for _, n := range among {
		if n == not || !h.usable(n) {
			continue
		}
		if _, leader, err := raftGauges(n); err == nil && leader {
			return n
		}
	}
	return nil
}

// waitLeader waits for a leader among the given nodes other than not.
func (h *harness) waitLeader(among []*testcluster.Node, not *testcluster.Node, timeout time.Duration) *testcluster.Node {
	h.t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if l := h.leaderAmong(among, not); l != nil {
			return l
		}
		time.Sleep(25 * time.Millisecond)
	}
	h.t.Fatalf("no leader among %s after %s\n%s", ids(among), timeout, h.c.Logs(30))
	return nil
}

// settle waits until every node runs, a leader is known, and every node has
// applied what the leader had committed.
func (h *harness) settle() *testcluster.Node {
	h.t.Helper()
	h.resumeAll()
	for _, n := range h.c.Nodes {
		if !n.Running() {
			n.Start()
		}
	}
	l := h.waitLeader(h.c.Nodes, nil, 60*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	resp, err := l.Admin().ClusterList(ctx, &ferrypb.ClusterListRequest{})
	cancel()
	if err == nil {
		h.c.WaitApplied(resp.CommitIndex, 90*time.Second)
	}
	return h.waitLeader(h.c.Nodes, nil, 60*time.Second)
}

func ids(ns []*testcluster.Node) []string {
	out := make([]string, len(ns))
	for i, n := range ns {
		out[i] = n.ID
	}
	return out
}

func (h *harness) others(not ...*testcluster.Node) []*testcluster.Node {
	var out []*testcluster.Node
	for _, n := range h.c.Nodes {
		if !slices.Contains(not, n) {
			out = append(out, n)
		}
	}
	return out
}

// ---- writer ----

// writer creates registration entries with request IDs from several workers.
// A failed attempt is retried with the same request ID on the next node until
// one acknowledges it; an acknowledged write must then be on every node, once.
type writer struct {
	c       *testcluster.Cluster
	prefix  string
	timeout time.Duration

	seq     atomic.Int64
	stop    chan struct{}
	giveUp  atomic.Int64 // unix nanos after which unacknowledged writes are abandoned
	wg      sync.WaitGroup
	attempt atomic.Int64

	// Linearizable reads of just-acknowledged writes, through random nodes.
	readsServed, readsStale, readsFailed atomic.Int64

	mu       sync.Mutex
	writes   map[string]*write
	oks      []span // successful attempts
	failures map[codes.Code]int
	problems []string
}

type write struct {
	id         string
	index      uint64 // index the acknowledgement named
	acked      bool
	ambiguous  int // failed attempts whose outcome the client cannot know
	duplicates int // attempts answered AlreadyExists: applied twice
}

type span struct{ start, end time.Time }

func newWriter(c *testcluster.Cluster, prefix string) *writer {
	return &writer{c: c, prefix: prefix, timeout: 2 * time.Second, stop: make(chan struct{}),
		writes: map[string]*write{}, failures: map[codes.Code]int{}}
}

func entryFor(id string) *ferrypb.Entry {
	return &ferrypb.Entry{
		Id:        id,
		SpiffeId:  "spiffe://example.org/chaos/" + id,
		ParentId:  "spiffe://example.org/agent/chaos",
		Selectors: []*ferrypb.Selector{{Type: "unix", Value: "uid:1000"}},
	}
}

func requestID(id string) string { return "req-" + id }

func (w *writer) start(workers int, pace time.Duration) {
	w.giveUp.Store(time.Now().Add(24 * time.Hour).UnixNano())
	for g := range workers {
		w.wg.Add(1)
		go func() {
			defer w.wg.Done()
			for {
				select {
				case <-w.stop:
					return
				default:
				}
				id := fmt.Sprintf("%s%07d", w.prefix, w.seq.Add(1))
				w.write(id, g)
				time.Sleep(pace)
			}
		}()
	}
}

// finish stops new writes and gives the unacknowledged ones until drain to be
// acknowledged.
func (w *writer) finish(drain time.Duration) {
	w.giveUp.Store(time.Now().Add(drain).UnixNano())
	close(w.stop)
	w.wg.Wait()
}

func (w *writer) write(id string, start int) {
	wr := &write{id: id}
	w.mu.Lock()
	w.writes[id] = wr
	w.mu.Unlock()
	req := &ferrypb.BatchCreateEntryRequest{Entries: []*ferrypb.Entry{entryFor(id)}, RequestId: requestID(id)}
	for attempt := 0; time.Now().UnixNano() < w.giveUp.Load(); attempt++ {
		n := w.c.Nodes[int(w.attempt.Add(1)+int64(start))%len(w.c.Nodes)]
		if !n.Running() {
			continue
		}
		began := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), w.timeout)
		resp, err := n.Admin().BatchCreateEntry(ctx, req)
		cancel()
		if err != nil {
			code := status.Code(err)
			w.mu.Lock()
			w.failures[code]++
			// ResourceExhausted is shed before any work; anything else may
			// or may not have reached the log.
			if code != codes.ResourceExhausted {
				wr.ambiguous++
			}
			w.mu.Unlock()
			time.Sleep(20 * time.Millisecond)
			continue
		}
		w.mu.Lock()
		switch c := codes.Code(resp.Results[0].GetCode()); c {
		case codes.OK:
			wr.acked, wr.index = true, resp.Index
			w.oks = append(w.oks, span{began, time.Now()})
			if rand.IntN(4) == 0 {
				defer w.readBack(id)
			}
		case codes.AlreadyExists:
			wr.duplicates++
			w.problems = append(w.problems, fmt.Sprintf("write %s applied twice: retry answered %s %s", id, c, resp.Results[0].GetMessage()))
		default:
			w.problems = append(w.problems, fmt.Sprintf("write %s: %s %s", id, c, resp.Results[0].GetMessage()))
		}
		w.mu.Unlock()
		return
	}
}

// readBack reads an acknowledged write through a random node with a
// linearizable read, which must see it: a node that answers NotFound served a
// stale read (a deposed leader, or a follower behind). A read the node refuses
// or does not answer in time is no answer, not a violation.
func (w *writer) readBack(id string) {
	n := w.c.Nodes[rand.IntN(len(w.c.Nodes))]
	if !n.Running() {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), w.timeout)
	defer cancel()
	_, err := n.Admin().GetEntry(ctx, &ferrypb.GetEntryRequest{Id: id, Consistency: ferrypb.ReadConsistency_READ_LINEARIZABLE})
	switch status.Code(err) {
	case codes.OK:
		w.readsServed.Add(1)
	case codes.NotFound:
		w.readsStale.Add(1)
		w.mu.Lock()
		w.problems = append(w.problems, fmt.Sprintf("stale read: %s answered NotFound for acknowledged write %s", n.ID, id))
		w.mu.Unlock()
	default:
		w.readsFailed.Add(1)
	}
}

func (w *writer) acked() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	n := 0
	for _, wr := range w.writes {
		if wr.acked {
			n++
		}
	}
	return n
}

// resumedAfter is how long after t the first write attempt begun after t was
// acknowledged; false when none was. The caller holds w.mu.
func (w *writer) resumedAfter(t time.Time) (time.Duration, bool) {
	var best time.Time
	for _, s := range w.oks {
		if s.start.After(t) && (best.IsZero() || s.end.Before(best)) {
			best = s.end
		}
	}
	if best.IsZero() {
		return 0, false
	}
	return best.Sub(t), true
}

// ---- observer ----

// observer polls every node for its Raft term and whether it is leader, and
// records each (term, leader) it can prove: the leader gauge is read between
// two reads of the term that agree, so the node was leader in that term.
type observer struct {
	c    *testcluster.Cluster
	stop chan struct{}
	done chan struct{}

	mu      sync.Mutex
	leaders map[uint64]map[string]bool
	samples int
}

func newObserver(c *testcluster.Cluster) *observer {
	return &observer{c: c, leaders: map[uint64]map[string]bool{}}
}

func (o *observer) start(every time.Duration) {
	o.stop, o.done = make(chan struct{}), make(chan struct{})
	go func() {
		defer close(o.done)
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-o.stop:
				return
			case <-t.C:
			}
			var wg sync.WaitGroup
			for _, n := range o.c.Nodes {
				if !n.Running() {
					continue
				}
				wg.Add(1)
				go func() { defer wg.Done(); o.sample(n) }()
			}
			wg.Wait()
		}
	}()
}

func (o *observer) sample(n *testcluster.Node) {
	before, _, err := raftGauges(n)
	if err != nil {
		return
	}
	_, leader, err := raftGauges(n)
	if err != nil {
		return
	}
	after, _, err := raftGauges(n)
	if err != nil || after != before {
		return
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	o.samples++
	if leader {
		o.record(before, n.ID)
	}
}

func (o *observer) record(term uint64, id string) {
	if o.leaders[term] == nil {
		o.leaders[term] = map[string]bool{}
	}
	o.leaders[term][id] = true
}

func (o *observer) finish() {
	close(o.stop)
	<-o.done
}

var electionWon = regexp.MustCompile(`msg="election won".* term=(\d+)`)

// scanLogs adds every election each node's log says it won.
func (o *observer) scanLogs() (elections int, err error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	for _, n := range o.c.Nodes {
		f, err := os.Open(filepath.Join(n.Dir, "server.log"))
		if err != nil {
			return 0, err
		}
		sc := bufio.NewScanner(f)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			if m := electionWon.FindStringSubmatch(sc.Text()); m != nil {
				term, _ := strconv.ParseUint(m[1], 10, 64)
				o.record(term, n.ID)
				elections++
			}
		}
		f.Close()
		if err := sc.Err(); err != nil {
			return 0, err
		}
	}
	return elections, nil
}

// violations lists every term with more than one leader.
func (o *observer) violations() []string {
	o.mu.Lock()
	defer o.mu.Unlock()
	var out []string
	for term, ls := range o.leaders {
		if len(ls) > 1 {
			names := make([]string, 0, len(ls))
			for id := range ls {
				names = append(names, id)
			}
			sort.Strings(names)
			out = append(out, fmt.Sprintf("term %d: leaders %v", term, names))
		}
	}
	sort.Strings(out)
	return out
}

// ---- checks ----

// listEntries reads every entry from n's local state.
func listEntries(n *testcluster.Node) (map[string]*ferrypb.Entry, error) {
	out := map[string]*ferrypb.Entry{}
	req := &ferrypb.ListEntriesRequest{PageSize: 10000}
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		resp, err := n.Admin().ListEntries(ctx, req)
		cancel()
		if err != nil {
			return nil, fmt.Errorf("list entries on %s: %w", n.ID, err)
		}
		for _, e := range resp.Entries {
			if _, dup := out[e.Id]; dup {
				return nil, fmt.Errorf("node %s lists entry %s twice", n.ID, e.Id)
			}
			out[e.Id] = e
		}
		if resp.NextPageToken == "" {
			return out, nil
		}
		req.PageToken = resp.NextPageToken
	}
}

// stateHashes waits until every node reports the same applied index and
// returns each node's state hash at it.
func (h *harness) stateHashes(timeout time.Duration) (uint64, map[string]string) {
	h.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		idx := map[uint64]bool{}
		sums := map[string]string{}
		var index uint64
		ok := true
		for _, n := range h.c.Nodes {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			resp, err := n.Admin().StateHash(ctx, &ferrypb.StateHashRequest{})
			cancel()
			if err != nil {
				ok = false
				break
			}
			idx[resp.AppliedIndex] = true
			index = resp.AppliedIndex
			sums[n.ID] = fmt.Sprintf("%x", resp.Sha256)
		}
		if ok && len(idx) == 1 {
			return index, sums
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("nodes did not reach one applied index for the state hash in %s: %v", timeout, idx)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// report is what one run measured.
type report struct {
	nodes                 int
	logStore              string
	wall                  time.Duration
	kills, partitions     int
	pauses, restarts      int
	catchups, viaSnapshot int
	acked, writes         int
	ambiguousWrites       int // writes with at least one attempt of unknown outcome
	resolved              int // of those, later acknowledged
	unresolvedPresent     int // never acknowledged, but applied
	unresolvedAbsent      int // never acknowledged, not applied
	lost                  int
	duplicates            int
	wrongIndex            int
	divergent             int
	leaderViolations      []string
	terms, elections      int
	observations          int
	recheck               int
	election, resumed     []time.Duration
	failures              map[codes.Code]int
	stateIndex            uint64
	heals, healsMidFlight int64
	heldReleased          int64
	connsHeld, connsCut   int64
	readsServed           int64
	readsStale            int64
	readsFailed           int64
	workloads             *workloadReport
}

func percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	i := int(float64(len(s)-1)*p + 0.5)
	return s[i]
}

func (r *report) print(out io.Writer) {
	fmt.Fprintf(out, "chaos: %d nodes (%s), %s: %d leader kills, %d partition/heal cycles, %d pauses, %d full restarts, %d follower catch-ups (%d via snapshot)\n",
		r.nodes, r.logStore, r.wall.Round(time.Second), r.kills, r.partitions, r.pauses, r.restarts, r.catchups, r.viaSnapshot)
	fmt.Fprintf(out, "chaos:   writes: %d acknowledged, %d lost, %d applied twice, %d at another index; %d indeterminate (%d resolved by retry, %d unresolved: %d applied, %d not)\n",
		r.acked, r.lost, r.duplicates, r.wrongIndex, r.ambiguousWrites, r.resolved, r.unresolvedPresent+r.unresolvedAbsent, r.unresolvedPresent, r.unresolvedAbsent)
	fmt.Fprintf(out, "chaos:   linearizable reads of acknowledged writes: %d served, %d stale, %d refused or timed out\n", r.readsServed, r.readsStale, r.readsFailed)
	fmt.Fprintf(out, "chaos:   failover: new leader p50 %s p99 %s (n=%d); writes resumed p50 %s p99 %s (n=%d)\n",
		percentile(r.election, .5).Round(time.Millisecond), percentile(r.election, .99).Round(time.Millisecond), len(r.election),
		percentile(r.resumed, .5).Round(time.Millisecond), percentile(r.resumed, .99).Round(time.Millisecond), len(r.resumed))
	fmt.Fprintf(out, "chaos:   network: %d heals, %d of them with RPCs held mid-flight (%d held reads released late); %d connections held, %d cut\n",
		r.heals, r.healsMidFlight, r.heldReleased, r.connsHeld, r.connsCut)
	fmt.Fprintf(out, "chaos:   state: %d nodes hash equal at index %d (%d divergent); leaders: %d terms seen, %d elections logged, %d polls, %d terms with two leaders; %d retried request IDs answered with their first index\n",
		r.nodes-r.divergent, r.stateIndex, r.divergent, r.terms, r.elections, r.observations, len(r.leaderViolations), r.recheck)
	var codesSeen []string
	for c, n := range r.failures {
		codesSeen = append(codesSeen, fmt.Sprintf("%s=%d", c, n))
	}
	sort.Strings(codesSeen)
	fmt.Fprintf(out, "chaos:   failed attempts (retried): %s\n", strings.Join(codesSeen, " "))
	if r.workloads != nil {
		r.workloads.print(out)
	}
}
