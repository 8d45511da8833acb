// Package interop drives a running ferry with unmodified outside clients: the
// go-spiffe v2 Workload API client (and, as they land, the Azure SDK and MSAL).
// It is its own module so the product's go.mod stays lean. The stack under test
// is the real binary: `ferry dev`, started once for the whole suite.
package interop

import (
	"bufio"
	"encoding/base64"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// stack is the running `ferry dev` and the environment it exported.
type stack struct {
	bin string
	dir string
	env map[string]string
	pid int // ferry dev's process, in its own mount namespace when run as root
}

var dev *stack

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	if os.Getenv("INTEROP_CHILD") != "" {
		return child()
	}
	tmp, err := os.MkdirTemp("", "ferry-interop-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(tmp)
	// Other users' processes (a test runs one as uid 65534) must reach the
	// binaries and the Workload API socket.
	_ = os.Chmod(tmp, 0o755)
	bin := filepath.Join(tmp, "ferry")
	build := exec.Command("go", "build", "-o", bin, "./cmd/ferry")
	build.Dir = "../.."
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "building ferry: %v\n%s", err, out)
		return 1
	}
	dir := filepath.Join(tmp, "dev")
	logf, err := os.Create(filepath.Join(tmp, "dev.log"))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	cmd := exec.Command(bin, "dev", "--data-dir", dir, "--log-level", "debug")
	if os.Geteuid() == 0 {
		// As root ferry dev writes Arc challenge files to
		// /var/opt/azcmagent/tokens, where Azure SDKs look for them: a
		// private mount namespace with a tmpfs on /var/opt keeps the host
		// untouched. Clients that read those files enter it (nsenter).
		cmd = exec.Command("unshare", "--mount", "--propagation", "private", "sh", "-c",
			`mount -t tmpfs -o mode=0755 ferry-interop-dev /var/opt && exec "$0" dev --data-dir "$1" --log-level debug`, bin, dir)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer func() {
		_ = cmd.Process.Signal(os.Interrupt)
		_ = cmd.Wait()
	}()
	env, err := waitEnv(filepath.Join(dir, "env"), 60*time.Second)
	if err != nil {
		logf.Close()
		out, _ := os.ReadFile(filepath.Join(tmp, "dev.log"))
		fmt.Fprintf(os.Stderr, "ferry dev did not come up: %v\n%s", err, out)
		return 1
	}
	dev = &stack{bin: bin, dir: dir, env: env, pid: cmd.Process.Pid}
	// The only concession the Azure clients need: trust the bridge's CA. Go
	// reads SSL_CERT_FILE when it first loads the system roots, which has not
	// happened yet in this process.
	if ca := env["FERRY_BRIDGE_CA"]; ca != "" {
		os.Setenv("SSL_CERT_FILE", ca)
	}
	// Copy the test binary where another user can run it.
	self, _ := os.Executable()
	if data, err := os.ReadFile(self); err == nil {
		_ = os.WriteFile(filepath.Join(tmp, "interop.test"), data, 0o755)
	}
	code := m.Run()
	if code != 0 {
		logf.Close()
		out, _ := os.ReadFile(filepath.Join(tmp, "dev.log"))
		lines := strings.Split(string(out), "\n")
		if len(lines) > 80 {
			lines = lines[len(lines)-80:]
		}
		fmt.Fprintf(os.Stderr, "---- ferry dev log (tail)\n%s\n", strings.Join(lines, "\n"))
	}
	return code
}

// waitEnv waits for `ferry dev` to write DIR/env and parses its export lines.
func waitEnv(path string, timeout time.Duration) (map[string]string, error) {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		f, err := os.Open(path)
		if err == nil {
			env := map[string]string{}
			sc := bufio.NewScanner(f)
			for sc.Scan() {
				line := strings.TrimPrefix(sc.Text(), "export ")
				k, v, ok := strings.Cut(line, "=")
				if ok {
					env[k] = strings.Trim(v, "'")
				}
			}
			f.Close()
			return env, nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return nil, fmt.Errorf("%s not written after %s", path, timeout)
}

// ferry runs the CLI with the dev stack's environment.
func (s *stack) ferry(t *testing.T, args ...string) string {
	t.Helper()
	cmd := exec.Command(s.bin, args...)
	cmd.Env = os.Environ()
	for k, v := range s.env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("ferry %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// decodeStd decodes standard base64 (x5c entries).
func decodeStd(s string) ([]byte, error) { return base64.StdEncoding.DecodeString(s) }
