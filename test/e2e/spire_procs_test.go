package e2e

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ferry-id/ferry/test/freeport"
	"github.com/ferry-id/ferry/test/testcluster"
)

// The SPIRE processes the side-by-side benchmarks start: spire-server with
// its default sqlite datastore and a disk key manager (so that it signs with
// the same CA after a restart, as a deployed server does), and spire-agents,
// from the binaries in the directory FERRY_BENCH_SPIRE names.

// spireJoinToken is the server's join_token node attestor.
const spireJoinToken = `  NodeAttestor "join_token" {
    plugin_data {}
  }
`

// spireProc is one SPIRE process: its command line, log and exit.
type spireProc struct {
	t    testing.TB
	bin  string
	args []string
	log  string

	mu   sync.Mutex
	cmd  *exec.Cmd
	done <-chan struct{}
}

func (p *spireProc) start() {
	p.t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	cmd := exec.Command(p.bin, p.args...)
	done, err := testcluster.StartLogged(cmd, p.log)
	if err != nil {
		p.t.Fatal(err)
	}
	p.cmd, p.done = cmd, done
}

// stop sends SIGTERM and waits for the process to exit (SIGKILL after 30s).
func (p *spireProc) stop() {
	p.mu.Lock()
	cmd, done := p.cmd, p.done
	p.cmd = nil
	p.mu.Unlock()
	if cmd == nil {
		return
	}
	testcluster.StopProcess(cmd, done, syscall.SIGTERM, 30*time.Second)
}

func (p *spireProc) pid() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil {
		return 0
	}
	return p.cmd.Process.Pid
}

func (p *spireProc) exited() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.done == nil {
		return false
	}
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

func (p *spireProc) logTail(lines int) string {
	data, _ := os.ReadFile(p.log)
	all := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(all) > lines {
		all = all[len(all)-lines:]
	}
	return strings.Join(all, "\n")
}

// spireServer is a spire-server process.
type spireServer struct {
	spireProc
	binDir   string
	dir      string
	sock     string
	port     int
	profAddr string // its pprof listener (profiling_enabled)
}

// startSPIREServer writes a server config under dir with nodeAttestors (HCL
// plugin blocks) and starts spire-server, returning once it is healthy.
func startSPIREServer(t testing.TB, binDir, dir, nodeAttestors string) *spireServer {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	port := freePort(t)
	prof := freePort(t)
	s := &spireServer{binDir: binDir, dir: dir, sock: filepath.Join(dir, "api.sock"), port: port, profAddr: fmt.Sprintf("localhost:%d", prof)}
	conf := filepath.Join(dir, "server.conf")
	text := fmt.Sprintf(`server {
  bind_address = "127.0.0.1"
  bind_port = "%d"
  socket_path = %q
  trust_domain = "example.org"
  data_dir = %q
  log_level = "WARN"
  profiling_enabled = true
  profiling_port = %d
}
plugins {
  DataStore "sql" {
    plugin_data {
      database_type = "sqlite3"
      connection_string = %q
    }
  }
%s  KeyManager "disk" {
    plugin_data {
      keys_path = %q
    }
  }
}
`, port, s.sock, filepath.Join(dir, "data"), prof, filepath.Join(dir, "datastore.sqlite3"), nodeAttestors, filepath.Join(dir, "keys.json"))
	if err := os.WriteFile(conf, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	s.spireProc = spireProc{t: t, bin: filepath.Join(binDir, "spire-server"), args: []string{"run", "-config", conf}, log: filepath.Join(dir, "server.log")}
	t.Cleanup(s.stop)
	s.start()
	s.waitHealthy(2 * time.Minute)
	return s
}

// waitHealthy waits until `spire-server healthcheck` succeeds and returns
// how long that took from the call.
func (s *spireServer) waitHealthy(timeout time.Duration) time.Duration {
	s.t.Helper()
	start := time.Now()
	for {
		out, err := s.cli("healthcheck")
		if err == nil {
			return time.Since(start)
		}
		if s.exited() {
			s.t.Fatalf("spire-server exited:\n%s", s.logTail(40))
		}
		if time.Since(start) > timeout {
			s.t.Fatalf("spire-server not healthy after %s: %v %s\n%s", timeout, err, out, s.logTail(40))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// cli runs spire-server's command line against this server's socket.
func (s *spireServer) cli(args ...string) (string, error) {
	out, err := exec.Command(filepath.Join(s.binDir, "spire-server"), append(args, "-socketPath", s.sock)...).CombinedOutput()
	return string(out), err
}

// mustCLI is cli that fails the test on an error.
func (s *spireServer) mustCLI(args ...string) string {
	s.t.Helper()
	out, err := s.cli(args...)
	if err != nil {
		s.t.Fatalf("spire-server %v: %v\n%.2000s", args, err, out)
	}
	return out
}

// liveHeap is the server's live heap after a collection, from its pprof
// listener.
func (s *spireServer) liveHeap() (int64, error) { return testcluster.LiveHeapAt(s.profAddr) }

// spireAgent is a spire-agent process.
type spireAgent struct {
	spireProc
	sock string
}

func (a *spireAgent) addr() string { return "unix://" + a.sock }

// startAgent writes a spire-agent config under dir with the node attestor
// block attestor and extra lines in the agent block, and starts it. It
// bootstraps from the server's bundle.
func (s *spireServer) startAgent(dir, attestor, extra string) *spireAgent {
	s.t.Helper()
	a := s.prepareAgent(dir, attestor, extra, s.mustCLI("bundle", "show"))
	a.start()
	return a
}

// prepareAgent writes the agent's config and trust bundle, not started.
func (s *spireServer) prepareAgent(dir, attestor, extra, bundle string) *spireAgent {
	s.t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		s.t.Fatal(err)
	}
	bundlePath := filepath.Join(dir, "bundle.pem")
	if err := os.WriteFile(bundlePath, []byte(bundle), 0o600); err != nil {
		s.t.Fatal(err)
	}
	a := &spireAgent{sock: filepath.Join(dir, "api.sock")}
	conf := filepath.Join(dir, "agent.conf")
	text := fmt.Sprintf(`agent {
  data_dir = %q
  log_level = "WARN"
  server_address = "127.0.0.1"
  server_port = "%d"
  socket_path = %q
  trust_domain = "example.org"
  trust_bundle_path = %q
%s}
plugins {
%s  KeyManager "memory" {
    plugin_data {}
  }
  WorkloadAttestor "unix" {
    plugin_data {}
  }
}
`, filepath.Join(dir, "data"), s.port, a.sock, bundlePath, extra, attestor)
	if err := os.WriteFile(conf, []byte(text), 0o600); err != nil {
		s.t.Fatal(err)
	}
	a.spireProc = spireProc{t: s.t, bin: filepath.Join(s.binDir, "spire-agent"), args: []string{"run", "-config", conf}, log: filepath.Join(dir, "agent.log")}
	s.t.Cleanup(a.stop)
	return a
}

// waitSocket waits for the agent's Workload API socket to accept.
func (a *spireAgent) waitSocket(t testing.TB) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for time.Now().Before(deadline) {
		if c, err := net.Dial("unix", a.sock); err == nil {
			c.Close()
			return
		}
		if a.exited() {
			t.Fatalf("spire-agent exited:\n%s", a.logTail(40))
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("spire-agent: socket not ready:\n%s", a.logTail(40))
}

// freePort returns a loopback TCP port reserved for this test binary.
func freePort(t testing.TB) int {
	t.Helper()
	return freeport.Port(t)
}
