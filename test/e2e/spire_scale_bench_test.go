package e2e

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha1"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc/codes"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/test/testcluster"
)

// BenchmarkScaleVsSPIRE runs one ferry server and one SPIRE 1.13 server
// (spire-server, default sqlite datastore) side by side on this machine,
// alternated: every round runs both, the order swapped each round, and the
// table gives the medians of FERRY_BENCH_ROUNDS rounds (default 2) with the
// load average of each round. It runs only when FERRY_BENCH_SPIRE names a
// directory holding spire-server and spire-agent:
//
//	FERRY_BENCH_SPIRE=/path/to/spire/bin nice go test -run '^$' -bench ScaleVsSPIRE -benchtime 1x -timeout 180m ./test/e2e/
//
// (`make scale-spire SPIRE=/path/to/spire/bin`). Two parts:
//
// Entries: a fresh server is given registration entries (the shape of
// BenchmarkEntryCreate's: three selectors, 100 parents) through the fastest
// path each offers (ferry: the admin API's BatchCreateEntry, batches of 500
// from 4 clients; SPIRE: `spire-server entry create -data` with files of
// 1,000 entries, one at a time: its sqlite datastore takes one writer), up to
// 10,000 and then up to FERRY_BENCH_ENTRIES (default 100,000; SPIRE only up to
// FERRY_BENCH_SPIRE_ENTRIES, default 10,000: each of its creates costs more
// CPU as the table grows, ~25 entries/s on average to 10,000 on a loaded
// 2-core machine, which would make 100,000 a matter of hours); at each size the
// time to create them all (from empty), the server's RSS and live heap (both
// are Go programs serving net/http/pprof: a collection, then HeapAlloc), and
// a restart (SIGTERM, start) to ready (ferry: /ready; SPIRE: `spire-server
// healthcheck`) with the RSS after it.
//
// Fleet: a fresh server and FERRY_BENCH_AGENTS (default 50) real agent
// processes (`ferry agent`, `spire-agent`), each attested by x509pop with a
// node certificate of its own from one test CA (join-token agents carry no
// node selectors in ferry, so no node alias could cover them); each agent
// has FERRY_BENCH_AGENT_ENTRIES (default 3) entries of its own and one
// shared entry under a node alias keyed on the CA's fingerprint, which every
// agent matches. A go-spiffe X509 watch on every agent's Workload API (as a
// workload would) measures: the time from starting the agents until every
// one serves all its SVIDs; the server's RSS and live heap per connected
// agent; the propagation of one change to the shared entry (a new DNS name)
// until every agent serves the SVID with it; and after a server restart,
// the time to ready and until every agent serves a change made at ready.
func BenchmarkScaleVsSPIRE(b *testing.B) {
	spireBin := os.Getenv("FERRY_BENCH_SPIRE")
	if spireBin == "" {
		b.Skip("FERRY_BENCH_SPIRE (a directory with spire-server and spire-agent) is not set")
	}
	rounds := envInt("FERRY_BENCH_ROUNDS", 2)
	sizes := map[string][]int{
		"ferry": scaleSizes(envInt("FERRY_BENCH_ENTRIES", 100000)),
		"SPIRE": scaleSizes(envInt("FERRY_BENCH_SPIRE_ENTRIES", 10000)),
	}
	agents := envInt("FERRY_BENCH_AGENTS", 50)
	perAgent := envInt("FERRY_BENCH_AGENT_ENTRIES", 3)
	testcluster.Binary(b)
	res := newScaleResults()
	var loads []string
	for round := range rounds {
		order := []string{"ferry", "SPIRE"}
		if round%2 == 1 {
			order = []string{"SPIRE", "ferry"}
		}
		load := loadavg()
		fmt.Printf("round %d (%s first): load average %s", round+1, order[0], load)
		for _, sys := range order {
			fmt.Printf("  %s entries\n", sys)
			if sys == "ferry" {
				ferryEntries(b, sizes[sys], res.add(sys))
			} else {
				spireEntries(b, spireBin, sizes[sys], res.add(sys))
			}
		}
		for _, sys := range order {
			fmt.Printf("  %s fleet of %d agents\n", sys, agents)
			if sys == "ferry" {
				ferryFleet(b, agents, perAgent, res.add(sys))
			} else {
				spireFleet(b, spireBin, agents, perAgent, res.add(sys))
			}
		}
		end := loadavg()
		loads = append(loads, strings.TrimSpace(load)+" -> "+strings.TrimSpace(end))
		fmt.Printf("round %d done: load average %s", round+1, end)
	}
	fmt.Printf("\nmedians of %d rounds (min-max in brackets); %d agents x %d entries + 1 shared; load averages per round (start -> end): %s\n",
		rounds, agents, perAgent, strings.Join(loads, "; "))
	res.print()
}

// scaleSizes is 10,000, then max if larger.
func scaleSizes(max int) []int {
	if max <= 10000 {
		return []int{max}
	}
	return []int{10000, max}
}

// scaleResults collects each figure's samples per system, in the order they
// were first recorded.
type scaleResults struct {
	mu      sync.Mutex
	order   []string
	unit    map[string]string
	samples map[string]map[string][]float64 // figure -> system -> samples
}

func newScaleResults() *scaleResults {
	return &scaleResults{unit: map[string]string{}, samples: map[string]map[string][]float64{}}
}

// add returns a recorder of sys's figures.
func (r *scaleResults) add(sys string) func(figure, unit string, v float64) {
	return func(figure, unit string, v float64) {
		r.mu.Lock()
		defer r.mu.Unlock()
		if r.samples[figure] == nil {
			r.samples[figure] = map[string][]float64{}
			r.order = append(r.order, figure)
			r.unit[figure] = unit
		}
		r.samples[figure][sys] = append(r.samples[figure][sys], v)
		fmt.Printf("    %s %s: %.1f %s\n", sys, figure, v, unit)
	}
}

func (r *scaleResults) print() {
	cell := func(xs []float64) string {
		if len(xs) == 0 {
			return "not run"
		}
		s := slices.Clone(xs)
		slices.Sort(s)
		med := s[len(s)/2]
		if len(s)%2 == 0 {
			med = (s[len(s)/2-1] + s[len(s)/2]) / 2
		}
		if len(s) == 1 {
			return fmt.Sprintf("%.1f", med)
		}
		return fmt.Sprintf("%.1f (%.1f-%.1f)", med, s[0], s[len(s)-1])
	}
	fmt.Printf("| figure | unit | ferry | SPIRE 1.13.3 |\n|---|---|---|---|\n")
	for _, f := range r.order {
		fmt.Printf("| %s | %s | %s | %s |\n", f, r.unit[f], cell(r.samples[f]["ferry"]), cell(r.samples[f]["SPIRE"]))
	}
}

// ferryEntries creates entries on a fresh one-node ferry cluster up to each
// size and restarts it at each.
func ferryEntries(b *testing.B, sizes []int, rec func(string, string, float64)) {
	c := testcluster.New(b, testcluster.Options{Nodes: 1, LogLevel: "warn"})
	defer func() {
		for _, n := range c.Nodes {
			n.Stop()
		}
	}()
	srv := c.WaitLeader(30*time.Second, nil)
	entries := benchEntries("scale", sizes[len(sizes)-1])
	var created time.Duration
	done := 0
	for _, size := range sizes {
		created += createBatches(b, c, entries[done:size], 500, 4)
		done = size
		if got := countEntries(b, srv); got != int64(size) {
			b.Fatalf("ferry: %d entries, want %d", got, size)
		}
		k := fmt.Sprintf("%dk entries", size/1000)
		rec(k+": create (from empty)", "s", created.Seconds())
		rec(k+": entries/s", "1/s", float64(size)/created.Seconds())
		rec(k+": server RSS", "MiB", mibBytes(procRSS(b, srv.PID())))
		rec(k+": server live heap", "MiB", mibBytes(liveHeap(b, srv.LiveHeap)))
		srv.Stop()
		start := time.Now()
		srv.Start()
		if _, err := waitReady(srv, 10*time.Minute); err != nil {
			b.Fatal(err)
		}
		rec(k+": restart to ready", "s", time.Since(start).Seconds())
		rec(k+": server RSS after restart", "MiB", mibBytes(procRSS(b, srv.PID())))
	}
}

// spireEntries does what ferryEntries does with a fresh spire-server.
func spireEntries(b *testing.B, bin string, sizes []int, rec func(string, string, float64)) {
	s := startSPIREServer(b, bin, b.TempDir(), spireJoinToken)
	defer s.stop()
	var created time.Duration
	done := 0
	for _, size := range sizes {
		for done < size {
			n := min(1000, size-done)
			batch := make([]spireEntry, n)
			for i := range batch {
				batch[i] = spireEntryOf(benchEntry("scale", done+i))
			}
			path := writeSPIREEntries(b, s.dir, batch)
			start := time.Now()
			s.mustCLI("entry", "create", "-data", path, "-output", "json")
			created += time.Since(start)
			done += n
		}
		if out := strings.TrimSpace(s.mustCLI("entry", "count")); !strings.Contains(out, strconv.Itoa(size)) {
			b.Fatalf("SPIRE: entry count %q, want %d", out, size)
		}
		k := fmt.Sprintf("%dk entries", size/1000)
		rec(k+": create (from empty)", "s", created.Seconds())
		rec(k+": entries/s", "1/s", float64(size)/created.Seconds())
		rec(k+": server RSS", "MiB", mibBytes(procRSS(b, s.pid())))
		rec(k+": server live heap", "MiB", mibBytes(liveHeap(b, s.liveHeap)))
		s.stop()
		start := time.Now()
		s.start()
		s.waitHealthy(10 * time.Minute)
		rec(k+": restart to ready", "s", time.Since(start).Seconds())
		rec(k+": server RSS after restart", "MiB", mibBytes(procRSS(b, s.pid())))
	}
}

// spireEntry is a registration entry as `spire-server entry create -data`
// reads it.
type spireEntry struct {
	EntryID     string          `json:"entry_id,omitempty"`
	SpiffeID    string          `json:"spiffe_id"`
	ParentID    string          `json:"parent_id"`
	Selectors   []spireSelector `json:"selectors"`
	X509SVIDTTL int32           `json:"x509_svid_ttl,omitempty"`
	DNSNames    []string        `json:"dns_names,omitempty"`
}

type spireSelector struct {
	Type  string `json:"type"`
	Value string `json:"value"`
}

func spireEntryOf(e *ferrypb.Entry) spireEntry {
	out := spireEntry{SpiffeID: e.SpiffeId, ParentID: e.ParentId, X509SVIDTTL: e.X509SvidTtl, DNSNames: e.DnsNames}
	for _, s := range e.Selectors {
		out.Selectors = append(out.Selectors, spireSelector{Type: s.Type, Value: s.Value})
	}
	return out
}

func writeSPIREEntries(b *testing.B, dir string, entries []spireEntry) string {
	b.Helper()
	data, err := json.Marshal(map[string][]spireEntry{"entries": entries})
	if err != nil {
		b.Fatal(err)
	}
	path := filepath.Join(dir, "entries.json")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		b.Fatal(err)
	}
	return path
}

// nodePKI is a CA that issues x509pop node certificates.
type nodePKI struct {
	dir    string
	cert   *x509.Certificate
	key    *ecdsa.PrivateKey
	caPath string
}

func newNodePKI(b *testing.B, dir string) *nodePKI {
	b.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "node CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		b.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	p := &nodePKI{dir: dir, cert: cert, key: key, caPath: filepath.Join(dir, "node-ca.pem")}
	if err := os.WriteFile(p.caPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		b.Fatal(err)
	}
	return p
}

// fingerprint is the CA's SHA-1 fingerprint as x509pop selectors carry it.
func (p *nodePKI) fingerprint() string {
	sum := sha1.Sum(p.cert.Raw)
	return hex.EncodeToString(sum[:])
}

// node writes a node certificate and key for name into dir and returns
// their paths and the x509pop agent ID they attest as.
func (p *nodePKI) node(b *testing.B, dir, name string, serial int64) (certPath, keyPath, agentID string) {
	b.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}, p.cert, &key.PublicKey, p.key)
	if err != nil {
		b.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		b.Fatal(err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		b.Fatal(err)
	}
	certPath, keyPath = filepath.Join(dir, "node.pem"), filepath.Join(dir, "node-key.pem")
	if err := os.WriteFile(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		b.Fatal(err)
	}
	sum := sha1.Sum(der)
	return certPath, keyPath, "spiffe://example.org/spire/agent/x509pop/" + hex.EncodeToString(sum[:])
}

const (
	fleetAliasID  = "spiffe://example.org/fleet"
	fleetSharedID = "spiffe://example.org/shared"
)

// sharedDNS is the DNS name the shared entry carries at version v.
func sharedDNS(v int) string { return fmt.Sprintf("v%d.shared.example.org", v) }

// fleetEntries is every entry of a fleet: the node alias, the shared entry
// at version 0, and perAgent entries under each agent ID, for this
// process's uid.
func fleetEntries(caFingerprint string, agentIDs []string, perAgent int) []*ferrypb.Entry {
	uid := []*ferrypb.Selector{{Type: "unix", Value: fmt.Sprintf("uid:%d", os.Getuid())}}
	out := []*ferrypb.Entry{
		{Id: "fleet-alias", SpiffeId: fleetAliasID, ParentId: "spiffe://example.org/spire/server",
			Selectors: []*ferrypb.Selector{{Type: "x509pop", Value: "ca:fingerprint:" + caFingerprint}}},
		sharedEntry(0),
	}
	for i, id := range agentIDs {
		for k := range perAgent {
			out = append(out, &ferrypb.Entry{Id: fmt.Sprintf("a%03d-w%d", i, k), SpiffeId: fmt.Sprintf("spiffe://example.org/a%03d/w%d", i, k),
				ParentId: id, Selectors: uid})
		}
	}
	return out
}

func sharedEntry(v int) *ferrypb.Entry {
	return &ferrypb.Entry{Id: "shared", SpiffeId: fleetSharedID, ParentId: fleetAliasID, DnsNames: []string{sharedDNS(v)},
		Selectors: []*ferrypb.Selector{{Type: "unix", Value: fmt.Sprintf("uid:%d", os.Getuid())}}}
}

// fleetWatch watches every agent's Workload API with go-spiffe and records
// when each agent first served each version of the shared SVID.
type fleetWatch struct {
	want int // SVIDs each agent serves when it has all its entries

	mu     sync.Mutex
	count  []int
	seenAt []map[int]time.Time
	wake   chan struct{}
	cancel context.CancelFunc
}

func newFleetWatch(addrs []string, want int) *fleetWatch {
	ctx, cancel := context.WithCancel(context.Background())
	w := &fleetWatch{want: want, count: make([]int, len(addrs)), seenAt: make([]map[int]time.Time, len(addrs)),
		wake: make(chan struct{}, 1), cancel: cancel}
	for i, addr := range addrs {
		w.seenAt[i] = map[int]time.Time{}
		go func() {
			client, err := workloadapi.New(ctx, workloadapi.WithAddr(addr))
			if err != nil {
				return
			}
			defer client.Close()
			_ = client.WatchX509Context(ctx, &agentWatch{w: w, i: i})
		}()
	}
	return w
}

type agentWatch struct {
	w *fleetWatch
	i int
}

func (a *agentWatch) OnX509ContextUpdate(x *workloadapi.X509Context) {
	now := time.Now()
	a.w.mu.Lock()
	a.w.count[a.i] = len(x.SVIDs)
	for _, s := range x.SVIDs {
		if s.ID.String() != fleetSharedID || len(s.Certificates) == 0 {
			continue
		}
		for _, dns := range s.Certificates[0].DNSNames {
			var v int
			if _, err := fmt.Sscanf(dns, "v%d.shared.example.org", &v); err == nil {
				if _, ok := a.w.seenAt[a.i][v]; !ok {
					a.w.seenAt[a.i][v] = now
				}
			}
		}
	}
	a.w.mu.Unlock()
	select {
	case a.w.wake <- struct{}{}:
	default:
	}
}

func (a *agentWatch) OnX509ContextWatchError(error) {}

// waitVersion waits until every agent serves all its SVIDs and version v
// of the shared one, and returns when each agent first served v.
func (w *fleetWatch) waitVersion(b *testing.B, v int, timeout time.Duration, logs func() string) []time.Time {
	b.Helper()
	deadline := time.After(timeout)
	for {
		w.mu.Lock()
		var at []time.Time
		missing := 0
		for i := range w.count {
			t, ok := w.seenAt[i][v]
			if !ok || w.count[i] < w.want {
				missing++
				continue
			}
			at = append(at, t)
		}
		w.mu.Unlock()
		if missing == 0 {
			return at
		}
		select {
		case <-w.wake:
		case <-time.After(time.Second): // a late update wakes nobody twice
		case <-deadline:
			b.Fatalf("%d agents do not serve version %d of the shared SVID after %s:\n%s", missing, v, timeout, logs())
		}
	}
}

// spread returns the median and the largest of the delays from start.
func spread(start time.Time, at []time.Time) (median, last time.Duration) {
	d := make([]time.Duration, len(at))
	for i, t := range at {
		d[i] = max(t.Sub(start), 0)
	}
	slices.Sort(d)
	return d[len(d)/2], d[len(d)-1]
}

// fleetRun measures a fleet once its server runs and holds its entries:
// start the agents until every one serves, the server's cost per agent,
// propagation of a shared change, and a server restart.
type fleetRun struct {
	agents    int
	perAgent  int
	serverPID func() int
	heap      func() (int64, error)
	startAll  func()               // start every agent process
	update    func(v int)          // set the shared entry to version v
	restart   func() time.Duration // stop the server, start it, wait ready: time from start to ready
	addrs     []string
	logs      func() string
}

func (f *fleetRun) run(b *testing.B, rec func(string, string, float64)) {
	rssBefore := procRSS(b, f.serverPID())
	heapBefore := liveHeap(b, f.heap)
	w := newFleetWatch(f.addrs, f.perAgent+1)
	defer w.cancel()
	start := time.Now()
	f.startAll()
	w.waitVersion(b, 0, 10*time.Minute, f.logs)
	k := fmt.Sprintf("%d agents", f.agents)
	rec(k+": start to every agent serving", "s", time.Since(start).Seconds())
	rssAfter := procRSS(b, f.serverPID())
	heapAfter := liveHeap(b, f.heap)
	rec(k+": server RSS", "MiB", mibBytes(rssAfter))
	rec(k+": server RSS per agent", "KiB", float64(rssAfter-rssBefore)/1024/float64(f.agents))
	rec(k+": server live heap per agent", "KiB", float64(heapAfter-heapBefore)/1024/float64(f.agents))

	t0 := time.Now()
	f.update(1)
	med, last := spread(t0, w.waitVersion(b, 1, 5*time.Minute, f.logs))
	rec(k+": shared change to every agent (median)", "ms", ms(med))
	rec(k+": shared change to every agent (last)", "ms", ms(last))

	ready := f.restart()
	restarted := time.Now().Add(-ready)
	f.update(2)
	_, last = spread(restarted, w.waitVersion(b, 2, 5*time.Minute, f.logs))
	rec(k+": restart to ready", "s", ready.Seconds())
	rec(k+": restart to every agent serving a change made at ready", "s", last.Seconds())
	rec(k+": server RSS after restart", "MiB", mibBytes(procRSS(b, f.serverPID())))
}

// ferryFleet runs the fleet on a fresh one-node ferry cluster.
func ferryFleet(b *testing.B, agents, perAgent int, rec func(string, string, float64)) {
	pki := newNodePKI(b, b.TempDir())
	c := testcluster.New(b, testcluster.Options{Nodes: 1, LogLevel: "warn", AgentLogLevel: "warn",
		ExtraServerConfig: fmt.Sprintf("x509pop {\n    ca_bundle_file = %q\n  }", pki.caPath)})
	srv := c.WaitLeader(30*time.Second, nil)
	var fleet []*testcluster.Agent
	var ids, addrs []string
	for i := range agents {
		name := fmt.Sprintf("a%03d", i)
		cert, key, id := pki.node(b, filepath.Join(pki.dir, name), name, int64(i+2))
		a := c.NewAgentAttested(name, fmt.Sprintf("  x509pop {\n    cert_file = %q\n    key_file = %q\n  }\n", cert, key))
		a.ID = id
		fleet = append(fleet, a)
		ids = append(ids, id)
		addrs = append(addrs, a.SocketAddr())
	}
	defer func() {
		for _, a := range fleet {
			a.Stop()
		}
		srv.Stop()
	}()
	ferryCreate(b, srv, fleetEntries(pki.fingerprint(), ids, perAgent))
	f := &fleetRun{
		agents: agents, perAgent: perAgent, addrs: addrs,
		serverPID: srv.PID,
		heap:      srv.LiveHeap,
		startAll: func() {
			for _, a := range fleet {
				a.Spawn()
			}
		},
		update: func(v int) {
			resp, err := srv.Admin().BatchUpdateEntry(context.Background(), &ferrypb.BatchUpdateEntryRequest{Entries: []*ferrypb.Entry{sharedEntry(v)}})
			if err != nil {
				b.Fatal(err)
			}
			if r := resp.Results[0]; codes.Code(r.Code) != codes.OK {
				b.Fatalf("ferry: update shared entry: %s", r.Message)
			}
		},
		restart: func() time.Duration {
			srv.Stop()
			start := time.Now()
			srv.Start()
			if _, err := waitReady(srv, 10*time.Minute); err != nil {
				b.Fatal(err)
			}
			return time.Since(start)
		},
		logs: func() string { return srv.LogTail(20) + "\n" + fleet[0].LogTail(20) },
	}
	f.run(b, rec)
}

// ferryCreate creates entries through the admin API in batches of 500.
func ferryCreate(b *testing.B, srv *testcluster.Node, entries []*ferrypb.Entry) {
	b.Helper()
	for len(entries) > 0 {
		n := min(500, len(entries))
		resp, err := srv.Admin().BatchCreateEntry(context.Background(), &ferrypb.BatchCreateEntryRequest{Entries: entries[:n]})
		if err != nil {
			b.Fatal(err)
		}
		for _, r := range resp.Results {
			if codes.Code(r.Code) != codes.OK {
				b.Fatalf("ferry: create: %s", r.Message)
			}
		}
		entries = entries[n:]
	}
}

// spireFleet runs the fleet on a fresh spire-server.
func spireFleet(b *testing.B, bin string, agents, perAgent int, rec func(string, string, float64)) {
	dir := b.TempDir()
	pki := newNodePKI(b, dir)
	s := startSPIREServer(b, bin, filepath.Join(dir, "server"), fmt.Sprintf(`  NodeAttestor "x509pop" {
    plugin_data {
      ca_bundle_path = %q
    }
  }
`, pki.caPath))
	bundle := s.mustCLI("bundle", "show")
	var fleet []*spireAgent
	var ids, addrs []string
	for i := range agents {
		name := fmt.Sprintf("a%03d", i)
		adir := filepath.Join(dir, name)
		cert, key, id := pki.node(b, adir, name, int64(i+2))
		a := s.prepareAgent(adir, fmt.Sprintf(`  NodeAttestor "x509pop" {
    plugin_data {
      private_key_path = %q
      certificate_path = %q
    }
  }
`, key, cert), "", bundle)
		fleet = append(fleet, a)
		ids = append(ids, id)
		addrs = append(addrs, a.addr())
	}
	defer func() {
		for _, a := range fleet {
			a.stop()
		}
		s.stop()
	}()
	var batch []spireEntry
	for _, e := range fleetEntries(pki.fingerprint(), ids, perAgent) {
		se := spireEntryOf(e)
		se.EntryID = e.Id
		batch = append(batch, se)
	}
	s.mustCLI("entry", "create", "-data", writeSPIREEntries(b, dir, batch), "-output", "json")
	f := &fleetRun{
		agents: agents, perAgent: perAgent, addrs: addrs,
		serverPID: s.pid,
		heap:      s.liveHeap,
		startAll: func() {
			for _, a := range fleet {
				a.start()
			}
		},
		update: func(v int) {
			e := sharedEntry(v)
			s.mustCLI("entry", "update", "-entryID", e.Id, "-spiffeID", e.SpiffeId, "-parentID", e.ParentId,
				"-selector", e.Selectors[0].Type+":"+e.Selectors[0].Value, "-dns", e.DnsNames[0])
		},
		restart: func() time.Duration {
			s.stop()
			start := time.Now()
			s.start()
			s.waitHealthy(10 * time.Minute)
			return time.Since(start)
		},
		logs: func() string { return s.logTail(20) + "\n" + fleet[0].logTail(20) },
	}
	f.run(b, rec)
}

func procRSS(b *testing.B, pid int) int64 {
	b.Helper()
	rss, err := testcluster.ProcRSS(pid)
	if err != nil {
		b.Fatal(err)
	}
	return rss
}

func liveHeap(b *testing.B, f func() (int64, error)) int64 {
	b.Helper()
	h, err := f()
	if err != nil {
		b.Fatal(err)
	}
	return h
}

func mibBytes(n int64) float64 { return float64(n) / (1 << 20) }
