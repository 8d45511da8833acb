// Package h2attack is a hostile HTTP/2 client of a gRPC endpoint on a unix
// socket (the agent's Workload API), written with golang.org/x/net's Framer
// and HPACK encoder so that it can do what no well-behaved client does: open
// more streams than announced, repeat large header values by HPACK reference,
// start request bodies it never finishes, hold connections that never call,
// reset streams as fast as it opens them. The hostile-local-user suites run it
// (cmd/h2attack) as a process of another uid against a real agent, to check
// that the agent's budgets hold and that other callers are still served.
package h2attack

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"sync"
	"sync/atomic"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// Methods of the Workload API the attacks call.
const (
	FetchX509SVID = "/SpiffeWorkloadAPI/FetchX509SVID"
	FetchJWTSVID  = "/SpiffeWorkloadAPI/FetchJWTSVID"
)

// Stats counts what the server answered, over every connection of an
// attack. It is safe for concurrent use.
type Stats struct {
	Dialed      atomic.Int64 // connections accepted by the kernel
	DialErrors  atomic.Int64 // connections the kernel refused (backlog full, no descriptors)
	GoAways     atomic.Int64 // GOAWAY frames received
	Refusals    atomic.Int64 // GOAWAY ENHANCE_YOUR_CALM: the connection was refused
	Closed      atomic.Int64 // connections the server closed
	StreamsSent atomic.Int64
	Resets      atomic.Int64 // RST_STREAM received
	Statuses    sync.Map     // grpc-status -> *atomic.Int64
	mu          sync.Mutex
	lastGoAway  string
}

// Report is a snapshot of Stats, as cmd/h2attack prints it.
type Report struct {
	Dialed      int64            `json:"dialed"`
	DialErrors  int64            `json:"dial_errors"`
	GoAways     int64            `json:"goaways"`
	Refusals    int64            `json:"refusals"`
	Closed      int64            `json:"closed"`
	StreamsSent int64            `json:"streams_sent"`
	Resets      int64            `json:"resets"`
	Statuses    map[string]int64 `json:"statuses"`
	LastGoAway  string           `json:"last_goaway,omitempty"`
}

// Add returns the sum of r and o (LastGoAway: o's if it has one).
func (r Report) Add(o Report) Report {
	r.Dialed += o.Dialed
	r.DialErrors += o.DialErrors
	r.GoAways += o.GoAways
	r.Refusals += o.Refusals
	r.Closed += o.Closed
	r.StreamsSent += o.StreamsSent
	r.Resets += o.Resets
	if r.Statuses == nil {
		r.Statuses = map[string]int64{}
	}
	for k, v := range o.Statuses {
		r.Statuses[k] += v
	}
	if o.LastGoAway != "" {
		r.LastGoAway = o.LastGoAway
	}
	return r
}

// Report returns a snapshot of s.
func (s *Stats) Report() Report {
	r := Report{
		Dialed: s.Dialed.Load(), DialErrors: s.DialErrors.Load(), GoAways: s.GoAways.Load(),
		Refusals: s.Refusals.Load(), Closed: s.Closed.Load(), StreamsSent: s.StreamsSent.Load(),
		Resets: s.Resets.Load(), Statuses: map[string]int64{},
	}
	s.Statuses.Range(func(k, v any) bool {
		r.Statuses[k.(string)] = v.(*atomic.Int64).Load()
		return true
	})
	s.mu.Lock()
	r.LastGoAway = s.lastGoAway
	s.mu.Unlock()
	return r
}

func (s *Stats) status(code string) {
	v, _ := s.Statuses.LoadOrStore(code, new(atomic.Int64))
	v.(*atomic.Int64).Add(1)
}

// Conn is one raw HTTP/2 client connection.
type Conn struct {
	nc    net.Conn
	stats *Stats

	mu   sync.Mutex // serializes writes
	fr   *http2.Framer
	enc  *hpack.Encoder
	hbuf bytes.Buffer
	next uint32
	// lastBlock is the wire size of the last header block sent.
	lastBlock int
	// Flow control of what Send queues, as the server grants it: a hostile
	// client that overran the windows would only get its connection closed.
	connWin    int64
	initWin    int64
	streamWin  map[uint32]int64
	pending    map[uint32][]byte
	pendingEnd map[uint32]bool

	done    chan struct{} // closed when the read loop ends
	settled chan struct{} // closed once admitted (SETTINGS ACK), refused (GOAWAY) or closed
	settle  sync.Once
}

// Dial connects to the unix socket at path and sends the client preface and
// an empty SETTINGS frame. A read loop counts what the server sends into
// stats, acknowledges its SETTINGS and PINGs, and ends when the server
// closes the connection.
func Dial(path string, stats *Stats) (*Conn, error) {
	nc, err := net.Dial("unix", path)
	if err != nil {
		stats.DialErrors.Add(1)
		return nil, err
	}
	stats.Dialed.Add(1)
	c := &Conn{nc: nc, stats: stats, next: 1, done: make(chan struct{}), settled: make(chan struct{}),
		connWin: 65535, initWin: 65535, streamWin: map[uint32]int64{}, pending: map[uint32][]byte{}, pendingEnd: map[uint32]bool{}}
	c.fr = http2.NewFramer(nc, nc)
	c.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	c.fr.MaxHeaderListSize = 1 << 20
	c.enc = hpack.NewEncoder(&c.hbuf)
	if _, err := io.WriteString(nc, http2.ClientPreface); err != nil {
		nc.Close()
		return nil, err
	}
	if err := c.fr.WriteSettings(); err != nil {
		nc.Close()
		return nil, err
	}
	go c.readLoop()
	return c, nil
}

// Done is closed once the server has closed the connection (or Close).
func (c *Conn) Done() <-chan struct{} { return c.done }

// Settled is closed once the server has admitted the connection
// (acknowledged its SETTINGS) or refused it (GOAWAY), or it has closed.
func (c *Conn) Settled() <-chan struct{} { return c.settled }

func (c *Conn) markSettled() { c.settle.Do(func() { close(c.settled) }) }

// Close closes the connection.
func (c *Conn) Close() error { return c.nc.Close() }

func (c *Conn) readLoop() {
	defer close(c.done)
	defer c.markSettled()
	defer c.nc.Close()
	for {
		f, err := c.fr.ReadFrame()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				c.stats.Closed.Add(1)
			}
			return
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if f.IsAck() {
				c.markSettled()
			} else {
				c.mu.Lock()
				if v, ok := f.Value(http2.SettingInitialWindowSize); ok {
					for id := range c.streamWin {
						c.streamWin[id] += int64(v) - c.initWin
					}
					c.initWin = int64(v)
				}
				_ = c.fr.WriteSettingsAck()
				c.pumpLocked()
				c.mu.Unlock()
			}
		case *http2.WindowUpdateFrame:
			c.mu.Lock()
			if f.StreamID == 0 {
				c.connWin += int64(f.Increment)
			} else if _, ok := c.streamWin[f.StreamID]; ok {
				c.streamWin[f.StreamID] += int64(f.Increment)
			}
			c.pumpLocked()
			c.mu.Unlock()
		case *http2.PingFrame:
			if !f.IsAck() {
				c.mu.Lock()
				_ = c.fr.WritePing(true, f.Data)
				c.mu.Unlock()
			}
		case *http2.GoAwayFrame:
			// Recorded before Settled fires: a reader woken by it reads
			// these figures (it once read an empty LastGoAway).
			c.stats.GoAways.Add(1)
			if f.ErrCode == http2.ErrCodeEnhanceYourCalm {
				c.stats.Refusals.Add(1)
			}
			c.stats.mu.Lock()
			c.stats.lastGoAway = f.ErrCode.String() + " " + string(f.DebugData())
			c.stats.mu.Unlock()
			c.markSettled()
		case *http2.RSTStreamFrame:
			c.stats.Resets.Add(1)
			c.mu.Lock()
			c.forgetLocked(f.StreamID)
			c.mu.Unlock()
		case *http2.MetaHeadersFrame:
			if v := f.PseudoValue("status"); v != "" && v != "200" {
				c.stats.status("http-" + v)
			}
			for _, hf := range f.RegularFields() {
				if hf.Name == "grpc-status" {
					c.stats.status(hf.Value)
				}
			}
			if f.StreamEnded() {
				c.mu.Lock()
				c.forgetLocked(f.StreamID)
				c.mu.Unlock()
			}
		}
	}
}

// Call opens a stream calling method with the given extra header fields and
// returns its ID. The stream's request is not sent: the caller sends it with
// Data, or never.
func (c *Conn) Call(method string, extra ...hpack.HeaderField) (uint32, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.hbuf.Reset()
	for _, f := range []hpack.HeaderField{
		{Name: ":method", Value: "POST"}, {Name: ":scheme", Value: "http"},
		{Name: ":path", Value: method}, {Name: ":authority", Value: "localhost"},
		{Name: "content-type", Value: "application/grpc"}, {Name: "te", Value: "trailers"},
		{Name: "workload.spiffe.io", Value: "true"},
	} {
		if err := c.enc.WriteField(f); err != nil {
			return 0, err
		}
	}
	for _, f := range extra {
		if err := c.enc.WriteField(f); err != nil {
			return 0, err
		}
	}
	id := c.next
	c.next += 2
	c.streamWin[id] = c.initWin
	c.lastBlock = c.hbuf.Len()
	if err := c.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: c.hbuf.Bytes(), EndHeaders: true}); err != nil {
		return 0, err
	}
	c.stats.StreamsSent.Add(1)
	return id, nil
}

// LastHeaderBlock is the size on the wire of the last call's header block.
func (c *Conn) LastHeaderBlock() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lastBlock
}

// Send queues p on stream id, ending the stream if end, and sends as much
// of it as the server's flow-control windows allow; the rest follows as the
// server grants more.
func (c *Conn) Send(id uint32, p []byte, end bool) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.streamWin[id]; !ok {
		return nil // the server has ended the stream
	}
	c.pending[id] = append(c.pending[id], p...)
	c.pendingEnd[id] = end
	return c.pumpLocked()
}

// pumpLocked sends queued DATA within the windows.
func (c *Conn) pumpLocked() error {
	for id, p := range c.pending {
		for len(p) > 0 && c.connWin > 0 && c.streamWin[id] > 0 {
			n := int(min(int64(len(p)), c.connWin, c.streamWin[id], 16<<10))
			last := n == len(p)
			if err := c.fr.WriteData(id, last && c.pendingEnd[id], p[:n]); err != nil {
				return err
			}
			c.connWin -= int64(n)
			c.streamWin[id] -= int64(n)
			p = p[n:]
		}
		if len(p) == 0 {
			delete(c.pending, id)
		} else {
			c.pending[id] = p
		}
	}
	return nil
}

func (c *Conn) forgetLocked(id uint32) {
	delete(c.streamWin, id)
	delete(c.pending, id)
	delete(c.pendingEnd, id)
}

// Reset resets stream id (CANCEL), as a client that gives up does.
func (c *Conn) Reset(id uint32) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.forgetLocked(id)
	return c.fr.WriteRSTStream(id, http2.ErrCodeCancel)
}

// Message frames a gRPC message of n bytes: its 5-byte prefix and n bytes of
// a protobuf field that parses as unknown.
func Message(n int) []byte {
	b := make([]byte, 5+n)
	binary.BigEndian.PutUint32(b[1:5], uint32(n))
	return b
}

// BinHeader returns a `-bin` header field whose value is base64 of random
// bytes and whose HPACK entry size (name, value and 32) is size, so that it
// fits the default 4 KiB dynamic table and every later use on the same
// connection is a one-byte index.
func BinHeader(size int) hpack.HeaderField {
	const name = "x-ferry-attack-bin"
	n := size - 32 - len(name)
	raw := make([]byte, n*3/4)
	_, _ = rand.Read(raw)
	v := base64.RawStdEncoding.EncodeToString(raw)
	return hpack.HeaderField{Name: name, Value: v[:min(len(v), n)&^3]}
}

// Options shape an attack.
type Options struct {
	Socket  string
	Conns   int
	Streams int // per connection
	// HeaderBytes is the HPACK size of the -bin header of HeadersFlood,
	// Refs how many times each stream repeats it.
	HeaderBytes, Refs int
	// BodyBytes is the declared size of each request of Bodies, of which
	// all but the last byte is sent (as far as flow control lets).
	BodyBytes int
	// Rounds is how many times Flood opens and resets a stream.
	Rounds int
}

// HeadersFlood opens o.Conns connections and on each o.Streams calls that
// send only their headers (no request, no END_STREAM), each repeating a
// -bin header of o.HeaderBytes o.Refs times by HPACK reference: a few bytes
// on the wire, o.Refs × o.HeaderBytes decoded.
func HeadersFlood(o Options, stats *Stats) ([]*Conn, error) {
	hf := BinHeader(o.HeaderBytes)
	extra := make([]hpack.HeaderField, o.Refs)
	for i := range extra {
		extra[i] = hf
	}
	return openEach(o, stats, func(c *Conn) error {
		for range o.Streams {
			if _, err := c.Call(FetchX509SVID, extra...); err != nil {
				return err
			}
		}
		return nil
	})
}

// Bodies opens o.Conns connections and on each o.Streams FetchJWTSVID calls
// whose request declares o.BodyBytes and sends all but its last byte.
func Bodies(o Options, stats *Stats) ([]*Conn, error) {
	msg := Message(o.BodyBytes)
	return openEach(o, stats, func(c *Conn) error {
		for range o.Streams {
			id, err := c.Call(FetchJWTSVID)
			if err != nil {
				return err
			}
			if err := c.Send(id, msg[:len(msg)-1], false); err != nil {
				return err
			}
		}
		return nil
	})
}

// Idle opens o.Conns connections that send the preface and nothing else.
func Idle(o Options, stats *Stats) ([]*Conn, error) {
	return openEach(o, stats, func(*Conn) error { return nil })
}

// openEach dials o.Conns connections and runs do on each, then waits until
// the server has admitted or refused each. Connections the kernel or the
// server refuses are counted, not fatal.
func openEach(o Options, stats *Stats, do func(*Conn) error) ([]*Conn, error) {
	var conns []*Conn
	for range o.Conns {
		c, err := Dial(o.Socket, stats)
		if err != nil {
			continue
		}
		conns = append(conns, c)
		if err := do(c); err != nil && !isClosed(err) {
			return conns, err
		}
	}
	for _, c := range conns {
		<-c.Settled()
	}
	return conns, nil
}

// Flood opens a connection and o.Rounds times starts FetchX509SVID and
// resets it at once (reconnecting if the server closes the connection);
// then opens o.Conns connections more, to be refused past the per-uid
// budget. It returns once every round is written and every connection
// admitted or refused.
func Flood(o Options, stats *Stats) error {
	c, err := Dial(o.Socket, stats)
	if err != nil {
		return err
	}
	defer func() { c.Close() }()
	for i := 0; i < o.Rounds; i++ {
		if closed(c) {
			if c, err = Dial(o.Socket, stats); err != nil {
				return err
			}
		}
		id, err := c.Call(FetchX509SVID)
		if err == nil {
			err = c.Send(id, Message(0), true)
		}
		if err == nil {
			err = c.Reset(id)
		}
		if err != nil && !isClosed(err) {
			return err
		}
	}
	extra, _ := Idle(Options{Socket: o.Socket, Conns: o.Conns}, stats)
	for _, e := range extra {
		e.Close()
	}
	return nil
}

func closed(c *Conn) bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

func isClosed(err error) bool {
	var ne *net.OpError
	return errors.Is(err, net.ErrClosed) || errors.Is(err, io.ErrClosedPipe) || errors.As(err, &ne)
}

// Describe names o for a log line.
func (o Options) Describe(mode string) string {
	switch mode {
	case "headers":
		return fmt.Sprintf("%d connections x %d header-only calls, a %d-byte -bin header x %d by HPACK reference", o.Conns, o.Streams, o.HeaderBytes, o.Refs)
	case "bodies":
		return fmt.Sprintf("%d connections x %d calls declaring %d-byte requests, never finished", o.Conns, o.Streams, o.BodyBytes)
	case "idle":
		return strconv.Itoa(o.Conns) + " idle connections"
	}
	return fmt.Sprintf("%d reset calls, %d extra connections", o.Rounds, o.Conns)
}
