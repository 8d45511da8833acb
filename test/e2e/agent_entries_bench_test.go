package e2e

import (
	"cmp"
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/test/testcluster"
)

// BenchmarkAgentEntryCount: what a Workload API call costs as the entries an
// agent holds for other workloads grow. Two real agent processes on one real
// server: "ref" holds one entry (the caller's), "many" holds the caller's entry
// plus entries for another uid, filled up to each of FERRY_BENCH_ENTRY_COUNTS
// (default 1000,10000,100000) in turn. Every case (FetchX509SVID and
// FetchJWTSVID; reused and new client; concurrency 1 and 16) runs against ref
// and many alternately, FERRY_BENCH_ROUNDS times (default 3) for
// FERRY_BENCH_SECONDS each (default 2), so both see the same machine load;
// the medians are printed side by side with their ratio. Then each agent is
// restarted FERRY_BENCH_RESTARTS times (default 3) and the time from starting
// the process to a workload holding its X509-SVID is printed (median and
// worst, with the CPU time the agent and the server spent). FERRY_BENCH_CALLS=0
// skips the calls.
//
// FERRY_BENCH_AGENT_CONFIG is inserted in both agents' configs (default
// none); FERRY_BENCH_CLIENTS picks the clients (default go-spiffe; see
// wlload.Clients); FERRY_BENCH_CLIENT=process runs them in a process of their
// own.
//
//	go test -run '^$' -bench AgentEntryCount -benchtime 1x -timeout 60m ./test/e2e/
func BenchmarkAgentEntryCount(b *testing.B) {
	counts := envInts(b, "FERRY_BENCH_ENTRY_COUNTS", []int{1000, 10000, 100000})
	rounds := envInt("FERRY_BENCH_ROUNDS", 3)
	seconds := envInt("FERRY_BENCH_SECONDS", 2)
	restarts := envInt("FERRY_BENCH_RESTARTS", 3)
	clients := []string{"go-spiffe"}
	if s := os.Getenv("FERRY_BENCH_CLIENTS"); s != "" {
		clients = strings.Split(s, ",")
	}
	agentConf := os.Getenv("FERRY_BENCH_AGENT_CONFIG")
	var driver string
	if os.Getenv("FERRY_BENCH_CLIENT") == "process" {
		driver = buildDriver(b)
	}

	c := testcluster.New(b, testcluster.Options{Nodes: 1, LogLevel: "warn"})
	srv := c.Nodes[0]
	uid := os.Getuid()
	ref, many := c.StartAgentWith("ref", agentConf), c.StartAgentWith("many", agentConf)
	marker := map[*testcluster.Agent]*ferrypb.Entry{}
	for _, a := range []*testcluster.Agent{ref, many} {
		e := uidEntry(a.ID, "caller-"+a.Name, uid)
		createOne(b, srv, e)
		marker[a] = e
		waitHint(b, a, "")
	}
	// The entries many holds besides the caller's.
	others := 0
	type figures struct{ rate, agentCPU []float64 }
	for _, total := range counts {
		b.Run(fmt.Sprintf("entries=%d", total), func(b *testing.B) {
			for range b.N {
				if add := total - 1 - others; add > 0 {
					entries := make([]*ferrypb.Entry, add)
					for i := range entries {
						entries[i] = uidEntry(many.ID, fmt.Sprintf("other-%07d", others+i), uid+54321)
					}
					d := createBatches(b, c, entries, 1000, 2)
					others += add
					// Entries reach the agent in commit order: once a later change
					// to the caller's entry has, all of them have.
					start := time.Now()
					markEntries(b, srv, many, marker[many], total)
					fmt.Printf("agent with %d entries: created %d in %s, all on the agent %s later\n",
						total, add, d.Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
				}
				for _, client := range clients {
					if os.Getenv("FERRY_BENCH_CALLS") == "0" {
						break
					}
					for _, kind := range []string{"x509", "jwt"} {
						for _, mode := range []string{"reused", "new"} {
							for _, conc := range []int{1, 16} {
								f := map[*testcluster.Agent]*figures{ref: {}, many: {}}
								for range rounds {
									for _, a := range []*testcluster.Agent{ref, many} {
										r, cpu := runCase(b, driver, a.SocketAddr(), a.PID(), client, kind, mode, conc, seconds)
										n := float64(max(r.Calls, 1))
										f[a].rate = append(f[a].rate, float64(r.Calls)/r.Seconds)
										f[a].agentCPU = append(f[a].agentCPU, float64(cpu.Microseconds())/n)
									}
								}
								r1, rn := median(f[ref].rate), median(f[many].rate)
								c1, cn := median(f[ref].agentCPU), median(f[many].agentCPU)
								name := fmt.Sprintf("%s/%s/%s/c=%d", client, kind, mode, conc)
								b.ReportMetric(rn/r1, name+"-calls/s-ratio")
								b.ReportMetric(cn/c1, name+"-cpu/call-ratio")
								fmt.Printf("%-9s Fetch%sSVID %-6s c=%2d  1 entry: %6.0f calls/s %5.0f µs agent CPU/call | %6d entries: %6.0f calls/s %5.0f µs | calls/s %+5.1f%%  CPU/call %+5.1f%%\n",
									client, strings.ToUpper(kind), mode, conc, r1, c1, total, rn, cn, 100*(rn/r1-1), 100*(cn/c1-1))
							}
						}
					}
				}
				for _, a := range []*testcluster.Agent{ref, many} {
					n := 1
					if a == many {
						n = total
					}
					var rs []restart
					for range restarts {
						rs = append(rs, restartToSVID(b, a, srv))
					}
					slices.SortFunc(rs, func(x, y restart) int { return cmp.Compare(x.toSVID, y.toSVID) })
					mid, worst := rs[len(rs)/2], rs[len(rs)-1]
					denied := 0
					for _, r := range rs {
						denied += r.denied
					}
					b.ReportMetric(ms(mid.toSVID), fmt.Sprintf("restart-%s-ms", a.Name))
					fmt.Printf("agent restart -> first X509-SVID with %6d entries: median %4.0f ms (CPU: agent %3.0f ms, server %3.0f ms), worst %4.0f ms (%d restarts; %d calls refused with PermissionDenied)\n",
						n, ms(mid.toSVID), ms(mid.agentCPU), ms(mid.serverCPU), ms(worst.toSVID), len(rs), denied)
				}
			}
		})
	}
}

// envInts parses a comma-separated list of positive integers.
func envInts(b *testing.B, name string, def []int) []int {
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	var out []int
	for f := range strings.SplitSeq(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			b.Fatalf("%s: %q is not a positive integer", name, f)
		}
		out = append(out, n)
	}
	return out
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

// markEntries changes the hint of the caller's entry e to one naming total
// and waits until a workload of a sees it.
func markEntries(b *testing.B, srv *testcluster.Node, a *testcluster.Agent, e *ferrypb.Entry, total int) {
	b.Helper()
	e.Hint = fmt.Sprintf("entries-%d", total)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	resp, err := srv.Admin().BatchUpdateEntry(ctx, &ferrypb.BatchUpdateEntryRequest{Entries: []*ferrypb.Entry{e}})
	if err != nil {
		b.Fatal(err)
	}
	if c := codes.Code(resp.Results[0].GetCode()); c != codes.OK {
		b.Fatalf("update %s: %s %s", e.Id, c, resp.Results[0].GetMessage())
	}
	waitHint(b, a, e.Hint)
}

// waitHint waits until a workload of a receives an X509-SVID with hint.
func waitHint(b *testing.B, a *testcluster.Agent, hint string) {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	client, err := workloadapi.New(ctx, workloadapi.WithAddr(a.SocketAddr()))
	if err != nil {
		b.Fatal(err)
	}
	defer client.Close()
	w := &hintWatcher{want: hint, cancel: cancel}
	err = client.WatchX509Context(ctx, w)
	if !w.done.Load() {
		b.Fatalf("agent %s: no X509-SVID with hint %q: %v", a.Name, hint, err)
	}
}

// hintWatcher ends the watch once an SVID with hint want arrives.
type hintWatcher struct {
	want   string
	cancel context.CancelFunc
	done   atomic.Bool
}

func (w *hintWatcher) OnX509ContextUpdate(x *workloadapi.X509Context) {
	for _, s := range x.SVIDs {
		if s.Hint == w.want {
			w.done.Store(true)
			w.cancel()
		}
	}
}

func (w *hintWatcher) OnX509ContextWatchError(error) {}

// restart is what restartToSVID measured.
type restart struct {
	toSVID time.Duration
	// agentCPU is the CPU time the new agent process had used when the
	// workload held its SVID; serverCPU what the server used meanwhile.
	agentCPU, serverCPU time.Duration
	denied              int // calls refused with PermissionDenied
}

// restartToSVID stops and starts a, and measures the time from starting the
// process to a workload holding its X509-SVID. Calls are retried at once
// while the agent has no socket yet; PermissionDenied is counted (it must not
// happen: the caller has an entry) and retried.
func restartToSVID(b *testing.B, a *testcluster.Agent, srv *testcluster.Node) restart {
	b.Helper()
	a.Stop()
	srvCPU := procCPU(b, srv.PID())
	start := time.Now()
	a.Spawn()
	pid := a.PID()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var r restart
	for {
		_, err := workloadapi.FetchX509SVID(ctx, workloadapi.WithAddr(a.SocketAddr()))
		if err == nil {
			r.toSVID = time.Since(start)
			r.agentCPU = procCPU(b, pid)
			r.serverCPU = procCPU(b, srv.PID()) - srvCPU
			return r
		}
		if ctx.Err() != nil {
			b.Fatalf("agent %s: no X509-SVID after restart: %v\n%s", a.Name, err, a.LogTail(20))
		}
		switch status.Code(err) {
		case codes.Unavailable:
		case codes.PermissionDenied:
			r.denied++
		default:
			b.Fatalf("agent %s: after restart: %v", a.Name, err)
		}
		time.Sleep(time.Millisecond)
	}
}
