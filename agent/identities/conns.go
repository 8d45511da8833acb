package identities

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ferry-id/ferry/agent/imds"
	"github.com/ferry-id/ferry/agent/peer"
	"github.com/ferry-id/ferry/agent/tokens"
)

// Peers finds the process behind a loopback TCP connection (*peer.Finder).
type Peers interface {
	Lookup(local, remote netip.AddrPort) (peer.Socket, error)
	FindProcess(inode uint64) (peer.Process, error)
}

// Conns tracks the connections of the token endpoint, so that decisions
// are kept per connection, and leads a token request back to the process
// that sent it when the request does not carry it.
//
// The endpoint binds an Arc challenge to whatever caller it resolved: to a
// uid, so that Azure's documented two-step curl (two processes of one user)
// works, or to a process. Attestation needs the process either way; the
// endpoint passes the one it found (imds.ProcessFrom). Conns wraps the
// endpoint's listener and gives every accepted connection its own local
// address value; net/http puts that value in each request's context
// (http.LocalAddrContextKey), from which Resolver finds the connection and,
// for a request that carries no process, resolves its process once per
// connection. Safe for concurrent use.
//
// Each connection also remembers the identities Resolver granted on it (see
// grant), so that a keep-alive connection is attested once per ReattestAfter
// rather than on every request.
type Conns struct {
	peers Peers

	// conns maps each tracked connection's own *net.TCPAddr to its
	// *connInfo: written once per connection, read on every request.
	conns sync.Map
	n     atomic.Int64
}

type connInfo struct {
	local, remote netip.AddrPort
	once          sync.Once
	proc          peer.Process
	err           error

	mu     sync.Mutex
	grants []grant // most recent last; at most maxGrants
}

// grant is one authorization decision made on a connection: this caller,
// asking with this selector, may use id. It is reused only on the same
// connection, for the same caller and selector, while younger than
// ReattestAfter and while the agent's entries are unchanged.
type grant struct {
	caller   imds.Caller
	sel      imds.Selector
	id       tokens.Identity
	at       time.Time
	revision uint64
}

// maxGrants bounds the decisions kept per connection: a client naming many
// identities on one connection re-attests instead of growing the list.
const maxGrants = 8

// NewConns returns a Conns resolving processes through peers.
func NewConns(peers Peers) *Conns {
	return &Conns{peers: peers}
}

// Listen wraps ln; pass the result to the endpoint as its listener.
func (t *Conns) Listen(ln net.Listener) net.Listener { return &trackedListener{Listener: ln, t: t} }

// Len is the number of open tracked connections.
func (t *Conns) Len() int { return int(t.n.Load()) }

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
	l.t.conns.Store(&own, &connInfo{local: la.AddrPort(), remote: ra.AddrPort()})
	l.t.n.Add(1)
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
		// The decisions made on this connection go with it: a later
		// connection, even from the same 4-tuple, starts unattested.
		if _, ok := c.t.conns.LoadAndDelete(c.local); ok {
			c.t.n.Add(-1)
		}
	})
	return c.Conn.Close()
}

// errNoConn: the request did not arrive through a tracked listener.
var errNoConn = errors.New("identities: request did not arrive on a tracked connection")

// info returns the tracked connection the request in ctx arrived on, or nil.
func (t *Conns) info(ctx context.Context) *connInfo {
	if t == nil {
		return nil
	}
	la, _ := ctx.Value(http.LocalAddrContextKey).(*net.TCPAddr)
	if la == nil {
		return nil
	}
	v, _ := t.conns.Load(la)
	ci, _ := v.(*connInfo)
	return ci
}

// process returns the process holding the client end of the connection the
// request in ctx arrived on. Its ids are checked when it is attested
// (Processes.Attest).
func (t *Conns) process(ctx context.Context) (peer.Process, error) {
	ci := t.info(ctx)
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
	return ci.proc, nil
}

// granted returns the identity granted earlier on this connection to the
// same caller and selector, if that decision is still current.
func (ci *connInfo) granted(c imds.Caller, s imds.Selector, now time.Time, maxAge time.Duration, revision uint64) (tokens.Identity, bool) {
	ci.mu.Lock()
	defer ci.mu.Unlock()
	for i := len(ci.grants) - 1; i >= 0; i-- {
		g := &ci.grants[i]
		if g.caller != c || g.sel != s {
			continue
		}
		// A clock stepped back is no reason to trust an old decision.
		if age := now.Sub(g.at); age < 0 || age >= maxAge || g.revision != revision {
			ci.grants = append(ci.grants[:i], ci.grants[i+1:]...)
			return tokens.Identity{}, false
		}
		return g.id, true
	}
	return tokens.Identity{}, false
}

// remember records a decision made at now (taken before attesting).
func (ci *connInfo) remember(g grant) {
	ci.mu.Lock()
	defer ci.mu.Unlock()
	for i := range ci.grants {
		if ci.grants[i].caller == g.caller && ci.grants[i].sel == g.sel {
			ci.grants = append(ci.grants[:i], ci.grants[i+1:]...)
			break
		}
	}
	if len(ci.grants) >= maxGrants {
		ci.grants = append(ci.grants[:0], ci.grants[1:]...)
	}
	ci.grants = append(ci.grants, g)
}
