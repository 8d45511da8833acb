package e2e

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/internal/testcluster"
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
func TestDevWalkthrough(t *testing.T) {
	if testing.Short() {
		t.Skip("starts ferry dev")
	}
	for _, tool := range []string{"bash", "curl", "grep", "cut", "tr", "sed", "ls", "id"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s is not installed", tool)
		}
	}
	_, sudoErr := exec.LookPath("sudo")
	if os.Geteuid() != 0 {
		// The walkthrough shows another user's view through sudo, which
		// would ask for a password here.
		t.Skip("the walkthrough's other-user steps need root")
	}
	bin := testcluster.Binary(t)

	// A directory every user may traverse: the walkthrough's other user
	// reaches its own challenge file under the data dir.
	dir, err := os.MkdirTemp("", "ferry-dev-walk-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	require.NoError(t, os.Chmod(dir, 0o755))
	path := filepath.Dir(bin) + ":" + os.Getenv("PATH")
	if sudoErr != nil {
		// No sudo on this machine: a stand-in that runs the command as the
		// user, as sudo -u does for root.
		shim := filepath.Join(dir, "shim")
		require.NoError(t, os.MkdirAll(shim, 0o755))
		require.NoError(t, os.WriteFile(filepath.Join(shim, "sudo"), []byte(`#!/bin/sh
[ "$1" = "-u" ] || { echo "sudo stand-in: only sudo -u USER COMMAND..." >&2; exit 2; }
u=$2; shift 2
exec runuser -u "$u" -- "$@"
`), 0o755))
		path = shim + ":" + path
	}

	data := filepath.Join(dir, "data")
	logf, err := os.Create(filepath.Join(dir, "dev.log"))
	require.NoError(t, err)
	defer logf.Close()
	dev := exec.Command(bin, "dev", "--data-dir", data, "--log-level", "debug")
	dev.Env = cleanEnv(path)
	dev.Stderr = logf
	stdout, err := dev.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, dev.Start())
	t.Cleanup(func() {
		_ = dev.Process.Signal(syscall.SIGTERM)
		_ = dev.Wait()
		if t.Failed() {
			out, _ := os.ReadFile(filepath.Join(dir, "dev.log"))
			t.Logf("ferry dev log (tail):\n%s", tail(string(out), 80))
		}
	})
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
	}()
	var text string
	select {
	case text = <-printed:
	case <-time.After(90 * time.Second):
		t.Fatal("ferry dev printed no walkthrough in 90 s")
	}
	steps := parseWalkthrough(t, text)
	require.Greater(t, len(steps), 15, "the walkthrough:\n%s", text)

	// One bash session, so variables and functions carry from step to step;
	// markers split the output per step.
	var script strings.Builder
	for i, st := range steps {
		fmt.Fprintf(&script, "echo '@@@ step %d'\n%s\necho \"@@@ rc=$?\"\n", i, st.cmd)
	}
	sh := exec.Command("bash", "-c", script.String())
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
		if len(st.shows) == 0 || st.status != 0 {
			require.Equal(t, "0", rc, "step %d failed:\n$ %s\n%s", i, st.cmd, body)
		}
		if st.status != 0 {
			require.Regexp(t, fmt.Sprintf(`(?m)^HTTP/1\.1 %d `, st.status), body, "step %d:\n$ %s\n%s", i, st.cmd, body)
			sawStatus[st.status] = true
		}
		for _, s := range st.shows {
			require.Contains(t, body, s, "step %d:\n$ %s\n%s", i, st.cmd, body)
		}
	}
	// The walkthrough shows every answer of the API.
	require.Equal(t, map[int]bool{200: true, 401: true, 403: true}, sawStatus)
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
