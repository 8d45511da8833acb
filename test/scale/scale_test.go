package scale_test

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/ferry-id/ferry/agent/session"
	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/test/testcluster"
)

// TestScale runs the fleet against real `ferry server` processes and prints
// the figures. It fails on a correctness violation (an agent sent an entry it
// may not have, missing or stale entries once writes have settled, a
// workload SVID naming the wrong ID or left to expire, a write refused for
// another reason than overload), never on a timing.
func TestScale(t *testing.T) {
	if os.Getenv("FERRY_SCALE") == "" {
		t.Skip("set FERRY_SCALE=1 (make scale) to run the scale harness")
	}
	cfg := loadConfig(t)
	raiseFileLimit(t, cfg.Agents)
	rep := &report{Config: cfg, Load: loadAvg()}
	defer rep.print(t)
	rep.add("machine: CPU a spinning thread gets (neighbours' load)", fmt.Sprintf("%.0f%% of a core", 100*cpuShare()), "")
	defer func() {
		rep.add("machine at the end: CPU a spinning thread gets", fmt.Sprintf("%.0f%% of a core", 100*cpuShare()), "")
	}()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	dir := t.TempDir()
	ca, caPath := newNodeCA(t, dir)
	extra := fmt.Sprintf("x509pop {\n    ca_bundle_file = %q\n  }\n  ca {\n    agent_svid_ttl = %q\n  }\n", caPath, cfg.AgentTTL)
	c := testcluster.New(t, testcluster.Options{Nodes: cfg.Nodes, LogLevel: "warn", ExtraServerConfig: extra, RaftMultiplier: cfg.RaftMultiplier})
	leader := c.WaitLeader(30*time.Second, nil)
	h := &harness{t: t, c: c, cfg: cfg, model: map[string]*ferrypb.Entry{}}
	h.waitBundle()
	base := measure(t, leader, true)
	rep.add("server at start: live heap / RSS", mib(base.Heap)+" / "+mib(base.RSS), "")

	// The fleet: x509pop agents get node certificates, join-token agents tokens.
	f := &fleet{t: t, cfg: cfg, dir: dir, rootFP: x509popFingerprint(ca.cert)}
	h.f = f
	joins := 0
	for i := range cfg.Agents {
		a := &simAgent{f: f, idx: i, pop: float64(i%100) >= 100*cfg.JoinShare, group: i % cfg.Groups}
		adir := filepath.Join(dir, fmt.Sprintf("a%05d", i))
		if err := os.MkdirAll(adir, 0o700); err != nil {
			t.Fatal(err)
		}
		if a.pop {
			a.att, a.id = ca.issue(t, adir, i, a.group)
		} else {
			a.id = fmt.Sprintf("spiffe://%s/spire/agent/scale/a%05d", trustDomain, i)
			joins++
		}
		f.agents = append(f.agents, a)
	}

	// Entries first: the aliases, then each agent's, the groups', the fleet's
	// and the idle ones.
	var entries []*ferrypb.Entry
	for g := range cfg.Groups {
		entries = append(entries, &ferrypb.Entry{Id: fmt.Sprintf("alias-g%03d", g), SpiffeId: groupID(g), ParentId: serverID,
			Selectors: []*ferrypb.Selector{{Type: "x509pop", Value: fmt.Sprintf("san:group:g%03d", g)}}})
	}
	entries = append(entries, &ferrypb.Entry{Id: "alias-fleet", SpiffeId: fleetID, ParentId: serverID,
		Selectors: []*ferrypb.Selector{{Type: "x509pop", Value: "ca:fingerprint:" + f.rootFP}}})
	for _, a := range f.agents {
		for n := range cfg.EntriesPerAgent {
			entries = append(entries, workloadEntry(ownEntry(a.idx, n), fmt.Sprintf("a%05d/w%03d", a.idx, n), a.id, n, cfg.SVIDTTL))
		}
	}
	for g := range cfg.Groups {
		for n := range cfg.GroupEntries {
			entries = append(entries, workloadEntry(groupEntry(g, n), fmt.Sprintf("g%03d/w%03d", g, n), groupID(g), n, cfg.SVIDTTL))
		}
	}
	for n := range cfg.FleetEntries {
		entries = append(entries, workloadEntry(fleetEntry(n), fmt.Sprintf("fleet/w%03d", n), fleetID, n, cfg.SVIDTTL))
	}
	for n := range cfg.IdleEntries {
		entries = append(entries, workloadEntry(fmt.Sprintf("i%06d", n), fmt.Sprintf("idle/w%06d", n),
			fmt.Sprintf("spiffe://%s/spire/agent/scale/idle%05d", trustDomain, n/100), n%100, cfg.SVIDTTL))
	}
	start := time.Now()
	h.create(entries, 1000, 4)
	took := time.Since(start)
	rep.add(fmt.Sprintf("create %d entries (batches of 1,000, 4 writers)", len(entries)),
		fmt.Sprintf("%s (%.0f entries/s)", ms(took), float64(len(entries))/took.Seconds()), "")
	withEntries := measure(t, leader, true)
	perEntry := float64(withEntries.Heap-base.Heap) / float64(len(entries))
	rep.add(fmt.Sprintf("live heap with %d entries", len(entries)), fmt.Sprintf("%s (%s per entry); RSS %s", mib(withEntries.Heap), kib(perEntry), mib(withEntries.RSS)), "<= 1 KiB per entry")

	// Writes before any agent streams, to compare with writes while they do.
	if cfg.Writes > 0 {
		d, rate := h.writes(cfg.Writes, cfg.Writers)
		rep.add(fmt.Sprintf("entry writes, no agent connected (%d writers)", cfg.Writers), fmt.Sprintf("%.0f/s; %s", rate, d), "")
	}

	// Join tokens, created concurrently, then every agent attests (at most
	// AttestParallel at once) and follows its entry stream.
	if joins > 0 {
		start = time.Now()
		h.joinTokens()
		rep.add(fmt.Sprintf("create %d join tokens (32 at once)", joins), ms(time.Since(start)), "")
	}
	before := measure(t, leader, false)
	start = time.Now()
	h.startAgents(ctx)
	took = time.Since(start)
	after := measure(t, leader, false)
	rep.add(fmt.Sprintf("attest %d agents (%d at once) to first SVID", cfg.Agents, cfg.AttestParallel),
		fmt.Sprintf("%s (%.0f/s); server CPU %s, driver CPU %s", ms(took), float64(cfg.Agents)/took.Seconds(), ms(after.CPU-before.CPU), ms(after.Driver-before.Driver)), "")
	for _, a := range f.agents {
		go a.workload(ctx)
	}
	took = h.converge(5*time.Minute) + took
	rep.add("all agents hold exactly their entries", ms(took)+" after the first attestation", "")
	h.waitWorkloads(5 * time.Minute)

	// At rest.
	rest0 := measure(t, leader, false)
	if cfg.Profile != "" {
		h.saveProfile(leader, fmt.Sprintf("profile?seconds=%d", int(cfg.Rest.Seconds())), "cpu-rest.pb.gz")
	} else {
		time.Sleep(cfg.Rest) // a measurement window, not synchronisation
	}
	rest1 := measure(t, leader, true)
	// Per agent connected to the node measured: its connection and stream,
	// and (in the same delta) every agent's node row.
	here := 0
	for _, a := range f.agents {
		a.mu.Lock()
		if a.server == leader.AgentAddr {
			here++
		}
		a.mu.Unlock()
	}
	perAgent := float64(rest1.Heap-withEntries.Heap) / float64(max(here, 1))
	rep.add(fmt.Sprintf("live heap with %d agents connected (%d of them to this node)", cfg.Agents, here), fmt.Sprintf("%s (%s per agent connected here); RSS %s (%s per agent connected here)",
		mib(rest1.Heap), kib(perAgent), mib(rest1.RSS), kib(float64(rest1.RSS-withEntries.RSS)/float64(max(here, 1)))), "<= 20 KiB per agent")
	rep.add(fmt.Sprintf("CPU at rest over %s", cfg.Rest), fmt.Sprintf("server %.1f%% of a core, driver %.1f%%",
		100*float64(rest1.CPU-rest0.CPU)/float64(cfg.Rest), 100*float64(rest1.Driver-rest0.Driver)/float64(cfg.Rest)), "")
	for _, n := range c.Nodes[1:] {
		u := measure(t, n, true)
		rep.add("follower "+n.ID+": live heap / RSS", mib(u.Heap)+" / "+mib(u.RSS), "")
	}

	// Fan-out: a change to an entry every x509pop agent receives.
	pops := 0
	for _, a := range f.agents {
		if a.pop {
			pops++
		}
	}
	if cfg.FleetEntries > 0 && pops > 0 {
		var all []time.Duration
		var prof sync.WaitGroup
		if cfg.Profile != "" {
			prof.Add(1)
			go func() { defer prof.Done(); h.saveProfile(leader, "profile?seconds=5", "cpu-fanout.pb.gz") }()
		}
		u0 := measure(t, leader, false)
		for range cfg.FanoutProbes {
			lat := h.timeUpdate(fleetEntry(0), pops, 2*time.Minute)
			all = append(all, lat...)
		}
		u1 := measure(t, leader, false)
		prof.Wait()
		rep.add(fmt.Sprintf("fan-out: a fleet entry change reaches all %d x509pop agents", pops), summarise(all).String()+
			fmt.Sprintf("; server CPU %s per change", ms((u1.CPU-u0.CPU)/time.Duration(cfg.FanoutProbes))), "p99 < 1 s")
	}

	// A change for one agent while every agent streams.
	if cfg.Probes > 0 {
		var all []time.Duration
		for range cfg.Probes {
			a := f.agents[mrand.N(len(f.agents))]
			all = append(all, h.timeUpdate(ownEntry(a.idx, 1%cfg.EntriesPerAgent), 1, time.Minute)...)
		}
		rep.add(fmt.Sprintf("a change for one agent, %d agents connected", cfg.Agents), summarise(all).String(), "p99 < 100 ms")
	}
	if cfg.Profile != "" {
		h.saveProfile(leader, "heap?gc=1", "heap-rest.pb.gz")
	}
	if cfg.Writes > 0 {
		var prof sync.WaitGroup
		if cfg.Profile != "" {
			prof.Add(1)
			go func() { defer prof.Done(); h.saveProfile(leader, "profile?seconds=5", "cpu-writes.pb.gz") }()
		}
		d, rate := h.writes(cfg.Writes, cfg.Writers)
		prof.Wait()
		rep.add(fmt.Sprintf("entry writes, %d agents streaming (%d writers)", cfg.Agents, cfg.Writers), fmt.Sprintf("%.0f/s; %s", rate, d), "")
	}
	h.converge(5 * time.Minute)

	// Churn: entries created and deleted, round after round; the server's
	// memory must come back.
	if cfg.Churn > 0 {
		for r := range cfg.ChurnRounds {
			var batch []*ferrypb.Entry
			for n := range cfg.Churn {
				batch = append(batch, workloadEntry(fmt.Sprintf("i-churn%d-%06d", r, n), fmt.Sprintf("churn/w%06d", n),
					fmt.Sprintf("spiffe://%s/spire/agent/scale/churn%05d", trustDomain, n/100), n%100, 0))
			}
			released := h.released(leader)
			start := time.Now()
			h.create(batch, 1000, 4)
			loaded := measure(t, leader, false)
			h.delete(batch, 1000)
			took := time.Since(start)
			// The server returns free memory once writes have stopped for
			// a second: RSS is measured after that.
			after := "after the server returned free memory"
			if !h.waitReleased(leader, released) {
				after = "10 s after (the server returned no memory: the burst was under 1 MiB of log, or writes did not pause)"
			}
			u := measure(t, leader, true)
			rep.add(fmt.Sprintf("churn round %d: %d entries created and deleted", r+1, cfg.Churn),
				fmt.Sprintf("%s; RSS %s loaded, %s %s; live heap %s", ms(took), mib(loaded.RSS), mib(u.RSS), after, mib(u.Heap)), "RSS returns")
		}
		h.converge(5 * time.Minute)
	}

	// CSR storm: every agent signs CSRs for its own entries at once, as after
	// a partition heals; a shed call is retried with backoff.
	h.storm(rep)
	h.converge(5 * time.Minute)

	// Restarts and failover.
	if cfg.Nodes == 1 {
		h.restartOne(rep, leader)
	} else {
		h.failover(rep)
		h.restartAll(rep)
	}
	h.converge(5 * time.Minute)

	if cfg.Profile != "" {
		for _, n := range c.Nodes {
			if data, err := os.ReadFile(filepath.Join(n.Dir, "server.log")); err == nil {
				_ = os.WriteFile(filepath.Join(cfg.Profile, n.ID+".log"), data, 0o644)
			}
		}
	}
	final := measure(t, leader, false)
	rep.add("driver CPU, whole run", ms(final.Driver), "")
	rep.add("workload SVIDs signed / failed attempts (shed)", fmt.Sprintf("%d / %d (%d)", f.signed.Load(), f.signFailures.Load(), f.shed.Load()), "")
	rep.add("session warnings (of which ResourceExhausted)", fmt.Sprintf("%d (%d)", f.logWarn.Load(), f.logShed.Load()), "")
	rep.add("entry changes applied by agents", fmt.Sprint(f.updates.Load()), "")
	rep.add("correctness violations", fmt.Sprint(f.violations.Load()), "0")
	if n := f.violations.Load(); n > 0 {
		t.Errorf("%d correctness violations; first: %s", n, strings.Join(f.firstViolate, "\n  "))
	}
}

// harness drives the cluster and the fleet.
type harness struct {
	t   testing.TB
	c   *testcluster.Cluster
	cfg config
	f   *fleet

	mu     sync.Mutex
	model  map[string]*ferrypb.Entry // the entries as last acknowledged
	tokens map[int]string
	bundle []*x509.Certificate
}

func workloadEntry(id, path, parent string, n, ttl int) *ferrypb.Entry {
	return &ferrypb.Entry{Id: id, SpiffeId: fmt.Sprintf("spiffe://%s/scale/%s", trustDomain, path), ParentId: parent,
		Selectors: []*ferrypb.Selector{{Type: "unix", Value: fmt.Sprintf("uid:%d", 1000+n)}}, X509SvidTtl: int32(ttl)}
}

func (h *harness) leader() *testcluster.Node { return h.c.WaitLeader(60*time.Second, nil) }

func (h *harness) waitBundle() {
	deadline := time.Now().Add(60 * time.Second)
	for {
		out, err := h.leader().CLI("bundle", "show")
		if err == nil && strings.Count(out, "BEGIN CERTIFICATE") >= len(h.c.Nodes) {
			rest := []byte(out)
			for {
				var b *pem.Block
				b, rest = pem.Decode(rest)
				if b == nil {
					break
				}
				cert, err := x509.ParseCertificate(b.Bytes)
				if err != nil {
					h.t.Fatal(err)
				}
				h.bundle = append(h.bundle, cert)
			}
			return
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("bundle: %v %s", err, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// call runs an admin write on the leader, retrying what a client retries
// (overload, a leader change) with the same request ID, so it applies once.
func (h *harness) call(what string, f func(ctx context.Context, admin ferrypb.AdminClient) (*ferrypb.BatchEntryResponse, error)) *ferrypb.BatchEntryResponse {
	for attempt := 0; ; attempt++ {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		resp, err := f(ctx, h.leader().Admin())
		cancel()
		if err == nil {
			for i, r := range resp.Results {
				if codes.Code(r.Code) != codes.OK {
					h.t.Fatalf("%s: result %d: %s %s", what, i, codes.Code(r.Code), r.Message)
				}
			}
			h.mu.Lock()
			for _, e := range resp.Entries {
				if e != nil {
					h.model[e.Id] = e
				}
			}
			h.mu.Unlock()
			return resp
		}
		switch status.Code(err) {
		case codes.ResourceExhausted, codes.Unavailable, codes.DeadlineExceeded, codes.Aborted:
			if attempt < 50 {
				time.Sleep(backoff(attempt))
				continue
			}
		}
		h.t.Fatalf("%s: %v", what, err)
	}
}

var requestSeq atomic.Int64

func requestID() string { return fmt.Sprintf("scale-%d-%d", time.Now().UnixNano(), requestSeq.Add(1)) }

// create writes entries in batches of size, with workers writers.
func (h *harness) create(entries []*ferrypb.Entry, size, workers int) {
	batches := make(chan []*ferrypb.Entry)
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for b := range batches {
				req := &ferrypb.BatchCreateEntryRequest{Entries: b, RequestId: requestID()}
				h.call("create", func(ctx context.Context, admin ferrypb.AdminClient) (*ferrypb.BatchEntryResponse, error) {
					return admin.BatchCreateEntry(ctx, req)
				})
			}
		}()
	}
	for len(entries) > 0 {
		k := min(size, len(entries))
		batches <- entries[:k]
		entries = entries[k:]
	}
	close(batches)
	wg.Wait()
	if h.t.Failed() {
		h.t.FailNow()
	}
}

func (h *harness) delete(entries []*ferrypb.Entry, size int) {
	for len(entries) > 0 {
		k := min(size, len(entries))
		ids := make([]string, k)
		for i, e := range entries[:k] {
			ids[i] = e.Id
		}
		entries = entries[k:]
		req := &ferrypb.BatchDeleteEntryRequest{Ids: ids, RequestId: requestID()}
		h.call("delete", func(ctx context.Context, admin ferrypb.AdminClient) (*ferrypb.BatchEntryResponse, error) {
			return admin.BatchDeleteEntry(ctx, req)
		})
		h.mu.Lock()
		for _, id := range ids {
			delete(h.model, id)
		}
		h.mu.Unlock()
	}
}

// update changes entry id's hint and returns its new revision.
func (h *harness) update(id string) uint64 {
	h.mu.Lock()
	e := proto.Clone(h.model[id]).(*ferrypb.Entry)
	h.mu.Unlock()
	e.Hint = fmt.Sprintf("h%d", requestSeq.Add(1))
	req := &ferrypb.BatchUpdateEntryRequest{Entries: []*ferrypb.Entry{e}, RequestId: requestID()}
	resp := h.call("update", func(ctx context.Context, admin ferrypb.AdminClient) (*ferrypb.BatchEntryResponse, error) {
		return admin.BatchUpdateEntry(ctx, req)
	})
	return resp.Entries[0].Revision
}

// timeUpdate updates entry id and returns how long each of the n agents
// that hold it took to receive the change.
func (h *harness) timeUpdate(id string, n int, timeout time.Duration) []time.Duration {
	lat, err := h.f.timeChange(id, n, timeout, func() (uint64, error) { return h.update(id), nil })
	if err != nil {
		h.t.Fatal(err)
	}
	return lat
}

// writes runs n single-entry updates of agents' own entries with w writers
// and returns their latency and rate.
func (h *harness) writes(n, w int) (dist, float64) {
	var mu sync.Mutex
	var lat []time.Duration
	// Writer k updates the entries of agents k, k+w, ...: an update names the
	// revision it replaces, so two writers never race on one entry.
	w = min(w, h.cfg.Agents)
	jobs := make([]chan string, w)
	var wg sync.WaitGroup
	for k := range w {
		jobs[k] = make(chan string, 1)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for id := range jobs[k] {
				s := time.Now()
				h.update(id)
				d := time.Since(s)
				mu.Lock()
				lat = append(lat, d)
				mu.Unlock()
			}
		}()
	}
	start := time.Now()
	for range n {
		a := mrand.N(h.cfg.Agents)
		jobs[a%w] <- ownEntry(a, mrand.N(h.cfg.EntriesPerAgent))
	}
	for _, j := range jobs {
		close(j)
	}
	wg.Wait()
	if h.t.Failed() {
		h.t.FailNow()
	}
	return summarise(lat), float64(n) / time.Since(start).Seconds()
}

func (h *harness) joinTokens() {
	h.tokens = map[int]string{}
	jobs := make(chan *simAgent)
	var wg sync.WaitGroup
	for range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for a := range jobs {
				var tok *ferrypb.CreateJoinTokenResponse
				var err error
				for attempt := 0; attempt < 50; attempt++ {
					ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
					tok, err = h.leader().Admin().CreateJoinToken(ctx, &ferrypb.CreateJoinTokenRequest{SpiffeId: a.id, TtlSeconds: 3600})
					cancel()
					if c := status.Code(err); c != codes.ResourceExhausted && c != codes.Unavailable {
						break
					}
					time.Sleep(backoff(attempt))
				}
				if err != nil {
					h.t.Errorf("join token for %s: %v", a.id, err)
					continue
				}
				a.att = joinAgent(h.t, tok.Token)
			}
		}()
	}
	for _, a := range h.f.agents {
		if !a.pop {
			jobs <- a
		}
	}
	close(jobs)
	wg.Wait()
	if h.t.Failed() {
		h.t.FailNow()
	}
}

// startAgents starts every agent's session, at most AttestParallel
// attesting at once, and returns once each has its SVID.
func (h *harness) startAgents(ctx context.Context) {
	var addrs []string
	for _, n := range h.c.Nodes {
		addrs = append(addrs, n.AgentAddr)
	}
	sem := make(chan struct{}, h.cfg.AttestParallel)
	var wg sync.WaitGroup
	for i, a := range h.f.agents {
		// Every agent lists the servers in the same order, as a fleet's
		// agent.conf does; each session shuffles the list, so each server
		// takes its share.
		servers := addrs
		s, err := session.New(session.Config{
			TrustDomain: spiffeid.RequireTrustDomainFromString(trustDomain),
			Servers:     servers,
			TrustBundle: h.bundle,
			DataDir:     filepath.Join(h.f.dir, fmt.Sprintf("a%05d", i), "data"),
			Attestor:    a.att,
			Sink:        a,
			Logger:      countingLogger(h.f, a),
		})
		if err != nil {
			h.t.Fatal(err)
		}
		a.sess = s
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			go func() {
				if err := s.Run(ctx); err != nil && ctx.Err() == nil {
					h.f.violation(a, "session ended: %v", err)
				}
			}()
			select {
			case <-s.Ready():
			case <-ctx.Done():
			}
			<-sem
			if got := s.SpiffeID().String(); got != a.id {
				h.f.violation(a, "attested as %s", got)
			}
		}()
	}
	wg.Wait()
}

// expected returns, for each agent, the entries it must hold with the
// revisions last acknowledged.
func (h *harness) expected(a *simAgent) map[string]uint64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	want := map[string]uint64{}
	for _, id := range a.expected() {
		want[id] = h.model[id].Revision
	}
	return want
}

// converge waits until every agent holds exactly the entries it should, at
// their acknowledged revisions, and returns how long that took. Not getting
// there within timeout is a correctness failure.
func (h *harness) converge(timeout time.Duration) time.Duration {
	start := time.Now()
	deadline := start.Add(timeout)
	pending := h.f.agents
	for {
		var still []*simAgent
		var first string
		for _, a := range pending {
			if d := a.diff(h.expected(a)); d != "" {
				still = append(still, a)
				if first == "" {
					first = a.id + ": " + d
				}
			}
		}
		if len(still) == 0 {
			return time.Since(start)
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("%d agents do not hold their entries after %s; first: %s", len(still), timeout, first)
		}
		pending = still
		time.Sleep(50 * time.Millisecond)
	}
}

// waitWorkloads waits until every agent's workload holds an SVID.
func (h *harness) waitWorkloads(timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	for _, a := range h.f.agents {
		for {
			a.svidMu.Lock()
			ok := !a.svidUntil.IsZero()
			a.svidMu.Unlock()
			if ok {
				break
			}
			if time.Now().After(deadline) {
				h.t.Fatalf("%s: no workload SVID after %s", a.id, timeout)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
}

// storm has every agent sign StormCSRs CSRs for its own entries at once.
func (h *harness) storm(rep *report) {
	var pids []int
	for _, n := range h.c.Nodes {
		pids = append(pids, n.PID())
	}
	leader := h.leader()
	u0 := measure(h.t, leader, false)
	stop := peakRSS(pids)
	var signed, shed, retried, failed atomic.Int64
	var lat []time.Duration
	var mu sync.Mutex
	gate := make(chan struct{})
	var wg sync.WaitGroup
	start := time.Now()
	for _, a := range h.f.agents {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-gate
			for n := range h.cfg.StormCSRs {
				for attempt := 0; ; attempt++ {
					chain, err := a.sign(context.Background(), ownEntry(a.idx, n))
					if err == nil {
						if want := fmt.Sprintf("spiffe://%s/scale/a%05d/w%03d", trustDomain, a.idx, n); chain[0].URIs[0].String() != want {
							h.f.violation(a, "storm SVID names %s, want %s", chain[0].URIs[0], want)
						}
						signed.Add(1)
						break
					}
					switch status.Code(err) {
					case codes.ResourceExhausted:
						shed.Add(1)
						time.Sleep(backoff(attempt))
						continue
					case codes.DeadlineExceeded, codes.Unavailable:
						// Not answered within the agent's 30 s: it asks again.
						retried.Add(1)
						time.Sleep(backoff(attempt))
						continue
					}
					failed.Add(1)
					h.f.violation(a, "storm CSR for %s: %v", ownEntry(a.idx, n), err)
					break
				}
			}
			mu.Lock()
			lat = append(lat, time.Since(start))
			mu.Unlock()
		}()
	}
	close(gate)
	wg.Wait()
	took := time.Since(start)
	peak := stopPeak(stop)
	u1 := measure(h.t, leader, false)
	rep.add(fmt.Sprintf("CSR storm: %d agents x %d CSRs at once", h.cfg.Agents, h.cfg.StormCSRs),
		fmt.Sprintf("%d signed in %s (agents done: %s); %d shed with ResourceExhausted and %d timed out (30 s), all retried; peak RSS %s; server CPU %s (%s per CSR), driver %s",
			signed.Load(), ms(took), summarise(lat), shed.Load(), retried.Load(), mib(peak), ms(u1.CPU-u0.CPU), ms((u1.CPU-u0.CPU)/time.Duration(max(1, signed.Load()))), ms(u1.Driver-u0.Driver)), "bounded RSS, every agent renewed")
}

func stopPeak(stop func() int64) int64 { return stop() }

// released is how many times n has returned free memory after a burst.
func (h *harness) released(n *testcluster.Node) float64 {
	v, err := n.Metric("ferry_memory_released_total")
	if err != nil {
		h.t.Fatal(err)
	}
	return v
}

// waitReleased waits until n has returned free memory more than before
// times, for at most 10 s: a burst under 1 MiB of log does not trigger it,
// and writes that never pause for a second (renewals of a large fleet) hold
// it off. Whether it did is reported.
func (h *harness) waitReleased(n *testcluster.Node, before float64) bool {
	deadline := time.Now().Add(10 * time.Second)
	for h.released(n) <= before {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
	return true
}

// restartOne stops the only server and starts it again: the time to ready
// and until every agent streams again (has a new full set) and holds its
// entries.
func (h *harness) restartOne(rep *report, n *testcluster.Node) {
	n.Stop()
	start := time.Now()
	n.Start()
	socket := time.Since(start)
	h.waitReady(n, 5*time.Minute)
	ready := time.Since(start)
	streaming := h.waitStreaming(start, 5*time.Minute)
	rep.add(fmt.Sprintf("restart with %d entries, %d agents: admin socket / ready", len(h.model), h.cfg.Agents), ms(socket)+" / "+ms(ready), "ready < 10 s")
	rep.add("restart: all agents streaming again (new full set)", ms(streaming), "")
}

// waitReady waits until n's /ready answers 200.
func (h *harness) waitReady(n *testcluster.Node, timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	for {
		err := n.ReadyErr()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			fds, _ := os.ReadDir("/proc/self/fd")
			h.t.Fatalf("%s not ready after %s (the driver has %d files open): %v", n.ID, timeout, len(fds), err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitStreaming waits until every agent has received a full set after t and
// returns how long after t the last one did.
func (h *harness) waitStreaming(t time.Time, timeout time.Duration) time.Duration {
	deadline := time.Now().Add(timeout)
	pending := h.f.agents
	for len(pending) > 0 {
		var still []*simAgent
		for _, a := range pending {
			if !a.fullSince(t) {
				still = append(still, a)
			}
		}
		if len(still) > 0 && time.Now().After(deadline) {
			h.t.Fatalf("%d agents not streaming %s after the restart (first %s); the sessions' last warnings:\n  %s", len(still), timeout, still[0].id, h.f.warnings())
		}
		pending = still
		if len(pending) > 0 {
			time.Sleep(20 * time.Millisecond)
		}
	}
	var last time.Time
	for _, a := range h.f.agents {
		a.mu.Lock()
		if a.lastFull.After(last) {
			last = a.lastFull
		}
		a.mu.Unlock()
	}
	return last.Sub(t)
}

// failover kills the leader while every agent streams: the time until a new
// leader, and until the agents that were streaming from it stream again from
// another server.
func (h *harness) failover(rep *report) {
	old := h.leader()
	var from []*simAgent
	for _, a := range h.f.agents {
		a.mu.Lock()
		if a.server == old.AgentAddr {
			from = append(from, a)
		}
		a.mu.Unlock()
	}
	start := time.Now()
	old.Kill()
	prof := h.profileWhile(h.c.Nodes[(slices.Index(h.c.Nodes, old)+1)%len(h.c.Nodes)], "cpu-failover.pb.gz")
	h.c.WaitLeader(60*time.Second, old)
	elected := time.Since(start)
	streaming := h.waitStreamingFrom(from, start, 5*time.Minute)
	prof()
	rep.add(fmt.Sprintf("leader failover, %d agents (%d streaming from the leader): new leader / all of those streaming again", h.cfg.Agents, len(from)),
		ms(elected)+" / "+ms(streaming), "streaming < 10 s")
	old.Start()
	h.converge(5 * time.Minute)
}

// waitStreamingFrom waits until every agent of from has a new full set
// after t and returns how long after t the last one did.
func (h *harness) waitStreamingFrom(from []*simAgent, t time.Time, timeout time.Duration) time.Duration {
	deadline := time.Now().Add(timeout)
	var last time.Duration
	for _, a := range from {
		for !a.fullSince(t) {
			if time.Now().After(deadline) {
				h.t.Fatalf("%s not streaming %s after the failover; the sessions' last warnings:\n  %s", a.id, timeout, h.f.warnings())
			}
			time.Sleep(20 * time.Millisecond)
		}
		a.mu.Lock()
		last = max(last, a.lastFull.Sub(t))
		a.mu.Unlock()
	}
	return last
}

// restartAll stops every server and starts them all again.
func (h *harness) restartAll(rep *report) {
	for _, n := range h.c.Nodes {
		n.Stop()
	}
	start := time.Now()
	var wg sync.WaitGroup
	for _, n := range h.c.Nodes {
		wg.Add(1)
		go func() { defer wg.Done(); n.Start() }()
	}
	wg.Wait()
	prof := h.profileWhile(h.c.Nodes[0], "cpu-restart.pb.gz")
	for _, n := range h.c.Nodes {
		h.waitReady(n, 5*time.Minute)
	}
	ready := time.Since(start)
	streaming := h.waitStreaming(start, 5*time.Minute)
	prof()
	rep.add(fmt.Sprintf("whole cluster restart, %d entries, %d agents: all ready / all agents streaming", len(h.model), h.cfg.Agents), ms(ready)+" / "+ms(streaming), "streaming < 30 s")
}

// profileWhile starts a 30 s CPU profile of n when SCALE_PROFILE is set;
// the function it returns waits for it.
func (h *harness) profileWhile(n *testcluster.Node, name string) func() {
	if h.cfg.Profile == "" {
		return func() {}
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); h.saveProfile(n, "profile?seconds=30", name) }()
	return wg.Wait
}

// saveProfile saves /debug/pprof/<what> of node n under SCALE_PROFILE.
func (h *harness) saveProfile(n *testcluster.Node, what, name string) {
	cl := http.Client{Timeout: 5 * time.Minute}
	resp, err := cl.Get("http://" + n.HealthAddr + "/debug/pprof/" + what)
	if err != nil {
		h.t.Errorf("profile %s: %v", what, err)
		return
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		h.t.Errorf("profile %s: %v %s", what, err, resp.Status)
		return
	}
	if err := os.WriteFile(filepath.Join(h.cfg.Profile, name), b, 0o644); err != nil {
		h.t.Error(err)
	}
}

func raiseFileLimit(t testing.TB, agents int) {
	// One connection per agent, and as much again for replacements: after
	// attestation or renewal (the old one closes 30 s later) and while
	// agents redial a restarted cluster; and the cluster's own files.
	// The hard limit is raised when the process may; otherwise what it
	// allows is enough if it leaves a quarter of the agents room to redial.
	want, need := uint64(2*agents+1024), uint64(agents+agents/4+1024)
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	if lim.Cur >= want {
		return
	}
	raised := syscall.Rlimit{Cur: want, Max: max(lim.Max, want)}
	if syscall.Setrlimit(syscall.RLIMIT_NOFILE, &raised) == nil {
		return
	}
	lim.Cur = lim.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil || lim.Max < need {
		t.Fatalf("%d agents need %d open files, the hard limit is %d: %v", agents, need, lim.Max, err)
	}
}
