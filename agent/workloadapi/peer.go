package workloadapi

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"

	"github.com/ferry-id/ferry/agent/budget"
	"github.com/ferry-id/ferry/attestors/workload"
	"github.com/ferry-id/ferry/internal/logging"
)

// authType is what callerInfo reports as its credentials.AuthInfo type.
const authType = "ferry-peercred"

// pinFunc pins pid; the default opens /proc/PID through workload.OpenProcessIn.
type pinFunc func(pid int32) (*workload.Process, error)

// callerInfo is the credentials.AuthInfo of a Workload API connection: the
// credentials the kernel recorded for the peer when it connected
// (SO_PEERCRED: its pid and effective uid and gid at connect), the pin on
// its process, and its supplementary groups at connect, read when first
// needed.
type callerInfo struct {
	credentials.CommonAuthInfo
	PID int32
	UID uint32
	GID uint32

	proc   *workload.Process
	groups *peerGroups
}

// AuthType implements credentials.AuthInfo.
func (callerInfo) AuthType() string { return authType }

// peer is what the caller's credentials must still be at every call (see
// workload.Peer.Check).
func (c callerInfo) peer() workload.Peer {
	return workload.Peer{UID: c.UID, GID: c.GID, HasGID: true, Groups: c.groups.get}
}

// callerFrom returns the caller of the RPC whose context is ctx.
func callerFrom(ctx context.Context) (callerInfo, bool) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return callerInfo{}, false
	}
	ci, ok := p.AuthInfo.(callerInfo)
	return ci, ok
}

// peerCreds is the server side of the Workload API's transport: no encryption
// (the spec forbids requiring TLS) but, at accept time, the SO_PEERCRED
// credentials of the unix-socket peer and a pin on its process, taken before
// the peer can send a single request. The pin lives as long as the connection.
type peerCreds struct {
	pin pinFunc
	log *logging.PerKey
}

var _ credentials.TransportCredentials = (*peerCreds)(nil)

func (c *peerCreds) ClientHandshake(context.Context, string, net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return nil, nil, errors.New("workloadapi: peer credentials are server-side only")
}

func (c *peerCreds) ServerHandshake(conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	raw, err := rawConn(conn)
	if err != nil {
		return nil, nil, err
	}
	ucred, err := budget.PeerCred(raw)
	if err != nil {
		return nil, nil, err
	}
	if ucred.Pid <= 0 {
		// The peer is in a PID namespace the agent cannot see.
		return nil, nil, fmt.Errorf("workloadapi: caller pid not visible (uid %d)", ucred.Uid)
	}
	proc, err := c.pin(ucred.Pid)
	if err != nil {
		// Typically a caller that exited right after connecting.
		c.log.Log(context.Background(), slog.LevelWarn, "uid", uint64(ucred.Uid), "workload API connection refused",
			slog.Int("pid", int(ucred.Pid)), slog.Uint64("uid", uint64(ucred.Uid)), slog.String("error", err.Error()))
		return nil, nil, fmt.Errorf("workloadapi: pin caller pid %d: %w", ucred.Pid, err)
	}
	info := callerInfo{
		CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.NoSecurity},
		PID:            ucred.Pid,
		UID:            ucred.Uid,
		GID:            ucred.Gid,
		proc:           proc,
		groups:         &peerGroups{raw: raw},
	}
	return &pinnedConn{Conn: conn, proc: proc}, info, nil
}

func (c *peerCreds) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: authType}
}

func (c *peerCreds) Clone() credentials.TransportCredentials {
	return &peerCreds{pin: c.pin, log: c.log}
}

func (c *peerCreds) OverrideServerName(string) error { return nil }

// rawConn returns the socket of a unix socket connection.
func rawConn(conn net.Conn) (syscall.RawConn, error) {
	sc, ok := conn.(syscall.Conn)
	if !ok || conn.LocalAddr().Network() != "unix" {
		return nil, fmt.Errorf("workloadapi: connection is %T, not a unix socket", conn)
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("workloadapi: peer credentials: %w", err)
	}
	return raw, nil
}

// peerGroups reads SO_PEERGROUPS, the supplementary groups the peer had when
// it connected (the kernel keeps them with the socket, so they can be read
// at any later time), once, and only for a connection whose calls are
// attested with group selectors.
type peerGroups struct {
	raw    syscall.RawConn
	once   sync.Once
	groups []uint32
	err    error
}

func (g *peerGroups) get() ([]uint32, error) {
	g.once.Do(func() {
		if err := g.raw.Control(func(fd uintptr) {
			g.groups, g.err = getsockoptPeerGroups(int(fd))
		}); err != nil {
			g.err = err
		}
		if g.err != nil {
			g.err = fmt.Errorf("workloadapi: SO_PEERGROUPS: %w", g.err)
		}
	})
	return g.groups, g.err
}

// getsockoptPeerGroups returns SO_PEERGROUPS of fd (x/sys/unix has no
// wrapper for it). The kernel answers ERANGE with the size needed when the
// buffer is too small.
func getsockoptPeerGroups(fd int) ([]uint32, error) {
	buf := make([]uint32, 32)
	for {
		size := uint32(len(buf) * 4)
		_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_PEERGROUPS,
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&size)), 0)
		switch errno {
		case 0:
			return buf[:size/4], nil
		case unix.EINTR:
			continue
		case unix.ERANGE:
			if int(size/4) <= len(buf) {
				return nil, errno
			}
			buf = make([]uint32, size/4)
		default:
			return nil, errno
		}
	}
}

// pinnedConn releases the caller's process pin when the connection closes, so
// a client that opens and drops connections cannot exhaust descriptors.
type pinnedConn struct {
	net.Conn
	proc *workload.Process
	once sync.Once
}

func (c *pinnedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { _ = c.proc.Close() })
	return err
}

// procPinner pins processes under procRoot with workload.OpenProcessIn.
func procPinner(procRoot string) pinFunc {
	return func(pid int32) (*workload.Process, error) {
		return workload.OpenProcessIn(procRoot, pid)
	}
}
