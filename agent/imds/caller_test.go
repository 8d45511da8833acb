package imds_test

import (
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/agent/imds"
	"github.com/ferry-id/ferry/internal/hostilecaller"
	"github.com/ferry-id/ferry/internal/roottest"
)

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

// TestClosedClientSocketIsNobody: a client of another uid sends its request
// and closes its socket before the endpoint looks it up. The kernel then
// lists the client socket in FIN_WAIT2 or TIME_WAIT, owned by uid 0 with
// inode 0. The endpoint must not take it for root: no challenge file is
// written (for root or anyone), root's challenge quota is untouched, and
// allowed_groups (which always admits root) is not bypassed.
func TestClosedClientSocketIsNobody(t *testing.T) {
	requireRoot(t)
	bin := callerBinary(t)
	toks := newFakeTokens()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	require.NoError(t, err)
	gl := gate(ln)
	logs := &hostilecaller.Output{}
	const quota = 2
	base, dir := startArc(t, toks, func(c *imds.Config) {
		c.Listener = gl
		c.AllowedGroups = []uint32{allowedGID}
		c.MaxChallengesPerUID = quota
		c.Logger = slog.New(slog.NewTextHandler(logs, nil))
	})
	server := ln.Addr().(*net.TCPAddr).AddrPort()

	// More closed requests than root may hold challenges.
	cmd := hostilecaller.Command(bin, hostilecaller.ModeSendClose, hostilecaller.EnvAddr+"="+server.String(),
		hostilecaller.EnvQuery+"="+arcQuery, hostilecaller.EnvN+"="+strconv.Itoa(quota+1))
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: asNobody()}
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)
	var clients []netip.AddrPort
	for line := range strings.Lines(string(out)) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "client="); ok {
			clients = append(clients, netip.MustParseAddrPort(v))
		}
	}
	require.Len(t, clients, quota+1, "%s", out)
	// Every client socket is now the kernel's TIME_WAIT entry for a closed
	// FIN_WAIT2 socket: uid 0, inode 0.
	require.NoError(t, hostilecaller.WaitSockets(20*time.Second, func(socks []hostilecaller.Socket) bool {
		n := 0
		for _, s := range socks {
			for _, c := range clients {
				if s.Local == c && s.Remote == server && s.ClosedClient() {
					n++
				}
			}
		}
		return n == len(clients)
	}), "the closed client sockets become uid 0, inode 0")

	gl.open()
	// The endpoint has answered (and closed) every one of them.
	require.NoError(t, hostilecaller.WaitSockets(20*time.Second, func(socks []hostilecaller.Socket) bool {
		for _, s := range socks {
			for _, c := range clients {
				if s.Local == server && s.Remote == c {
					return false
				}
			}
		}
		return true
	}), "the endpoint handles every closed connection")
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
	toks := newFakeTokens()
	s, _ := startServer(t, imds.Config{Mode: imds.ModeVM, Tokens: toks})

	cmd := hostilecaller.Command(callerBinary(t), hostilecaller.ModeIMDSSetuidExec,
		hostilecaller.EnvAddr+"="+s.Addr().String(), hostilecaller.EnvQuery+"="+mgmt)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: asNobody()}
	out, stop, err := hostilecaller.Start(cmd)
	require.NoError(t, err)
	t.Cleanup(stop)
	second, err := out.Await("second", 60*time.Second)
	require.NoError(t, err)
	first, _ := out.Result("first")
	require.True(t, strings.HasPrefix(first, "200 "), out.String())
	require.Equal(t, "403 "+bodyIDs, second, out.String())
	calls := toks.Calls()
	require.Len(t, calls, 1, "Tokens is asked for the first request only")
	require.Equal(t, uint32(nobody), calls[0].Caller.UID)
}

// callerBinary copies the test binary where every uid may execute it, to
// play hostile callers (internal/hostilecaller).
func callerBinary(t *testing.T) string {
	t.Helper()
	bin, err := hostilecaller.Binary(sharedTempDir(t))
	require.NoError(t, err)
	return bin
}
