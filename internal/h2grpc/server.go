// Package h2grpc is a small gRPC server for local endpoints, made for the
// SPIFFE Workload API: every workload on a node calls it, often with a new
// connection per call, so what a call costs the server beyond the call itself
// is what it spends in goroutine hand-offs and system calls.
//
// Each connection is served by one goroutine that reads frames and answers
// unary calls inline: request, handler, response headers, message and
// trailers, and the acknowledgements of what the client sent with it, leave
// in one write. A server-streaming call runs in a goroutine of its own, which
// writes its messages to the connection itself. grpc-go's server, by
// contrast, hands every call from the connection's reader to a worker and
// every frame from the worker to a writer goroutine, and starts four
// goroutines per connection.
//
// It serves services described by grpc.ServiceDesc (the generated
// registration functions accept a *Server), with grpc's interceptors,
// credentials.AuthInfo from a handshake function, metadata, deadlines
// (grpc-timeout), status codes with messages and details, and HTTP/2 flow
// control in both directions. It does not offer compression (a compressed
// request is refused with Unimplemented, as grpc-go does without a
// decompressor), client-streaming or bidirectional methods, or TLS: it is for
// unix sockets whose peer the handshake identifies.
package h2grpc

import (
	"bufio"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// ErrServerStopped is returned by Serve once Stop or GracefulStop was called.
var ErrServerStopped = errors.New("h2grpc: server stopped")

// Options configure a Server.
type Options struct {
	// Handshake runs on every accepted connection before anything is read
	// from it; it returns the connection to serve and the AuthInfo that
	// handlers find with peer.FromContext. An error closes the connection.
	Handshake func(net.Conn) (net.Conn, credentials.AuthInfo, error)
	// UnaryInterceptor and StreamInterceptor, when set, wrap every call.
	UnaryInterceptor  grpc.UnaryServerInterceptor
	StreamInterceptor grpc.StreamServerInterceptor
	// MaxRecvMsgSize bounds a request message (default 4 MiB); larger ones
	// get ResourceExhausted.
	MaxRecvMsgSize int
	// MaxConcurrentStreams bounds the calls open at once on one connection
	// (default 256); more are refused (REFUSED_STREAM, which clients retry).
	MaxConcurrentStreams uint32
	// PrefaceTimeout bounds the wait for a new connection's HTTP/2 preface
	// (default 10 s).
	PrefaceTimeout time.Duration
	// Log receives connection-level errors (protocol errors, failed
	// handshakes) at Debug. Nil discards them.
	Log *slog.Logger
}

// Server serves registered gRPC services on listeners.
type Server struct {
	opts    Options
	methods map[string]*method // by full path: /package.Service/Method

	mu       sync.Mutex
	lis      map[net.Listener]bool
	conns    map[*conn]bool
	stopping bool
	done     chan struct{} // closed by Stop and GracefulStop
	wg       sync.WaitGroup
	work     chan func() // to idle workers
	workers  bool        // started (by the first Serve)
}

type method struct {
	impl   any
	unary  *grpc.MethodDesc
	stream *grpc.StreamDesc
	info   *grpc.StreamServerInfo
	uinfo  *grpc.UnaryServerInfo
}

var _ grpc.ServiceRegistrar = (*Server)(nil)

// NewServer returns a Server with o. It starts nothing: its workers start
// with the first Serve and run until Stop or GracefulStop.
func NewServer(o Options) *Server {
	if o.MaxRecvMsgSize <= 0 {
		o.MaxRecvMsgSize = 4 << 20
	}
	if o.MaxConcurrentStreams == 0 {
		o.MaxConcurrentStreams = 256
	}
	if o.PrefaceTimeout <= 0 {
		o.PrefaceTimeout = 10 * time.Second
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.Handshake == nil {
		o.Handshake = func(c net.Conn) (net.Conn, credentials.AuthInfo, error) { return c, nil, nil }
	}
	return &Server{opts: o, methods: map[string]*method{}, lis: map[net.Listener]bool{}, conns: map[*conn]bool{},
		done: make(chan struct{}), work: make(chan func())}
}

// RegisterService registers impl, which must implement sd.HandlerType. Call
// it before Serve. Client-streaming and bidirectional methods are refused.
func (s *Server) RegisterService(sd *grpc.ServiceDesc, impl any) {
	for i := range sd.Methods {
		m := &sd.Methods[i]
		path := "/" + sd.ServiceName + "/" + m.MethodName
		s.methods[path] = &method{impl: impl, unary: m, uinfo: &grpc.UnaryServerInfo{Server: impl, FullMethod: path}}
	}
	for i := range sd.Streams {
		st := &sd.Streams[i]
		if st.ClientStreams || !st.ServerStreams {
			panic(fmt.Sprintf("h2grpc: %s/%s: only unary and server-streaming methods are supported", sd.ServiceName, st.StreamName))
		}
		path := "/" + sd.ServiceName + "/" + st.StreamName
		s.methods[path] = &method{impl: impl, stream: st, info: &grpc.StreamServerInfo{FullMethod: path, IsServerStream: true}}
	}
}

// Serve accepts connections on l until l fails or the server stops; it
// returns ErrServerStopped after Stop or GracefulStop.
func (s *Server) Serve(l net.Listener) error {
	s.mu.Lock()
	if s.stopping {
		s.mu.Unlock()
		l.Close()
		return ErrServerStopped
	}
	s.lis[l] = true
	if !s.workers {
		// Under mu while not stopping: stop waits for these too.
		s.workers = true
		for range max(4, runtime.GOMAXPROCS(0)) {
			s.wg.Add(1)
			go s.worker()
		}
	}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.lis, l)
		s.mu.Unlock()
	}()
	var delay time.Duration
	for {
		nc, err := l.Accept()
		if err != nil {
			select {
			case <-s.done:
				return ErrServerStopped
			default:
			}
			var ne interface{ Timeout() bool }
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				// Out of descriptors or similar: back off, as net/http does.
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				time.Sleep(delay)
				continue
			}
			return err
		}
		delay = 0
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.serveConn(nc)
		}()
	}
}

// Stop closes the listeners and every connection at once: calls in flight
// see their context canceled. It waits for connection goroutines and
// handlers to return.
func (s *Server) Stop() {
	s.stop(false)
}

// GracefulStop closes the listeners, tells every client to go away (GOAWAY),
// refuses new calls and waits for those in flight to finish.
func (s *Server) GracefulStop() {
	s.stop(true)
}

func (s *Server) stop(graceful bool) {
	s.mu.Lock()
	if !s.stopping {
		s.stopping = true
		close(s.done)
	}
	for l := range s.lis {
		l.Close()
	}
	conns := make([]*conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	var wg sync.WaitGroup
	for _, c := range conns {
		if graceful {
			wg.Go(c.goAway)
		} else {
			c.close()
		}
	}
	wg.Wait()
	s.wg.Wait()
}

// serveConn runs one connection: handshake, preface, then the frame loop.
func (s *Server) serveConn(nc net.Conn) {
	raw := nc
	nc, auth, err := s.opts.Handshake(nc)
	if err != nil {
		s.opts.Log.Debug("connection refused at handshake", "error", err)
		raw.Close()
		return
	}
	c := newConn(s, nc, auth)
	s.mu.Lock()
	if s.stopping {
		s.mu.Unlock()
		nc.Close()
		return
	}
	s.conns[c] = true
	s.mu.Unlock()
	if err := c.start(); err != nil {
		c.end(err)
		return
	}
	c.readLoop()
}

// maxBuffered bounds the request bytes a connection may have the server
// hold for calls not yet dispatched.
func (s *Server) maxBuffered() int { return 4 * (s.opts.MaxRecvMsgSize + 5) }

// Limits of what a peer may send.
const (
	maxHeaderListSize = 64 << 10
	// windowUpdateAt is how many received bytes are credited back at once.
	windowUpdateAt = 16 << 10
	// maxMessageLen is how long a grpc-message may be.
	maxMessageLen = 4 << 10
)

// conn is one HTTP/2 connection.
type conn struct {
	s      *Server
	nc     net.Conn
	br     *bufio.Reader
	fr     *http2.Framer
	ctx    context.Context // carries the peer
	cancel context.CancelFunc

	// Written by the reader goroutine only.
	lastID      uint32
	recvUnacked uint32
	recvWin     int64 // what the client may still send on the connection

	mu       sync.Mutex // guards what follows, and every write to the framer
	cond     *sync.Cond // signaled when a send window grows or the conn closes
	bw       *bufio.Writer
	henc     *hpack.Encoder
	hbuf     []byte
	streams  map[uint32]*stream
	buffered int   // request bytes held for streams not yet dispatched
	sendWin  int64 // connection send window
	initWin  int64 // the peer's SETTINGS_INITIAL_WINDOW_SIZE
	maxFrm   uint32
	closed   bool
	gone     bool // GOAWAY sent: no new streams
	// firstPending counts streams handed to workers that have not written
	// yet; flushTimer flushes if they take long.
	firstPending int
	flushTimer   *time.Timer
	werr         error
	hw           headerWriter
}

func newConn(s *Server, nc net.Conn, auth credentials.AuthInfo) *conn {
	c := &conn{s: s, nc: nc, streams: map[uint32]*stream{}, sendWin: 65535, initWin: 65535, maxFrm: 16384, recvWin: 65535}
	c.cond = sync.NewCond(&c.mu)
	c.br = bufio.NewReaderSize(nc, 4<<10)
	c.bw = bufio.NewWriterSize(nc, 4<<10)
	c.fr = http2.NewFramer(c.bw, c.br)
	c.fr.SetReuseFrames()
	c.fr.SetMaxReadFrameSize(16384) // the default, which the server does not raise
	c.fr.MaxHeaderListSize = maxHeaderListSize
	c.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	c.hw.c = c
	c.henc = hpack.NewEncoder(&c.hw)
	c.ctx, c.cancel = context.WithCancel(peer.NewContext(context.Background(), &peer.Peer{
		Addr: nc.RemoteAddr(), LocalAddr: nc.LocalAddr(), AuthInfo: auth,
	}))
	return c
}

// headerWriter collects the hpack encoder's output into conn.hbuf.
type headerWriter struct{ c *conn }

func (w *headerWriter) Write(p []byte) (int, error) {
	w.c.hbuf = append(w.c.hbuf, p...)
	return len(p), nil
}

// start exchanges the prefaces.
func (c *conn) start() error {
	// The server's preface goes first, without waiting for the client's: a
	// client cannot start a call before it has the server's settings.
	c.mu.Lock()
	c.setErr(c.fr.WriteSettings(
		http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: c.s.opts.MaxConcurrentStreams},
		http2.Setting{ID: http2.SettingMaxHeaderListSize, Val: maxHeaderListSize},
	))
	c.setErr(c.bw.Flush())
	c.mu.Unlock()
	c.nc.SetReadDeadline(time.Now().Add(c.s.opts.PrefaceTimeout))
	var preface [len(http2.ClientPreface)]byte
	if _, err := io.ReadFull(c.br, preface[:]); err != nil {
		return fmt.Errorf("read preface: %w", err)
	}
	if string(preface[:]) != http2.ClientPreface {
		return errors.New("not an HTTP/2 client preface")
	}
	c.nc.SetReadDeadline(time.Time{})
	return nil
}

// readLoop reads and handles frames until the connection ends, or until
// it hands the reading on: the goroutine reading a call's request runs the
// call, so that its first answer leaves without waiting for another
// goroutine to be scheduled, and a worker reads on (see dispatch).
func (c *conn) readLoop() {
	err := c.read()
	if err == errHandedOff {
		return
	}
	c.end(err)
}

// end closes the connection after its read loop ended with err.
func (c *conn) end(err error) {
	c.close()
	c.s.mu.Lock()
	delete(c.s.conns, c)
	c.s.mu.Unlock()
	if err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
		c.s.opts.Log.Debug("connection ended", "error", err)
	}
}

// errHandedOff ends a read loop whose goroutine went on to run a call.
var errHandedOff = errors.New("h2grpc: reading handed off")

func (c *conn) read() error {
	for {
		if c.br.Buffered() == 0 {
			// Everything the client sent so far has been answered: one
			// write carries the answers, unless a stream just handed to
			// a worker is about to write its first message, which then
			// carries them (with a timer in case it does not).
			if err := c.flushUnlessStreamWrites(); err != nil {
				return err
			}
		}
		f, err := c.fr.ReadFrame()
		if err != nil {
			if errors.Is(err, http2.ErrFrameTooLarge) {
				c.writeGoAway(http2.ErrCodeFrameSize, "frame larger than 16384 bytes")
				return err
			}
			var ce http2.ConnectionError
			if errors.As(err, &ce) {
				c.writeGoAway(http2.ErrCode(ce), err.Error())
				return err
			}
			var se http2.StreamError
			if errors.As(err, &se) {
				// A refused HEADERS still opened (and closed) its stream:
				// its DATA is then ignored, not a connection error.
				if se.StreamID%2 == 1 && se.StreamID > c.lastID {
					c.lastID = se.StreamID
				}
				c.resetStream(se.StreamID, se.Code)
				continue
			}
			return err
		}
		if err := c.handle(f); err != nil {
			if err == errHandedOff {
				return err
			}
			var ce http2.ConnectionError
			if errors.As(err, &ce) {
				c.writeGoAway(http2.ErrCode(ce), err.Error())
			}
			return err
		}
	}
}

func (c *conn) handle(f http2.Frame) error {
	switch f := f.(type) {
	case *http2.SettingsFrame:
		if f.IsAck() {
			return nil
		}
		if err := f.ForeachSetting(c.applySetting); err != nil {
			return err
		}
		c.mu.Lock()
		c.setErr(c.fr.WriteSettingsAck())
		c.mu.Unlock()
	case *http2.PingFrame:
		if !f.IsAck() {
			c.mu.Lock()
			c.setErr(c.fr.WritePing(true, f.Data))
			c.mu.Unlock()
		}
	case *http2.WindowUpdateFrame:
		return c.onWindowUpdate(f)
	case *http2.MetaHeadersFrame:
		return c.onHeaders(f)
	case *http2.DataFrame:
		return c.onData(f)
	case *http2.RSTStreamFrame:
		c.mu.Lock()
		if st := c.streams[f.StreamID]; st != nil {
			c.resetLocked(st)
		}
		c.mu.Unlock()
	case *http2.GoAwayFrame:
		// The client opens no more calls; those in flight complete
		// (RFC 9113 §6.8), and the client closes the connection.
		c.mu.Lock()
		c.gone = true
		c.mu.Unlock()
	case *http2.PushPromiseFrame:
		return http2.ConnectionError(http2.ErrCodeProtocol)
	default:
		// PRIORITY and unknown frame types are ignored (RFC 9113 §5.5).
	}
	return nil
}

func (c *conn) applySetting(s http2.Setting) error {
	if err := s.Valid(); err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	switch s.ID {
	case http2.SettingInitialWindowSize:
		delta := int64(s.Val) - c.initWin
		c.initWin = int64(s.Val)
		for _, st := range c.streams {
			st.sendWin += delta
			if st.sendWin > 1<<31-1 {
				return http2.ConnectionError(http2.ErrCodeFlowControl)
			}
		}
		c.cond.Broadcast()
	case http2.SettingMaxFrameSize:
		c.maxFrm = s.Val
	case http2.SettingHeaderTableSize:
		c.henc.SetMaxDynamicTableSizeLimit(s.Val)
	}
	return nil
}

func (c *conn) onWindowUpdate(f *http2.WindowUpdateFrame) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	inc := int64(f.Increment)
	if f.StreamID == 0 {
		c.sendWin += inc
		if c.sendWin > 1<<31-1 {
			return http2.ConnectionError(http2.ErrCodeFlowControl)
		}
	} else if st := c.streams[f.StreamID]; st != nil {
		st.sendWin += inc
		if st.sendWin > 1<<31-1 {
			st.reset = true
			st.cancel()
			c.writeRSTLocked(f.StreamID, http2.ErrCodeFlowControl)
		}
	}
	c.cond.Broadcast()
	return nil
}

// stream is one call.
type stream struct {
	c        *conn
	id       uint32
	m        *method
	ctx      context.Context
	cancel   context.CancelFunc
	buf      []byte      // the request as received
	running  bool        // dispatched: its handler runs or has run
	recvWin  int64       // what the client may still send on it
	stopWake func() bool // stops the deadline's wake-up of blocked sends
	inline   bool        // served by the reader goroutine
	ended    bool        // request complete or refused: further DATA is ignored
	recvd    bool        // RecvMsg returned the request
	unacked  uint32

	// Guarded by c.mu.
	sendWin      int64
	firstPending bool // counted in conn.firstPending
	reset        bool // the client reset it, or the connection closed
	headerSent   bool
	header       metadata.MD
	trailer      metadata.MD
	finished     bool
}

func (c *conn) onHeaders(f *http2.MetaHeadersFrame) error {
	id := f.StreamID
	if id%2 == 0 {
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	c.mu.Lock()
	_, open := c.streams[id]
	c.mu.Unlock()
	if open {
		// Trailers from the client: none of our methods take a stream
		// of requests.
		c.resetStream(id, http2.ErrCodeProtocol)
		return nil
	}
	if id <= c.lastID {
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	c.lastID = id

	c.mu.Lock()
	refuse := c.gone || uint32(len(c.streams)) >= c.s.opts.MaxConcurrentStreams
	c.mu.Unlock()
	if refuse {
		c.resetStream(id, http2.ErrCodeRefusedStream)
		return nil
	}

	st := &stream{c: c, id: id, recvWin: 65535}
	c.mu.Lock()
	st.sendWin = c.initWin
	c.mu.Unlock()
	if f.Truncated {
		c.refuseHTTP(st, 431, fmt.Sprintf("header list larger than %d bytes", maxHeaderListSize))
		return nil
	}
	if f.PseudoValue("method") != "POST" {
		c.resetStream(id, http2.ErrCodeProtocol)
		return nil
	}
	ctx := c.ctx
	md := make(metadata.MD, len(f.RegularFields()))
	var (
		contentType string
		timeout     time.Duration
		hasTimeout  bool
		encoding    string
		badTimeout  bool
	)
	for _, hf := range f.RegularFields() {
		switch hf.Name {
		case "content-type":
			contentType = hf.Value
			md.Append(hf.Name, hf.Value)
		case "grpc-timeout":
			d, err := parseTimeout(hf.Value)
			if err != nil {
				badTimeout = true
			}
			timeout, hasTimeout = d, true
		case "grpc-encoding":
			encoding = hf.Value
		case "te", "connection", "grpc-accept-encoding", "grpc-message", "grpc-status":
		default:
			if strings.HasSuffix(hf.Name, "-bin") {
				v, err := decodeBinHeader(hf.Value)
				if err != nil {
					c.startTrailersOnly(st, status.Errorf(codes.Internal, "malformed binary metadata %q", hf.Name))
					return nil
				}
				md.Append(hf.Name, string(v))
				continue
			}
			md.Append(hf.Name, hf.Value)
		}
	}
	if a := f.PseudoValue("authority"); a != "" {
		md.Append(":authority", a)
	}
	if !isGRPCContentType(contentType) {
		c.refuseHTTP(st, 415, fmt.Sprintf("invalid gRPC request content-type %q", contentType))
		return nil
	}
	if badTimeout {
		c.startTrailersOnly(st, status.Error(codes.Internal, "malformed grpc-timeout"))
		return nil
	}
	if encoding != "" && encoding != "identity" {
		c.startTrailersOnly(st, status.Errorf(codes.Unimplemented, "grpc: Decompressor is not installed for grpc-encoding %q", encoding))
		return nil
	}
	path := f.PseudoValue("path")
	m := c.s.methods[path]
	if m == nil {
		c.startTrailersOnly(st, status.Errorf(codes.Unimplemented, "unknown method %s", path))
		return nil
	}
	st.m = m
	ctx = metadata.NewIncomingContext(ctx, md)
	if hasTimeout {
		st.ctx, st.cancel = context.WithTimeout(ctx, timeout)
		// A send blocked on the client's window gives up at the deadline.
		st.stopWake = context.AfterFunc(st.ctx, func() {
			c.mu.Lock()
			c.cond.Broadcast()
			c.mu.Unlock()
		})
	} else {
		st.ctx, st.cancel = context.WithCancel(ctx)
	}
	if m.unary != nil {
		st.ctx = grpc.NewContextWithServerTransportStream(st.ctx, transportStream{st})
	}
	c.mu.Lock()
	c.streams[id] = st
	c.mu.Unlock()
	if f.StreamEnded() {
		return c.dispatch(st)
	}
	return nil
}

// startTrailersOnly answers a call refused before it was registered.
func (c *conn) startTrailersOnly(st *stream, err error) {
	st.ctx, st.cancel = context.WithCancel(c.ctx)
	st.ended = true
	c.mu.Lock()
	c.streams[st.id] = st
	c.mu.Unlock()
	c.finish(st, err)
}

// refuseHTTP answers a request that is not gRPC with an HTTP status.
func (c *conn) refuseHTTP(st *stream, code int, msg string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.hbuf = c.hbuf[:0]
	c.encode(":status", strconv.Itoa(code))
	c.encode("content-type", "application/grpc")
	c.encode("grpc-status", strconv.Itoa(int(codes.Internal)))
	c.encode("grpc-message", encodeMessage(msg))
	c.writeHeaderBlockLocked(st.id, true)
}

func (c *conn) onData(f *http2.DataFrame) error {
	n := f.Header().Length // padding counts against the window too
	c.recvWin -= int64(n)
	if c.recvWin < 0 {
		return http2.ConnectionError(http2.ErrCodeFlowControl)
	}
	c.recvUnacked += n
	if c.recvUnacked >= windowUpdateAt {
		c.mu.Lock()
		c.setErr(c.fr.WriteWindowUpdate(0, c.recvUnacked))
		c.mu.Unlock()
		c.recvWin += int64(c.recvUnacked)
		c.recvUnacked = 0
	}
	c.mu.Lock()
	st := c.streams[f.StreamID]
	c.mu.Unlock()
	if st == nil {
		if f.StreamID > c.lastID {
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
		return nil // a stream already answered or reset
	}
	if st.ended {
		return nil
	}
	st.recvWin -= int64(n)
	if st.recvWin < 0 {
		c.resetStream(st.id, http2.ErrCodeFlowControl)
		return nil
	}
	c.mu.Lock()
	over := c.buffered+len(f.Data()) > c.s.maxBuffered()
	if !over {
		c.buffered += len(f.Data())
	}
	c.mu.Unlock()
	if over || len(st.buf)+len(f.Data()) > c.s.opts.MaxRecvMsgSize+5 {
		st.ended = true
		msg := fmt.Sprintf("grpc: received message larger than max (%d vs. %d)", len(st.buf)+len(f.Data())-5, c.s.opts.MaxRecvMsgSize)
		if over {
			msg = "grpc: requests on this connection exceed what the server buffers"
		}
		c.finish(st, status.Error(codes.ResourceExhausted, msg))
		c.resetStream(st.id, http2.ErrCodeCancel)
		return nil
	}
	st.buf = append(st.buf, f.Data()...)
	st.unacked += n
	if st.unacked >= windowUpdateAt && !f.StreamEnded() {
		c.mu.Lock()
		c.setErr(c.fr.WriteWindowUpdate(st.id, st.unacked))
		c.mu.Unlock()
		st.recvWin += int64(st.unacked)
		st.unacked = 0
	}
	if f.StreamEnded() {
		return c.dispatch(st)
	}
	return nil
}

// dispatch runs a call whose request has arrived whole, on the goroutine
// reading the connection. A unary call is answered inline: the answer leaves
// with the next flush of the read loop. A streaming call may last as long as
// the client wants, so the reading goes on on a worker (errHandedOff tells
// the read loop to stop) while this goroutine runs the call.
func (c *conn) dispatch(st *stream) error {
	st.ended = true
	c.mu.Lock()
	st.running = true
	c.buffered -= len(st.buf) // the request is the handler's now
	c.mu.Unlock()
	if st.m.unary != nil {
		st.inline = true
		resp, err := st.m.unary.Handler(st.m.impl, st.ctx, st.RecvMsg, c.s.opts.UnaryInterceptor)
		if err == nil {
			err = st.SendMsg(resp)
			if err == errSentAsync {
				return nil
			}
		}
		c.finish(st, err)
		return nil
	}
	c.mu.Lock()
	st.firstPending = true
	c.firstPending++
	c.mu.Unlock()
	c.s.spawn(c.readLoop)
	serveStream(st)
	return errHandedOff
}

// spawn runs f on an idle worker, or on a new goroutine when every worker
// is busy. Workers are long-lived, so their stacks have already grown to what
// reading a connection and serving a call need.
func (s *Server) spawn(f func()) {
	select {
	case s.work <- f:
		return
	default:
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		f()
	}()
}

func (s *Server) worker() {
	defer s.wg.Done()
	for {
		select {
		case f := <-s.work:
			f()
		case <-s.done:
			return
		}
	}
}

func serveStream(st *stream) {
	c := st.c
	var err error
	if ic := c.s.opts.StreamInterceptor; ic != nil {
		err = ic(st.m.impl, st, st.m.info, st.m.stream.Handler)
	} else {
		err = st.m.stream.Handler(st.m.impl, st)
	}
	c.finish(st, err)
}

// finish ends a call with err's status, unless the client reset it.
func (c *conn) finish(st *stream, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if st.finished {
		return
	}
	st.finished = true
	delete(c.streams, st.id)
	if !st.running {
		c.releaseLocked(st)
	}
	if st.stopWake != nil {
		st.stopWake()
	}
	c.wroteLocked(st)
	c.cond.Broadcast() // for goAway, waiting for the streams to end
	defer st.cancel()
	if st.reset || c.closed {
		return
	}
	if err == nil && st.ctx.Err() != nil {
		// The handler returned because the deadline passed.
		if errors.Is(st.ctx.Err(), context.DeadlineExceeded) {
			err = status.Error(codes.DeadlineExceeded, "context deadline exceeded")
		}
	}
	stat := status.Convert(err)
	if ctxErr := st.ctx.Err(); err != nil && stat.Code() == codes.Unknown && ctxErr != nil {
		stat = status.FromContextError(ctxErr)
	}
	c.hbuf = c.hbuf[:0]
	if !st.headerSent {
		// Trailers-only response.
		c.encode(":status", "200")
		c.encode("content-type", "application/grpc")
		for k, vs := range st.header {
			c.encodeMD(k, vs)
		}
		st.headerSent = true
	}
	c.encode("grpc-status", strconv.Itoa(int(stat.Code())))
	if msg := stat.Message(); msg != "" {
		if len(msg) > maxMessageLen {
			msg = msg[:maxMessageLen]
		}
		c.encode("grpc-message", encodeMessage(msg))
	}
	if p := stat.Proto(); len(p.GetDetails()) > 0 {
		if b, err := proto.Marshal(p); err == nil {
			c.encode("grpc-status-details-bin", base64.RawStdEncoding.EncodeToString(b))
		}
	}
	for k, vs := range st.trailer {
		c.encodeMD(k, vs)
	}
	c.writeHeaderBlockLocked(st.id, true)
	if !st.inline {
		c.setErr(c.bw.Flush())
	}
}

// transportStream lets a unary handler set headers and trailers with
// grpc.SetHeader, grpc.SendHeader and grpc.SetTrailer.
type transportStream struct{ st *stream }

var _ grpc.ServerTransportStream = transportStream{}

func (t transportStream) Method() string { return t.st.m.uinfo.FullMethod }

func (t transportStream) SetHeader(md metadata.MD) error { return t.st.SetHeader(md) }

func (t transportStream) SendHeader(md metadata.MD) error { return t.st.SendHeader(md) }

func (t transportStream) SetTrailer(md metadata.MD) error {
	t.st.SetTrailer(md)
	return nil
}

// Context implements grpc.ServerStream.
func (st *stream) Context() context.Context { return st.ctx }

// SetHeader implements grpc.ServerStream.
func (st *stream) SetHeader(md metadata.MD) error {
	st.c.mu.Lock()
	defer st.c.mu.Unlock()
	if st.headerSent {
		return status.Error(codes.Internal, "SetHeader called after headers were sent")
	}
	st.header = metadata.Join(st.header, md)
	return nil
}

// SendHeader implements grpc.ServerStream.
func (st *stream) SendHeader(md metadata.MD) error {
	c := st.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if st.headerSent {
		return status.Error(codes.Internal, "SendHeader called more than once")
	}
	st.header = metadata.Join(st.header, md)
	if err := st.checkLocked(); err != nil {
		return err
	}
	c.writeHeadersLocked(st)
	c.wroteLocked(st)
	if !st.inline {
		c.setErr(c.bw.Flush())
	}
	return c.werr
}

// SetTrailer implements grpc.ServerStream.
func (st *stream) SetTrailer(md metadata.MD) {
	st.c.mu.Lock()
	defer st.c.mu.Unlock()
	st.trailer = metadata.Join(st.trailer, md)
}

// RecvMsg implements grpc.ServerStream: the one request, then io.EOF.
func (st *stream) RecvMsg(m any) error {
	if st.recvd {
		return io.EOF
	}
	st.recvd = true
	b := st.buf
	if len(b) < 5 {
		return status.Error(codes.Internal, "grpc: request message missing")
	}
	if b[0] != 0 {
		return status.Error(codes.Internal, "grpc: compressed flag set with identity or empty encoding")
	}
	n := int(b[1])<<24 | int(b[2])<<16 | int(b[3])<<8 | int(b[4])
	if n != len(b)-5 {
		return status.Error(codes.Internal, "grpc: one request message expected")
	}
	pm, ok := m.(proto.Message)
	if !ok {
		return status.Errorf(codes.Internal, "grpc: %T is not a protobuf message", m)
	}
	if err := proto.Unmarshal(b[5:], pm); err != nil {
		return status.Errorf(codes.Internal, "grpc: failed to unmarshal the received message: %v", err)
	}
	st.buf = nil
	return nil
}

// SendMsg implements grpc.ServerStream. It blocks while the client's flow
// control windows are full, until the client makes room, resets the stream
// or the connection closes.
func (st *stream) SendMsg(m any) error {
	pm, ok := m.(proto.Message)
	if !ok {
		return status.Errorf(codes.Internal, "grpc: %T is not a protobuf message", m)
	}
	size := proto.Size(pm)
	b := make([]byte, 5, 5+size)
	b[1], b[2], b[3], b[4] = byte(size>>24), byte(size>>16), byte(size>>8), byte(size)
	b, err := proto.MarshalOptions{UseCachedSize: true}.MarshalAppend(b, pm)
	if err != nil {
		return status.Errorf(codes.Internal, "grpc: error while marshaling: %v", err)
	}
	c := st.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := st.checkLocked(); err != nil {
		return err
	}
	if !st.headerSent {
		c.writeHeadersLocked(st)
	}
	for {
		if err := st.checkLocked(); err != nil {
			return err
		}
		if b = c.writeWindowedLocked(st, b); len(b) == 0 {
			break
		}
		if st.inline && !st.reset {
			// The read loop is this goroutine: it cannot read the
			// client's window updates while waiting for them. Finish
			// the write from a goroutine of its own.
			return st.sendRestAsync(b)
		}
		c.wroteLocked(st)
		c.setErr(c.bw.Flush())
		c.cond.Wait()
	}
	c.wroteLocked(st)
	if !st.inline {
		c.setErr(c.bw.Flush())
	}
	return c.werr
}

// sendRestAsync is for an inline call whose answer exceeds the client's
// window: the rest of the message, and the trailers, are written by a
// goroutine once the client makes room. Called with c.mu held.
func (st *stream) sendRestAsync(rest []byte) error {
	st.inline = false
	st.finished = true // finish is called by the goroutine, not the caller
	c := st.c
	c.s.wg.Add(1)
	go func() {
		defer c.s.wg.Done()
		c.mu.Lock()
		for !st.reset && !c.closed && c.werr == nil && st.ctx.Err() == nil {
			if rest = c.writeWindowedLocked(st, rest); len(rest) == 0 {
				break
			}
			c.setErr(c.bw.Flush())
			c.cond.Wait()
		}
		st.finished = false
		c.mu.Unlock()
		c.finish(st, nil)
	}()
	return errSentAsync
}

// writeWindowedLocked writes as much of b as the client's windows allow, in
// frames of at most its frame size, and returns the rest.
func (c *conn) writeWindowedLocked(st *stream, b []byte) []byte {
	for len(b) > 0 {
		n := min(int64(len(b)), c.sendWin, st.sendWin, int64(c.maxFrm))
		if n <= 0 {
			break
		}
		c.setErr(c.fr.WriteData(st.id, false, b[:n]))
		c.sendWin -= n
		st.sendWin -= n
		b = b[n:]
	}
	return b
}

// errSentAsync tells the inline dispatcher that the answer is on its way.
var errSentAsync = errors.New("h2grpc: answer continues asynchronously")

// checkLocked reports why st can no longer send.
func (st *stream) checkLocked() error {
	switch {
	case st.c.closed || st.c.werr != nil:
		return status.Error(codes.Unavailable, "transport is closing")
	case st.reset:
		return status.Error(codes.Canceled, "stream reset by the client")
	case st.finished:
		return status.Error(codes.Internal, "stream already finished")
	case st.ctx.Err() != nil:
		return status.FromContextError(st.ctx.Err()).Err()
	}
	return nil
}

func (c *conn) writeHeadersLocked(st *stream) {
	c.hbuf = c.hbuf[:0]
	c.encode(":status", "200")
	c.encode("content-type", "application/grpc")
	for k, vs := range st.header {
		c.encodeMD(k, vs)
	}
	st.headerSent = true
	c.writeHeaderBlockLocked(st.id, false)
}

// writeHeaderBlockLocked writes c.hbuf as HEADERS and, if it exceeds the
// peer's frame size, CONTINUATION frames.
func (c *conn) writeHeaderBlockLocked(id uint32, endStream bool) {
	block := c.hbuf
	first := true
	for first || len(block) > 0 {
		n := min(len(block), int(c.maxFrm))
		frag := block[:n]
		block = block[n:]
		if first {
			c.setErr(c.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: frag, EndStream: endStream, EndHeaders: len(block) == 0}))
			first = false
		} else {
			c.setErr(c.fr.WriteContinuation(id, len(block) == 0, frag))
		}
	}
}

func (c *conn) encode(name, value string) {
	c.henc.WriteField(hpack.HeaderField{Name: name, Value: value})
}

func (c *conn) encodeMD(k string, vs []string) {
	if k == "" || k[0] == ':' || strings.HasPrefix(k, "grpc-") {
		return
	}
	for _, v := range vs {
		if strings.HasSuffix(k, "-bin") {
			v = base64.RawStdEncoding.EncodeToString([]byte(v))
		}
		c.encode(k, v)
	}
}

// resetStream sends RST_STREAM and forgets the stream.
func (c *conn) resetStream(id uint32, code http2.ErrCode) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if st := c.streams[id]; st != nil {
		c.resetLocked(st)
	}
	c.writeRSTLocked(id, code)
}

// resetLocked ends st for good: its handler, if running, sees its context
// canceled and its sends fail; a stream whose request had not arrived whole
// is forgotten at once, with what it had buffered.
func (c *conn) resetLocked(st *stream) {
	st.reset = true
	if st.cancel != nil {
		st.cancel()
	}
	if !st.running && !st.finished {
		st.finished = true
		delete(c.streams, st.id)
		c.releaseLocked(st)
	}
	c.cond.Broadcast()
}

// releaseLocked returns st's buffered request bytes to the connection's
// allowance.
func (c *conn) releaseLocked(st *stream) {
	c.buffered -= len(st.buf)
	st.buf = nil
}

func (c *conn) writeRSTLocked(id uint32, code http2.ErrCode) {
	c.setErr(c.fr.WriteRSTStream(id, code))
}

func (c *conn) writeGoAway(code http2.ErrCode, msg string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.setErr(c.fr.WriteGoAway(c.lastID, code, []byte(msg)))
	c.setErr(c.bw.Flush())
}

// goAway starts a graceful close: no new streams; the connection closes once
// the calls in flight have finished.
func (c *conn) goAway() {
	c.mu.Lock()
	if !c.gone && !c.closed {
		c.gone = true
		c.setErr(c.fr.WriteGoAway(1<<31-1, http2.ErrCodeNo, nil))
		c.setErr(c.bw.Flush())
	}
	for len(c.streams) > 0 && !c.closed {
		c.cond.Wait()
	}
	// Answers of inline calls wait for the read loop's flush: send them.
	if !c.closed {
		c.setErr(c.bw.Flush())
	}
	c.mu.Unlock()
	c.close()
}

// firstWriteDelay bounds how long control frames (acknowledgements) wait
// for the first message of a stream to carry them.
const firstWriteDelay = time.Millisecond

func (c *conn) flushUnlessStreamWrites() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.firstPending > 0 && c.bw.Buffered() > 0 && c.werr == nil {
		if c.flushTimer == nil {
			c.flushTimer = time.AfterFunc(firstWriteDelay, func() {
				c.mu.Lock()
				defer c.mu.Unlock()
				if !c.closed {
					c.setErr(c.bw.Flush())
				}
			})
		} else {
			c.flushTimer.Reset(firstWriteDelay)
		}
		return nil
	}
	c.setErr(c.bw.Flush())
	return c.werr
}

// wroteLocked notes that st has written (and is about to flush).
func (c *conn) wroteLocked(st *stream) {
	if st.firstPending {
		st.firstPending = false
		c.firstPending--
	}
}

// setErr records the first write error; the connection is then unusable.
func (c *conn) setErr(err error) {
	if err != nil && c.werr == nil {
		c.werr = err
		c.nc.Close()
	}
}

func (c *conn) close() {
	// First, so that a writer blocked on a client that does not read lets
	// go of the lock.
	c.nc.Close()
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	if c.flushTimer != nil {
		c.flushTimer.Stop()
	}
	for _, st := range c.streams {
		st.reset = true
		if st.cancel != nil {
			st.cancel()
		}
	}
	c.cond.Broadcast()
	c.mu.Unlock()
	c.cancel()
	c.nc.Close()
}

func isGRPCContentType(ct string) bool {
	rest, ok := strings.CutPrefix(ct, "application/grpc")
	return ok && (rest == "" || rest[0] == '+' || rest[0] == ';')
}

// parseTimeout parses a grpc-timeout value: at most 8 digits and a unit.
func parseTimeout(s string) (time.Duration, error) {
	if len(s) < 2 || len(s) > 9 {
		return 0, errors.New("bad timeout")
	}
	n, err := strconv.ParseInt(s[:len(s)-1], 10, 64)
	if err != nil || n < 0 {
		return 0, errors.New("bad timeout")
	}
	var unit time.Duration
	switch s[len(s)-1] {
	case 'H':
		unit = time.Hour
	case 'M':
		unit = time.Minute
	case 'S':
		unit = time.Second
	case 'm':
		unit = time.Millisecond
	case 'u':
		unit = time.Microsecond
	case 'n':
		unit = time.Nanosecond
	default:
		return 0, errors.New("bad timeout unit")
	}
	if n > int64(1<<63-1)/int64(unit) {
		return 1<<63 - 1, nil
	}
	return time.Duration(n) * unit, nil
}

func decodeBinHeader(v string) ([]byte, error) {
	if len(v)%4 == 0 {
		return base64.StdEncoding.DecodeString(v)
	}
	return base64.RawStdEncoding.DecodeString(v)
}

// encodeMessage percent-encodes a grpc-message value (gRPC over HTTP/2:
// bytes outside printable ASCII, and '%').
func encodeMessage(msg string) string {
	clean := true
	for i := 0; i < len(msg); i++ {
		if b := msg[i]; b < 0x20 || b > 0x7e || b == '%' {
			clean = false
			break
		}
	}
	if clean {
		return msg
	}
	var sb strings.Builder
	for i := 0; i < len(msg); i++ {
		b := msg[i]
		if b < 0x20 || b > 0x7e || b == '%' {
			fmt.Fprintf(&sb, "%%%02X", b)
		} else {
			sb.WriteByte(b)
		}
	}
	return sb.String()
}
