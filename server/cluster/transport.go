package cluster

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/raft"
)

// Connection types: the first byte a dialer writes after the TLS handshake.
const (
	connRaft byte = 0x01
	connGRPC byte = 0x02
)

// handshakeTimeout bounds the TLS handshake and the type byte together, so a
// peer that connects and stays silent cannot hold a goroutine.
const handshakeTimeout = 10 * time.Second

// mux accepts mutual-TLS connections on one listener and hands them to the
// raft transport or the gRPC server by their first byte.
type mux struct {
	ln        net.Listener
	tls       *peerTLS
	advertise net.Addr
	log       *slog.Logger

	raft *chanListener
	grpc *chanListener

	wg      sync.WaitGroup
	closed  chan struct{}
	once    sync.Once
	pmu     sync.Mutex
	pending map[net.Conn]struct{} // connections not yet handed to a consumer
}

func newMux(ln net.Listener, advertise net.Addr, pt *peerTLS, log *slog.Logger) *mux {
	m := &mux{
		ln:        ln,
		tls:       pt,
		advertise: advertise,
		log:       log,
		closed:    make(chan struct{}),
		pending:   make(map[net.Conn]struct{}),
	}
	m.raft = newChanListener(advertise, m.closed)
	m.grpc = newChanListener(advertise, m.closed)
	m.wg.Add(1)
	go m.serve()
	return m
}

func (m *mux) serve() {
	defer m.wg.Done()
	for {
		c, err := m.ln.Accept()
		if err != nil {
			select {
			case <-m.closed:
				return
			default:
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				time.Sleep(10 * time.Millisecond)
				continue
			}
			if errors.Is(err, net.ErrClosed) {
				return
			}
			m.log.Warn("cluster: accept", "err", err)
			time.Sleep(50 * time.Millisecond)
			continue
		}
		m.wg.Add(1)
		go func() {
			defer m.wg.Done()
			m.handle(c)
		}()
	}
}

// track records c as pending until it is handed over; false when the mux is closing.
func (m *mux) track(c net.Conn, add bool) bool {
	m.pmu.Lock()
	defer m.pmu.Unlock()
	if !add {
		delete(m.pending, c)
		return true
	}
	select {
	case <-m.closed:
		return false
	default:
	}
	m.pending[c] = struct{}{}
	return true
}

func (m *mux) handle(c net.Conn) {
	if !m.track(c, true) {
		c.Close()
		return
	}
	defer m.track(c, false)
	tc := tls.Server(c, m.tls.server)
	_ = tc.SetDeadline(time.Now().Add(handshakeTimeout))
	if err := tc.Handshake(); err != nil {
		m.log.Debug("cluster: refused connection", "remote", c.RemoteAddr().String(), "err", err)
		c.Close()
		return
	}
	var kind [1]byte
	if _, err := io.ReadFull(tc, kind[:]); err != nil {
		m.log.Debug("cluster: no connection type", "remote", c.RemoteAddr().String(), "err", err)
		tc.Close()
		return
	}
	_ = tc.SetDeadline(time.Time{})
	var dst *chanListener
	switch kind[0] {
	case connRaft:
		dst = m.raft
	case connGRPC:
		dst = m.grpc
	default:
		m.log.Debug("cluster: unknown connection type", "remote", c.RemoteAddr().String(), "type", kind[0])
		tc.Close()
		return
	}
	if !dst.deliver(tc) {
		tc.Close()
	}
}

// dial opens a mutual-TLS connection to addr and announces its type.
func (m *mux) dial(ctx context.Context, addr string, kind byte) (net.Conn, error) {
	d := &net.Dialer{}
	raw, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("cluster: dial %s: %w", addr, err)
	}
	tc := tls.Client(raw, m.tls.clientFor(addr))
	deadline := time.Now().Add(handshakeTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	_ = tc.SetDeadline(deadline)
	if err := tc.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, fmt.Errorf("cluster: TLS handshake with %s: %w", addr, err)
	}
	if _, err := tc.Write([]byte{kind}); err != nil {
		tc.Close()
		return nil, fmt.Errorf("cluster: %s: %w", addr, err)
	}
	_ = tc.SetDeadline(time.Time{})
	return tc, nil
}

// Close stops accepting and closes the listener; connections already handed
// out belong to their consumers.
func (m *mux) Close() error {
	var err error
	m.once.Do(func() {
		m.pmu.Lock()
		close(m.closed)
		for c := range m.pending {
			c.Close()
		}
		m.pmu.Unlock()
		err = m.ln.Close()
		m.wg.Wait()
	})
	return err
}

// streamLayer is the raft.StreamLayer over the mux.
type streamLayer struct {
	*chanListener
	m *mux
}

var _ raft.StreamLayer = (*streamLayer)(nil)

func (s *streamLayer) Dial(address raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return s.m.dial(ctx, string(address), connRaft)
}

// chanListener is a net.Listener fed by the mux.
type chanListener struct {
	addr   net.Addr
	conns  chan net.Conn
	done   chan struct{} // closed by Close
	muxed  chan struct{} // closed when the mux closes
	closeO sync.Once
}

func newChanListener(addr net.Addr, muxClosed chan struct{}) *chanListener {
	return &chanListener{addr: addr, conns: make(chan net.Conn), done: make(chan struct{}), muxed: muxClosed}
}

func (l *chanListener) deliver(c net.Conn) bool {
	select {
	case l.conns <- c:
		return true
	case <-l.done:
		return false
	case <-l.muxed:
		return false
	}
}

func (l *chanListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	case <-l.muxed:
		return nil, net.ErrClosed
	}
}

func (l *chanListener) Close() error {
	l.closeO.Do(func() { close(l.done) })
	return nil
}

func (l *chanListener) Addr() net.Addr { return l.addr }

// stringAddr is a net.Addr for the advertised address.
type stringAddr string

func (a stringAddr) Network() string { return "tcp" }
func (a stringAddr) String() string  { return string(a) }
