package scale_test

import (
	"encoding/json"
	"fmt"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ferry-id/ferry/test/testcluster"
)

// config is the harness's knobs, read from SCALE_* variables (see doc.go).
type config struct {
	Nodes           int     // SCALE_NODES: servers, 1 or 3
	Agents          int     // SCALE_AGENTS: simulated agents
	JoinShare       float64 // SCALE_JOIN_SHARE: share attesting with join tokens (the rest x509pop)
	EntriesPerAgent int     // SCALE_ENTRIES_PER_AGENT: entries parented on each agent
	Groups          int     // SCALE_GROUPS: node aliases, one per group of x509pop agents
	GroupEntries    int     // SCALE_GROUP_ENTRIES: entries parented on each group alias
	FleetEntries    int     // SCALE_FLEET_ENTRIES: entries parented on the fleet alias
	IdleEntries     int     // SCALE_IDLE_ENTRIES: entries for agents that never connect
	Churn           int     // SCALE_CHURN: entries created and deleted per churn round
	ChurnRounds     int     // SCALE_CHURN_ROUNDS
	Probes          int     // SCALE_PROBES: timed changes for one agent
	FanoutProbes    int     // SCALE_FANOUT_PROBES: timed changes every x509pop agent receives
	Writes          int     // SCALE_WRITES: single-entry writes timed with and without streams
	Writers         int     // SCALE_WRITERS: concurrent writers
	StormCSRs       int     // SCALE_STORM_CSRS: CSRs each agent sends in the storm
	AttestParallel  int     // SCALE_ATTEST_PARALLEL: agents attesting at once
	AgentTTL        string  // SCALE_AGENT_TTL: agent SVID lifetime (renewed at half)
	SVIDTTL         int     // SCALE_SVID_TTL: workload X509-SVID lifetime, seconds (0 = server default)
	Rest            time.Duration
	RaftMultiplier  int    // SCALE_RAFT_MULTIPLIER: the servers' cluster.raft_multiplier (0: their default)
	Out             string // SCALE_OUT: figures as JSON
	Profile         string // SCALE_PROFILE: directory for the server's heap (at rest) and CPU (writes) profiles
}

func loadConfig(t testing.TB) config {
	c := config{
		Nodes: envInt(t, "SCALE_NODES", 1), Agents: envInt(t, "SCALE_AGENTS", 1000),
		JoinShare: envFloat(t, "SCALE_JOIN_SHARE", 0.1), EntriesPerAgent: envInt(t, "SCALE_ENTRIES_PER_AGENT", 10),
		Groups: envInt(t, "SCALE_GROUPS", 10), GroupEntries: envInt(t, "SCALE_GROUP_ENTRIES", 5),
		FleetEntries: envInt(t, "SCALE_FLEET_ENTRIES", 2), IdleEntries: envInt(t, "SCALE_IDLE_ENTRIES", 0),
		Churn: envInt(t, "SCALE_CHURN", 10000), ChurnRounds: envInt(t, "SCALE_CHURN_ROUNDS", 3),
		Probes: envInt(t, "SCALE_PROBES", 20), FanoutProbes: envInt(t, "SCALE_FANOUT_PROBES", 3),
		Writes: envInt(t, "SCALE_WRITES", 300), Writers: envInt(t, "SCALE_WRITERS", 8),
		AttestParallel: envInt(t, "SCALE_ATTEST_PARALLEL", 64), StormCSRs: envInt(t, "SCALE_STORM_CSRS", 1),
		AgentTTL: envStr("SCALE_AGENT_TTL", "1h"), SVIDTTL: envInt(t, "SCALE_SVID_TTL", 0),
		Rest:           time.Duration(envInt(t, "SCALE_REST_SECONDS", 10)) * time.Second,
		RaftMultiplier: envInt(t, "SCALE_RAFT_MULTIPLIER", 0),
		Out:            os.Getenv("SCALE_OUT"), Profile: os.Getenv("SCALE_PROFILE"),
	}
	if c.EntriesPerAgent < 1 {
		t.Fatal("SCALE_ENTRIES_PER_AGENT must be at least 1 (the workload uses the first)")
	}
	c.StormCSRs = min(max(c.StormCSRs, 1), c.EntriesPerAgent)
	if c.Groups < 1 {
		c.Groups = 1
	}
	return c
}

func envStr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

func envInt(t testing.TB, k string, def int) int {
	v := os.Getenv(k)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		t.Fatalf("%s: %v", k, err)
	}
	return n
}

func envFloat(t testing.TB, k string, def float64) float64 {
	v := os.Getenv(k)
	if v == "" {
		return def
	}
	n, err := strconv.ParseFloat(v, 64)
	if err != nil {
		t.Fatalf("%s: %v", k, err)
	}
	return n
}

// usage is one reading of a server process and of the driver.
type usage struct {
	RSS, Heap int64
	CPU       time.Duration
	Driver    time.Duration
}

func driverCPU() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// measure reads node n; withHeap also collects garbage there and reads the
// live heap (which costs the server a collection).
func measure(t testing.TB, n *testcluster.Node, withHeap bool) usage {
	t.Helper()
	var u usage
	var err error
	if withHeap {
		if u.Heap, err = n.LiveHeap(); err != nil {
			t.Fatalf("live heap of %s: %v", n.ID, err)
		}
	}
	if u.RSS, err = testcluster.ProcRSS(n.PID()); err != nil {
		t.Fatal(err)
	}
	if u.CPU, err = testcluster.ProcCPU(n.PID()); err != nil {
		t.Fatal(err)
	}
	u.Driver = driverCPU()
	return u
}

// peakRSS samples the RSS of pids every 50 ms until the returned stop is
// called; stop returns the highest seen of any, in bytes.
func peakRSS(pids []int) (stop func() int64) {
	var mu sync.Mutex
	var peak int64
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		for {
			for _, pid := range pids {
				if rss, err := testcluster.ProcRSS(pid); err == nil {
					mu.Lock()
					peak = max(peak, rss)
					mu.Unlock()
				}
			}
			select {
			case <-done:
				return
			case <-time.After(50 * time.Millisecond):
			}
		}
	}()
	return func() int64 {
		close(done)
		<-finished
		mu.Lock()
		defer mu.Unlock()
		return peak
	}
}

// dist summarises durations.
type dist struct {
	N             int
	P50, P99, Max time.Duration
}

func summarise(ds []time.Duration) dist {
	if len(ds) == 0 {
		return dist{}
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	at := func(q float64) time.Duration { return s[min(len(s)-1, int(q*float64(len(s))))] }
	return dist{N: len(s), P50: at(0.50), P99: at(0.99), Max: s[len(s)-1]}
}

func (d dist) String() string {
	return fmt.Sprintf("p50 %s, p99 %s, max %s (n=%d)", ms(d.P50), ms(d.P99), ms(d.Max), d.N)
}

func ms(d time.Duration) string {
	if d < 10*time.Millisecond {
		return fmt.Sprintf("%.2f ms", float64(d)/1e6)
	}
	if d < 10*time.Second {
		return fmt.Sprintf("%.0f ms", float64(d)/1e6)
	}
	return fmt.Sprintf("%.1f s", d.Seconds())
}

func mib(b int64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }
func kib(b float64) string {
	return fmt.Sprintf("%.2f KiB", b/1024)
}

// report is the figures of one run: rows of the table, in order.
type report struct {
	Config config
	Load   string
	Rows   [][3]string // figure, value, target
}

func (r *report) add(figure, value, target string) {
	r.Rows = append(r.Rows, [3]string{figure, value, target})
	fmt.Printf("scale: %-58s %s\n", figure, value)
}

func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

func (r *report) print(t testing.TB) {
	var b strings.Builder
	fmt.Fprintf(&b, "\nferry scale: %d node(s), %d agents (%.0f%% join token), %d entries per agent, %d groups x %d, %d fleet, %d idle; raft_multiplier %d; load average %s -> %s\n\n",
		r.Config.Nodes, r.Config.Agents, 100*r.Config.JoinShare, r.Config.EntriesPerAgent, r.Config.Groups, r.Config.GroupEntries,
		r.Config.FleetEntries, r.Config.IdleEntries, max(r.Config.RaftMultiplier, 1), r.Load, loadAvg())
	fmt.Fprintf(&b, "| figure | value | target |\n|---|---|---|\n")
	for _, row := range r.Rows {
		fmt.Fprintf(&b, "| %s | %s | %s |\n", row[0], row[1], row[2])
	}
	fmt.Print(b.String())
	if r.Config.Out != "" {
		out, _ := json.MarshalIndent(r, "", "  ")
		if err := os.WriteFile(r.Config.Out, out, 0o644); err != nil {
			t.Error(err)
		}
	}
}

// cpuShare spins one thread for a second and returns the share of a core it
// got: on a machine shared with other work, what the figures were taken with.
func cpuShare() float64 {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	const rusageThread = 1 // RUSAGE_THREAD
	var r0, r1 syscall.Rusage
	_ = syscall.Getrusage(rusageThread, &r0)
	start := time.Now()
	for time.Since(start) < time.Second {
	}
	wall := time.Since(start)
	_ = syscall.Getrusage(rusageThread, &r1)
	used := time.Duration(r1.Utime.Nano() + r1.Stime.Nano() - r0.Utime.Nano() - r0.Stime.Nano())
	return float64(used) / float64(wall)
}
