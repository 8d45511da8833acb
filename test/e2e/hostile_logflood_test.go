package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/internal/roottest"
	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/test/h2attack"
)

// The agent limits the lines one caller can make it write (see
// workloadapi's callerLog): 10 per 10 s per uid, plus a count of those
// suppressed.
const (
	callerLogBurst  = 10
	callerLogWindow = 10 * time.Second
)

// TestHostileLogFlood: one process of another uid opens and resets
// FetchX509SVID calls as fast as it can and opens more connections than its
// budget allows. The agent's log (at info, as deployed) grows by at most the
// per-uid allowance, and a call the client canceled itself is never a
// warning.
func TestHostileLogFlood(t *testing.T) {
	roottest.Require(t)
	c, a := hostileAgent(t, "info")
	// The attacker has an identity, so its calls get as far as following
	// the cache before it resets them.
	createOne(t, c.Nodes[0], &ferrypb.Entry{Id: "attacker", SpiffeId: "spiffe://example.org/attacker", ParentId: a.ID,
		Selectors: []*ferrypb.Selector{{Type: "unix", Value: fmt.Sprintf("uid:%d", attackerUID)}}})

	logPath := filepath.Join(a.Dir, "agent.log")
	before := readLines(t, logPath)
	start := time.Now()
	cmd := exec.Command(buildTool(t, "github.com/ferry-id/ferry/test/h2attack/cmd/h2attack"), "-socket", a.Socket,
		"-mode", "flood", "-rounds", strconv.Itoa(scaled(5000)), "-conns", "300")
	asUID(cmd, attackerUID)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	require.NoError(t, err, "h2attack: %s %s", out, stderr.String())
	var rep h2attack.Report
	require.NoError(t, json.Unmarshal(out, &rep))
	require.Positive(t, rep.Refusals, "connections past the per-uid budget are refused: %+v", rep)
	require.EqualValues(t, scaled(5000), rep.StreamsSent)

	// The canary, after the flood: served, and the agent is alive.
	r := runCanary(t, a.SocketAddr(), 1)
	require.Empty(t, r.Error)
	elapsed := time.Since(start)

	added := readLines(t, logPath)[len(before):]
	var attacker []string
	for _, l := range added {
		if strings.Contains(l, fmt.Sprintf("uid=%d", attackerUID)) {
			attacker = append(attacker, l)
		}
		require.False(t, strings.Contains(l, "level=WARN") && strings.Contains(l, "context canceled"),
			"a call its client canceled is not a warning: %s", l)
	}
	// Each window lets through the burst and one suppressed-count line.
	windows := int(elapsed/callerLogWindow) + 1
	bound := windows * (callerLogBurst + 1)
	t.Logf("flood of %d reset calls and %d refused connections in %s: the agent wrote %d lines, %d about uid %d (bound %d)",
		rep.StreamsSent, rep.Refusals, elapsed.Round(time.Millisecond), len(added), len(attacker), attackerUID, bound)
	require.NotEmpty(t, attacker, "refusals are still logged")
	require.LessOrEqual(t, len(attacker), bound, "lines about the flooding uid:\n%s", strings.Join(attacker, ""))
	// Everything else the agent wrote meanwhile is its own business, a few lines.
	require.LessOrEqual(t, len(added)-len(attacker), 20, "other lines:\n%s", strings.Join(added, ""))
}

// readLines returns the lines of the file at path.
func readLines(t testing.TB, path string) []string {
	t.Helper()
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	return strings.SplitAfter(strings.TrimSuffix(string(data), "\n"), "\n")
}
