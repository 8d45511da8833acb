// Package budget bounds what local callers may hold of a server on a unix
// socket: connections, and calls in flight, in total and per uid. The uid is
// the one the kernel reports for the connection (SO_PEERCRED), read at accept,
// before a byte of the connection is parsed.
//
// When a budget is exhausted the uid holding the most is refused or shed
// first, so that other uids keep being served: a uid at its own cap is
// refused; when the total is reached, a newcomer whose uid holds fewer than
// the uid holding the most is admitted and that uid loses a connection (an
// idle one if it has any) or a call; otherwise the newcomer is refused.
//
// A Budget is safe for concurrent use.
package budget

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/sys/unix"
)

// Limits are the caps of a Budget. Each must be positive.
type Limits struct {
	// Conns bounds the connections open at once, ConnsPerUID those of one uid.
	Conns, ConnsPerUID int
	// Calls bounds the calls in flight at once, CallsPerUID those of one uid.
	Calls, CallsPerUID int
}

func (l Limits) validate() error {
	switch {
	case l.Conns <= 0 || l.ConnsPerUID <= 0 || l.Calls <= 0 || l.CallsPerUID <= 0:
		return fmt.Errorf("budget: every limit must be positive: %+v", l)
	case l.ConnsPerUID > l.Conns:
		return fmt.Errorf("budget: connections per uid (%d) above the total (%d)", l.ConnsPerUID, l.Conns)
	case l.CallsPerUID > l.Calls:
		return fmt.Errorf("budget: calls per uid (%d) above the total (%d)", l.CallsPerUID, l.Calls)
	}
	return nil
}

// Refusal is a connection or call refused, or one taken back from the uid
// holding the most (Shed) to make room for another uid.
type Refusal struct {
	UID  uint32
	PID  int32
	Kind string // "connection" or "call"
	Shed bool   // taken back from a uid holding the most, rather than refused
	// Reason says which cap was reached, for the caller and the log.
	Reason string
}

func (r *Refusal) Error() string { return r.Reason }

// ErrShed is the cause of the context of a call taken back from the uid
// holding the most calls.
var ErrShed = errors.New("budget: call shed: the agent's call budget is full and this uid holds the most calls")

// Budget counts connections and calls per uid. New returns one; Listener
// charges connections, Conn.StartCall calls.
type Budget struct {
	lim Limits
	// onRefuse reports each refusal and shed; called without b.mu held.
	onRefuse func(*Refusal)

	mu    sync.Mutex
	conns int
	calls int
	uids  map[uint32]*account
}

// account is what one uid holds.
type account struct {
	uid   uint32
	conns map[*Conn]struct{}
	calls int
}

// New returns a Budget with limits lim. onRefuse, when not nil, is told of
// every refusal and shed (from the goroutine accepting or starting the call).
func New(lim Limits, onRefuse func(*Refusal)) (*Budget, error) {
	if err := lim.validate(); err != nil {
		return nil, err
	}
	if onRefuse == nil {
		onRefuse = func(*Refusal) {}
	}
	return &Budget{lim: lim, onRefuse: onRefuse, uids: make(map[uint32]*account)}, nil
}

// Limits returns b's limits.
func (b *Budget) Limits() Limits { return b.lim }

// Usage reports what uid holds: connections open and calls in flight.
func (b *Budget) Usage(uid uint32) (conns, calls int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if a := b.uids[uid]; a != nil {
		return len(a.conns), a.calls
	}
	return 0, 0
}

// Totals reports the connections open and calls in flight of every uid.
func (b *Budget) Totals() (conns, calls int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.conns, b.calls
}

func (b *Budget) accountLocked(uid uint32) *account {
	a := b.uids[uid]
	if a == nil {
		a = &account{uid: uid, conns: make(map[*Conn]struct{})}
		b.uids[uid] = a
	}
	return a
}

// dropIfEmptyLocked forgets an account that holds nothing.
func (b *Budget) dropIfEmptyLocked(a *account) {
	if len(a.conns) == 0 && a.calls == 0 {
		delete(b.uids, a.uid)
	}
}

// heaviestLocked returns the account holding the most by weight.
func (b *Budget) heaviestLocked(weight func(*account) int) *account {
	var top *account
	for _, a := range b.uids {
		if top == nil || weight(a) > weight(top) {
			top = a
		}
	}
	return top
}

func connWeight(a *account) int { return len(a.conns) }
func callWeight(a *account) int { return a.calls }

// admit charges a new connection of cred, or refuses it. A connection taken
// back from the uid holding the most is returned to be closed by the caller.
func (b *Budget) admit(uc *net.UnixConn, cred unix.Ucred) (*Conn, *Conn, *Refusal) {
	b.mu.Lock()
	defer b.mu.Unlock()
	a := b.accountLocked(cred.Uid)
	if len(a.conns) >= b.lim.ConnsPerUID {
		b.dropIfEmptyLocked(a)
		return nil, nil, &Refusal{UID: cred.Uid, PID: cred.Pid, Kind: "connection",
			Reason: fmt.Sprintf("uid %d holds %d connections, its limit (max_connections_per_uid)", cred.Uid, len(a.conns))}
	}
	var victim *Conn
	if b.conns >= b.lim.Conns {
		top := b.heaviestLocked(connWeight)
		if top == a || len(top.conns) <= len(a.conns)+1 {
			b.dropIfEmptyLocked(a)
			return nil, nil, &Refusal{UID: cred.Uid, PID: cred.Pid, Kind: "connection",
				Reason: fmt.Sprintf("%d connections open, the limit (max_connections)", b.conns)}
		}
		victim = top.pickConnLocked()
		b.releaseConnLocked(victim)
	}
	c := &Conn{UnixConn: uc, cred: cred, b: b, acct: a, calls: make(map[*call]struct{})}
	a.conns[c] = struct{}{}
	b.conns++
	return c, victim, nil
}

// pickConnLocked returns the connection of a to take back: one without a call
// in flight if there is one, else the one with the fewest calls.
func (a *account) pickConnLocked() *Conn {
	var best *Conn
	for c := range a.conns {
		if best == nil || len(c.calls) < len(best.calls) {
			best = c
			if len(c.calls) == 0 {
				break
			}
		}
	}
	return best
}

// releaseConnLocked uncharges c and its calls, once.
func (b *Budget) releaseConnLocked(c *Conn) {
	if c.released {
		return
	}
	c.released = true
	delete(c.acct.conns, c)
	b.conns--
	for k := range c.calls {
		delete(c.calls, k)
		c.acct.calls--
		b.calls--
	}
	b.dropIfEmptyLocked(c.acct)
}

// Listener wraps l, a unix socket listener: Accept reads each connection's
// peer credentials and charges it to its uid, refusing (with an HTTP/2
// GOAWAY saying why) connections over budget. Connections it returns are
// *Conn.
func (b *Budget) Listener(l net.Listener) net.Listener { return &listener{Listener: l, b: b} }

type listener struct {
	net.Listener
	b         *Budget
	lingering atomic.Int64
}

// refuseWriteTimeout bounds the write of the refusal frames. A new
// connection's socket buffer is empty, so it never blocks in practice.
const refuseWriteTimeout = 100 * time.Millisecond

func (l *listener) Accept() (net.Conn, error) {
	for {
		nc, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		uc, ok := nc.(*net.UnixConn)
		if !ok {
			nc.Close()
			continue
		}
		cred, err := readPeerCred(uc)
		if err != nil {
			// The peer is already gone.
			uc.Close()
			continue
		}
		c, victim, ref := l.b.admit(uc, *cred)
		if victim != nil {
			victim.UnixConn.Close()
			l.b.onRefuse(&Refusal{UID: victim.cred.Uid, PID: victim.cred.Pid, Kind: "connection", Shed: true,
				Reason: fmt.Sprintf("connection closed: max_connections reached and uid %d holds the most", victim.cred.Uid)})
		}
		if ref != nil {
			l.refuse(uc, ref.Reason)
			l.b.onRefuse(ref)
			continue
		}
		return c, nil
	}
}

// refuse tells the client why in HTTP/2's terms (the server preface, then
// GOAWAY ENHANCE_YOUR_CALM with the reason as debug data, which gRPC clients
// include in their error) and closes the connection. Closing at once would
// fail the client's write of its own preface before it reads the GOAWAY, so
// up to maxLingering refused connections are closed only once their client
// has closed or lingerTimeout has passed; past that, at once.
func (l *listener) refuse(uc *net.UnixConn, reason string) {
	_ = uc.SetWriteDeadline(time.Now().Add(refuseWriteTimeout))
	fr := http2.NewFramer(uc, nil)
	if fr.WriteSettings() != nil || fr.WriteGoAway(0, http2.ErrCodeEnhanceYourCalm, []byte("workload API: connection refused: "+reason)) != nil ||
		uc.CloseWrite() != nil || l.lingering.Add(1) > maxLingering {
		l.lingering.Add(-1)
		uc.Close()
		return
	}
	go func() {
		defer l.lingering.Add(-1)
		defer uc.Close()
		_ = uc.SetReadDeadline(time.Now().Add(lingerTimeout))
		_, _ = io.CopyN(io.Discard, uc, lingerBytes)
	}()
}

// Refused connections left open for their client to read why.
const (
	maxLingering  = 64
	lingerTimeout = time.Second
	lingerBytes   = 64 << 10
)

// readPeerCred reads SO_PEERCRED off a unix socket connection.
func readPeerCred(sc syscall.Conn) (*unix.Ucred, error) {
	raw, err := sc.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("budget: peer credentials: %w", err)
	}
	return PeerCred(raw)
}

// PeerCred reads SO_PEERCRED off a unix socket: the peer's pid and its
// effective uid and gid when it connected.
func PeerCred(raw syscall.RawConn) (*unix.Ucred, error) {
	var (
		cred    *unix.Ucred
		credErr error
	)
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return nil, fmt.Errorf("budget: peer credentials: %w", err)
	}
	if credErr != nil {
		return nil, fmt.Errorf("budget: peer credentials: %w", credErr)
	}
	return cred, nil
}

// Conn is a connection charged to its peer's uid. Close uncharges it.
type Conn struct {
	*net.UnixConn
	cred unix.Ucred
	b    *Budget
	acct *account

	// Guarded by b.mu.
	calls    map[*call]struct{}
	released bool
}

// Cred returns the peer credentials read when the connection was accepted.
func (c *Conn) Cred() unix.Ucred { return c.cred }

// Close closes the connection and uncharges it and its calls.
func (c *Conn) Close() error {
	err := c.UnixConn.Close()
	c.b.mu.Lock()
	c.b.releaseConnLocked(c)
	c.b.mu.Unlock()
	return err
}

// RemoteAddr names the peer by its credentials; ConnOf finds c from it.
func (c *Conn) RemoteAddr() net.Addr { return &Addr{c: c} }

// Addr is the remote address of a Conn.
type Addr struct{ c *Conn }

// Network implements net.Addr.
func (a *Addr) Network() string { return "unix" }

// String implements net.Addr.
func (a *Addr) String() string {
	return fmt.Sprintf("pid %d uid %d", a.c.cred.Pid, a.c.cred.Uid)
}

// ConnOf returns the Conn whose RemoteAddr is addr.
func ConnOf(addr net.Addr) (*Conn, bool) {
	a, ok := addr.(*Addr)
	if !ok {
		return nil, false
	}
	return a.c, true
}

// call is one call in flight.
type call struct {
	cancel context.CancelCauseFunc
}

// StartCall charges a call on c to its uid, or refuses it. The returned
// context, derived from ctx, is the call's: the charge is released when it is
// done, and it is canceled with cause ErrShed if the call is taken back to
// make room for another uid's.
func (c *Conn) StartCall(ctx context.Context) (context.Context, error) {
	b := c.b
	b.mu.Lock()
	if c.released {
		b.mu.Unlock()
		return nil, &Refusal{UID: c.cred.Uid, PID: c.cred.Pid, Kind: "call", Reason: "connection closed"}
	}
	a := c.acct
	if a.calls >= b.lim.CallsPerUID {
		b.mu.Unlock()
		ref := &Refusal{UID: c.cred.Uid, PID: c.cred.Pid, Kind: "call",
			Reason: fmt.Sprintf("uid %d has %d calls in flight, its limit (max_calls_per_uid)", c.cred.Uid, a.calls)}
		b.onRefuse(ref)
		return nil, ref
	}
	var shed *call
	var shedUID uint32
	var shedPID int32
	if b.calls >= b.lim.Calls {
		top := b.heaviestLocked(callWeight)
		if top == a || top.calls <= a.calls+1 {
			b.mu.Unlock()
			ref := &Refusal{UID: c.cred.Uid, PID: c.cred.Pid, Kind: "call",
				Reason: fmt.Sprintf("%d calls in flight, the limit (max_calls)", b.calls)}
			b.onRefuse(ref)
			return nil, ref
		}
		var from *Conn
		for oc := range top.conns {
			if from == nil || len(oc.calls) > len(from.calls) {
				from = oc
			}
		}
		for k := range from.calls {
			shed = k
			break
		}
		delete(from.calls, shed)
		top.calls--
		b.calls--
		shedUID, shedPID = from.cred.Uid, from.cred.Pid
	}
	cctx, cancel := context.WithCancelCause(ctx)
	k := &call{cancel: cancel}
	c.calls[k] = struct{}{}
	a.calls++
	b.calls++
	b.mu.Unlock()
	context.AfterFunc(cctx, func() { c.endCall(k) })
	if shed != nil {
		shed.cancel(ErrShed)
		b.onRefuse(&Refusal{UID: shedUID, PID: shedPID, Kind: "call", Shed: true,
			Reason: fmt.Sprintf("call shed: max_calls reached and uid %d holds the most", shedUID)})
	}
	return cctx, nil
}

// endCall uncharges k, unless it was already (shed, or its connection
// released).
func (c *Conn) endCall(k *call) {
	k.cancel(nil)
	b := c.b
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, ok := c.calls[k]; !ok {
		return
	}
	delete(c.calls, k)
	c.acct.calls--
	b.calls--
	b.dropIfEmptyLocked(c.acct)
}
