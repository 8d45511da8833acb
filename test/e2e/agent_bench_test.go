package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc/codes"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/test/testcluster"
	"github.com/ferry-id/ferry/test/wlload"
)

// Agent benchmarks: a real server and a real `ferry agent run` process, driven
// with go-spiffe's Workload API client from this process.
//
//	go test -run '^$' -bench 'BenchmarkAgent' -benchtime 1x ./test/e2e/
//
// FERRY_BENCH_ENTRIES sets the entries of BenchmarkAgentEntryToWorkload
// (default 200); FERRY_BENCH_SECONDS the time per case of
// BenchmarkAgentWorkloadAPI (default 3), and FERRY_BENCH_CLIENT=process runs
// its clients in a separate process (test/wlload); FERRY_BENCH_CACHED the entries of
// BenchmarkAgentRSS (default 10000), FERRY_BENCH_FETCHED how many of them a
// workload fetches (default 1000).

func envInt(name string, def int) int {
	if s := os.Getenv(name); s != "" {
		var n int
		if _, err := fmt.Sscan(s, &n); err == nil && n > 0 {
			return n
		}
	}
	return def
}

// arrivals records when each SPIFFE ID first reaches a watching workload.
type arrivals struct {
	mu    sync.Mutex
	seen  map[string]time.Time
	count int // SVIDs in the latest update
	wake  chan struct{}
}

func newArrivals() *arrivals {
	return &arrivals{seen: map[string]time.Time{}, wake: make(chan struct{}, 1)}
}

func (a *arrivals) OnX509ContextUpdate(x *workloadapi.X509Context) {
	now := time.Now()
	a.mu.Lock()
	for _, s := range x.SVIDs {
		if _, ok := a.seen[s.ID.String()]; !ok {
			a.seen[s.ID.String()] = now
		}
	}
	a.count = len(x.SVIDs)
	a.mu.Unlock()
	select {
	case a.wake <- struct{}{}:
	default:
	}
}

func (a *arrivals) OnX509ContextWatchError(error) {}

// wait returns when ok holds, false after timeout.
func (a *arrivals) wait(timeout time.Duration, ok func(a *arrivals) bool) bool {
	deadline := time.After(timeout)
	for {
		a.mu.Lock()
		done := ok(a)
		a.mu.Unlock()
		if done {
			return true
		}
		select {
		case <-a.wake:
		case <-deadline:
			return false
		}
	}
}

func (a *arrivals) at(id string) (time.Time, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	t, ok := a.seen[id]
	return t, ok
}

// uidEntry is an entry for processes of uid under the agent.
func uidEntry(agentID, id string, uid int) *ferrypb.Entry {
	return &ferrypb.Entry{
		Id:        id,
		SpiffeId:  "spiffe://example.org/bench/" + id,
		ParentId:  agentID,
		Selectors: []*ferrypb.Selector{{Type: "unix", Value: fmt.Sprintf("uid:%d", uid)}},
	}
}

func createOne(b testing.TB, n *testcluster.Node, e *ferrypb.Entry) {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := n.Admin().BatchCreateEntry(ctx, &ferrypb.BatchCreateEntryRequest{Entries: []*ferrypb.Entry{e}})
	if err != nil {
		b.Fatal(err)
	}
	if c := codes.Code(resp.Results[0].GetCode()); c != codes.OK {
		b.Fatalf("create %s: %s %s", e.Id, c, resp.Results[0].GetMessage())
	}
}

func percentile(lat []time.Duration, p int) time.Duration {
	if len(lat) == 0 {
		return 0
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	i := len(lat) * p / 100
	if i >= len(lat) {
		i = len(lat) - 1
	}
	return lat[i]
}

func watch(b *testing.B, ctx context.Context, a *testcluster.Agent) *arrivals {
	b.Helper()
	client, err := workloadapi.New(ctx, workloadapi.WithAddr(a.SocketAddr()))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { client.Close() })
	w := newArrivals()
	go func() { _ = client.WatchX509Context(ctx, w) }()
	return w
}

// BenchmarkAgentEntryToWorkload: the time from the admin BatchCreateEntry
// call returning to the new entry's X509-SVID arriving on a watching go-spiffe
// client, one entry at a time.
func BenchmarkAgentEntryToWorkload(b *testing.B) {
	c := testcluster.New(b, testcluster.Options{Nodes: 1, LogLevel: "info"})
	a := c.StartAgent("bench")
	srv := c.Nodes[0]
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	uid := os.Getuid()
	createOne(b, srv, uidEntry(a.ID, "warmup", uid))
	w := watch(b, ctx, a)
	if !w.wait(30*time.Second, func(a *arrivals) bool { _, ok := a.seen["spiffe://example.org/bench/warmup"]; return ok }) {
		b.Fatal("warm-up SVID never arrived")
	}
	n := envInt("FERRY_BENCH_ENTRIES", 200)
	for range b.N {
		lat := make([]time.Duration, 0, n)
		for i := range n {
			id := fmt.Sprintf("e2w-%d-%04d", time.Now().UnixNano(), i)
			createOne(b, srv, uidEntry(a.ID, id, uid))
			returned := time.Now()
			sid := "spiffe://example.org/bench/" + id
			if !w.wait(30*time.Second, func(a *arrivals) bool { _, ok := a.seen[sid]; return ok }) {
				b.Fatalf("SVID for %s never arrived", sid)
			}
			at, _ := w.at(sid)
			lat = append(lat, max(0, at.Sub(returned)))
		}
		p50, p99, worst := percentile(lat, 50), percentile(lat, 99), percentile(lat, 100)
		b.ReportMetric(ms(p50), "p50-ms")
		b.ReportMetric(ms(p99), "p99-ms")
		fmt.Printf("entry create -> SVID on watching workload (%d entries): p50 %.2f ms  p99 %.2f ms  max %.2f ms\n",
			n, ms(p50), ms(p99), ms(worst))
	}
}

// pidRSS returns VmRSS of pid in KiB.
func pidRSS(b *testing.B, pid int) int64 {
	b.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			var kb int64
			if _, err := fmt.Sscan(strings.TrimSuffix(strings.TrimSpace(v), " kB"), &kb); err != nil {
				b.Fatal(err)
			}
			return kb
		}
	}
	b.Fatalf("no VmRSS for pid %d", pid)
	return 0
}

// settledRSS samples RSS every 250 ms for d and returns the last sample.
func settledRSS(b *testing.B, pid int, d time.Duration) int64 {
	b.Helper()
	var last int64
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(250 * time.Millisecond) {
		last = pidRSS(b, pid)
	}
	return last
}

// BenchmarkAgentRSS: the agent's VmRSS idle, with FERRY_BENCH_CACHED entries
// parented on it (SVIDs are minted only for what workloads ask for), and after
// one workload matching FERRY_BENCH_FETCHED of them has fetched its SVIDs.
func BenchmarkAgentRSS(b *testing.B) {
	c := testcluster.New(b, testcluster.Options{Nodes: 1, LogLevel: "info"})
	a := c.StartAgent("bench")
	srv := c.Nodes[0]
	pid := a.PID()
	total, fetched := envInt("FERRY_BENCH_CACHED", 10000), envInt("FERRY_BENCH_FETCHED", 1000)
	fetched = min(fetched, total)
	uid := os.Getuid()
	for range b.N {
		idle := settledRSS(b, pid, 2*time.Second)

		// fetched entries match this process; the rest another uid.
		var batch []*ferrypb.Entry
		flush := func() {
			if len(batch) == 0 {
				return
			}
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			resp, err := srv.Admin().BatchCreateEntry(ctx, &ferrypb.BatchCreateEntryRequest{Entries: batch})
			cancel()
			if err != nil {
				b.Fatal(err)
			}
			for _, r := range resp.Results {
				if codes.Code(r.GetCode()) != codes.OK {
					b.Fatalf("create: %s", r.GetMessage())
				}
			}
			batch = batch[:0]
		}
		run := time.Now().UnixNano()
		for i := range total {
			u := uid + 54321
			if i < fetched {
				u = uid
			}
			batch = append(batch, uidEntry(a.ID, fmt.Sprintf("rss-%d-%05d", run, i), u))
			if len(batch) == 500 {
				flush()
			}
		}
		flush()
		// The entries stream to the agent as they commit; give it time to
		// settle (nothing signals "all received" without a workload fetch).
		cached := settledRSS(b, pid, 5*time.Second)

		ctx, cancel := context.WithCancel(context.Background())
		w := watch(b, ctx, a)
		ok := w.wait(120*time.Second, func(a *arrivals) bool { return a.count >= fetched })
		if !ok {
			cancel()
			b.Fatalf("the workload never received %d SVIDs", fetched)
		}
		served := settledRSS(b, pid, 3*time.Second)
		cancel()

		b.ReportMetric(mib(idle), "idle-RSS-MiB")
		b.ReportMetric(mib(cached), "cached-RSS-MiB")
		b.ReportMetric(mib(served), "served-RSS-MiB")
		fmt.Printf("agent RSS: idle %.1f MiB; %d entries cached %.1f MiB; after a workload fetched %d SVIDs %.1f MiB\n",
			mib(idle), total, mib(cached), fetched, mib(served))
	}
}

// procCPU returns the CPU time (user + system) pid has used.
func procCPU(b *testing.B, pid int) time.Duration {
	b.Helper()
	d, err := testcluster.ProcCPU(pid)
	if err != nil {
		b.Fatal(err)
	}
	return d
}

// buildDriver builds test/wlload/cmd/wlload, the Workload API load driver.
func buildDriver(b *testing.B) string {
	b.Helper()
	bin := filepath.Join(b.TempDir(), "wlload")
	out, err := exec.Command("go", "build", "-o", bin, "github.com/ferry-id/ferry/test/wlload/cmd/wlload").CombinedOutput()
	if err != nil {
		b.Fatalf("build wlload: %v\n%s", err, out)
	}
	return bin
}

// runCase runs one case of BenchmarkAgentWorkloadAPI: its clients in this
// process, or with a driver binary in a wlload process of their own. It
// returns what the clients measured and the CPU time the agent spent.
func runCase(b *testing.B, driver, addr string, agentPID int, client, kind, mode string, conc, seconds int) (wlload.Result, time.Duration) {
	b.Helper()
	agentCPU0 := procCPU(b, agentPID)
	var r wlload.Result
	if driver == "" {
		r = wlload.Run(addr, client, kind, mode, conc, time.Duration(seconds)*time.Second, benchAudience)
	} else {
		cmd := exec.Command(driver, "-addr", addr, "-client", client, "-call", kind, "-mode", mode,
			"-c", strconv.Itoa(conc), "-seconds", strconv.Itoa(seconds), "-audience", benchAudience)
		out, err := cmd.Output()
		if err != nil {
			b.Fatalf("wlload: %v\n%s", err, out)
		}
		if err := json.Unmarshal(out, &r); err != nil {
			b.Fatalf("wlload output %q: %v", out, err)
		}
	}
	agentCPU := procCPU(b, agentPID) - agentCPU0
	if r.Error != "" {
		b.Fatalf("wlload: %s", r.Error)
	}
	return r, agentCPU
}

// benchAudience is the audience of the benchmark's JWT-SVIDs.
const benchAudience = "spiffe://example.org/bench"

// BenchmarkAgentWorkloadAPI: FetchX509SVID and FetchJWTSVID against a real
// agent process, calls/s and p99 at concurrency 1 and 16, with a new client
// per call and with a reused client (one per goroutine).
// Each case also prints the CPU time the agent process and this process (the
// clients) spent per call: on a small machine they share the cores, so the
// agent's own cost per call bounds what it could serve alone. With
// FERRY_BENCH_CLIENT=process the clients run in a separate process
// (test/wlload) instead of this one. Two clients: go-spiffe's workloadapi
// client, and a bare gRPC client of the generated stubs (see wlload).
// With FERRY_BENCH_CEILING=1 the same cases then run against `wlload
// -replay-on`, a server that replays the agent's answers and does nothing
// else: what these clients reach on this machine whatever the server does
// (its "agent" CPU is the replaying process's).
func BenchmarkAgentWorkloadAPI(b *testing.B) {
	c := testcluster.New(b, testcluster.Options{Nodes: 1, LogLevel: "info"})
	a := c.StartAgent("bench")
	srv := c.Nodes[0]
	createOne(b, srv, uidEntry(a.ID, "wlapi", os.Getuid()))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	w := watch(b, ctx, a)
	if !w.wait(30*time.Second, func(a *arrivals) bool { return a.count > 0 }) {
		b.Fatal("no SVID")
	}
	seconds := envInt("FERRY_BENCH_SECONDS", 3)
	agentPID := a.PID()
	var driver string // "": the clients run in this process
	if os.Getenv("FERRY_BENCH_CLIENT") == "process" {
		driver = buildDriver(b)
	}
	matrix := func(prefix, addr string, pid int) {
		for _, client := range wlload.Clients {
			for _, kind := range []string{"x509", "jwt"} {
				for _, mode := range []string{"reused", "new"} {
					for _, conc := range []int{1, 16} {
						b.Run(fmt.Sprintf("%s%s/%s/%s/c=%d", prefix, client, kind, mode, conc), func(b *testing.B) {
							for range b.N {
								benchCase(b, driver, addr, pid, prefix, client, kind, mode, conc, seconds)
							}
						})
					}
				}
			}
		}
	}
	// Warm up (the agent's first SVIDs, the server settling after start):
	// discarded.
	runCase(b, driver, a.SocketAddr(), agentPID, wlload.Clients[0], "x509", "reused", 4, 2)
	matrix("", a.SocketAddr(), agentPID)
	if os.Getenv("FERRY_BENCH_CEILING") != "" {
		// The same clients against a server that only replays the agent's
		// answers: what they can do on this machine whatever the server.
		if driver == "" {
			driver = buildDriver(b)
		}
		addr, pid := startReplay(b, driver, a.SocketAddr())
		matrix("ceiling/", addr, pid)
	}
}

// startReplay starts `wlload -replay-on`, recording from the agent at
// agentAddr, and returns its address and PID.
func startReplay(b *testing.B, driver, agentAddr string) (string, int) {
	b.Helper()
	sock := filepath.Join(b.TempDir(), "replay.sock")
	cmd := exec.Command(driver, "-addr", agentAddr, "-replay-on", sock, "-audience", benchAudience)
	out, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || strings.TrimSpace(line) != "serving" {
		b.Fatalf("wlload -replay-on: %q %v", line, err)
	}
	return "unix://" + sock, cmd.Process.Pid
}

// benchCase runs and reports one case of BenchmarkAgentWorkloadAPI.
func benchCase(b *testing.B, driver, addr string, agentPID int, prefix, client, kind, mode string, conc, seconds int) {
	r, agentCPU := runCase(b, driver, addr, agentPID, client, kind, mode, conc, seconds)
	rate := float64(r.Calls) / r.Seconds
	n := float64(max(r.Calls, 1))
	// With a driver process, the agent's CPU also covers the
	// driver's start and its clients' connecting, which take
	// a few milliseconds next to seconds of calls.
	agentPer, clientPer := float64(agentCPU.Microseconds())/n, float64(r.CPUus)/n
	p50, p99 := time.Duration(r.P50us)*time.Microsecond, time.Duration(r.P99us)*time.Microsecond
	b.ReportMetric(rate, "calls/s")
	b.ReportMetric(ms(p50), "p50-ms")
	b.ReportMetric(ms(p99), "p99-ms")
	b.ReportMetric(agentPer, "agent-cpu-µs/call")
	b.ReportMetric(clientPer, "client-cpu-µs/call")
	where := ""
	if driver != "" {
		where = "  [client process]"
	}
	fmt.Printf("%s%-9s Fetch%sSVID %-6s client, concurrency %2d: %7.0f calls/s  p50 %.2f ms  p99 %.2f ms  (%d calls)  CPU/call: agent %.0f µs, client %.0f µs%s\n",
		prefix, client, strings.ToUpper(kind), mode, conc, rate, ms(p50), ms(p99), r.Calls, agentPer, clientPer, where)
}
