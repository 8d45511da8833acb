package imds_test

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/agent/imds"
	"github.com/ferry-id/ferry/internal/roottest"
)

// callerChild runs the test binary as one of the hostile callers below and
// returns its exit code. Results go to stdout, one "name=value" per line.
func callerChild(mode string) int {
	fail := func(format string, args ...any) int {
		fmt.Printf("child error: "+format+"\n", args...)
		return 1
	}
	addr := os.Getenv("CHILD_ADDR")
	request := "GET " + imds.TokenPath + "?" + os.Getenv("CHILD_QUERY") + " HTTP/1.1\r\nHost: " + addr + "\r\nMetadata: true\r\n"
	switch mode {
	case "sendclose":
		// Send a request on each of n connections and close them at once,
		// without waiting for an answer.
		n, _ := strconv.Atoi(os.Getenv("CHILD_N"))
		for range n {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				return fail("dial: %v", err)
			}
			if _, err := io.WriteString(c, request+"Connection: close\r\n\r\n"); err != nil {
				return fail("write: %v", err)
			}
			fmt.Printf("client=%s\n", c.LocalAddr())
			c.Close()
		}
		return 0
	case "keepalive-passwd":
		// Get a token on a keep-alive connection, hand the connection to a
		// child, and become /usr/bin/passwd (setuid root), which waits on
		// stdin; the child asks again on the same connection.
		c, err := net.Dial("tcp", addr)
		if err != nil {
			return fail("dial: %v", err)
		}
		status, _, err := roundTrip(c, request)
		if err != nil {
			return fail("first request: %v", err)
		}
		fmt.Printf("first=%d\n", status)
		f, err := c.(*net.TCPConn).File()
		if err != nil {
			return fail("file: %v", err)
		}
		exe, err := os.Executable()
		if err != nil {
			return fail("executable: %v", err)
		}
		child := exec.Command(exe)
		child.Env = []string{"IMDS_TEST_CHILD=inherited", "CHILD_ADDR=" + addr, "CHILD_QUERY=" + os.Getenv("CHILD_QUERY")}
		child.ExtraFiles = []*os.File{f}
		child.Stdout, child.Stderr = os.Stdout, os.Stderr
		if err := child.Start(); err != nil {
			return fail("start: %v", err)
		}
		err = syscall.Exec("/usr/bin/passwd", []string{"passwd"}, []string{"PATH=/usr/bin:/bin"})
		return fail("exec passwd: %v", err)
	case "inherited":
		if err := waitSetuidParent(); err != nil {
			return fail("%v", err)
		}
		c, err := net.FileConn(os.NewFile(3, "conn"))
		if err != nil {
			return fail("conn: %v", err)
		}
		status, body, err := roundTrip(c, request)
		if err != nil {
			return fail("second request: %v", err)
		}
		fmt.Printf("second=%d %s\n", status, body)
		return 0
	}
	return fail("unknown mode %q", mode)
}

// roundTrip sends one keep-alive request on c and reads its answer.
func roundTrip(c net.Conn, request string) (int, string, error) {
	if _, err := io.WriteString(c, request+"\r\n"); err != nil {
		return 0, "", err
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// waitSetuidParent waits until the parent process runs with an effective
// uid other than its real uid: it has executed its setuid program.
func waitSetuidParent() error {
	path := fmt.Sprintf("/proc/%d/status", os.Getppid())
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		for line := range strings.Lines(string(b)) {
			if f := strings.Fields(line); len(f) == 5 && f[0] == "Uid:" && f[1] != f[2] {
				return nil
			}
		}
		time.Sleep(5 * time.Millisecond)
	}
	return errors.New("parent never ran its setuid program")
}

// gatedListener accepts nothing until open is called, so that clients can
// connect, send and close before the server sees their connections.
type gatedListener struct {
	net.Listener
	gate      chan struct{}
	closed    chan struct{}
	openOnce  sync.Once
	closeOnce sync.Once
}

func gate(l net.Listener) *gatedListener {
	return &gatedListener{Listener: l, gate: make(chan struct{}), closed: make(chan struct{})}
}

func (l *gatedListener) open() { l.openOnce.Do(func() { close(l.gate) }) }

func (l *gatedListener) Accept() (net.Conn, error) {
	select {
	case <-l.gate:
	case <-l.closed:
		return nil, net.ErrClosed
	}
	return l.Listener.Accept()
}

func (l *gatedListener) Close() error {
	l.closeOnce.Do(func() { close(l.closed) })
	return l.Listener.Close()
}

// tcpEntry is one line of /proc/net/tcp.
type tcpEntry struct {
	local, remote netip.AddrPort
	state         string
	uid, inode    string
}

func tcpTable(t *testing.T) []tcpEntry {
	t.Helper()
	b, err := os.ReadFile("/proc/net/tcp")
	require.NoError(t, err)
	var out []tcpEntry
	for line := range strings.Lines(string(b)) {
		f := strings.Fields(line)
		if len(f) < 10 || f[0] == "sl" {
			continue
		}
		out = append(out, tcpEntry{local: procNetAddr(t, f[1]), remote: procNetAddr(t, f[2]), state: f[3], uid: f[7], inode: f[9]})
	}
	return out
}

// procNetAddr decodes an IPv4 "0100007F:1F90" of /proc/net/tcp.
func procNetAddr(t *testing.T, s string) netip.AddrPort {
	t.Helper()
	h, p, _ := strings.Cut(s, ":")
	v, err := strconv.ParseUint(h, 16, 32)
	require.NoError(t, err)
	port, err := strconv.ParseUint(p, 16, 16)
	require.NoError(t, err)
	var a [4]byte
	binary.NativeEndian.PutUint32(a[:], uint32(v))
	return netip.AddrPortFrom(netip.AddrFrom4(a), uint16(port))
}

// waitTCP waits until ok holds for the TCP table.
func waitTCP(t *testing.T, what string, ok func([]tcpEntry) bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !ok(tcpTable(t)) {
		require.True(t, time.Now().Before(deadline), "%s: %v", what, tcpTable(t))
		time.Sleep(5 * time.Millisecond)
	}
}

// syncBuffer collects log lines; safe for concurrent use.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// TestClosedClientSocketIsNobody: a client of another uid sends its request
// and closes its socket before the endpoint looks it up. The kernel then
// lists the client socket in FIN_WAIT2 or TIME_WAIT, owned by uid 0 with
// inode 0. The endpoint must not take it for root: no challenge file is
// written (for root or anyone), root's challenge quota is untouched, and
// allowed_groups (which always admits root) is not bypassed.
func TestClosedClientSocketIsNobody(t *testing.T) {
	requireRoot(t)
	bin := childBinary(t)
	toks := newFakeTokens()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	require.NoError(t, err)
	gl := gate(ln)
	logs := &syncBuffer{}
	const quota = 2
	base, dir := startArc(t, toks, func(c *imds.Config) {
		c.Listener = gl
		c.AllowedGroups = []uint32{allowedGID}
		c.MaxChallengesPerUID = quota
		c.Logger = slog.New(slog.NewTextHandler(logs, nil))
	})
	server := ln.Addr().(*net.TCPAddr).AddrPort()

	// More closed requests than root may hold challenges.
	out := runLines(t, bin, asNobody(), "IMDS_TEST_CHILD=sendclose", "CHILD_ADDR="+server.String(), "CHILD_QUERY="+arcQuery,
		"CHILD_N="+strconv.Itoa(quota+1))
	var clients []netip.AddrPort
	for _, line := range out {
		if v, ok := strings.CutPrefix(line, "client="); ok {
			clients = append(clients, netip.MustParseAddrPort(v))
		}
	}
	require.Len(t, clients, quota+1, "%v", out)
	// Every client socket is now the kernel's TIME_WAIT entry for a closed
	// FIN_WAIT2 socket: uid 0, inode 0.
	waitTCP(t, "the closed client sockets become uid 0, inode 0", func(tab []tcpEntry) bool {
		n := 0
		for _, e := range tab {
			for _, c := range clients {
				if e.local == c && e.remote == server && e.uid == "0" && e.inode == "0" && (e.state == "05" || e.state == "06") {
					n++
				}
			}
		}
		return n == len(clients)
	})

	gl.open()
	// The endpoint has answered (and closed) every one of them.
	waitTCP(t, "the endpoint handles every closed connection", func(tab []tcpEntry) bool {
		for _, e := range tab {
			for _, c := range clients {
				if e.local == server && e.remote == c {
					return false
				}
			}
		}
		return true
	})
	files, err := os.ReadDir(dir)
	require.NoError(t, err)
	require.Empty(t, files, "no challenge file for a closed socket")
	require.Empty(t, toks.Calls())
	// Root's quota is whole.
	for range quota {
		challenge(t, base, dir)
	}
	// Each was refused for what it is.
	require.Equal(t, quota+1, strings.Count(logs.String(), "the client has closed it"), logs.String())
}

// runLines runs the test binary in a child mode as cred and returns its
// output lines; a line starting "child error" fails the test.
func runLines(t *testing.T, bin string, cred *syscall.Credential, env ...string) []string {
	t.Helper()
	cmd := exec.Command(bin)
	cmd.Env = env
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)
	require.NotContains(t, string(out), "child error")
	return strings.Split(strings.TrimSpace(string(out)), "\n")
}

// TestSetuidExecOnKeepAliveConnection: a caller of uid 65534 gets a token
// on a keep-alive connection, hands the connection to a child and executes
// /usr/bin/passwd (setuid root). The connection's caller was identified on
// the first request, but the second request checks the process again: its
// ids are no longer all the socket owner's, and it is refused.
func TestSetuidExecOnKeepAliveConnection(t *testing.T) {
	requireRoot(t)
	if fi, err := os.Stat("/usr/bin/passwd"); err != nil || fi.Mode()&os.ModeSetuid == 0 {
		roottest.Skipf(t, "/usr/bin/passwd is not a setuid program here (%v)", err)
	}
	bin := childBinary(t)
	toks := newFakeTokens()
	s, _ := startServer(t, imds.Config{Mode: imds.ModeVM, Tokens: toks})

	cmd := exec.Command(bin)
	cmd.Env = []string{"IMDS_TEST_CHILD=keepalive-passwd", "CHILD_ADDR=" + s.Addr().String(), "CHILD_QUERY=" + mgmt}
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: asNobody()}
	stdin, err := cmd.StdinPipe() // kept open: passwd waits for a password
	require.NoError(t, err)
	out := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	require.NoError(t, cmd.Start())
	t.Cleanup(func() {
		stdin.Close()
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	require.Eventually(t, func() bool { return strings.Contains(out.String(), "second=") }, 30*time.Second, 10*time.Millisecond,
		"the child never asked: %s", out)
	require.NotContains(t, out.String(), "child error")
	require.Contains(t, out.String(), "first=200")
	require.Contains(t, out.String(), "second=403 "+bodyIDs)
	calls := toks.Calls()
	require.Len(t, calls, 1, "Tokens is asked for the first request only")
	require.Equal(t, uint32(nobody), calls[0].Caller.UID)
}
