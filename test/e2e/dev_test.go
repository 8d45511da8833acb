package e2e

import (
	"bufio"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/internal/roottest"
	"github.com/ferry-id/ferry/test/testcluster"
)

// walkStep is one command of the printed walkthrough and what its trailing
// comment says it shows.
type walkStep struct {
	cmd    string   // as printed, continuation lines included
	status int      // HTTP status the output must show (0: none)
	shows  []string // quoted strings the output must contain
}

var (
	trailing = regexp.MustCompile(`\s{2,}# (.*)$`)
	leadCode = regexp.MustCompile(`^([1-5][0-9][0-9])\b`)
	quoted   = regexp.MustCompile(`"([^"]+)"`)
)

// parseWalkthrough takes the indented, non-comment lines between the
// greeting and the goodbye, joins continuation lines, and reads each step's
// trailing comment: a leading HTTP status and any quoted strings are what the
// command must show.
func parseWalkthrough(t *testing.T, text string) []walkStep {
	t.Helper()
	var steps []walkStep
	var cur []string
	for _, line := range strings.Split(text, "\n") {
		if !strings.HasPrefix(line, "  ") {
			continue
		}
		line = strings.TrimPrefix(line, "  ")
		if len(cur) == 0 && (strings.TrimSpace(line) == "" || strings.HasPrefix(strings.TrimSpace(line), "#")) {
			continue
		}
		cur = append(cur, line)
		if strings.HasSuffix(line, `\`) {
			continue
		}
		st := walkStep{cmd: strings.Join(cur, "\n")}
		cur = nil
		if m := trailing.FindStringSubmatch(line); m != nil {
			comment := m[1]
			if c := leadCode.FindStringSubmatch(comment); c != nil {
				st.status, _ = strconv.Atoi(c[1])
			}
			for _, q := range quoted.FindAllStringSubmatch(comment, -1) {
				st.shows = append(st.shows, q[1])
			}
		}
		steps = append(steps, st)
	}
	require.Empty(t, cur, "a continuation line ends the walkthrough")
	return steps
}

// TestDevWalkthrough starts `ferry dev` as `make run` does and runs the
// walkthrough it prints, as printed, in one bash session: every command must
// succeed, and every command whose comment says what it shows must show it.
// Then it restarts the stack over the same data dir five times: each start
// must find the tenant, identities, client IDs, resources, entries, agents
// and authorities exactly as they were (a restarted server that read its
// state before replaying its log made a new tenant each time), and the
// walkthrough runs again after each, its create commands now answering that
// what they create already exists.
//
// The stack runs as root in private mount and network namespaces: a tmpfs on
// /var/opt gives it /var/opt/azcmagent/tokens (the challenge directory Azure
// SDKs accept, which ferry dev takes when it runs as root) without touching
// the host, and a loopback of its own keeps other processes off its ports.
func TestDevWalkthrough(t *testing.T) {
	if testing.Short() {
		t.Skip("starts ferry dev")
	}
	for _, tool := range []string{"bash", "curl", "grep", "cut", "tr", "sed", "ls", "id", "setpriv", "unshare", "nsenter", "mount", "ip"} {
		if _, err := exec.LookPath(tool); err != nil {
			roottest.Skipf(t, "%s is not installed", tool)
		}
	}
	// The walkthrough shows another user's view (setpriv), and the stack
	// needs namespaces of its own.
	roottest.Require(t)
	bin := testcluster.Binary(t)

	dir, err := os.MkdirTemp("", "ferry-dev-walk-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	require.NoError(t, os.Chmod(dir, 0o755))
	path := filepath.Dir(bin) + ":" + os.Getenv("PATH")

	// The data dir sits in a home directory others may not enter (0750, as
	// many distributions make them), as a newcomer's checkout would.
	home := filepath.Join(dir, "home")
	require.NoError(t, os.Mkdir(home, 0o750))
	data := filepath.Join(home, "ferry", ".dev")
	logPath := filepath.Join(dir, "dev.log")
	t.Cleanup(func() {
		if t.Failed() {
			out, _ := os.ReadFile(logPath)
			t.Logf("ferry dev log (tail):\n%s", tail(string(out), 80))
		}
	})

	d := startDev(t, bin, data, path, logPath)
	require.Contains(t, d.text, "the challenge files are in /var/opt/azcmagent/tokens, so unmodified Azure SDKs",
		"as root, with the directory free, the Arc endpoint serves SDKs")
	steps := parseWalkthrough(t, d.text)
	require.Greater(t, len(steps), 15, "the walkthrough:\n%s", d.text)
	start := time.Now()
	runWalkthrough(t, d, dir, path, steps, false)
	t.Logf("walkthrough: %s", time.Since(start).Round(time.Millisecond))
	env := readEnvFile(t, filepath.Join(data, "env"))
	want := directoryState(t, env["FERRY_ADMIN_SOCKET"])
	require.Len(t, filter(want, "tenant "), 1, "%v", want)

	for i := 1; i <= 5; i++ {
		d.stop(t)
		start := time.Now()
		d = startDev(t, bin, data, path, logPath)
		t.Logf("restart %d: walkthrough printed after %s", i, time.Since(start).Round(time.Millisecond))
		again := readEnvFile(t, filepath.Join(data, "env"))
		for _, k := range []string{"AZURE_TENANT_ID", "FERRY_AGENT_ID", "FERRY_JWT_ISSUER", "AZURE_AUTHORITY_HOST", "FERRY_BRIDGE_CA"} {
			require.Equal(t, env[k], again[k], "restart %d: %s", i, k)
		}
		requireSameState(t, want, directoryState(t, env["FERRY_ADMIN_SOCKET"]), fmt.Sprintf("restart %d", i))
		runWalkthrough(t, d, dir, path, parseWalkthrough(t, d.text), true)
		requireSameState(t, want, directoryState(t, env["FERRY_ADMIN_SOCKET"]), fmt.Sprintf("walkthrough after restart %d", i))
	}
	d.stop(t)
	checkDevLog(t, logPath, 6)
}

// devStack is a running `ferry dev` in namespaces of its own.
type devStack struct {
	cmd  *exec.Cmd
	text string // the walkthrough it printed
	done chan struct{}
}

// startDev starts ferry dev over data and waits for its walkthrough.
func startDev(t *testing.T, bin, data, path, logPath string) *devStack {
	t.Helper()
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	require.NoError(t, err)
	cmd := exec.Command("unshare", "--mount", "--net", "--propagation", "private", "sh", "-c",
		`ip link set lo up && mount -t tmpfs -o mode=0755 ferry-dev /var/opt && exec "$0" dev --data-dir "$1" --log-level debug`,
		bin, data)
	cmd.Env = cleanEnv(path)
	cmd.Stderr = logf
	// The stack ends with this test binary, whatever happens to it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	d := &devStack{cmd: cmd, done: make(chan struct{})}
	printed := make(chan string, 1)
	go func() {
		var b strings.Builder
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			b.WriteString(sc.Text() + "\n")
			if strings.HasPrefix(sc.Text(), "Stop with Ctrl-C") {
				printed <- b.String()
				break
			}
		}
		for sc.Scan() {
		}
		_ = cmd.Wait()
		logf.Close()
		close(d.done)
	}()
	t.Cleanup(func() { d.stop(t) })
	select {
	case d.text = <-printed:
	case <-d.done:
		t.Fatal("ferry dev exited before printing its walkthrough")
	case <-time.After(120 * time.Second):
		t.Fatal("ferry dev printed no walkthrough in 120 s")
	}
	return d
}

// stop ends the stack as Ctrl-C would and waits for it.
func (d *devStack) stop(t *testing.T) {
	t.Helper()
	select {
	case <-d.done:
		return
	default:
	}
	_ = d.cmd.Process.Signal(syscall.SIGINT)
	select {
	case <-d.done:
	case <-time.After(60 * time.Second):
		_ = d.cmd.Process.Kill()
		<-d.done
		t.Error("ferry dev did not stop within 60 s of SIGINT")
	}
}

// creates are the walkthrough's commands that make something; run again over
// the same data dir, they say it exists.
var creates = []string{"ferry entry create ", "ferry identity create ", "ferry identity federated-credential create ",
	"ferry resource create ", "ferry role assign "}

// runWalkthrough runs steps in one bash session inside the stack's
// namespaces, so variables and functions carry from step to step; markers
// split the output per step. With again (the walkthrough ran before over the
// same data dir), the create commands must answer that their object already
// exists, and the calls that were refused for want of the role now succeed
// with it.
func runWalkthrough(t *testing.T, d *devStack, dir, path string, steps []walkStep, again bool) {
	t.Helper()
	var script strings.Builder
	for i, st := range steps {
		fmt.Fprintf(&script, "echo '@@@ step %d'\n%s\necho \"@@@ rc=$?\"\n", i, st.cmd)
	}
	sh := exec.Command("nsenter", "-t", strconv.Itoa(d.cmd.Process.Pid), "-m", "-n", "--", "bash", "-c", script.String())
	sh.Dir = dir
	sh.Env = cleanEnv(path)
	out, err := sh.CombinedOutput()
	require.NoError(t, err, "%s", out)

	sections := strings.Split(string(out), "@@@ step ")[1:]
	require.Len(t, sections, len(steps), "%s", out)
	var sawStatus = map[int]bool{}
	for i, st := range steps {
		sec := sections[i]
		body, rcText, ok := strings.Cut(sec, "@@@ rc=")
		require.True(t, ok, "step %d: %s", i, sec)
		body = strings.TrimPrefix(body, strconv.Itoa(i)+"\n")
		rc := strings.TrimSpace(rcText)
		t.Logf("$ %s\n%s", st.cmd, tail(body, 12))
		if again && slices.ContainsFunc(creates, func(p string) bool { return strings.HasPrefix(st.cmd, p) }) {
			if rc != "0" {
				require.Regexp(t, `(?i)already ?exists`, body, "step %d, run again:\n$ %s\n%s", i, st.cmd, body)
			}
			continue
		}
		if len(st.shows) == 0 || st.status != 0 {
			require.Equal(t, "0", rc, "step %d failed:\n$ %s\n%s", i, st.cmd, body)
		}
		if again && st.status == http.StatusForbidden {
			// The role was assigned on the first run: every new token
			// carries it.
			require.Regexp(t, `(?m)^HTTP/1\.1 200 `, body, "step %d, run again:\n$ %s\n%s", i, st.cmd, body)
			require.Contains(t, body, `"roles":["reader"]`, "step %d, run again:\n$ %s\n%s", i, st.cmd, body)
			sawStatus[http.StatusOK] = true
			continue
		}
		if st.status != 0 {
			require.Regexp(t, fmt.Sprintf(`(?m)^HTTP/1\.1 %d `, st.status), body, "step %d:\n$ %s\n%s", i, st.cmd, body)
			sawStatus[st.status] = true
		}
		for _, s := range st.shows {
			require.Contains(t, body, s, "step %d:\n$ %s\n%s", i, st.cmd, body)
		}
	}
	// The walkthrough shows every answer of the API (run again, the role is
	// held from the start).
	if again {
		require.Equal(t, map[int]bool{200: true, 401: true}, sawStatus)
	} else {
		require.Equal(t, map[int]bool{200: true, 401: true, 403: true}, sawStatus)
	}
}

// readEnvFile parses the export lines ferry dev writes.
func readEnvFile(t *testing.T, path string) map[string]string {
	t.Helper()
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	env := map[string]string{}
	for _, line := range strings.Split(string(data), "\n") {
		k, v, ok := strings.Cut(strings.TrimPrefix(line, "export "), "=")
		if ok {
			env[k] = strings.Trim(v, "'")
		}
	}
	return env
}

func filter(lines []string, prefix string) []string {
	var out []string
	for _, l := range lines {
		if strings.HasPrefix(l, prefix) {
			out = append(out, l)
		}
	}
	return out
}

// checkDevLog reads the log of runs starts of ferry dev: no line repeats a
// key or holds an unexpanded format, and every role said it stopped, each
// time.
func checkDevLog(t *testing.T, path string, runs int) {
	t.Helper()
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	stops := map[string]int{}
	for _, line := range strings.Split(strings.TrimSpace(string(data)), "\n") {
		if !strings.HasPrefix(line, "time=") {
			continue
		}
		keys, msg := logfmtKeys(line)
		seen := map[string]bool{}
		for _, k := range keys {
			require.False(t, seen[k], "key %q repeats in: %s", k, line)
			seen[k] = true
		}
		require.NotRegexp(t, `%[-+# 0]*[vsdqxT]|%!`, line, "an unexpanded format in: %s", line)
		if strings.HasSuffix(msg, " stopped") {
			stops[msg]++
		}
	}
	for _, msg := range []string{"server stopped", "agent stopped", "bridge stopped", "demo API stopped"} {
		require.Equal(t, runs, stops[msg], "%q in %d runs", msg, runs)
	}
}

// logfmtKeys returns the keys of a log/slog text line, in order, and its msg.
func logfmtKeys(line string) ([]string, string) {
	var keys []string
	var msg string
	for i := 0; i < len(line); {
		for i < len(line) && line[i] == ' ' {
			i++
		}
		eq := strings.IndexByte(line[i:], '=')
		if eq < 0 {
			break
		}
		key := line[i : i+eq]
		i += eq + 1
		var val string
		if i < len(line) && line[i] == '"' {
			j := i + 1
			for j < len(line) && line[j] != '"' {
				if line[j] == '\\' {
					j++
				}
				j++
			}
			val, _ = strconv.Unquote(line[i:min(j+1, len(line))])
			i = j + 1
		} else {
			j := strings.IndexByte(line[i:], ' ')
			if j < 0 {
				j = len(line) - i
			}
			val = line[i : i+j]
			i += j
		}
		keys = append(keys, key)
		if key == "msg" {
			msg = val
		}
	}
	return keys, msg
}

// cleanEnv is this process's environment without anything that points a
// ferry or Azure client somewhere, and with path as PATH.
func cleanEnv(path string) []string {
	var env []string
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		switch {
		case name == "PATH", strings.HasPrefix(name, "FERRY_"), strings.HasPrefix(name, "AZURE_"), strings.HasPrefix(name, "SPIFFE_"),
			strings.HasPrefix(name, "IDENTITY_"), strings.HasPrefix(name, "IMDS_"), name == "DEMO_API", name == "SSL_CERT_FILE":
			continue
		}
		env = append(env, kv)
	}
	return append(env, "PATH="+path, "NO_PROXY=*")
}

func tail(s string, lines int) string {
	all := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(all) > lines {
		all = all[len(all)-lines:]
	}
	return strings.Join(all, "\n")
}
