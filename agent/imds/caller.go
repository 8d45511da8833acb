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
	"github.com/ferry-id/ferry/attestors/workload"
)

type connKey struct{}

// connState caches the caller of one TCP connection: the client socket, and
// so its owner, cannot change while the connection lives. Its process is
// verified again on every request (Server.caller).
type connState struct {
	conn   net.Conn
	once   sync.Once
	done   atomic.Bool // once has run
	caller Caller
	proc   peer.Process
	err    error
}

func connContext(ctx context.Context, c net.Conn) context.Context {
	return context.WithValue(ctx, connKey{}, &connState{conn: c})
}

// caller identifies the process behind r's connection: found on the
// connection's first request, and verified (same process, same ids) on
// every request.
func (s *Server) caller(r *http.Request) (Caller, peer.Process, error) {
	var (
		c   Caller
		p   peer.Process
		err error
	)
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
		c, p, err = st.caller, st.proc, st.err
	} else {
		// Served outside our http.Server (a handler test or a wrapper): use
		// the addresses net/http records.
		la, _ := r.Context().Value(http.LocalAddrContextKey).(net.Addr)
		local, err1 := tcpAddrPort(la)
		remote, err2 := netip.ParseAddrPort(r.RemoteAddr)
		if err := errors.Join(err1, err2); err != nil {
			return Caller{}, peer.Process{}, fmt.Errorf("imds: connection addresses: %w", err)
		}
		c, p, err = s.lookup(local, remote)
	}
	if err != nil {
		return Caller{}, peer.Process{}, err
	}
	if err := s.peers.Verify(p); err != nil {
		return Caller{}, peer.Process{}, err
	}
	return c, p, nil
}

// knownCaller returns the caller of r's connection if it was identified
// already (by an earlier request on the connection). Its process must still
// be verified.
func knownCaller(r *http.Request) (Caller, peer.Process, bool) {
	st, ok := r.Context().Value(connKey{}).(*connState)
	if !ok || !st.done.Load() || st.err != nil {
		return Caller{}, peer.Process{}, false
	}
	return st.caller, st.proc, true
}

// lookup finds the caller of the connection (local, remote): the client
// socket must be ESTABLISHED with an inode (Peers.Lookup), held by a live
// process (Peers.FindProcess) whose ids pass the credential rule against the
// socket's owner, the only credential a TCP connection carries.
func (s *Server) lookup(local, remote netip.AddrPort) (Caller, peer.Process, error) {
	la, ra := local.Addr().Unmap(), remote.Addr().Unmap()
	// A local client connects from a loopback address, or from the address
	// it connects to (169.254.169.254 on lo). The socket lookup below is
	// what proves the client is on this host.
	if !ra.IsLoopback() && ra != la {
		return Caller{}, peer.Process{}, fmt.Errorf("imds: remote address %v is not local", ra)
	}
	sock, err := s.peers.Lookup(local, remote)
	if err != nil {
		return Caller{}, peer.Process{}, err
	}
	p, err := s.peers.FindProcess(sock.Inode)
	if err != nil {
		return Caller{}, peer.Process{}, err
	}
	if err := CallerPeer(sock.UID).Check(p.Creds, false); err != nil {
		return Caller{}, peer.Process{}, fmt.Errorf("imds: process %d holding a socket of uid %d: %w", p.PID, sock.UID, err)
	}
	if s.groups != nil && sock.UID != 0 {
		if err := s.admit(p); err != nil {
			return Caller{}, peer.Process{}, err
		}
	}
	c := Caller{UID: sock.UID, GID: NoGID}
	if s.resolvePID {
		c.GID, c.PID, c.StartTime = p.Creds.GID.Real, p.PID, p.StartTime
	}
	return c, p, nil
}

// CallerPeer is what the kernel says about the caller of a loopback TCP
// connection whose client socket uid owns: its uid, and nothing else. The
// credential rule (workload.Peer.Check) then wants every uid of the caller
// to be uid and its gids to agree with each other.
func CallerPeer(uid uint32) workload.Peer { return workload.Peer{UID: uid} }

// errNotAllowed: the caller is in none of AllowedGroups.
var errNotAllowed = errors.New("imds: caller is not in an allowed group")

// admit applies AllowedGroups to the process holding the client socket, with
// the groups read when it was found (between two start-time checks, so they
// are the groups of the process whose socket it is). The decision is kept
// for the connection, like the caller itself: every later request verifies
// that the process still has those ids and groups.
func (s *Server) admit(p peer.Process) error {
	gid := p.Creds.GID.Real // all four agree (the credential rule)
	if s.groups[gid] {
		return nil
	}
	for _, g := range p.Creds.Groups {
		if s.groups[g] {
			return nil
		}
	}
	return fmt.Errorf("%w: uid %d, gid %d, groups %v", errNotAllowed, p.Creds.UID.Real, gid, p.Creds.Groups)
}

type processKey struct{}

// ProcessFrom returns the process the endpoint found, and verified, for the
// request whose context is ctx (the context Tokens gets): the process holding
// the client socket, with its credentials.
func ProcessFrom(ctx context.Context) (peer.Process, bool) {
	p, ok := ctx.Value(processKey{}).(peer.Process)
	return p, ok
}

func withProcess(ctx context.Context, p peer.Process) context.Context {
	return context.WithValue(ctx, processKey{}, p)
}

func tcpAddrPort(a net.Addr) (netip.AddrPort, error) {
	t, ok := a.(*net.TCPAddr)
	if !ok {
		return netip.AddrPort{}, fmt.Errorf("imds: not a TCP address: %v", a)
	}
	return t.AddrPort(), nil
}
