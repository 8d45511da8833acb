package chaos

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
)

// Mode is how a cut link fails.
type Mode int

const (
	// Blackhole stops bytes in both directions without closing anything, as a
	// firewall dropping packets would: RPCs in flight stall, new connections
	// are accepted but not connected through. On Heal everything held is
	// delivered, so a node's RPCs sent before the cut arrive after it, late.
	Blackhole Mode = iota + 1
	// Reset closes the link's connections and refuses new ones at once, as a
	// host answering with RST would.
	Reset
)

func (m Mode) String() string {
	switch m {
	case Blackhole:
		return "blackhole"
	case Reset:
		return "reset"
	}
	return fmt.Sprintf("mode(%d)", int(m))
}

// Identify names the node a proxied connection comes from, "" when unknown.
// remote is the connection's remote address as the proxy sees it, local the
// proxy's own end.
type Identify func(remote, local *net.TCPAddr) string

// Config configures a Net.
type Config struct {
	// Identify tells the source node of each accepted connection. While any
	// link is cut, a connection from an unknown source is refused (and those
	// already open are closed); otherwise it is forwarded untouched.
	Identify Identify
	Logger   *slog.Logger
}

// Net is a set of TCP proxies, one in front of each node, and the state of
// every directed link between nodes. Its methods are safe for concurrent use.
type Net struct {
	identify Identify
	log      *slog.Logger

	mu      sync.Mutex
	cut     map[link]Mode
	changed chan struct{} // closed and replaced on every change of cut
	closed  bool
	lns     []net.Listener
	conns   map[*pipe]struct{}
	wg      sync.WaitGroup

	forwarded atomic.Int64
	held      atomic.Int64
	refused   atomic.Int64

	waiting   int // copies blocked at a blackhole now; guarded by mu
	heals     int64
	midFlight int64 // heals that released bytes held in flight
	released  int64 // reads (RPC fragments) held by a blackhole and released by a heal
}

// link is the direction from one node to another.
type link struct{ from, to string }

// NewNet returns an empty Net.
func NewNet(cfg Config) *Net {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Identify == nil {
		cfg.Identify = func(_, _ *net.TCPAddr) string { return "" }
	}
	return &Net{identify: cfg.Identify, log: cfg.Logger, cut: map[link]Mode{}, changed: make(chan struct{}), conns: map[*pipe]struct{}{}}
}

// Add starts a proxy for node on a free loopback port that forwards to target,
// and returns the proxy's address.
func (n *Net) Add(node, target string) (string, error) {
	return n.AddOn(node, "127.0.0.1:0", target)
}

// AddOn is Add with the proxy listening on listen. A caller that hands out
// ports itself (as testcluster.FreeAddr does) should use it, so that the
// proxy cannot take a port already promised to a node that has not started.
func (n *Net) AddOn(node, listen, target string) (string, error) {
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return "", fmt.Errorf("chaos: proxy for %s: %w", node, err)
	}
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		ln.Close()
		return "", errors.New("chaos: net closed")
	}
	n.lns = append(n.lns, ln)
	n.wg.Add(1)
	n.mu.Unlock()
	go n.serve(ln, node, target)
	return ln.Addr().String(), nil
}

// Cut fails the links between a and b, both directions.
func (n *Net) Cut(mode Mode, a, b string) {
	n.update(func() {
		n.cut[link{a, b}] = mode
		n.cut[link{b, a}] = mode
	})
}

// Partition cuts every link between nodes of different groups. Nodes in no
// group keep all their links.
func (n *Net) Partition(mode Mode, groups ...[]string) {
	n.update(func() {
		for i, g := range groups {
			for j, h := range groups {
				if i == j {
					continue
				}
				for _, a := range g {
					for _, b := range h {
						n.cut[link{a, b}] = mode
					}
				}
			}
		}
	})
}

// Heal restores every link. Bytes a blackhole held flow on.
func (n *Net) Heal() {
	n.update(func() {
		if len(n.cut) == 0 {
			return
		}
		n.heals++
		if n.waiting > 0 {
			n.midFlight++
			n.released += int64(n.waiting)
		}
		clear(n.cut)
	})
}

// HealCounts reports how many heals there were, how many of them came while
// bytes were held in a blackhole (a node mid-RPC), and how many held reads
// they released in all.
func (n *Net) HealCounts() (heals, midFlight, released int64) {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.heals, n.midFlight, n.released
}

// Counts reports connections forwarded, held by a blackhole before being
// forwarded, and refused or reset.
func (n *Net) Counts() (forwarded, held, refused int64) {
	return n.forwarded.Load(), n.held.Load(), n.refused.Load()
}

// Close stops every proxy and closes every proxied connection.
func (n *Net) Close() {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return
	}
	n.closed = true
	close(n.changed)
	for _, ln := range n.lns {
		ln.Close()
	}
	for p := range n.conns {
		p.close()
	}
	n.mu.Unlock()
	n.wg.Wait()
}

func (n *Net) update(f func()) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return
	}
	f()
	close(n.changed)
	n.changed = make(chan struct{})
	// Reset links drop their connections now. So do connections whose source
	// could not be told when they were accepted (made before the cluster was
	// known): a cut must not leave them flowing, and their redial is
	// identified.
	for p := range n.conns {
		if n.cut[p.l] == Reset || n.cut[link{p.l.to, p.l.from}] == Reset || (len(n.cut) > 0 && p.l.from == "") {
			p.close()
		}
	}
}

// gate blocks while l is blackholed and reports whether bytes may flow on it:
// false once it is reset or the net is closed. held says the caller holds
// bytes read from the link, which count as in flight while it waits.
func (n *Net) gate(l link, held bool) bool {
	waited := false
	defer func() {
		if waited {
			n.mu.Lock()
			n.waiting--
			n.mu.Unlock()
		}
	}()
	for {
		n.mu.Lock()
		if n.closed {
			n.mu.Unlock()
			return false
		}
		mode, ch := n.cut[l], n.changed
		if mode == Blackhole && held && !waited {
			waited = true
			n.waiting++
		}
		n.mu.Unlock()
		switch mode {
		case 0:
			return true
		case Reset:
			return false
		}
		<-ch
	}
}

// cutting reports whether any link is cut.
func (n *Net) cutting() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return len(n.cut) > 0
}

func (n *Net) mode(l link) Mode {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.cut[l]
}

func (n *Net) serve(ln net.Listener, node, target string) {
	defer n.wg.Done()
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		n.wg.Add(1)
		go func() {
			defer n.wg.Done()
			n.handle(c, node, target)
		}()
	}
}

func (n *Net) handle(c net.Conn, node, target string) {
	from := n.identify(c.RemoteAddr().(*net.TCPAddr), c.LocalAddr().(*net.TCPAddr))
	l := link{from, node}
	if from == "" && n.cutting() {
		// A dialer the net cannot name may be a node on either side: while
		// any link is cut, letting it through would leak the partition.
		n.refused.Add(1)
		c.Close()
		return
	}
	if from != "" && n.mode(l) == Blackhole {
		n.held.Add(1)
	}
	if from != "" && !n.gate(l, false) {
		n.refused.Add(1)
		c.Close()
		return
	}
	up, err := net.Dial("tcp", target)
	if err != nil {
		n.log.Debug("chaos: proxy dial", "to", node, "err", err)
		c.Close()
		return
	}
	p := &pipe{l: l, a: c, b: up}
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		p.close()
		return
	}
	n.conns[p] = struct{}{}
	n.mu.Unlock()
	n.forwarded.Add(1)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); n.copy(p, up, c, l) }()
	go func() { defer wg.Done(); n.copy(p, c, up, link{l.to, l.from}) }()
	wg.Wait()
	p.close()
	n.mu.Lock()
	delete(n.conns, p)
	n.mu.Unlock()
}

// copy moves bytes from src to dst, each read passing l's gate before it is
// written: a blackhole holds it, a reset ends the connection.
func (n *Net) copy(p *pipe, dst, src net.Conn, l link) {
	buf := make([]byte, 32<<10)
	for {
		k, err := src.Read(buf)
		if k > 0 {
			if l.from != "" && l.to != "" && !n.gate(l, true) {
				p.close()
				return
			}
			if _, werr := dst.Write(buf[:k]); werr != nil {
				p.close()
				return
			}
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				// Half-close: pass the end of stream on, keep the other way open.
				if tc, ok := dst.(*net.TCPConn); ok {
					_ = tc.CloseWrite()
					return
				}
			}
			p.close()
			return
		}
	}
}

// pipe is one proxied connection: a from the dialing node, b to the target.
type pipe struct {
	l    link
	a, b net.Conn
	once sync.Once
}

func (p *pipe) close() {
	p.once.Do(func() {
		p.a.Close()
		p.b.Close()
	})
}
