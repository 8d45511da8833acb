package e2e

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ferry-id/ferry/test/testcluster"
	"github.com/ferry-id/ferry/test/wlload"
)

// BenchmarkAgentVsSPIRE measures ferry's agent and a SPIRE agent side by
// side with the same driver: every case of BenchmarkAgentWorkloadAPI (both
// clients, X509 and JWT, reused and new clients, concurrency 1 and 16), the
// driver a process of its own (test/wlload), the two agents alternated case
// by case, FERRY_BENCH_ROUNDS rounds (default 3), and prints the medians:
// calls/s, p99, and the agent's CPU time per call. It runs only when
// FERRY_BENCH_SPIRE names a directory holding spire-server and spire-agent
// binaries (FERRY_BENCH_CASES, a regexp, runs only the cases it matches,
// e.g. "new/c=1"):
//
//	FERRY_BENCH_SPIRE=/path/to/spire/bin go test -run '^$' -bench AgentVsSPIRE -benchtime 1x -timeout 60m ./test/e2e/
//
// Each agent attests the driver by its uid (unix:uid), has one entry for it,
// and logs at warn (SPIRE) and info (ferry). The machine's load average is
// printed with every round: a round disturbed by other work should be run
// again.
func BenchmarkAgentVsSPIRE(b *testing.B) {
	spireBin := os.Getenv("FERRY_BENCH_SPIRE")
	if spireBin == "" {
		b.Skip("FERRY_BENCH_SPIRE (a directory with spire-server and spire-agent) is not set")
	}
	c := testcluster.New(b, testcluster.Options{Nodes: 1, LogLevel: "info", AgentLogLevel: "info"})
	fa := c.StartAgent("bench")
	createOne(b, c.Nodes[0], uidEntry(fa.ID, "wlapi", os.Getuid()))
	sp := startSPIRE(b, spireBin)
	driver := buildDriver(b)
	seconds := envInt("FERRY_BENCH_SECONDS", 3)
	rounds := envInt("FERRY_BENCH_ROUNDS", 3)
	var only *regexp.Regexp // FERRY_BENCH_CASES: run only the cases it matches
	if v := os.Getenv("FERRY_BENCH_CASES"); v != "" {
		only = regexp.MustCompile(v)
	}
	agents := []struct {
		name string
		addr string
		pid  int
	}{{"ferry", fa.SocketAddr(), fa.PID()}, {"spire", sp.addr, sp.pid}}
	// The first SVIDs, and both agents settled.
	for _, a := range agents {
		waitServed(b, driver, a.addr)
		runCase(b, driver, a.addr, a.pid, wlload.Clients[0], "x509", "reused", 4, 2)
		runCase(b, driver, a.addr, a.pid, "grpc", "jwt", "new", 4, 2)
	}
	type key struct{ agent, cs string }
	type sample struct{ rate, p99ms, cpuUS float64 }
	results := map[key][]sample{}
	var cases []string
	for round := range rounds {
		fmt.Printf("round %d: load average %s", round+1, loadavg())
		for _, client := range wlload.Clients {
			for _, kind := range []string{"x509", "jwt"} {
				for _, mode := range []string{"reused", "new"} {
					for _, conc := range []int{1, 16} {
						cs := fmt.Sprintf("%s/%s/%s/c=%d", client, kind, mode, conc)
						if only != nil && !only.MatchString(cs) {
							continue
						}
						if round == 0 {
							cases = append(cases, cs)
						}
						order := agents
						if round%2 == 1 { // alternate which agent goes first
							order = []struct {
								name string
								addr string
								pid  int
							}{agents[1], agents[0]}
						}
						for _, a := range order {
							r, cpu := runCase(b, driver, a.addr, a.pid, client, kind, mode, conc, seconds)
							n := float64(max(r.Calls, 1))
							results[key{a.name, cs}] = append(results[key{a.name, cs}], sample{
								rate: float64(r.Calls) / r.Seconds, p99ms: float64(r.P99us) / 1000, cpuUS: float64(cpu.Microseconds()) / n,
							})
						}
					}
				}
			}
		}
		fmt.Printf("round %d done: load average %s", round+1, loadavg())
	}
	median := func(xs []sample, f func(sample) float64) float64 {
		v := make([]float64, len(xs))
		for i, x := range xs {
			v[i] = f(x)
		}
		sort.Float64s(v)
		return v[len(v)/2]
	}
	fmt.Printf("\nmedians of %d rounds, %d s per case (driver: test/wlload in its own process)\n", rounds, seconds)
	fmt.Printf("| case | ferry calls/s | SPIRE calls/s | ratio | ferry p99 ms | SPIRE p99 ms | ferry agent CPU µs/call | SPIRE agent CPU µs/call | CPU ratio |\n|---|---|---|---|---|---|---|---|---|\n")
	for _, cs := range cases {
		f, s := results[key{"ferry", cs}], results[key{"spire", cs}]
		fr, sr := median(f, func(x sample) float64 { return x.rate }), median(s, func(x sample) float64 { return x.rate })
		fp, spp := median(f, func(x sample) float64 { return x.p99ms }), median(s, func(x sample) float64 { return x.p99ms })
		fc, sc := median(f, func(x sample) float64 { return x.cpuUS }), median(s, func(x sample) float64 { return x.cpuUS })
		fmt.Printf("| %s | %.0f | %.0f | %.2fx | %.2f | %.2f | %.0f | %.0f | %.2f |\n", cs, fr, sr, fr/sr, fp, spp, fc, sc, fc/sc)
		b.ReportMetric(fr/sr, strings.ReplaceAll(cs, "/", "_")+"-rate-ratio")
	}
}

func loadavg() string {
	data, _ := os.ReadFile("/proc/loadavg")
	return string(data)
}

// waitServed waits until the endpoint at addr serves an X509-SVID.
func waitServed(b *testing.B, driver, addr string) {
	b.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		out, err := exec.Command(driver, "-addr", addr, "-call", "x509", "-mode", "new", "-c", "1", "-seconds", "0.2").Output()
		if err == nil && !bytes.Contains(out, []byte(`"error"`)) {
			return
		}
		if time.Now().After(deadline) {
			b.Fatalf("%s never served an X509-SVID: %v %s", addr, err, out)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// spire is a SPIRE server and agent started for the comparison.
type spire struct {
	addr string // the agent's Workload API
	pid  int    // the agent's PID
}

// startSPIRE starts spire-server and spire-agent from bin, attests the
// agent with a join token and registers one entry for this process's uid.
func startSPIRE(b *testing.B, bin string) *spire {
	b.Helper()
	s := startSPIREServer(b, bin, b.TempDir(), spireJoinToken)
	m := regexp.MustCompile(`Token: (\S+)`).FindStringSubmatch(s.mustCLI("token", "generate", "-spiffeID", "spiffe://example.org/agent"))
	if m == nil {
		b.Fatal("spire-server token generate: no token")
	}
	s.mustCLI("entry", "create", "-parentID", "spiffe://example.org/agent", "-spiffeID", "spiffe://example.org/bench/wlapi",
		"-selector", fmt.Sprintf("unix:uid:%d", os.Getuid()))
	a := s.startAgent(filepath.Join(s.dir, "agent"), fmt.Sprintf(`  NodeAttestor "join_token" {
    plugin_data {}
  }
`), "  join_token = "+strconv.Quote(m[1])+"\n")
	a.waitSocket(b)
	return &spire{addr: a.addr(), pid: a.pid()}
}
