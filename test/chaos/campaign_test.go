package chaos_test

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/test/chaos"
	"github.com/ferry-id/ferry/test/testcluster"
)

// campaign is what one run of the nemesis does. Every count can be set from
// the environment (see envCampaign); `make chaos` runs the defaults.
type campaign struct {
	nodes      int
	logStore   string
	kills      int // SIGKILL the leader, restart it
	partitions int // cut the leader into a minority, heal
	pauses     int // SIGSTOP/SIGCONT the leader or a random node
	restarts   int // SIGKILL every node at once, start them all
	catchups   int // a follower down until the leader compacted past it
	duration   time.Duration
	writers    int
	agents     int // agents, each serving one workload that also exchanges tokens at a bridge
	seed       uint64
}

func envInt(t *testing.T, name string, def int) int {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 0 {
		t.Fatalf("%s=%q: want a count", name, v)
	}
	return n
}

// envCampaign reads CHAOS_KILLS, CHAOS_PARTITIONS, CHAOS_PAUSES,
// CHAOS_RESTARTS, CHAOS_CATCHUPS, CHAOS_DURATION (keep faulting at least this
// long), CHAOS_WRITERS, CHAOS_AGENTS and CHAOS_SEED over the defaults given.
func envCampaign(t *testing.T, def campaign) campaign {
	c := def
	c.kills = envInt(t, "CHAOS_KILLS", c.kills)
	c.partitions = envInt(t, "CHAOS_PARTITIONS", c.partitions)
	c.pauses = envInt(t, "CHAOS_PAUSES", c.pauses)
	c.restarts = envInt(t, "CHAOS_RESTARTS", c.restarts)
	c.catchups = envInt(t, "CHAOS_CATCHUPS", c.catchups)
	c.writers = envInt(t, "CHAOS_WRITERS", c.writers)
	c.agents = envInt(t, "CHAOS_AGENTS", c.agents)
	c.seed = uint64(envInt(t, "CHAOS_SEED", int(time.Now().UnixNano()%1e9)))
	if v := os.Getenv("CHAOS_DURATION"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			t.Fatalf("CHAOS_DURATION: %v", err)
		}
		c.duration = d
	}
	return c
}

func skipUnlessChaos(t *testing.T) {
	if testing.Short() {
		t.Skip("chaos campaign: starts real server processes")
	}
	if os.Getenv("FERRY_CHAOS") == "" {
		t.Skip("chaos campaign: set FERRY_CHAOS=1 (make chaos)")
	}
}

// TestChaos runs the campaign on a 3-node cluster (raft-boltdb, where a
// compacted log forces snapshot installs) and on a 5-node one (raft-wal, the
// default store). CHAOS_NODES=3 or =5 runs one of them.
func TestChaos(t *testing.T) {
	skipUnlessChaos(t)
	runs := []campaign{
		{nodes: 3, logStore: "boltdb", kills: 20, partitions: 20, pauses: 4, restarts: 1, catchups: 1, writers: 8, agents: 2},
		{nodes: 5, logStore: "wal", kills: 5, partitions: 5, pauses: 2, restarts: 1, catchups: 1, writers: 8, agents: 2},
	}
	only := os.Getenv("CHAOS_NODES")
	for _, def := range runs {
		if only != "" && only != strconv.Itoa(def.nodes) {
			continue
		}
		t.Run(fmt.Sprintf("%d-nodes", def.nodes), func(t *testing.T) {
			c := envCampaign(t, def)
			t.Logf("seed %d (CHAOS_SEED=%d reproduces the fault schedule)", c.seed, c.seed)
			r := runCampaign(t, c)
			r.print(os.Stdout)
			r.check(t)
		})
	}
}

func (r *report) check(t *testing.T) {
	t.Helper()
	if r.lost != 0 || r.duplicates != 0 || r.wrongIndex != 0 || r.divergent != 0 || len(r.leaderViolations) != 0 || r.readsStale != 0 {
		t.Errorf("safety violated: %d lost, %d applied twice, %d at another index, %d divergent nodes, %d stale reads, two leaders in: %v",
			r.lost, r.duplicates, r.wrongIndex, r.divergent, r.readsStale, r.leaderViolations)
	}
	if r.acked == 0 {
		t.Errorf("no write was acknowledged")
	}
	if wr := r.workloads; wr != nil {
		if wr.expired != 0 || wr.wrongIDSeen != 0 || wr.refusedByAgent != 0 {
			t.Errorf("a workload was without a valid SVID: %d fetches saw it expired, %d saw another ID, %d were refused: %v",
				wr.expired, wr.wrongIDSeen, wr.refusedByAgent, wr.failReasons)
		}
		if wr.recovered != wr.faults {
			t.Errorf("token exchanges did not succeed again after %d of %d faults", wr.faults-wr.recovered, wr.faults)
		}
		if wr.exchangesOK == 0 {
			t.Errorf("no token exchange succeeded")
		}
	}
}

func runCampaign(t *testing.T, c campaign) *report {
	began := time.Now()
	h := newHarness(t, c.nodes, c.logStore, c.seed)
	h.w = newWriter(h.c, fmt.Sprintf("n%d-", c.nodes))
	var wl *workloads
	if c.agents > 0 {
		wl = startWorkloads(h, c.agents)
		wl.run()
	}
	h.obs.start(200 * time.Millisecond)
	h.w.start(c.writers, 5*time.Millisecond)
	r := &report{nodes: c.nodes, logStore: c.logStore}

	var steps []string
	add := func(kind string, n int) {
		for range n {
			steps = append(steps, kind)
		}
	}
	add("kill", c.kills)
	add("partition", c.partitions)
	add("pause", c.pauses)
	add("restart", c.restarts)
	add("catchup", c.catchups)
	h.rng.Shuffle(len(steps), func(i, j int) { steps[i], steps[j] = steps[j], steps[i] })
	kinds := []string{"kill", "partition", "pause"}
	for i := 0; i < len(steps) || time.Since(began) < c.duration; i++ {
		kind := ""
		if i < len(steps) {
			kind = steps[i]
		} else {
			kind = kinds[h.rng.IntN(len(kinds))]
		}
		switch kind {
		case "kill":
			h.killLeader()
			r.kills++
		case "partition":
			h.partitionLeader(r.partitions)
			r.partitions++
		case "pause":
			h.pauseNode(r.pauses)
			r.pauses++
		case "restart":
			h.restartAll()
			r.restarts++
		case "catchup":
			if h.catchUp() {
				r.viaSnapshot++
			}
			r.catchups++
		}
		t.Logf("step %d %s done (%d writes acknowledged)", i+1, kind, h.w.acked())
	}

	// Quiesce: stop writing, give unacknowledged writes time to resolve, heal
	// and restart everything, and let every node apply the whole log.
	h.net.Heal()
	h.settle()
	h.w.finish(30 * time.Second)
	h.obs.finish()
	h.settle()
	if wl != nil {
		// A last round of exchanges, after every fault.
		time.Sleep(2 * time.Second)
		wl.finish()
		r.workloads = wl.report(h.faults)
	}
	r.wall = time.Since(began)
	r.heals, r.healsMidFlight, r.heldReleased = h.net.HealCounts()
	_, r.connsHeld, r.connsCut = h.net.Counts()
	r.readsServed, r.readsStale, r.readsFailed = h.w.readsServed.Load(), h.w.readsStale.Load(), h.w.readsFailed.Load()
	h.verify(r)
	if c.logStore == "boltdb" && c.catchups > 0 && r.viaSnapshot == 0 {
		t.Errorf("no catch-up installed a snapshot although the leader's log was compacted past the follower")
	}
	return r
}

// ---- faults ----

func (h *harness) record(kind string, at time.Time, old, nw *testcluster.Node, election time.Duration) {
	fr := faultRecord{kind: kind, at: at, old: old.ID, election: election}
	if nw != nil {
		fr.new = nw.ID
	}
	h.faults = append(h.faults, fr)
}

// killLeader SIGKILLs the leader, waits for another, and restarts the old one.
func (h *harness) killLeader() {
	old := h.settle()
	at := time.Now()
	old.Kill()
	nw := h.waitLeader(h.others(old), nil, 30*time.Second)
	h.record("kill", at, old, nw, time.Since(at))
	old.Start()
}

// partitionLeader cuts the leader (and, with five nodes, one follower) off from
// the majority while clients keep writing to every node, the old leader
// included. Even cycles heal once the majority has a new leader; odd ones heal
// at a random moment 0.2-1.5s after the cut, often before the majority has
// elected anyone, while the old leader still has AppendEntries in flight. With
// a blackhole those RPCs are held, not dropped, and land after the heal, late
// and from an old term (hashicorp/raft #695's trigger). Every fourth cycle
// resets the connections instead.
func (h *harness) partitionLeader(cycle int) {
	old := h.settle()
	minority := []*testcluster.Node{old}
	if len(h.c.Nodes) >= 5 {
		rest := h.others(old)
		minority = append(minority, rest[h.rng.IntN(len(rest))])
	}
	majority := h.others(minority...)
	mode := chaos.Blackhole
	if cycle%4 == 3 {
		mode = chaos.Reset
	}
	at := time.Now()
	h.net.Partition(mode, ids(minority), ids(majority))
	if cycle%2 == 0 {
		nw := h.waitLeader(majority, nil, 30*time.Second)
		h.record("partition", at, old, nw, time.Since(at))
		time.Sleep(time.Duration(h.rng.IntN(500)) * time.Millisecond)
	} else {
		time.Sleep(200*time.Millisecond + time.Duration(h.rng.IntN(1300))*time.Millisecond)
	}
	h.net.Heal()
}

// pauseNode SIGSTOPs the leader (even calls) until another is elected, or a
// random node (odd calls) for 1.5s, then SIGCONTs it.
func (h *harness) pauseNode(i int) {
	old := h.settle()
	if i%2 == 0 {
		at := time.Now()
		h.pause(old)
		nw := h.waitLeader(h.others(old), nil, 30*time.Second)
		h.record("pause", at, old, nw, time.Since(at))
		time.Sleep(500 * time.Millisecond)
		h.resume(old)
		return
	}
	n := h.c.Nodes[h.rng.IntN(len(h.c.Nodes))]
	h.pause(n)
	time.Sleep(1500 * time.Millisecond)
	h.resume(n)
}

// restartAll SIGKILLs every node at once and starts them all again.
func (h *harness) restartAll() {
	old := h.settle()
	at := time.Now()
	for _, n := range h.c.Nodes {
		n.Kill()
	}
	for _, n := range h.c.Nodes {
		n.Start()
	}
	nw := h.waitLeader(h.c.Nodes, nil, 60*time.Second)
	h.record("restart", at, old, nw, time.Since(at))
}

// catchUp keeps a follower down while the leader's log moves past its
// snapshot threshold and trailing window, then restarts it and waits until it
// has caught up. It reports whether the follower installed a snapshot.
func (h *harness) catchUp() bool {
	l := h.settle()
	f := h.others(l)[h.rng.IntN(len(h.c.Nodes)-1)]
	installs := strings.Count(f.LogTail(1<<30), "Installed remote snapshot")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	before, err := l.Admin().ClusterList(ctx, &ferrypb.ClusterListRequest{})
	cancel()
	if err != nil {
		h.t.Fatalf("cluster list on leader %s: %v", l.ID, err)
	}
	f.Kill()
	// Past the snapshot threshold (256) and the trailing logs (128), with room
	// for the snapshot interval.
	target := before.CommitIndex + 256 + 128 + 256
	deadline := time.Now().Add(120 * time.Second)
	for {
		l = h.waitLeader(h.others(f), nil, 30*time.Second)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		now, err := l.Admin().ClusterList(ctx, &ferrypb.ClusterListRequest{})
		cancel()
		if err == nil && now.CommitIndex >= target {
			break
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("the log did not reach index %d in time for the catch-up", target)
		}
		time.Sleep(200 * time.Millisecond)
	}
	time.Sleep(2500 * time.Millisecond) // a snapshot interval or two
	at := time.Now()
	f.Start()
	h.settle()
	h.t.Logf("follower %s caught up from index %d in %s", f.ID, before.CommitIndex, time.Since(at).Round(time.Millisecond))
	return strings.Count(f.LogTail(1<<30), "Installed remote snapshot") > installs
}

// ---- verification ----

func (h *harness) verify(r *report) {
	t := h.t
	w := h.w
	w.mu.Lock()
	defer w.mu.Unlock()
	r.writes = len(w.writes)
	r.failures = w.failures
	for _, p := range w.problems {
		t.Error(p)
	}

	// Every acknowledged write on every node, applied once at the index its
	// acknowledgement named; nothing on any node that no client wrote.
	counts := map[int]int{}
	present := map[string]bool{}
	for _, n := range h.c.Nodes {
		entries, err := listEntries(n)
		if err != nil {
			t.Fatal(err)
		}
		counts[len(entries)]++
		for id, e := range entries {
			if strings.HasPrefix(id, "workload-") {
				continue // the campaign's workloads, not a writer's
			}
			wr, ok := w.writes[id]
			if !ok {
				t.Errorf("node %s holds entry %s that no client wrote", n.ID, id)
				continue
			}
			present[id] = true
			if wr.acked && e.CreatedIndex != wr.index {
				r.wrongIndex++
				t.Errorf("node %s: entry %s created at index %d, acknowledged at %d", n.ID, id, e.CreatedIndex, wr.index)
			}
		}
		for id, wr := range w.writes {
			if wr.acked && entries[id] == nil {
				r.lost++
				t.Errorf("node %s lost acknowledged write %s (index %d)", n.ID, id, wr.index)
			}
		}
	}
	if len(counts) != 1 {
		t.Errorf("nodes hold different numbers of entries: %v", counts)
	}
	for _, wr := range w.writes {
		if wr.acked {
			r.acked++
		}
		r.duplicates += wr.duplicates
		if wr.ambiguous > 0 {
			r.ambiguousWrites++
			switch {
			case wr.acked:
				r.resolved++
			case present[wr.id]:
				r.unresolvedPresent++
			default:
				r.unresolvedAbsent++
			}
		}
	}

	// Retried request IDs, through any node, are answered with their first
	// result: a sample of acknowledged writes, sent again.
	i := 0
	for id, wr := range w.writes {
		if !wr.acked || i >= 200 {
			continue
		}
		n := h.c.Nodes[i%len(h.c.Nodes)]
		i++
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		resp, err := n.Admin().BatchCreateEntry(ctx, &ferrypb.BatchCreateEntryRequest{Entries: []*ferrypb.Entry{entryFor(id)}, RequestId: requestID(id)})
		cancel()
		if err != nil {
			t.Errorf("retry of %s on %s: %v", id, n.ID, err)
			continue
		}
		if c := codes.Code(resp.Results[0].GetCode()); c != codes.OK || resp.Index != wr.index {
			r.duplicates++
			t.Errorf("retry of %s on %s answered %s at index %d, first answer was index %d", id, n.ID, c, resp.Index, wr.index)
			continue
		}
		r.recheck++
	}

	// Identical state on every node.
	index, sums := h.stateHashes(60 * time.Second)
	r.stateIndex = index
	groups := map[string][]string{}
	for id, s := range sums {
		groups[s] = append(groups[s], id)
	}
	if len(groups) != 1 {
		biggest := 0
		for _, g := range groups {
			biggest = max(biggest, len(g))
		}
		r.divergent = len(h.c.Nodes) - biggest
		t.Errorf("state diverged at index %d: %v", index, groups)
	}

	// At most one leader per term.
	elections, err := h.obs.scanLogs()
	if err != nil {
		t.Fatal(err)
	}
	r.elections = elections
	r.terms = len(h.obs.leaders)
	r.observations = h.obs.samples
	r.leaderViolations = h.obs.violations()

	// Failover figures.
	for _, f := range h.faults {
		if f.kind == "restart" {
			continue
		}
		r.election = append(r.election, f.election)
		if d, ok := w.resumedAfter(f.at); ok {
			r.resumed = append(r.resumed, d)
		}
	}
}
