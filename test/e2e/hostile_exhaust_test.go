package e2e

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/internal/roottest"
	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/test/h2attack"
	"github.com/ferry-id/ferry/test/testcluster"
	"github.com/ferry-id/ferry/test/wlload"
)

// The hostile-local-user exhaustion suite: a real `ferry agent`, an attacker
// process (test/h2attack) of one uid and a canary (test/wlload, fetching an
// X509-SVID with a new go-spiffe client per call) of another. Under each
// attack the canary must never fail, the agent must stay up with its peak
// RSS under maxAgentRSS, and the attacker must have been refused.
//
// The attacks run at the sizes of the finding by default; FERRY_HOSTILE_SCALE
// (a fraction, e.g. 0.25) scales their connections and streams, and
// FERRY_HOSTILE_SECONDS (default 3) is how long the canary calls under each.
// The tests assert no timing; BenchmarkHostile prints the canary's latency
// under each attack:
//
//	go test -run '^$' -bench BenchmarkHostile -benchtime 1x ./test/e2e/

// The uids of the attacker and the canary: neither needs an account.
const (
	attackerUID = 65534
	canaryUID   = 65533
)

// maxAgentRSS is the bound on the agent's peak RSS under attack.
const maxAgentRSS = 256 << 20

var (
	toolsMu sync.Mutex
	tools   = map[string]string{}
)

// buildTool builds the command at pkg into a directory every uid may read,
// once per test process.
func buildTool(t testing.TB, pkg string) string {
	t.Helper()
	toolsMu.Lock()
	defer toolsMu.Unlock()
	if bin, ok := tools[pkg]; ok {
		return bin
	}
	dir, err := os.MkdirTemp("", "ferry-tool-")
	require.NoError(t, err)
	require.NoError(t, os.Chmod(dir, 0o755))
	bin := filepath.Join(dir, filepath.Base(pkg))
	out, err := exec.Command("go", "build", "-o", bin, pkg).CombinedOutput()
	require.NoError(t, err, "go build %s: %s", pkg, out)
	tools[pkg] = bin
	return bin
}

// asUID makes cmd run as uid (and gid uid), from /.
func asUID(cmd *exec.Cmd, uid uint32) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
	cmd.Dir = "/"
}

// procStatusKiB reads a "Vm...:" field of /proc/PID/status, in KiB.
func procStatusKiB(t testing.TB, pid int, field string) int64 {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	require.NoError(t, err, "agent process %d", pid)
	for line := range strings.Lines(string(data)) {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			require.NoError(t, err)
			return kb
		}
	}
	t.Fatalf("no %s in /proc/%d/status", field, pid)
	return 0
}

// resetPeakRSS restarts the kernel's peak-RSS record (VmHWM) of pid.
func resetPeakRSS(t testing.TB, pid int) {
	t.Helper()
	require.NoError(t, os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", pid), []byte("5"), 0))
}

// attack is a running h2attack process.
type attack struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	out   *bufio.Reader
	ready h2attack.Report
}

// startAttack starts h2attack as uid and waits until it has written its
// frames.
func startAttack(t testing.TB, uid uint32, socket string, args ...string) *attack {
	t.Helper()
	cmd := exec.Command(buildTool(t, "github.com/ferry-id/ferry/test/h2attack/cmd/h2attack"), append([]string{"-socket", socket}, args...)...)
	asUID(cmd, uid)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	require.NoError(t, err)
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	a := &attack{cmd: cmd, stdin: stdin, out: bufio.NewReader(stdout)}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	line, err := a.out.ReadString('\n')
	require.NoError(t, err, "h2attack %v", args)
	rest, ok := strings.CutPrefix(line, "ready ")
	require.True(t, ok, "h2attack: %q", line)
	require.NoError(t, json.Unmarshal([]byte(rest), &a.ready))
	return a
}

// finish lets the attacker go and returns what it saw.
func (a *attack) finish(t testing.TB) h2attack.Report {
	t.Helper()
	require.NoError(t, a.stdin.Close())
	line, err := a.out.ReadString('\n')
	require.NoError(t, err)
	var r h2attack.Report
	require.NoError(t, json.Unmarshal([]byte(line), &r))
	require.NoError(t, a.cmd.Wait())
	return r
}

// runCanary fetches X509-SVIDs as canaryUID, a new go-spiffe client per
// call, for seconds, and returns what it measured.
func runCanary(t testing.TB, addr string, seconds int) wlload.Result {
	t.Helper()
	cmd := exec.Command(buildTool(t, "github.com/ferry-id/ferry/test/wlload/cmd/wlload"),
		"-addr", addr, "-client", "go-spiffe", "-call", "x509", "-mode", "new", "-c", "1", "-seconds", strconv.Itoa(seconds))
	asUID(cmd, canaryUID)
	out, err := cmd.Output()
	require.NoError(t, err, "wlload: %s", out)
	var r wlload.Result
	require.NoError(t, json.Unmarshal(out, &r), "wlload: %s", out)
	return r
}

// hostileAgent starts a one-server cluster and an agent whose entries give
// the canary an identity (and the attacker none).
func hostileAgent(t testing.TB, logLevel string) (*testcluster.Cluster, *testcluster.Agent) {
	t.Helper()
	c := testcluster.New(t, testcluster.Options{Nodes: 1, LogLevel: "info", AgentLogLevel: logLevel})
	a := c.StartAgent("hostile")
	createOne(t, c.Nodes[0], &ferrypb.Entry{Id: "canary", SpiffeId: "spiffe://example.org/canary", ParentId: a.ID,
		Selectors: []*ferrypb.Selector{{Type: "unix", Value: fmt.Sprintf("uid:%d", canaryUID)}}})
	// The canary is served before any attack starts.
	r := runCanary(t, a.SocketAddr(), 1)
	for r.Error != "" && strings.Contains(r.Error, "PermissionDenied") {
		// The entry has not reached the agent yet.
		r = runCanary(t, a.SocketAddr(), 1)
	}
	require.Empty(t, r.Error)
	return c, a
}

// scaled returns n scaled by FERRY_HOSTILE_SCALE, at least 1.
func scaled(n int) int {
	s, err := strconv.ParseFloat(os.Getenv("FERRY_HOSTILE_SCALE"), 64)
	if err != nil || s <= 0 {
		return n
	}
	return max(1, int(float64(n)*s))
}

// exhaustion is one attack of the suite.
type exhaustion struct {
	name string
	args []string
	// uids run the attack, one process each; default attackerUID.
	uids []uint32
	// refused checks, from the attacker's report, that it was refused.
	refused func(t testing.TB, r h2attack.Report)
}

func exhaustions() []exhaustion {
	return []exhaustion{{
		// 100 connections x 256 calls that send only headers, each with a
		// ~4 KB -bin value repeated by HPACK index: within the per-uid
		// call budget they are held, past it refused.
		name: "headers",
		args: []string{"-mode", "headers", "-conns", strconv.Itoa(scaled(100)), "-streams", strconv.Itoa(scaled(256)), "-header-bytes", "3800", "-refs", "1"},
		refused: func(t testing.TB, r h2attack.Report) {
			require.Positive(t, r.Resets+r.Statuses["8"], "calls past the budget are refused (RST_STREAM or ResourceExhausted): %+v", r)
		},
	}, {
		// 100 connections x 4 requests declaring 1 MiB, never finished:
		// refused before their bodies are buffered.
		name: "bodies",
		args: []string{"-mode", "bodies", "-conns", strconv.Itoa(scaled(100)), "-streams", "4", "-body-bytes", strconv.Itoa(1 << 20)},
		refused: func(t testing.TB, r h2attack.Report) {
			require.Positive(t, r.Statuses["8"], "oversized requests get ResourceExhausted: %+v", r)
		},
	}, {
		// The same, adapted to the limits: requests just under
		// max_request_bytes, 8 per connection. Within the per-uid call
		// budget they are held (their bodies buffered), past it refused.
		name: "bodies-max",
		args: []string{"-mode", "bodies", "-conns", strconv.Itoa(scaled(100)), "-streams", "8", "-body-bytes", "69000"},
		refused: func(t testing.TB, r h2attack.Report) {
			require.Positive(t, r.Statuses["8"], "calls past the per-uid budget get ResourceExhausted: %+v", r)
		},
	}, {
		// Four uids together: each fills its own call budget (256), which
		// fills the agent's (1024). The canary's calls are still admitted:
		// the uid holding the most gives one of its calls up each time.
		name: "headers-4uids",
		uids: []uint32{attackerUID, attackerUID - 2, attackerUID - 3, attackerUID - 4},
		args: []string{"-mode", "headers", "-conns", strconv.Itoa(scaled(8)), "-streams", "64", "-header-bytes", "3800", "-refs", "1"},
		refused: func(t testing.TB, r h2attack.Report) {
			require.Positive(t, r.Statuses["8"], "calls past the budgets get ResourceExhausted: %+v", r)
		},
	}, {
		// 7,000 idle connections: past the per-uid connection budget they
		// are refused with a GOAWAY, before they cost a descriptor more.
		name: "idle",
		args: []string{"-mode", "idle", "-conns", strconv.Itoa(scaled(7000))},
		refused: func(t testing.TB, r h2attack.Report) {
			require.Positive(t, r.Refusals, "connections past the per-uid budget get GOAWAY ENHANCE_YOUR_CALM: %+v", r)
		},
	}}
}

// TestHostileExhaustion runs each exhaustion attack as attackerUID with the
// canary calling as canaryUID.
func TestHostileExhaustion(t *testing.T) {
	roottest.Require(t)
	_, a := hostileAgent(t, "info")
	seconds := envInt("FERRY_HOSTILE_SECONDS", 3)
	for _, ex := range exhaustions() {
		t.Run(ex.name, func(t *testing.T) {
			r, rep, peak := underAttack(t, a, ex, seconds)
			ex.refused(t, rep)
			require.Empty(t, r.Error, "the canary failed under attack")
			require.Positive(t, r.Calls)
			require.Less(t, peak, int64(maxAgentRSS), "agent peak RSS")
			t.Logf("%s: canary %d calls, p50 %.1f ms, p99 %.1f ms; agent peak RSS %.1f MiB; attacker: %+v",
				ex.name, r.Calls, float64(r.P50us)/1000, float64(r.P99us)/1000, float64(peak)/(1<<20), rep)
		})
	}
}

// underAttack runs ex against a with the canary calling for seconds, and
// returns the canary's result, the attacker's report and the agent's peak
// RSS in bytes. The agent must be alive throughout.
func underAttack(t testing.TB, a *testcluster.Agent, ex exhaustion, seconds int) (wlload.Result, h2attack.Report, int64) {
	t.Helper()
	pid := a.PID()
	require.NotZero(t, pid, "agent is not running")
	resetPeakRSS(t, pid)
	uids := ex.uids
	if len(uids) == 0 {
		uids = []uint32{attackerUID}
	}
	var atks []*attack
	for _, uid := range uids {
		atks = append(atks, startAttack(t, uid, a.Socket, ex.args...))
	}
	r := runCanary(t, a.SocketAddr(), seconds)
	peak := procStatusKiB(t, pid, "VmHWM") << 10
	var rep h2attack.Report
	for _, atk := range atks {
		rep = rep.Add(atk.finish(t))
	}
	require.Equal(t, pid, a.PID(), "the agent restarted")
	require.NoError(t, syscall.Kill(pid, 0), "the agent died")
	return r, rep, peak
}

// BenchmarkHostile prints, for no attack and then each attack of
// TestHostileExhaustion, the canary's calls, p50 and p99, and the agent's
// peak RSS. FERRY_HOSTILE_SECONDS (default 20) is the canary's time under
// each.
func BenchmarkHostile(b *testing.B) {
	roottest.Require(b)
	_, a := hostileAgent(b, "info")
	seconds := envInt("FERRY_HOSTILE_SECONDS", 20)
	cases := append([]exhaustion{{name: "none", args: []string{"-mode", "idle", "-conns", "0"}, refused: func(testing.TB, h2attack.Report) {}}}, exhaustions()...)
	for _, ex := range cases {
		b.Run(ex.name, func(b *testing.B) {
			for range b.N {
				r, rep, peak := underAttack(b, a, ex, seconds)
				ex.refused(b, rep)
				if r.Error != "" {
					b.Fatalf("canary failed: %s", r.Error)
				}
				b.ReportMetric(float64(r.P99us)/1000, "canary-p99-ms")
				b.ReportMetric(float64(peak)/(1<<20), "agent-peak-RSS-MiB")
				fmt.Printf("attack %-7s canary (uid %d, new go-spiffe client per X509-SVID fetch): %5d calls in %ds, p50 %.2f ms, p99 %.2f ms, 0 failed; agent peak RSS %.1f MiB; attacker (uid %d): %d dialed, %d connections refused, %d calls sent, %d reset, statuses %v\n",
					ex.name, canaryUID, r.Calls, seconds, float64(r.P50us)/1000, float64(r.P99us)/1000, float64(peak)/(1<<20),
					attackerUID, rep.Dialed, rep.Refusals, rep.StreamsSent, rep.Resets, rep.Statuses)
			}
		})
	}
}
