package identities

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"sync"

	"github.com/ferry-id/ferry/agent/peer"
)

// Peers finds the process behind a loopback TCP connection (*peer.Finder).
type Peers interface {
	Lookup(local, remote netip.AddrPort) (peer.Socket, error)
	FindProcess(inode uint64) (peer.Process, error)
}

// Conns leads a token request back to the process that sent it, for an
// endpoint that identifies callers by uid only.
//
// The endpoint binds an Arc challenge to whatever caller it resolved: to a
// uid, so that Azure's documented two-step curl (two processes of one user)
// works, or to a process. Attestation needs the process either way. Conns
// wraps the endpoint's listener and gives every accepted connection its own
// local address value; net/http puts that value in each request's context
// (http.LocalAddrContextKey), from which Resolver finds the connection and
// resolves its process once per connection. Safe for concurrent use.
type Conns struct {
	peers Peers

	mu    sync.Mutex
	conns map[*net.TCPAddr]*connInfo
}

type connInfo struct {
	local, remote netip.AddrPort
	once          sync.Once
	proc          peer.Process
	err           error
}

// NewConns returns a Conns resolving processes through peers.
func NewConns(peers Peers) *Conns {
	return &Conns{peers: peers, conns: map[*net.TCPAddr]*connInfo{}}
}

// Listen wraps ln; pass the result to the endpoint as its listener.
func (t *Conns) Listen(ln net.Listener) net.Listener { return &trackedListener{Listener: ln, t: t} }

// Len is the number of open tracked connections.
func (t *Conns) Len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.conns)
}

type trackedListener struct {
	net.Listener
	t *Conns
}

func (l *trackedListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	la, ok1 := c.LocalAddr().(*net.TCPAddr)
	ra, ok2 := c.RemoteAddr().(*net.TCPAddr)
	if !ok1 || !ok2 {
		return c, nil
	}
	own := *la // a distinct pointer for this connection
	l.t.mu.Lock()
	l.t.conns[&own] = &connInfo{local: la.AddrPort(), remote: ra.AddrPort()}
	l.t.mu.Unlock()
	return &trackedConn{Conn: c, local: &own, t: l.t}, nil
}

type trackedConn struct {
	net.Conn
	local *net.TCPAddr
	t     *Conns
	once  sync.Once
}

func (c *trackedConn) LocalAddr() net.Addr { return c.local }

func (c *trackedConn) Close() error {
	c.once.Do(func() {
		c.t.mu.Lock()
		delete(c.t.conns, c.local)
		c.t.mu.Unlock()
	})
	return c.Conn.Close()
}

// errNoConn: the request did not arrive through a tracked listener.
var errNoConn = errors.New("identities: request did not arrive on a tracked connection")

// process returns the process holding the client end of the connection the
// request in ctx arrived on, checking that it runs as uid.
func (t *Conns) process(ctx context.Context, uid uint32) (peer.Process, error) {
	la, _ := ctx.Value(http.LocalAddrContextKey).(*net.TCPAddr)
	t.mu.Lock()
	ci := t.conns[la]
	t.mu.Unlock()
	if ci == nil {
		return peer.Process{}, errNoConn
	}
	ci.once.Do(func() {
		sock, err := t.peers.Lookup(ci.local, ci.remote)
		if err != nil {
			ci.err = err
			return
		}
		ci.proc, ci.err = t.peers.FindProcess(sock.Inode)
	})
	if ci.err != nil {
		return peer.Process{}, fmt.Errorf("identities: calling process: %w", ci.err)
	}
	if ci.proc.UID != uid {
		return peer.Process{}, fmt.Errorf("identities: calling process %d runs as uid %d, its socket belongs to uid %d", ci.proc.PID, ci.proc.UID, uid)
	}
	return ci.proc, nil
}
