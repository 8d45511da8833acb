package peer_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/agent/peer"
	"github.com/ferry-id/ferry/attestors/workload"
	"github.com/ferry-id/ferry/internal/hostilecaller"
	"github.com/ferry-id/ferry/internal/roottest"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

const nobody = 65534

func TestMain(m *testing.M) {
	if addr := os.Getenv("PEER_TEST_DIAL"); addr != "" {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		fmt.Println(c.LocalAddr())
		// Hold the connection until the parent closes stdin.
		_, _ = io.Copy(io.Discard, os.Stdin)
		c.Close()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// childBinary copies the test binary where another uid may execute it.
func childBinary(t *testing.T) string {
	t.Helper()
	exe, err := os.Executable()
	require.NoError(t, err)
	dir, err := os.MkdirTemp("", "peer-test-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	require.NoError(t, os.Chmod(dir, 0o755))
	b, err := os.ReadFile(exe)
	require.NoError(t, err)
	p := filepath.Join(dir, "child")
	require.NoError(t, os.WriteFile(p, b, 0o755))
	return p
}

type child struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
}

// dialAs starts a child process under uid that connects to addr and holds the
// connection; it returns once the child is connected.
func dialAs(t *testing.T, bin, addr string, uid uint32) *child {
	t.Helper()
	cmd := exec.Command(bin)
	cmd.Env = append(os.Environ(), "PEER_TEST_DIAL="+addr)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
	stdin, err := cmd.StdinPipe()
	require.NoError(t, err)
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	cmd.Stderr = os.Stderr
	require.NoError(t, cmd.Start())
	c := &child{cmd: cmd, stdin: stdin}
	t.Cleanup(c.stop)
	line, err := bufio.NewReader(stdout).ReadString('\n')
	require.NoError(t, err, "child did not connect")
	require.NotEmpty(t, strings.TrimSpace(line))
	return c
}

// acceptFrom listens on addr, has a child of uid connect, and returns the
// child and the accepted connection with its local and remote addresses.
func acceptFrom(t *testing.T, bin, network, addr string, uid uint32) (*child, net.Conn, netip.AddrPort, netip.AddrPort) {
	t.Helper()
	l := listen(t, network, addr)
	ch := dialAs(t, bin, l.Addr().String(), uid)
	conn, err := l.Accept()
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	return ch, conn, conn.LocalAddr().(*net.TCPAddr).AddrPort(), conn.RemoteAddr().(*net.TCPAddr).AddrPort()
}

func (c *child) stop() {
	c.stdin.Close()
	_ = c.cmd.Wait()
}

func listen(t *testing.T, network, addr string) net.Listener {
	t.Helper()
	l, err := net.Listen(network, addr)
	if err != nil {
		roottest.Skipf(t, "cannot listen on %s: %v", addr, err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

// requireRoot: children run under another uid.
func requireRoot(t *testing.T) {
	t.Helper()
	roottest.Require(t)
}

func TestLookupOtherUID(t *testing.T) {
	requireRoot(t)
	bin := childBinary(t)
	for _, tc := range []struct{ name, network, addr string }{
		{"ipv4", "tcp4", "127.0.0.1:0"},
		{"ipv6", "tcp6", "[::1]:0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ch, conn, local, remote := acceptFrom(t, bin, tc.network, tc.addr, nobody)

			viaNetlink, err := peer.LookupNetlink(local, remote)
			require.NoError(t, err)
			require.Equal(t, uint32(nobody), viaNetlink.UID)
			require.NotZero(t, viaNetlink.Inode)

			viaProc, err := peer.LookupProcNet("/proc", local, remote)
			require.NoError(t, err)
			require.Equal(t, viaNetlink, viaProc)

			for _, cfg := range []peer.Config{{}, {DisableNetlink: true}} {
				s, err := peer.New(cfg).LookupConn(conn)
				require.NoError(t, err)
				require.Equal(t, viaNetlink, s)
			}

			f := peer.New(peer.Config{})
			p, err := f.FindProcess(viaNetlink.Inode)
			require.NoError(t, err)
			require.Equal(t, int32(ch.cmd.Process.Pid), p.PID)
			require.Equal(t, uint32(nobody), p.UID)
			require.Equal(t, uint32(nobody), p.GID)
			require.Equal(t, workload.IDs{Real: nobody, Effective: nobody, Saved: nobody, FS: nobody}, p.Creds.UID)
			require.NoError(t, f.Verify(p))

			ch.stop()
			require.ErrorIs(t, f.Verify(p), peer.ErrNotFound)
			_, err = f.FindProcess(viaNetlink.Inode)
			require.ErrorIs(t, err, peer.ErrNotFound)
		})
	}
}

// selfConn connects to itself over loopback: it returns the client's and
// the server's ends.
func selfConn(t *testing.T) (client, server net.Conn) {
	t.Helper()
	l := listen(t, "tcp4", "127.0.0.1:0")
	c, err := net.Dial("tcp", l.Addr().String())
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	conn, err := l.Accept()
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	return c, conn
}

func TestLookupSelf(t *testing.T) {
	c, conn := selfConn(t)
	f := peer.New(peer.Config{})
	s, err := f.LookupConn(conn)
	require.NoError(t, err)
	require.Equal(t, uint32(os.Geteuid()), s.UID)
	p, err := f.FindProcess(s.Inode)
	require.NoError(t, err)
	require.Equal(t, int32(os.Getpid()), p.PID)

	// The server's own end is a different socket: looking up the reverse
	// tuple finds the accepted socket, not the client's.
	r, err := f.Lookup(c.LocalAddr().(*net.TCPAddr).AddrPort(), c.RemoteAddr().(*net.TCPAddr).AddrPort())
	require.NoError(t, err)
	require.NotEqual(t, s.Inode, r.Inode)
}

func TestLookupNotFound(t *testing.T) {
	l := listen(t, "tcp4", "127.0.0.1:0")
	local := l.Addr().(*net.TCPAddr).AddrPort()
	remote := netip.MustParseAddrPort("127.0.0.1:1")
	_, err := peer.LookupNetlink(local, remote)
	require.ErrorIs(t, err, peer.ErrNotFound)
	_, err = peer.LookupProcNet("/proc", local, remote)
	require.ErrorIs(t, err, peer.ErrNotFound)
	_, err = peer.New(peer.Config{}).Lookup(local, remote)
	require.ErrorIs(t, err, peer.ErrNotFound)
}

func TestProcNetParsing(t *testing.T) {
	proc := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(proc, "net"), 0o755))
	const header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
	// 127.0.0.1:51000 -> 127.0.0.1:40342 owned by uid 1000, inode 4242
	// (the listener line must not match).
	tcp := header +
		"   0: 0100007F:9D96 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1111 1 0000000000000000 100 0 0 10 0\n" +
		"   1: 0100007F:C738 0100007F:9D96 01 00000000:00000000 00:00000000 00000000  1000        0 4242 1 0000000000000000 20 4 30 10 -1\n"
	// [::1]:50000 -> [::1]:8080 owned by uid 1001, inode 5353.
	tcp6 := header +
		"   0: 00000000000000000000000001000000:C350 00000000000000000000000001000000:1F90 01 00000000:00000000 00:00000000 00000000  1001        0 5353 1 0000000000000000 20 4 30 10 -1\n"
	require.NoError(t, os.WriteFile(filepath.Join(proc, "net", "tcp"), []byte(tcp), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(proc, "net", "tcp6"), []byte(tcp6), 0o644))

	f := peer.New(peer.Config{ProcRoot: proc, DisableNetlink: true})
	s, err := f.Lookup(netip.MustParseAddrPort("127.0.0.1:40342"), netip.MustParseAddrPort("127.0.0.1:51000"))
	require.NoError(t, err)
	require.Equal(t, peer.Socket{UID: 1000, Inode: 4242}, s)

	s, err = f.Lookup(netip.MustParseAddrPort("[::1]:8080"), netip.MustParseAddrPort("[::1]:50000"))
	require.NoError(t, err)
	require.Equal(t, peer.Socket{UID: 1001, Inode: 5353}, s)

	// IPv4-mapped addresses are treated as IPv4.
	s, err = f.Lookup(netip.MustParseAddrPort("[::ffff:127.0.0.1]:40342"), netip.MustParseAddrPort("[::ffff:127.0.0.1]:51000"))
	require.NoError(t, err)
	require.Equal(t, uint32(1000), s.UID)

	// Reversed tuple: that socket is not in the table.
	_, err = f.Lookup(netip.MustParseAddrPort("127.0.0.1:51000"), netip.MustParseAddrPort("127.0.0.1:40342"))
	require.ErrorIs(t, err, peer.ErrNotFound)
}

// TestProcNetRefusesClosedSockets: a client socket that is not ESTABLISHED,
// or that no descriptor holds (inode 0), is nobody's caller, whatever uid
// the table shows for it (0 for a TIME_WAIT entry).
func TestProcNetRefusesClosedSockets(t *testing.T) {
	proc := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(proc, "net"), 0o755))
	const header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
	line := func(port, state string, uid, inode int) string {
		return fmt.Sprintf("   1: 0100007F:%s 0100007F:9D96 %s 00000000:00000000 00:00000000 00000000 %5d        0 %d 1 0000000000000000 20 4 30 10 -1\n", port, state, uid, inode)
	}
	tcp := header +
		line("C738", "06", 0, 0) + // 51000: TIME_WAIT, as the kernel lists it
		line("C739", "05", 0, 0) + // 51001: FIN_WAIT2
		line("C73A", "04", 1000, 0) + // 51002: FIN_WAIT1, orphaned
		line("C73B", "01", 1000, 0) + // 51003: ESTABLISHED, no inode
		line("C73C", "08", 1000, 77) // 51004: CLOSE_WAIT
	require.NoError(t, os.WriteFile(filepath.Join(proc, "net", "tcp"), []byte(tcp), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(proc, "net", "tcp6"), []byte(header), 0o644))
	f := peer.New(peer.Config{ProcRoot: proc, DisableNetlink: true})
	for port, why := range map[uint16]string{51000: "TIME_WAIT", 51001: "FIN_WAIT2", 51002: "FIN_WAIT1", 51003: "no inode", 51004: "CLOSE_WAIT"} {
		s, err := f.Lookup(netip.MustParseAddrPort("127.0.0.1:40342"), netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port))
		require.ErrorIs(t, err, peer.ErrNotFound, "port %d: %+v", port, s)
		require.ErrorContains(t, err, why)
		require.Equal(t, peer.Socket{}, s)
	}
}

// TestLookupClosedClient: a client of another uid connects and closes its
// end while the server's end is still open. The kernel keeps the client's
// socket in FIN_WAIT2 as a TIME_WAIT entry owned by uid 0 with inode 0; both
// lookups refuse it instead of reporting a root caller.
func TestLookupClosedClient(t *testing.T) {
	requireRoot(t)
	ch, conn, local, remote := acceptFrom(t, childBinary(t), "tcp4", "127.0.0.1:0", nobody)
	s, err := peer.LookupNetlink(local, remote)
	require.NoError(t, err)
	require.Equal(t, uint32(nobody), s.UID)

	ch.stop()
	// Wait for the kernel to turn the orphaned socket into its TIME_WAIT
	// entry: uid 0, inode 0.
	deadline := time.Now().Add(10 * time.Second)
	for closed := false; !closed; {
		socks, err := hostilecaller.Sockets()
		require.NoError(t, err)
		for _, s := range socks {
			if s.Local == remote && s.Remote == local && s.ClosedClient() {
				t.Logf("client socket in /proc/net/tcp: %+v", s)
				closed = true
			}
		}
		require.True(t, closed || time.Now().Before(deadline), "the client socket never became a TIME_WAIT entry: %v", socks)
		time.Sleep(5 * time.Millisecond)
	}

	_, err = peer.LookupNetlink(local, remote)
	require.ErrorIs(t, err, peer.ErrNotFound)
	require.ErrorContains(t, err, "the client has closed it")
	_, err = peer.LookupProcNet("/proc", local, remote)
	require.ErrorIs(t, err, peer.ErrNotFound)
	require.ErrorContains(t, err, "the client has closed it")
	for _, cfg := range []peer.Config{{}, {DisableNetlink: true}} {
		_, err := peer.New(cfg).LookupConn(conn)
		require.ErrorIs(t, err, peer.ErrNotFound)
	}
}

// fakeProc writes /proc/PID/{stat,status,fd/N} into dir; status holds
// status (a Uid and a Gid line at least).
func fakeProc(t *testing.T, dir string, pid int, comm string, start uint64, status string, sockets ...uint64) {
	t.Helper()
	p := filepath.Join(dir, fmt.Sprint(pid))
	require.NoError(t, os.MkdirAll(filepath.Join(p, "fd"), 0o755))
	stat := fmt.Sprintf("%d (%s) S 1 %d %d 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 %d 1000 10 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0\n", pid, comm, pid, pid, start)
	require.NoError(t, os.WriteFile(filepath.Join(p, "stat"), []byte(stat), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(p, "status"), []byte("Name:\t"+comm+"\n"+status), 0o644))
	for i, s := range sockets {
		require.NoError(t, os.Symlink(fmt.Sprintf("socket:[%d]", s), filepath.Join(p, "fd", fmt.Sprint(i+3))))
	}
}

func ids(id uint32) workload.IDs { return workload.IDs{Real: id, Effective: id, Saved: id, FS: id} }

func TestFindProcessFakeProc(t *testing.T) {
	proc := t.TempDir()
	const user = "Uid:\t1000\t1000\t1000\t1000\nGid:\t2000\t2000\t2000\t2000\nGroups:\t4 24\n"
	fakeProc(t, proc, 7, "other", 50, "Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\n", 111)
	fakeProc(t, proc, 42, "we ird) (name", 12345, user, 222, 999)
	fakeProc(t, proc, 100, "fork", 99999, user, 999)

	f := peer.New(peer.Config{ProcRoot: proc})
	p, err := f.FindProcess(999)
	require.NoError(t, err)
	// Lowest PID of the two holders.
	require.Equal(t, peer.Process{PID: 42, UID: 1000, GID: 2000, StartTime: 12345,
		Creds: workload.Creds{UID: ids(1000), GID: ids(2000), Groups: []uint32{4, 24}}}, p)
	require.NoError(t, f.Verify(p))

	_, err = f.FindProcess(333)
	require.ErrorIs(t, err, peer.ErrNotFound)

	// The same process with other ids: a setuid program, other groups.
	for _, status := range []string{
		"Uid:\t1000\t0\t0\t0\nGid:\t2000\t2000\t2000\t2000\nGroups:\t4 24\n",
		"Uid:\t1000\t1000\t1000\t1000\nGid:\t2000\t0\t0\t0\nGroups:\t4 24\n",
		"Uid:\t1000\t1000\t1000\t1000\nGid:\t2000\t2000\t2000\t2000\nGroups:\t0 4 24\n",
	} {
		require.NoError(t, os.WriteFile(filepath.Join(proc, "42", "status"), []byte(status), 0o644))
		require.ErrorIs(t, f.Verify(p), workload.ErrCredentialsChanged, status)
	}
	require.NoError(t, os.WriteFile(filepath.Join(proc, "42", "status"), []byte(user), 0o644))
	require.NoError(t, f.Verify(p))

	// Same PID, new process: the start time changed.
	require.NoError(t, os.RemoveAll(filepath.Join(proc, "42")))
	fakeProc(t, proc, 42, "reused", 77777, user)
	require.ErrorIs(t, f.Verify(p), peer.ErrNotFound)

	require.NoError(t, os.RemoveAll(filepath.Join(proc, "42")))
	require.ErrorIs(t, f.Verify(p), peer.ErrNotFound)
}

func TestParseStartTime(t *testing.T) {
	for _, tc := range []struct {
		stat string
		want uint64
		ok   bool
	}{
		{"1 (init) S 0 1 1 0 -1 4194560 1 2 3 4 5 6 7 8 20 0 1 0 17 1000 10", 17, true},
		{"9 (a) b) S 0 1 1 0 -1 4194560 1 2 3 4 5 6 7 8 20 0 1 0 424242 1000 10", 424242, true},
		{"9 (a) b) S 0 1", 0, false},
		{"no paren", 0, false},
		{"1 (x) S 0 1 1 0 -1 4194560 1 2 3 4 5 6 7 8 20 0 1 0 notanumber 1", 0, false},
	} {
		got, err := peer.ParseStartTime(tc.stat)
		if !tc.ok {
			require.Error(t, err, tc.stat)
			continue
		}
		require.NoError(t, err, tc.stat)
		require.Equal(t, tc.want, got)
	}
}

func TestLookupConnRejectsNonTCP(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	_, err := peer.New(peer.Config{}).LookupConn(a)
	require.Error(t, err)
	require.False(t, errors.Is(err, peer.ErrNotFound))
}

// TestAttestSelf attests this process through Attest, the way the
// managed-identity endpoint does, with the credential rule applied.
func TestAttestSelf(t *testing.T) {
	_, conn := selfConn(t)
	f := peer.New(peer.Config{})
	s, err := f.LookupConn(conn)
	require.NoError(t, err)
	p, err := f.FindProcess(s.Inode)
	require.NoError(t, err)
	groups, err := os.Getgroups()
	require.NoError(t, err)
	require.Len(t, p.Creds.Groups, len(groups))

	var seen workload.Creds
	attest := func(ctx context.Context, pid int32) ([]*ferrypb.Selector, error) {
		c, ok, err := workload.CredsFrom(ctx, "/proc", pid, false)
		require.True(t, ok, "the attestors run within the attestation")
		seen = c
		return []*ferrypb.Selector{{Type: "unix", Value: "uid:x"}}, err
	}
	sels, err := f.Attest(context.Background(), p, workload.Peer{UID: s.UID}, attest)
	require.NoError(t, err)
	require.Len(t, sels, 1)
	require.Equal(t, p.Creds, seen)

	_, err = f.Attest(context.Background(), p, workload.Peer{UID: s.UID + 1}, attest)
	require.ErrorIs(t, err, workload.ErrCredentialsChanged)
	other := p
	other.StartTime++
	_, err = f.Attest(context.Background(), other, workload.Peer{UID: s.UID}, attest)
	require.ErrorIs(t, err, workload.ErrProcessChanged)
}
