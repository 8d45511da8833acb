package imds

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"

	"github.com/ferry-id/ferry/agent/peer"
)

type connKey struct{}

// connState caches the caller of one TCP connection: the client socket, and
// so its owner, cannot change while the connection lives.
type connState struct {
	conn   net.Conn
	once   sync.Once
	done   atomic.Bool // once has run
	caller Caller
	proc   *peer.Process
	err    error
}

func connContext(ctx context.Context, c net.Conn) context.Context {
	return context.WithValue(ctx, connKey{}, &connState{conn: c})
}

// caller identifies the process behind r's connection.
func (s *Server) caller(r *http.Request) (Caller, *peer.Process, error) {
	if st, ok := r.Context().Value(connKey{}).(*connState); ok {
		st.once.Do(func() {
			local, err1 := tcpAddrPort(st.conn.LocalAddr())
			remote, err2 := tcpAddrPort(st.conn.RemoteAddr())
			if err := errors.Join(err1, err2); err != nil {
				st.err = err
				return
			}
			st.caller, st.proc, st.err = s.lookup(local, remote)
		})
		st.done.Store(true)
		return st.caller, st.proc, st.err
	}
	// Served outside our http.Server (a handler test or a wrapper): use the
	// addresses net/http records.
	la, _ := r.Context().Value(http.LocalAddrContextKey).(net.Addr)
	local, err1 := tcpAddrPort(la)
	remote, err2 := netip.ParseAddrPort(r.RemoteAddr)
	if err := errors.Join(err1, err2); err != nil {
		return Caller{}, nil, fmt.Errorf("imds: connection addresses: %w", err)
	}
	return s.lookup(local, remote)
}

// knownCaller returns the caller of r's connection if it was identified
// already (by an earlier request on the connection).
func knownCaller(r *http.Request) (Caller, *peer.Process, bool) {
	st, ok := r.Context().Value(connKey{}).(*connState)
	if !ok || !st.done.Load() || st.err != nil {
		return Caller{}, nil, false
	}
	return st.caller, st.proc, true
}

func (s *Server) lookup(local, remote netip.AddrPort) (Caller, *peer.Process, error) {
	la, ra := local.Addr().Unmap(), remote.Addr().Unmap()
	// A local client connects from a loopback address, or from the address
	// it connects to (169.254.169.254 on lo). The socket lookup below is
	// what proves the client is on this host.
	if !ra.IsLoopback() && ra != la {
		return Caller{}, nil, fmt.Errorf("imds: remote address %v is not local", ra)
	}
	sock, err := s.peers.Lookup(local, remote)
	if err != nil {
		return Caller{}, nil, err
	}
	c := Caller{UID: sock.UID, GID: NoGID}
	needProc := s.resolvePID || (s.groups != nil && sock.UID != 0)
	if !needProc {
		return c, nil, nil
	}
	p, err := s.peers.FindProcess(sock.Inode)
	if err != nil {
		return Caller{}, nil, err
	}
	if p.UID != sock.UID {
		// The socket was created under one uid and is held by a process of
		// another (passed or inherited across setuid): trust neither.
		return Caller{}, nil, fmt.Errorf("imds: socket uid %d differs from process %d uid %d", sock.UID, p.PID, p.UID)
	}
	if s.groups != nil && sock.UID != 0 {
		if err := s.admit(p); err != nil {
			return Caller{}, nil, err
		}
	}
	if !s.resolvePID {
		return c, nil, nil
	}
	c.GID, c.PID, c.StartTime = p.GID, p.PID, p.StartTime
	return c, &p, nil
}

// errNotAllowed: the caller is in none of AllowedGroups.
var errNotAllowed = errors.New("imds: caller is not in an allowed group")

// admit applies AllowedGroups to the process holding the client socket.
// The decision is kept for the connection, like the caller itself: a
// process's groups change only through setgroups/setgid, which needs the
// privilege that would let it join the group anyway, and the socket stays
// with the process found (a process that took over the PID afterwards does
// not hold it). The groups are read between two start-time checks, so they
// are the groups of the process whose socket it is.
func (s *Server) admit(p peer.Process) error {
	gid, groups, err := s.peers.(GroupPeers).Groups(p.PID)
	if err != nil {
		return err
	}
	if err := s.peers.Alive(p); err != nil {
		return err
	}
	if s.groups[gid] {
		return nil
	}
	for _, g := range groups {
		if s.groups[g] {
			return nil
		}
	}
	return fmt.Errorf("%w: uid %d, gid %d, groups %v", errNotAllowed, p.UID, gid, groups)
}

func tcpAddrPort(a net.Addr) (netip.AddrPort, error) {
	t, ok := a.(*net.TCPAddr)
	if !ok {
		return netip.AddrPort{}, fmt.Errorf("imds: not a TCP address: %v", a)
	}
	return t.AddrPort(), nil
}
