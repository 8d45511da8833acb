package testcluster

import (
	"bufio"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// StartLogged starts cmd with its output appended to the file at log
// (created 0600) and returns a channel closed once the process has exited.
func StartLogged(cmd *exec.Cmd, log string) (<-chan struct{}, error) {
	logf, err := os.OpenFile(log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, err
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); logf.Close(); close(done) }()
	return done, nil
}

// StopProcess sends sig to a process StartLogged started and waits until it
// has exited (done), killing it if it is still running after grace.
func StopProcess(cmd *exec.Cmd, done <-chan struct{}, sig syscall.Signal, grace time.Duration) {
	_ = cmd.Process.Signal(sig)
	select {
	case <-done:
	case <-time.After(grace):
		_ = cmd.Process.Kill()
		<-done
	}
}

// ProcRSS returns the resident set (VmRSS) of process pid, in bytes.
func ProcRSS(pid int) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			kib, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kib << 10, err
		}
	}
	return 0, fmt.Errorf("testcluster: no VmRSS for pid %d", pid)
}

// clockTicks is USER_HZ, the unit of /proc/<pid>/stat's CPU times: 100 on
// every Linux architecture Go supports.
const clockTicks = 100

// ProcCPU returns the CPU time (user + system) process pid has used.
func ProcCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) may hold spaces: count fields after its ')'.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("testcluster: malformed /proc/%d/stat", pid)
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 {
		return 0, fmt.Errorf("testcluster: short /proc/%d/stat", pid)
	}
	// f[0] is field 3 (state): utime is field 14, stime field 15.
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("testcluster: malformed /proc/%d/stat", pid)
	}
	return time.Duration(ut+st) * time.Second / clockTicks, nil
}

// LiveHeap collects garbage in the node's process and returns the bytes of
// heap still reachable (runtime.MemStats.HeapAlloc just after the
// collection), read from /debug/pprof/heap on its health listener.
//
// It collects twice: what sync.Pools held at the first collection (gRPC's
// write buffers, say) is only released by the second.
func (n *Node) LiveHeap() (int64, error) { return LiveHeapAt(n.HealthAddr) }

// LiveHeapAt is LiveHeap for any Go process serving net/http/pprof at addr
// (host:port): a ferry node's health listener, or another server's
// profiling listener in a side-by-side comparison.
func LiveHeapAt(addr string) (int64, error) {
	cl := http.Client{Timeout: time.Minute}
	var resp *http.Response
	for i := range 2 {
		var err error
		resp, err = cl.Get("http://" + addr + "/debug/pprof/heap?gc=1&debug=1")
		if err != nil {
			return 0, err
		}
		if i == 0 {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, fmt.Errorf("testcluster: heap profile: %s", resp.Status)
	}
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "# HeapAlloc = "); ok {
			return strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		}
	}
	return 0, fmt.Errorf("testcluster: no HeapAlloc in the heap profile")
}

// Ready reports whether the node's /ready answers 200.
func (n *Node) Ready() bool { return n.ReadyErr() == nil }

// ReadyErr returns nil when the node's /ready answers 200, else why not.
func (n *Node) ReadyErr() error {
	cl := http.Client{Timeout: 2 * time.Second}
	resp, err := cl.Get("http://" + n.HealthAddr + "/ready")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fmt.Errorf("testcluster: /ready: %s %s", resp.Status, strings.TrimSpace(string(b)))
	}
	return nil
}

// Metric returns the value of the unlabelled metric name from the node's
// /metrics (Prometheus text format).
func (n *Node) Metric(name string) (float64, error) {
	cl := http.Client{Timeout: time.Minute}
	resp, err := cl.Get("http://" + n.HealthAddr + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			return strconv.ParseFloat(strings.TrimSpace(v), 64)
		}
	}
	return 0, fmt.Errorf("testcluster: no metric %s on %s", name, n.ID)
}
