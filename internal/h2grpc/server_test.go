package h2grpc_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	workloadpb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/encoding/gzip"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/ferry-id/ferry/internal/h2grpc"
)

// guard bounds every wait: it only matters when a test fails.
const guard = 10 * time.Second

// ---------------------------------------------------------------------------
// Test service, server and client helpers.

type testAuth struct {
	credentials.CommonAuthInfo
	ID string
}

func (testAuth) AuthType() string { return "h2grpc-test" }

func handshakeAs(id string) func(net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return func(c net.Conn) (net.Conn, credentials.AuthInfo, error) {
		return c, testAuth{CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.NoSecurity}, ID: id}, nil
	}
}

// api is the Workload API implementation: each test sets what it needs;
// unset methods have a default behavior (see below).
type api struct {
	workloadpb.UnimplementedSpiffeWorkloadAPIServer
	jwt      func(context.Context, *workloadpb.JWTSVIDRequest) (*workloadpb.JWTSVIDResponse, error)
	validate func(context.Context, *workloadpb.ValidateJWTSVIDRequest) (*workloadpb.ValidateJWTSVIDResponse, error)
	x509     func(*workloadpb.X509SVIDRequest, workloadpb.SpiffeWorkloadAPI_FetchX509SVIDServer) error
}

// FetchJWTSVID answers one SVID per audience by default: SpiffeId is the
// request's, Svid is "jwt-for-<audience>".
func (a *api) FetchJWTSVID(ctx context.Context, req *workloadpb.JWTSVIDRequest) (*workloadpb.JWTSVIDResponse, error) {
	if a.jwt != nil {
		return a.jwt(ctx, req)
	}
	return echoJWT(req), nil
}

func echoJWT(req *workloadpb.JWTSVIDRequest) *workloadpb.JWTSVIDResponse {
	resp := &workloadpb.JWTSVIDResponse{}
	for _, aud := range req.Audience {
		resp.Svids = append(resp.Svids, &workloadpb.JWTSVID{SpiffeId: req.SpiffeId, Svid: "jwt-for-" + aud})
	}
	return resp
}

// ValidateJWTSVID answers by default SpiffeId = hex(sha256(svid)).
func (a *api) ValidateJWTSVID(ctx context.Context, req *workloadpb.ValidateJWTSVIDRequest) (*workloadpb.ValidateJWTSVIDResponse, error) {
	if a.validate != nil {
		return a.validate(ctx, req)
	}
	return &workloadpb.ValidateJWTSVIDResponse{SpiffeId: sum(req.Svid)}, nil
}

func sum(s string) string {
	h := sha256.Sum256([]byte(s))
	return hex.EncodeToString(h[:])
}

// FetchX509SVID sends three messages by default, SpiffeId spiffe://test/0..2.
func (a *api) FetchX509SVID(req *workloadpb.X509SVIDRequest, stream workloadpb.SpiffeWorkloadAPI_FetchX509SVIDServer) error {
	if a.x509 != nil {
		return a.x509(req, stream)
	}
	for i := range 3 {
		if err := stream.Send(x509Resp(i)); err != nil {
			return err
		}
	}
	return nil
}

func x509Resp(i int) *workloadpb.X509SVIDResponse {
	return &workloadpb.X509SVIDResponse{Svids: []*workloadpb.X509SVID{{SpiffeId: fmt.Sprintf("spiffe://test/%d", i)}}}
}

type testServer struct {
	srv    *h2grpc.Server
	path   string
	served chan struct{} // closed when Serve returned
	err    error         // what Serve returned
}

// socketPath returns a short path for a unix socket in a new directory.
func socketPath(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "h2")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	return filepath.Join(dir, "s")
}

// startServer serves impl with o (Handshake defaults to handshakeAs("test"))
// on a new unix socket. Cleanup stops the server and checks that Serve
// returned ErrServerStopped.
func startServer(t *testing.T, o h2grpc.Options, impl workloadpb.SpiffeWorkloadAPIServer) *testServer {
	t.Helper()
	if o.Handshake == nil {
		o.Handshake = handshakeAs("test")
	}
	srv := h2grpc.NewServer(o)
	workloadpb.RegisterSpiffeWorkloadAPIServer(srv, impl)
	path := socketPath(t)
	l, err := net.Listen("unix", path)
	require.NoError(t, err)
	ts := &testServer{srv: srv, path: path, served: make(chan struct{})}
	go func() {
		ts.err = srv.Serve(l)
		close(ts.served)
	}()
	t.Cleanup(func() {
		stopped := make(chan struct{})
		go func() {
			srv.Stop()
			close(stopped)
		}()
		select {
		case <-stopped:
		case <-time.After(guard):
			t.Error("Stop did not return")
			return
		}
		assert.ErrorIs(t, ts.serveErr(t), h2grpc.ErrServerStopped)
	})
	return ts
}

// serveErr waits for Serve to return and returns its error.
func (ts *testServer) serveErr(t *testing.T) error {
	t.Helper()
	select {
	case <-ts.served:
		return ts.err
	case <-time.After(guard):
		t.Error("Serve did not return")
		return nil
	}
}

func dial(t *testing.T, path string, opts ...grpc.DialOption) (workloadpb.SpiffeWorkloadAPIClient, *grpc.ClientConn) {
	t.Helper()
	opts = append([]grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}, opts...)
	cc, err := grpc.NewClient("unix://"+path, opts...)
	require.NoError(t, err)
	t.Cleanup(func() { cc.Close() })
	return workloadpb.NewSpiffeWorkloadAPIClient(cc), cc
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), guard)
	t.Cleanup(cancel)
	return ctx
}

// assertServes checks that a new client connection gets a correct answer.
func assertServes(t *testing.T, path string) {
	t.Helper()
	client, _ := dial(t, path)
	resp, err := client.FetchJWTSVID(testCtx(t), &workloadpb.JWTSVIDRequest{Audience: []string{"still-serving"}, SpiffeId: "spiffe://test/after"})
	require.NoError(t, err)
	require.Len(t, resp.Svids, 1)
	assert.Equal(t, "jwt-for-still-serving", resp.Svids[0].Svid)
	assert.Equal(t, "spiffe://test/after", resp.Svids[0].SpiffeId)
}

// wait receives from c, or fails the test after guard.
func wait[T any](t *testing.T, c <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-c:
		return v
	case <-time.After(guard):
		require.FailNow(t, "timed out waiting for "+what)
		panic("unreachable")
	}
}

func randomBytes(n int, seed uint64) []byte {
	b := make([]byte, n)
	var s [32]byte
	binary.LittleEndian.PutUint64(s[:], seed)
	rand.NewChaCha8(s).Read(b)
	return b
}

// ---------------------------------------------------------------------------
// Raw HTTP/2 client.

type rawConn struct {
	t        *testing.T
	nc       net.Conn
	wbuf     bytes.Buffer // frames are written here; send writes them out
	fr       *http2.Framer
	henc     *hpack.Encoder
	hbuf     bytes.Buffer
	settings map[http2.SettingID]uint32 // the server's
	resps    map[uint32]*rawResp
	goAways  []http2.ErrCode
}

// dialRaw connects, sends the client preface and SETTINGS with settings, and
// reads the server's SETTINGS.
func dialRaw(t *testing.T, path string, settings ...http2.Setting) *rawConn {
	t.Helper()
	nc, err := net.Dial("unix", path)
	require.NoError(t, err)
	t.Cleanup(func() { nc.Close() })
	require.NoError(t, nc.SetDeadline(time.Now().Add(guard)))
	r := &rawConn{t: t, nc: nc, settings: map[http2.SettingID]uint32{}}
	r.fr = http2.NewFramer(&r.wbuf, nc)
	r.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	r.fr.AllowIllegalWrites = true
	r.henc = hpack.NewEncoder(&r.hbuf)
	r.wbuf.WriteString(http2.ClientPreface)
	require.NoError(t, r.fr.WriteSettings(settings...))
	r.send()
	f, err := r.fr.ReadFrame()
	require.NoError(t, err)
	sf, ok := f.(*http2.SettingsFrame)
	require.True(t, ok, "first frame from the server is %T, want SETTINGS", f)
	require.False(t, sf.IsAck())
	require.NoError(t, sf.ForeachSetting(func(s http2.Setting) error {
		r.settings[s.ID] = s.Val
		return nil
	}))
	return r
}

func (r *rawConn) send() {
	r.t.Helper()
	_, err := r.nc.Write(r.wbuf.Bytes())
	r.wbuf.Reset()
	require.NoError(r.t, err)
}

// sendLoose is send for a server that may close the connection meanwhile.
func (r *rawConn) sendLoose() {
	r.nc.Write(r.wbuf.Bytes())
	r.wbuf.Reset()
}

// block hpack-encodes fields.
func (r *rawConn) block(fields ...hpack.HeaderField) []byte {
	r.hbuf.Reset()
	for _, f := range fields {
		require.NoError(r.t, r.henc.WriteField(f))
	}
	return bytes.Clone(r.hbuf.Bytes())
}

func (r *rawConn) headers(id uint32, endStream bool, fields ...hpack.HeaderField) {
	r.t.Helper()
	require.NoError(r.t, r.fr.WriteHeaders(http2.HeadersFrameParam{
		StreamID: id, BlockFragment: r.block(fields...), EndStream: endStream, EndHeaders: true,
	}))
}

func hf(name, value string) hpack.HeaderField { return hpack.HeaderField{Name: name, Value: value} }

// reqFields is a gRPC request's header block for path, then extra pairs.
func reqFields(path string, extra ...string) []hpack.HeaderField {
	fs := []hpack.HeaderField{
		hf(":method", "POST"), hf(":scheme", "http"), hf(":path", path), hf(":authority", "localhost"),
		hf("content-type", "application/grpc"), hf("te", "trailers"),
	}
	for i := 0; i+1 < len(extra); i += 2 {
		fs = append(fs, hf(extra[i], extra[i+1]))
	}
	return fs
}

func grpcFrame(t *testing.T, m proto.Message) []byte {
	b, err := proto.Marshal(m)
	require.NoError(t, err)
	out := make([]byte, 5, 5+len(b))
	binary.BigEndian.PutUint32(out[1:], uint32(len(b)))
	return append(out, b...)
}

const (
	jwtPath      = "/SpiffeWorkloadAPI/FetchJWTSVID"
	validatePath = "/SpiffeWorkloadAPI/ValidateJWTSVID"
	x509Path     = "/SpiffeWorkloadAPI/FetchX509SVID"
)

// call writes (without sending) a complete request: HEADERS, DATA with
// END_STREAM.
func (r *rawConn) call(id uint32, path string, m proto.Message, extra ...string) {
	r.t.Helper()
	r.headers(id, false, reqFields(path, extra...)...)
	require.NoError(r.t, r.fr.WriteData(id, true, grpcFrame(r.t, m)))
}

type rawResp struct {
	headers  []hpack.HeaderField // the first header block
	trailers []hpack.HeaderField // the last one (same as headers for trailers-only)
	data     []byte
	rst      bool
	rstCode  http2.ErrCode
	done     bool
	eof      bool // the connection ended before the stream did
	readErr  error
}

func field(fs []hpack.HeaderField, name string) string {
	for _, f := range fs {
		if f.Name == name {
			return f.Value
		}
	}
	return ""
}

// next reads a frame and records what it means for its stream in r.resps
// (and a GOAWAY in r.goAways).
func (r *rawConn) next() (http2.Frame, error) {
	f, err := r.fr.ReadFrame()
	if err != nil {
		return nil, err
	}
	if r.resps == nil {
		r.resps = map[uint32]*rawResp{}
	}
	st := func(id uint32) *rawResp {
		if r.resps[id] == nil {
			r.resps[id] = &rawResp{}
		}
		return r.resps[id]
	}
	switch f := f.(type) {
	case *http2.MetaHeadersFrame:
		resp := st(f.StreamID)
		if resp.headers == nil {
			resp.headers = f.Fields
		}
		if f.StreamEnded() {
			resp.trailers, resp.done = f.Fields, true
		}
	case *http2.DataFrame:
		resp := st(f.StreamID)
		resp.data = append(resp.data, f.Data()...)
		resp.done = resp.done || f.StreamEnded()
	case *http2.RSTStreamFrame:
		resp := st(f.StreamID)
		resp.rst, resp.rstCode, resp.done = true, f.ErrCode, true
	case *http2.GoAwayFrame:
		r.goAways = append(r.goAways, f.ErrCode)
	}
	return f, nil
}

// response reads frames until stream id ends (END_STREAM or RST_STREAM) or
// the connection does, and returns what arrived for it.
func (r *rawConn) response(id uint32) rawResp {
	r.t.Helper()
	for r.resps[id] == nil || !r.resps[id].done {
		if _, err := r.next(); err != nil {
			resp := rawResp{}
			if r.resps[id] != nil {
				resp = *r.resps[id]
			}
			resp.eof, resp.readErr = true, err
			return resp
		}
	}
	resp := *r.resps[id]
	delete(r.resps, id)
	return resp
}

// waitHeaders reads frames until stream id has its response headers.
func (r *rawConn) waitHeaders(id uint32) {
	r.t.Helper()
	for r.resps[id] == nil || r.resps[id].headers == nil {
		_, err := r.next()
		require.NoError(r.t, err)
	}
}

// okResponse checks a successful response and returns its message bytes.
func (r *rawConn) okResponse(id uint32) []byte {
	r.t.Helper()
	resp := r.response(id)
	require.False(r.t, resp.eof, "connection ended: %v", resp.readErr)
	require.False(r.t, resp.rst, "stream reset: %v", resp.rstCode)
	assert.Equal(r.t, "200", field(resp.headers, ":status"))
	assert.Equal(r.t, "application/grpc", field(resp.headers, "content-type"))
	require.Equal(r.t, "0", field(resp.trailers, "grpc-status"), "grpc-message %q", field(resp.trailers, "grpc-message"))
	require.GreaterOrEqual(r.t, len(resp.data), 5)
	assert.Equal(r.t, byte(0), resp.data[0])
	assert.Equal(r.t, len(resp.data)-5, int(binary.BigEndian.Uint32(resp.data[1:5])))
	return resp.data[5:]
}

// splitMessages splits a response body into its messages.
func splitMessages(t *testing.T, data []byte) [][]byte {
	var msgs [][]byte
	for len(data) > 0 {
		require.GreaterOrEqual(t, len(data), 5)
		require.Equal(t, byte(0), data[0])
		n := int(binary.BigEndian.Uint32(data[1:5]))
		require.GreaterOrEqual(t, len(data), 5+n)
		msgs = append(msgs, data[5:5+n])
		data = data[5+n:]
	}
	return msgs
}

// alive sends a PING and reads until its ACK, or fails if the connection
// ends first.
func (r *rawConn) alive() error {
	data := [8]byte{'a', 'l', 'i', 'v', 'e'}
	if err := r.fr.WritePing(false, data); err != nil {
		return err
	}
	_, werr := r.nc.Write(r.wbuf.Bytes())
	r.wbuf.Reset()
	for {
		f, err := r.next()
		if err != nil {
			return errors.Join(werr, err)
		}
		if p, ok := f.(*http2.PingFrame); ok && p.IsAck() && p.Data == data {
			return nil
		}
	}
}

// expectGoAway reads until a GOAWAY and returns its error code.
func (r *rawConn) expectGoAway() http2.ErrCode {
	r.t.Helper()
	for len(r.goAways) == 0 {
		_, err := r.next()
		require.NoError(r.t, err, "connection ended without GOAWAY")
	}
	code := r.goAways[0]
	r.goAways = r.goAways[1:]
	return code
}

// expectClosed reads until the server closes the connection.
func (r *rawConn) expectClosed() {
	r.t.Helper()
	expectClosed(r.t, r.nc)
}

func expectClosed(t *testing.T, nc net.Conn) {
	t.Helper()
	require.NoError(t, nc.SetReadDeadline(time.Now().Add(guard)))
	_, err := io.Copy(io.Discard, nc)
	// A unix socket closed with unread data gives its peer ECONNRESET.
	if err != nil && !errors.Is(err, syscall.ECONNRESET) {
		require.NoError(t, err, "connection not closed by the server")
	}
}

// ping sends a PING and reads until its ACK: everything the server wrote
// before answering it has then been read.
func (r *rawConn) ping(data [8]byte) {
	r.t.Helper()
	require.NoError(r.t, r.fr.WritePing(false, data))
	r.send()
	for {
		f, err := r.next()
		require.NoError(r.t, err)
		if p, ok := f.(*http2.PingFrame); ok && p.IsAck() {
			require.Equal(r.t, data, p.Data)
			return
		}
	}
}

// ---------------------------------------------------------------------------
// 1. Unary calls.

func TestUnaryRoundTrip(t *testing.T) {
	type seen struct {
		req  *workloadpb.JWTSVIDRequest
		md   metadata.MD
		peer *peer.Peer
	}
	got := make(chan seen, 1)
	impl := &api{jwt: func(ctx context.Context, req *workloadpb.JWTSVIDRequest) (*workloadpb.JWTSVIDResponse, error) {
		md, _ := metadata.FromIncomingContext(ctx)
		p, _ := peer.FromContext(ctx)
		got <- seen{req: req, md: md, peer: p}
		return &workloadpb.JWTSVIDResponse{Svids: []*workloadpb.JWTSVID{
			{SpiffeId: "spiffe://example.org/a", Svid: "header.payload.sig", Hint: "ünïcode"},
			{SpiffeId: "spiffe://example.org/b", Svid: strings.Repeat("x", 1000)},
		}}, nil
	}}
	ts := startServer(t, h2grpc.Options{Handshake: handshakeAs("caller-42")}, impl)
	client, _ := dial(t, ts.path)

	bin := string([]byte{0, 1, 2, 0xfe, 0xff, '\n'})
	ctx := metadata.AppendToOutgoingContext(testCtx(t),
		"workload.spiffe.io", "true",
		"x-multi", "one", "x-multi", "two",
		"x-trace-bin", bin,
	)
	resp, err := client.FetchJWTSVID(ctx, &workloadpb.JWTSVIDRequest{Audience: []string{"aud1", "aud2"}, SpiffeId: "spiffe://example.org/want"})
	require.NoError(t, err)
	require.Len(t, resp.Svids, 2)
	assert.Equal(t, "spiffe://example.org/a", resp.Svids[0].SpiffeId)
	assert.Equal(t, "header.payload.sig", resp.Svids[0].Svid)
	assert.Equal(t, "ünïcode", resp.Svids[0].Hint)
	assert.Equal(t, strings.Repeat("x", 1000), resp.Svids[1].Svid)

	s := wait(t, got, "handler")
	assert.Equal(t, []string{"aud1", "aud2"}, s.req.Audience)
	assert.Equal(t, "spiffe://example.org/want", s.req.SpiffeId)
	assert.Equal(t, []string{"true"}, s.md.Get("workload.spiffe.io"))
	assert.Equal(t, []string{"one", "two"}, s.md.Get("x-multi"))
	assert.Equal(t, []string{bin}, s.md.Get("x-trace-bin"))
	assert.Equal(t, []string{"application/grpc"}, s.md.Get("content-type"))
	assert.NotEmpty(t, s.md.Get(":authority"))
	require.Len(t, s.md.Get("user-agent"), 1)
	assert.Contains(t, s.md.Get("user-agent")[0], "grpc-go")
	for _, k := range []string{"te", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding"} {
		assert.Empty(t, s.md.Get(k), k)
	}
	require.NotNil(t, s.peer)
	require.IsType(t, testAuth{}, s.peer.AuthInfo)
	assert.Equal(t, "caller-42", s.peer.AuthInfo.(testAuth).ID)
	assert.Equal(t, "unix", s.peer.Addr.Network())
	assert.Equal(t, ts.path, s.peer.LocalAddr.String())
}

func TestUnaryErrorStatus(t *testing.T) {
	detail := &wrapperspb.StringValue{Value: "détail 100%"}
	withDetails, err := status.New(codes.PermissionDenied, "denied: ünïcode 50% ✓").WithDetails(detail, wrapperspb.Int64(42))
	require.NoError(t, err)
	long := strings.Repeat("é", 3000) // 6000 bytes

	impl := &api{jwt: func(ctx context.Context, req *workloadpb.JWTSVIDRequest) (*workloadpb.JWTSVIDResponse, error) {
		switch req.SpiffeId {
		case "plain":
			return nil, status.Error(codes.NotFound, "no such identity")
		case "nonascii":
			return nil, status.Error(codes.InvalidArgument, "naïve 100% sûr — ✓ tab\there %41 %%")
		case "details":
			return nil, withDetails.Err()
		case "long":
			return nil, status.Error(codes.Aborted, long)
		case "plainerr":
			return nil, errors.New("not a status")
		}
		return nil, nil
	}}
	ts := startServer(t, h2grpc.Options{}, impl)
	client, _ := dial(t, ts.path)

	call := func(id string) *status.Status {
		_, err := client.FetchJWTSVID(testCtx(t), &workloadpb.JWTSVIDRequest{SpiffeId: id})
		require.Error(t, err)
		st, ok := status.FromError(err)
		require.True(t, ok)
		return st
	}

	st := call("plain")
	assert.Equal(t, codes.NotFound, st.Code())
	assert.Equal(t, "no such identity", st.Message())

	st = call("nonascii")
	assert.Equal(t, codes.InvalidArgument, st.Code())
	assert.Equal(t, "naïve 100% sûr — ✓ tab\there %41 %%", st.Message())

	st = call("details")
	assert.Equal(t, codes.PermissionDenied, st.Code())
	assert.Equal(t, "denied: ünïcode 50% ✓", st.Message())
	details := st.Details()
	require.Len(t, details, 2)
	require.IsType(t, &wrapperspb.StringValue{}, details[0])
	assert.True(t, proto.Equal(detail, details[0].(proto.Message)))
	assert.True(t, proto.Equal(wrapperspb.Int64(42), details[1].(proto.Message)))

	// Messages are cut at 4 KiB.
	st = call("long")
	assert.Equal(t, codes.Aborted, st.Code())
	assert.Equal(t, long[:4096], st.Message())

	st = call("plainerr")
	assert.Equal(t, codes.Unknown, st.Code())
	assert.Equal(t, "not a status", st.Message())
}

func TestInterceptors(t *testing.T) {
	var unaryCalls, streamCalls atomic.Int32
	o := h2grpc.Options{
		UnaryInterceptor: func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
			unaryCalls.Add(1)
			if info.FullMethod != jwtPath {
				return nil, status.Errorf(codes.Internal, "unexpected method %s", info.FullMethod)
			}
			if _, ok := info.Server.(*api); !ok {
				return nil, status.Errorf(codes.Internal, "unexpected server %T", info.Server)
			}
			r := req.(*workloadpb.JWTSVIDRequest)
			if r.SpiffeId == "deny" {
				return nil, status.Error(codes.PermissionDenied, "interceptor says no")
			}
			resp, err := handler(ctx, req)
			if err == nil {
				resp.(*workloadpb.JWTSVIDResponse).Svids[0].Hint = "intercepted"
			}
			return resp, err
		},
		StreamInterceptor: func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
			streamCalls.Add(1)
			if info.FullMethod != x509Path || !info.IsServerStream || info.IsClientStream {
				return status.Errorf(codes.Internal, "unexpected info %+v", info)
			}
			if err := ss.SendMsg(x509Resp(-1)); err != nil {
				return err
			}
			return handler(srv, ss)
		},
	}
	ts := startServer(t, o, &api{})
	client, _ := dial(t, ts.path)

	resp, err := client.FetchJWTSVID(testCtx(t), &workloadpb.JWTSVIDRequest{Audience: []string{"a"}, SpiffeId: "ok"})
	require.NoError(t, err)
	assert.Equal(t, "intercepted", resp.Svids[0].Hint)
	assert.Equal(t, "jwt-for-a", resp.Svids[0].Svid)

	_, err = client.FetchJWTSVID(testCtx(t), &workloadpb.JWTSVIDRequest{Audience: []string{"a"}, SpiffeId: "deny"})
	assert.Equal(t, codes.PermissionDenied, status.Code(err))

	stream, err := client.FetchX509SVID(testCtx(t), &workloadpb.X509SVIDRequest{})
	require.NoError(t, err)
	var ids []string
	for {
		m, err := stream.Recv()
		if err == io.EOF {
			break
		}
		require.NoError(t, err)
		ids = append(ids, m.Svids[0].SpiffeId)
	}
	assert.Equal(t, []string{"spiffe://test/-1", "spiffe://test/0", "spiffe://test/1", "spiffe://test/2"}, ids)
	assert.Equal(t, int32(2), unaryCalls.Load())
	assert.Equal(t, int32(1), streamCalls.Load())
}

// ---------------------------------------------------------------------------
// 2. Server streaming.

func TestStreamingMessagesInOrder(t *testing.T) {
	const n = 5
	next := make(chan struct{})
	type seen struct {
		peer *peer.Peer
		md   metadata.MD
	}
	got := make(chan seen, 1)
	impl := &api{x509: func(_ *workloadpb.X509SVIDRequest, stream workloadpb.SpiffeWorkloadAPI_FetchX509SVIDServer) error {
		p, _ := peer.FromContext(stream.Context())
		md, _ := metadata.FromIncomingContext(stream.Context())
		got <- seen{p, md}
		if err := stream.SetHeader(metadata.Pairs("x-header", "h1", "x-header-bin", "\x00\xffbin")); err != nil {
			return err
		}
		stream.SetTrailer(metadata.Pairs("x-trailer", "t1", "x-trailer-bin", "\x01\x02"))
		for i := range n {
			if err := stream.Send(x509Resp(i)); err != nil {
				return err
			}
			// The next message leaves once the client has read this one.
			select {
			case <-next:
			case <-stream.Context().Done():
				return stream.Context().Err()
			}
		}
		return nil
	}}
	ts := startServer(t, h2grpc.Options{Handshake: handshakeAs("streamer")}, impl)
	client, _ := dial(t, ts.path)

	ctx := metadata.AppendToOutgoingContext(testCtx(t), "x-req", "r1")
	stream, err := client.FetchX509SVID(ctx, &workloadpb.X509SVIDRequest{})
	require.NoError(t, err)
	for i := range n {
		m, err := stream.Recv()
		require.NoError(t, err)
		require.Len(t, m.Svids, 1)
		assert.Equal(t, fmt.Sprintf("spiffe://test/%d", i), m.Svids[0].SpiffeId)
		next <- struct{}{}
	}
	_, err = stream.Recv()
	assert.Equal(t, io.EOF, err)

	hdr, err := stream.Header()
	require.NoError(t, err)
	assert.Equal(t, []string{"h1"}, hdr.Get("x-header"))
	assert.Equal(t, []string{"\x00\xffbin"}, hdr.Get("x-header-bin"))
	tr := stream.Trailer()
	assert.Equal(t, []string{"t1"}, tr.Get("x-trailer"))
	assert.Equal(t, []string{"\x01\x02"}, tr.Get("x-trailer-bin"))

	s := wait(t, got, "handler")
	assert.Equal(t, "streamer", s.peer.AuthInfo.(testAuth).ID)
	assert.Equal(t, []string{"r1"}, s.md.Get("x-req"))
}

func TestStreamingClientCancel(t *testing.T) {
	var handlers sync.WaitGroup
	handlerErr := make(chan error, 1)
	impl := &api{x509: func(_ *workloadpb.X509SVIDRequest, stream workloadpb.SpiffeWorkloadAPI_FetchX509SVIDServer) error {
		handlers.Add(1)
		defer handlers.Done()
		if err := stream.Send(x509Resp(0)); err != nil {
			return err
		}
		<-stream.Context().Done()
		handlerErr <- stream.Context().Err()
		return stream.Context().Err()
	}}
	ts := startServer(t, h2grpc.Options{}, impl)
	client, _ := dial(t, ts.path)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stream, err := client.FetchX509SVID(ctx, &workloadpb.X509SVIDRequest{})
	require.NoError(t, err)
	_, err = stream.Recv()
	require.NoError(t, err)
	cancel()
	assert.ErrorIs(t, wait(t, handlerErr, "handler to see the cancel"), context.Canceled)
	_, err = stream.Recv()
	assert.Equal(t, codes.Canceled, status.Code(err))
	handlers.Wait()

	// The connection serves the next call.
	resp, err := client.FetchJWTSVID(testCtx(t), &workloadpb.JWTSVIDRequest{Audience: []string{"x"}})
	require.NoError(t, err)
	assert.Equal(t, "jwt-for-x", resp.Svids[0].Svid)
}

func TestStreamingErrorAfterMessages(t *testing.T) {
	impl := &api{x509: func(_ *workloadpb.X509SVIDRequest, stream workloadpb.SpiffeWorkloadAPI_FetchX509SVIDServer) error {
		for i := range 2 {
			if err := stream.Send(x509Resp(i)); err != nil {
				return err
			}
		}
		stream.SetTrailer(metadata.Pairs("x-why", "rotation"))
		st, _ := status.New(codes.Aborted, "stopped ✓ at 50%").WithDetails(wrapperspb.String("more"))
		return st.Err()
	}}
	ts := startServer(t, h2grpc.Options{}, impl)
	client, _ := dial(t, ts.path)

	stream, err := client.FetchX509SVID(testCtx(t), &workloadpb.X509SVIDRequest{})
	require.NoError(t, err)
	for i := range 2 {
		m, err := stream.Recv()
		require.NoError(t, err)
		assert.Equal(t, fmt.Sprintf("spiffe://test/%d", i), m.Svids[0].SpiffeId)
	}
	_, err = stream.Recv()
	st := status.Convert(err)
	assert.Equal(t, codes.Aborted, st.Code())
	assert.Equal(t, "stopped ✓ at 50%", st.Message())
	require.Len(t, st.Details(), 1)
	assert.True(t, proto.Equal(wrapperspb.String("more"), st.Details()[0].(proto.Message)))
	assert.Equal(t, []string{"rotation"}, stream.Trailer().Get("x-why"))
}

// A streaming handler that fails before sending gets a trailers-only answer
// that carries the headers it set.
func TestStreamingTrailersOnly(t *testing.T) {
	impl := &api{x509: func(_ *workloadpb.X509SVIDRequest, stream workloadpb.SpiffeWorkloadAPI_FetchX509SVIDServer) error {
		if err := stream.SetHeader(metadata.Pairs("x-h", "v")); err != nil {
			return err
		}
		return status.Error(codes.Unavailable, "not yet")
	}}
	ts := startServer(t, h2grpc.Options{}, impl)
	r := dialRaw(t, ts.path)
	r.call(1, x509Path, &workloadpb.X509SVIDRequest{})
	r.send()
	resp := r.response(1)
	require.False(t, resp.eof)
	require.NotNil(t, resp.trailers, "want a trailers-only response")
	assert.Equal(t, resp.headers, resp.trailers)
	assert.Equal(t, "200", field(resp.trailers, ":status"))
	assert.Equal(t, "v", field(resp.trailers, "x-h"))
	assert.Equal(t, strconv.Itoa(int(codes.Unavailable)), field(resp.trailers, "grpc-status"))
	assert.Equal(t, "not yet", field(resp.trailers, "grpc-message"))
	assert.Empty(t, resp.data)
}

func TestStreamSendHeaderTwice(t *testing.T) {
	errs := make(chan [3]error, 1)
	impl := &api{x509: func(_ *workloadpb.X509SVIDRequest, stream workloadpb.SpiffeWorkloadAPI_FetchX509SVIDServer) error {
		var e [3]error
		e[0] = stream.SendHeader(metadata.Pairs("x-first", "1"))
		e[1] = stream.SendHeader(metadata.Pairs("x-second", "2"))
		e[2] = stream.SetHeader(metadata.Pairs("x-third", "3"))
		errs <- e
		return stream.Send(x509Resp(0))
	}}
	ts := startServer(t, h2grpc.Options{}, impl)
	client, _ := dial(t, ts.path)
	stream, err := client.FetchX509SVID(testCtx(t), &workloadpb.X509SVIDRequest{})
	require.NoError(t, err)
	hdr, err := stream.Header()
	require.NoError(t, err)
	assert.Equal(t, []string{"1"}, hdr.Get("x-first"))
	assert.Empty(t, hdr.Get("x-second"))
	_, err = stream.Recv()
	require.NoError(t, err)
	_, err = stream.Recv()
	assert.Equal(t, io.EOF, err)
	e := wait(t, errs, "handler")
	assert.NoError(t, e[0])
	assert.Equal(t, codes.Internal, status.Code(e[1]))
	assert.Equal(t, codes.Internal, status.Code(e[2]))
}

// ---------------------------------------------------------------------------
// 3. Refused calls.

func TestUnknownMethod(t *testing.T) {
	ts := startServer(t, h2grpc.Options{}, &api{})
	_, cc := dial(t, ts.path)

	err := cc.Invoke(testCtx(t), "/SpiffeWorkloadAPI/NoSuchMethod", &workloadpb.JWTSVIDRequest{}, &workloadpb.JWTSVIDResponse{})
	assert.Equal(t, codes.Unimplemented, status.Code(err))
	assert.Contains(t, status.Convert(err).Message(), "/SpiffeWorkloadAPI/NoSuchMethod")

	err = cc.Invoke(testCtx(t), "/other.Service/FetchJWTSVID", &workloadpb.JWTSVIDRequest{}, &workloadpb.JWTSVIDResponse{})
	assert.Equal(t, codes.Unimplemented, status.Code(err))

	stream, err := cc.NewStream(testCtx(t), &grpc.StreamDesc{ServerStreams: true}, "/SpiffeWorkloadAPI/NoSuchStream")
	require.NoError(t, err)
	require.NoError(t, stream.SendMsg(&workloadpb.X509SVIDRequest{}))
	require.NoError(t, stream.CloseSend())
	err = stream.RecvMsg(&workloadpb.X509SVIDResponse{})
	assert.Equal(t, codes.Unimplemented, status.Code(err))

	// A method registered but not implemented by the impl.
	s, err := workloadpb.NewSpiffeWorkloadAPIClient(cc).FetchJWTBundles(testCtx(t), &workloadpb.JWTBundlesRequest{})
	require.NoError(t, err)
	_, err = s.Recv()
	assert.Equal(t, codes.Unimplemented, status.Code(err))

	assertServes(t, ts.path)
}

func TestCompressedRequest(t *testing.T) {
	var calls atomic.Int32
	impl := &api{jwt: func(ctx context.Context, req *workloadpb.JWTSVIDRequest) (*workloadpb.JWTSVIDResponse, error) {
		calls.Add(1)
		return echoJWT(req), nil
	}}
	ts := startServer(t, h2grpc.Options{}, impl)
	client, _ := dial(t, ts.path)

	_, err := client.FetchJWTSVID(testCtx(t), &workloadpb.JWTSVIDRequest{Audience: []string{"a"}}, grpc.UseCompressor(gzip.Name))
	assert.Equal(t, codes.Unimplemented, status.Code(err))
	assert.Contains(t, status.Convert(err).Message(), "gzip")
	assert.Equal(t, int32(0), calls.Load())

	stream, err := client.FetchX509SVID(testCtx(t), &workloadpb.X509SVIDRequest{}, grpc.UseCompressor(gzip.Name))
	require.NoError(t, err)
	_, err = stream.Recv()
	assert.Equal(t, codes.Unimplemented, status.Code(err))

	// The same connection serves an uncompressed call.
	resp, err := client.FetchJWTSVID(testCtx(t), &workloadpb.JWTSVIDRequest{Audience: []string{"a"}})
	require.NoError(t, err)
	assert.Equal(t, "jwt-for-a", resp.Svids[0].Svid)
	assert.Equal(t, int32(1), calls.Load())
}

func TestMaxRecvMsgSize(t *testing.T) {
	const max = 1 << 20
	var calls atomic.Int32
	impl := &api{validate: func(ctx context.Context, req *workloadpb.ValidateJWTSVIDRequest) (*workloadpb.ValidateJWTSVIDResponse, error) {
		calls.Add(1)
		return &workloadpb.ValidateJWTSVIDResponse{SpiffeId: sum(req.Svid)}, nil
	}}
	ts := startServer(t, h2grpc.Options{MaxRecvMsgSize: max}, impl)
	client, _ := dial(t, ts.path)

	big := strings.Repeat("j", 3<<20)
	_, err := client.ValidateJWTSVID(testCtx(t), &workloadpb.ValidateJWTSVIDRequest{Svid: big})
	assert.Equal(t, codes.ResourceExhausted, status.Code(err), "%v", err)
	assert.Equal(t, int32(0), calls.Load())

	// Exactly at the limit passes; one byte more does not.
	req := func(size int) *workloadpb.ValidateJWTSVIDRequest {
		r := &workloadpb.ValidateJWTSVIDRequest{Audience: "a"}
		for n := size - 10; ; n++ {
			r.Svid = strings.Repeat("s", n)
			if proto.Size(r) >= size {
				require.Equal(t, size, proto.Size(r))
				return r
			}
		}
	}
	at := req(max)
	resp, err := client.ValidateJWTSVID(testCtx(t), at)
	require.NoError(t, err)
	assert.Equal(t, sum(at.Svid), resp.SpiffeId)
	_, err = client.ValidateJWTSVID(testCtx(t), req(max+1))
	assert.Equal(t, codes.ResourceExhausted, status.Code(err), "%v", err)

	// The connection still serves calls.
	for range 3 {
		resp, err = client.ValidateJWTSVID(testCtx(t), &workloadpb.ValidateJWTSVIDRequest{Svid: "small"})
		require.NoError(t, err)
		assert.Equal(t, sum("small"), resp.SpiffeId)
	}
	assert.Equal(t, int32(4), calls.Load())
}

// Malformed request bodies, over the raw protocol.
func TestMalformedRequests(t *testing.T) {
	var calls atomic.Int32
	impl := &api{jwt: func(ctx context.Context, req *workloadpb.JWTSVIDRequest) (*workloadpb.JWTSVIDResponse, error) {
		calls.Add(1)
		return echoJWT(req), nil
	}}
	ts := startServer(t, h2grpc.Options{}, impl)
	r := dialRaw(t, ts.path)
	msg := grpcFrame(t, &workloadpb.JWTSVIDRequest{Audience: []string{"a"}})
	id := uint32(1)
	for _, tc := range []struct {
		name  string
		write func(id uint32)
		code  codes.Code
	}{
		{"no message", func(id uint32) { r.headers(id, true, reqFields(jwtPath)...) }, codes.Internal},
		{"compressed flag without encoding", func(id uint32) {
			m := bytes.Clone(msg)
			m[0] = 1
			r.headers(id, false, reqFields(jwtPath)...)
			require.NoError(t, r.fr.WriteData(id, true, m))
		}, codes.Internal},
		{"two messages", func(id uint32) {
			r.headers(id, false, reqFields(jwtPath)...)
			require.NoError(t, r.fr.WriteData(id, false, msg))
			require.NoError(t, r.fr.WriteData(id, true, msg))
		}, codes.Internal},
		{"short message", func(id uint32) {
			r.headers(id, false, reqFields(jwtPath)...)
			require.NoError(t, r.fr.WriteData(id, true, msg[:len(msg)-1]))
		}, codes.Internal},
		{"not protobuf", func(id uint32) {
			r.headers(id, false, reqFields(jwtPath)...)
			require.NoError(t, r.fr.WriteData(id, true, []byte{0, 0, 0, 0, 3, 0xff, 0xff, 0xff}))
		}, codes.Internal},
		{"malformed timeout", func(id uint32) {
			r.headers(id, false, reqFields(jwtPath, "grpc-timeout", "12x")...)
			require.NoError(t, r.fr.WriteData(id, true, msg))
		}, codes.Internal},
		{"timeout too long", func(id uint32) {
			r.headers(id, false, reqFields(jwtPath, "grpc-timeout", "123456789S")...)
			require.NoError(t, r.fr.WriteData(id, true, msg))
		}, codes.Internal},
		{"malformed binary metadata", func(id uint32) {
			r.headers(id, false, reqFields(jwtPath, "x-bad-bin", "!!!not base64")...)
			require.NoError(t, r.fr.WriteData(id, true, msg))
		}, codes.Internal},
		{"padded data", func(id uint32) {
			r.headers(id, false, reqFields(jwtPath)...)
			require.NoError(t, r.fr.WriteDataPadded(id, true, msg, make([]byte, 100)))
		}, codes.OK},
		{"split message", func(id uint32) {
			r.headers(id, false, reqFields(jwtPath)...)
			for i := range msg {
				require.NoError(t, r.fr.WriteData(id, false, msg[i:i+1]))
			}
			require.NoError(t, r.fr.WriteData(id, true, nil))
		}, codes.OK},
		{"padded binary metadata", func(id uint32) {
			r.headers(id, false, reqFields(jwtPath, "x-ok-bin", base64.StdEncoding.EncodeToString([]byte{1}))...)
			require.NoError(t, r.fr.WriteData(id, true, msg))
		}, codes.OK},
	} {
		tc.write(id)
		r.send()
		resp := r.response(id)
		require.False(t, resp.eof, "%s: connection ended: %v", tc.name, resp.readErr)
		require.False(t, resp.rst, "%s: reset %v", tc.name, resp.rstCode)
		assert.Equal(t, strconv.Itoa(int(tc.code)), field(resp.trailers, "grpc-status"), "%s: %s", tc.name, field(resp.trailers, "grpc-message"))
		id += 2
	}
	assert.Equal(t, int32(3), calls.Load())
}

// ---------------------------------------------------------------------------
// 4. Deadlines.

func TestDeadline(t *testing.T) {
	type seen struct {
		deadline time.Time
		ok       bool
		err      error
	}
	got := make(chan seen, 10)
	impl := &api{jwt: func(ctx context.Context, req *workloadpb.JWTSVIDRequest) (*workloadpb.JWTSVIDResponse, error) {
		d, ok := ctx.Deadline()
		if req.SpiffeId == "block" {
			<-ctx.Done()
			got <- seen{d, ok, ctx.Err()}
			return nil, ctx.Err()
		}
		got <- seen{d, ok, nil}
		return echoJWT(req), nil
	}}
	ts := startServer(t, h2grpc.Options{}, impl)
	client, _ := dial(t, ts.path)

	// Without a client deadline the handler has none.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	_, err := client.FetchJWTSVID(ctx, &workloadpb.JWTSVIDRequest{})
	require.NoError(t, err)
	s := wait(t, got, "handler")
	assert.False(t, s.ok)

	// A deadline an hour away arrives (to the precision of grpc-timeout).
	want := time.Now().Add(time.Hour)
	ctx, cancel = context.WithDeadline(context.Background(), want)
	defer cancel()
	_, err = client.FetchJWTSVID(ctx, &workloadpb.JWTSVIDRequest{})
	require.NoError(t, err)
	s = wait(t, got, "handler")
	require.True(t, s.ok)
	assert.WithinDuration(t, want, s.deadline, time.Minute)

	// A handler that waits for its context ends with DeadlineExceeded.
	start := time.Now()
	ctx, cancel = context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, err = client.FetchJWTSVID(ctx, &workloadpb.JWTSVIDRequest{SpiffeId: "block"})
	assert.Equal(t, codes.DeadlineExceeded, status.Code(err))
	s = wait(t, got, "handler")
	require.True(t, s.ok)
	assert.True(t, s.deadline.After(start))
	assert.True(t, s.deadline.Before(start.Add(guard)))
	assert.ErrorIs(t, s.err, context.DeadlineExceeded)

	assertServes(t, ts.path)
}

// The server, not only the client, ends a call whose grpc-timeout passed.
func TestDeadlineRaw(t *testing.T) {
	impl := &api{
		jwt: func(ctx context.Context, req *workloadpb.JWTSVIDRequest) (*workloadpb.JWTSVIDResponse, error) {
			<-ctx.Done()
			return nil, ctx.Err()
		},
		x509: func(_ *workloadpb.X509SVIDRequest, stream workloadpb.SpiffeWorkloadAPI_FetchX509SVIDServer) error {
			if err := stream.Send(x509Resp(0)); err != nil {
				return err
			}
			<-stream.Context().Done()
			return nil // finish reports the deadline
		},
	}
	ts := startServer(t, h2grpc.Options{}, impl)
	r := dialRaw(t, ts.path)

	r.call(1, jwtPath, &workloadpb.JWTSVIDRequest{}, "grpc-timeout", "100m")
	r.send()
	resp := r.response(1)
	require.False(t, resp.eof)
	assert.Equal(t, strconv.Itoa(int(codes.DeadlineExceeded)), field(resp.trailers, "grpc-status"))

	r.call(3, x509Path, &workloadpb.X509SVIDRequest{}, "grpc-timeout", "100000u")
	r.send()
	resp = r.response(3)
	require.False(t, resp.eof)
	assert.NotEmpty(t, resp.data)
	assert.Equal(t, strconv.Itoa(int(codes.DeadlineExceeded)), field(resp.trailers, "grpc-status"))

	// Huge timeouts are valid.
	r.call(5, validatePath, &workloadpb.ValidateJWTSVIDRequest{Svid: "x"}, "grpc-timeout", "99999999H")
	r.send()
	var out workloadpb.ValidateJWTSVIDResponse
	require.NoError(t, proto.Unmarshal(r.okResponse(5), &out))
	assert.Equal(t, sum("x"), out.SpiffeId)
}

// ---------------------------------------------------------------------------
// 5. Flow control.

func TestLargeStreamingResponse(t *testing.T) {
	bundles := [][]byte{randomBytes(3<<20, 1), randomBytes(1<<20+7, 2), randomBytes(100, 3)}
	impl := &api{x509: func(_ *workloadpb.X509SVIDRequest, stream workloadpb.SpiffeWorkloadAPI_FetchX509SVIDServer) error {
		for i, b := range bundles {
			if err := stream.Send(&workloadpb.X509SVIDResponse{Svids: []*workloadpb.X509SVID{{SpiffeId: strconv.Itoa(i), Bundle: b}}}); err != nil {
				return err
			}
		}
		return nil
	}}
	ts := startServer(t, h2grpc.Options{}, impl)
	client, _ := dial(t, ts.path, grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(8<<20)))

	for range 2 {
		stream, err := client.FetchX509SVID(testCtx(t), &workloadpb.X509SVIDRequest{})
		require.NoError(t, err)
		for i, b := range bundles {
			m, err := stream.Recv()
			require.NoError(t, err)
			assert.Equal(t, strconv.Itoa(i), m.Svids[0].SpiffeId)
			assert.True(t, bytes.Equal(b, m.Svids[0].Bundle), "bundle %d differs", i)
		}
		_, err = stream.Recv()
		assert.Equal(t, io.EOF, err)
	}
}

func TestLargeUnaryResponse(t *testing.T) {
	big := base64.RawStdEncoding.EncodeToString(randomBytes(1<<20, 4)) // ~1.3 MiB
	impl := &api{jwt: func(ctx context.Context, req *workloadpb.JWTSVIDRequest) (*workloadpb.JWTSVIDResponse, error) {
		if req.SpiffeId == "big" {
			return &workloadpb.JWTSVIDResponse{Svids: []*workloadpb.JWTSVID{{SpiffeId: "big", Svid: big}}}, nil
		}
		return echoJWT(req), nil
	}}
	ts := startServer(t, h2grpc.Options{}, impl)
	client, _ := dial(t, ts.path, grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(8<<20)))

	// Sequentially, and interleaved with small calls on the same connection.
	for range 3 {
		resp, err := client.FetchJWTSVID(testCtx(t), &workloadpb.JWTSVIDRequest{SpiffeId: "big"})
		require.NoError(t, err)
		require.Len(t, resp.Svids, 1)
		assert.True(t, resp.Svids[0].Svid == big, "large answer differs")
	}
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			if i%2 == 0 {
				resp, err := client.FetchJWTSVID(testCtx(t), &workloadpb.JWTSVIDRequest{SpiffeId: "big"})
				if assert.NoError(t, err) && assert.Len(t, resp.Svids, 1) {
					assert.True(t, resp.Svids[0].Svid == big, "large answer differs")
				}
				return
			}
			for j := range 20 {
				aud := fmt.Sprintf("a%d-%d", i, j)
				resp, err := client.FetchJWTSVID(testCtx(t), &workloadpb.JWTSVIDRequest{Audience: []string{aud}})
				if assert.NoError(t, err) && assert.Len(t, resp.Svids, 1) {
					assert.Equal(t, "jwt-for-"+aud, resp.Svids[0].Svid)
				}
			}
		})
	}
	wg.Wait()
}

func TestLargeUnaryRequest(t *testing.T) {
	ts := startServer(t, h2grpc.Options{MaxRecvMsgSize: 1 << 20}, &api{})
	client, _ := dial(t, ts.path)
	svid := base64.RawStdEncoding.EncodeToString(randomBytes(900<<10*3/4, 5)) // 900 KiB
	require.Len(t, svid, 900<<10)
	for range 3 {
		resp, err := client.ValidateJWTSVID(testCtx(t), &workloadpb.ValidateJWTSVIDRequest{Audience: "aud", Svid: svid})
		require.NoError(t, err)
		assert.Equal(t, sum(svid), resp.SpiffeId)
	}
}

// The server never sends more than the client's windows allow, honors
// SETTINGS_INITIAL_WINDOW_SIZE (0 here, so even the inline unary answer has
// to wait for WINDOW_UPDATEs) and SETTINGS_MAX_FRAME_SIZE.
func TestSendFlowControlRaw(t *testing.T) {
	const msgLen = 100 << 10
	big := strings.Repeat("w", msgLen)
	impl := &api{
		jwt: func(ctx context.Context, req *workloadpb.JWTSVIDRequest) (*workloadpb.JWTSVIDResponse, error) {
			return &workloadpb.JWTSVIDResponse{Svids: []*workloadpb.JWTSVID{{Svid: big}}}, nil
		},
		x509: func(_ *workloadpb.X509SVIDRequest, stream workloadpb.SpiffeWorkloadAPI_FetchX509SVIDServer) error {
			return stream.Send(&workloadpb.X509SVIDResponse{Svids: []*workloadpb.X509SVID{{Bundle: []byte(big)}}})
		},
	}
	ts := startServer(t, h2grpc.Options{}, impl)

	for _, tc := range []struct {
		path string
		req  proto.Message
	}{{jwtPath, &workloadpb.JWTSVIDRequest{}}, {x509Path, &workloadpb.X509SVIDRequest{}}} {
		t.Run(tc.path, func(t *testing.T) {
			r := dialRaw(t, ts.path, http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0})
			connGranted, streamGranted := 65535, 0
			received := 0
			var resp rawResp
			readSome := func() bool { // false once the stream ended
				f, err := r.next()
				require.NoError(t, err)
				switch f := f.(type) {
				case *http2.DataFrame:
					require.Equal(t, uint32(1), f.StreamID)
					assert.LessOrEqual(t, len(f.Data()), 16384, "DATA larger than SETTINGS_MAX_FRAME_SIZE")
					received += int(f.Header().Length)
					require.LessOrEqual(t, received, streamGranted, "stream window exceeded")
					require.LessOrEqual(t, received, connGranted, "connection window exceeded")
					resp.data = append(resp.data, f.Data()...)
				case *http2.MetaHeadersFrame:
					if resp.headers == nil {
						resp.headers = f.Fields
					}
					if f.StreamEnded() {
						resp.trailers = f.Fields
						return false
					}
				case *http2.RSTStreamFrame, *http2.GoAwayFrame:
					require.Fail(t, "unexpected frame", "%v", f)
				}
				return true
			}
			r.call(1, tc.path, tc.req)
			r.send()
			// Grant the stream 10000 bytes at a time and read exactly that.
			for received < msgLen && received < connGranted {
				grant := min(10000, connGranted-streamGranted)
				streamGranted += grant
				require.NoError(t, r.fr.WriteWindowUpdate(1, uint32(grant)))
				r.send()
				for received < streamGranted {
					require.True(t, readSome(), "stream ended after %d bytes", received)
				}
			}
			require.Equal(t, 65535, received, "stopped before the connection window was used")
			// The stream window is now large, the connection one is empty.
			streamGranted += 1 << 20
			require.NoError(t, r.fr.WriteWindowUpdate(1, 1<<20))
			r.send()
			r.ping([8]byte{1})
			connGranted += 1 << 20
			require.NoError(t, r.fr.WriteWindowUpdate(0, 1<<20))
			r.send()
			for readSome() {
			}
			assert.Equal(t, "0", field(resp.trailers, "grpc-status"))
			require.Greater(t, len(resp.data), msgLen)
			n := int(binary.BigEndian.Uint32(resp.data[1:5]))
			require.Equal(t, len(resp.data)-5, n)
			assert.True(t, bytes.Contains(resp.data, []byte(big)))
		})
	}
}

// SETTINGS_INITIAL_WINDOW_SIZE changes apply to open streams (RFC 9113
// §6.9.2), and one that overflows a stream window is a connection error.
func TestInitialWindowSizeChangeRaw(t *testing.T) {
	big := strings.Repeat("i", 200<<10)
	impl := &api{jwt: func(ctx context.Context, req *workloadpb.JWTSVIDRequest) (*workloadpb.JWTSVIDResponse, error) {
		return &workloadpb.JWTSVIDResponse{Svids: []*workloadpb.JWTSVID{{Svid: big}}}, nil
	}}
	ts := startServer(t, h2grpc.Options{}, impl)

	r := dialRaw(t, ts.path, http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0})
	r.call(1, jwtPath, &workloadpb.JWTSVIDRequest{})
	require.NoError(t, r.fr.WriteWindowUpdate(0, 1<<20))
	r.send()
	r.waitHeaders(1)
	r.ping([8]byte{2})
	assert.Empty(t, r.resps[1].data, "DATA sent with a zero stream window")
	require.NoError(t, r.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 20}))
	r.send()
	var j workloadpb.JWTSVIDResponse
	require.NoError(t, proto.Unmarshal(r.okResponse(1), &j))
	assert.True(t, j.Svids[0].Svid == big)

	r = dialRaw(t, ts.path, http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0})
	r.call(1, jwtPath, &workloadpb.JWTSVIDRequest{})
	r.send()
	r.waitHeaders(1)
	require.NoError(t, r.fr.WriteWindowUpdate(1, 1<<31-1-10))
	require.NoError(t, r.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 20}))
	r.sendLoose()
	assert.Equal(t, http2.ErrCodeFlowControl, r.expectGoAway())
	r.expectClosed()
	client, _ := dial(t, ts.path)
	resp, err := client.ValidateJWTSVID(testCtx(t), &workloadpb.ValidateJWTSVIDRequest{Svid: "v"})
	require.NoError(t, err)
	assert.Equal(t, sum("v"), resp.SpiffeId)
}

// Response metadata larger than a frame goes out in CONTINUATION frames.
func TestLargeResponseMetadata(t *testing.T) {
	hv := strings.Repeat("h", 40<<10)
	tv := strings.Repeat("t", 40<<10)
	impl := &api{x509: func(_ *workloadpb.X509SVIDRequest, stream workloadpb.SpiffeWorkloadAPI_FetchX509SVIDServer) error {
		if err := stream.SetHeader(metadata.Pairs("x-big-header", hv)); err != nil {
			return err
		}
		stream.SetTrailer(metadata.Pairs("x-big-trailer", tv))
		return stream.Send(x509Resp(0))
	}}
	ts := startServer(t, h2grpc.Options{}, impl)
	client, _ := dial(t, ts.path)
	stream, err := client.FetchX509SVID(testCtx(t), &workloadpb.X509SVIDRequest{})
	require.NoError(t, err)
	_, err = stream.Recv()
	require.NoError(t, err)
	_, err = stream.Recv()
	require.Equal(t, io.EOF, err)
	hdr, err := stream.Header()
	require.NoError(t, err)
	assert.Equal(t, []string{hv}, hdr.Get("x-big-header"))
	assert.Equal(t, []string{tv}, stream.Trailer().Get("x-big-trailer"))
}

// The server credits what it receives: a request larger than its windows
// arrives, when the client only sends what the windows allow.
func TestRecvFlowControlRaw(t *testing.T) {
	ts := startServer(t, h2grpc.Options{}, &api{})
	r := dialRaw(t, ts.path)
	svid := strings.Repeat("r", 300<<10)
	body := grpcFrame(t, &workloadpb.ValidateJWTSVIDRequest{Svid: svid})
	connWin, streamWin := 65535, 65535
	r.headers(1, false, reqFields(validatePath)...)
	r.send()
	for len(body) > 0 {
		n := min(len(body), connWin, streamWin, 16384)
		if n == 0 {
			f, err := r.next()
			require.NoError(t, err)
			if wu, ok := f.(*http2.WindowUpdateFrame); ok {
				switch wu.StreamID {
				case 0:
					connWin += int(wu.Increment)
				case 1:
					streamWin += int(wu.Increment)
				}
			}
			continue
		}
		require.NoError(t, r.fr.WriteData(1, n == len(body), body[:n]))
		r.send()
		body = body[n:]
		connWin -= n
		streamWin -= n
	}
	var out workloadpb.ValidateJWTSVIDResponse
	require.NoError(t, proto.Unmarshal(r.okResponse(1), &out))
	assert.Equal(t, sum(svid), out.SpiffeId)
}

// ---------------------------------------------------------------------------
// 6. Concurrency.

func checkMixedCalls(t *testing.T, client workloadpb.SpiffeWorkloadAPIClient, g, calls int) {
	for i := range calls {
		if (g+i)%2 == 0 {
			aud := fmt.Sprintf("g%d-c%d", g, i)
			resp, err := client.FetchJWTSVID(testCtx(t), &workloadpb.JWTSVIDRequest{Audience: []string{aud, "x"}, SpiffeId: aud})
			if !assert.NoError(t, err) || !assert.Len(t, resp.Svids, 2) {
				return
			}
			assert.Equal(t, "jwt-for-"+aud, resp.Svids[0].Svid)
			assert.Equal(t, aud, resp.Svids[1].SpiffeId)
			continue
		}
		stream, err := client.FetchX509SVID(testCtx(t), &workloadpb.X509SVIDRequest{})
		if !assert.NoError(t, err) {
			return
		}
		for j := range 3 {
			m, err := stream.Recv()
			if !assert.NoError(t, err) {
				return
			}
			assert.Equal(t, fmt.Sprintf("spiffe://test/%d", j), m.Svids[0].SpiffeId)
		}
		_, err = stream.Recv()
		assert.Equal(t, io.EOF, err)
	}
}

func TestConcurrentCallsOneConnection(t *testing.T) {
	ts := startServer(t, h2grpc.Options{}, &api{})
	client, _ := dial(t, ts.path)
	var wg sync.WaitGroup
	for g := range 200 {
		wg.Go(func() { checkMixedCalls(t, client, g, 5) })
	}
	wg.Wait()
}

func TestConcurrentCallsManyConnections(t *testing.T) {
	ts := startServer(t, h2grpc.Options{}, &api{})
	var wg sync.WaitGroup
	for g := range 50 {
		client, _ := dial(t, ts.path)
		wg.Go(func() { checkMixedCalls(t, client, g, 6) })
	}
	// And a connection per call, as workloads often do.
	for g := range 50 {
		wg.Go(func() {
			cc, err := grpc.NewClient("unix://"+ts.path, grpc.WithTransportCredentials(insecure.NewCredentials()))
			if !assert.NoError(t, err) {
				return
			}
			defer cc.Close()
			checkMixedCalls(t, workloadpb.NewSpiffeWorkloadAPIClient(cc), g, 1)
		})
	}
	wg.Wait()
}

// ---------------------------------------------------------------------------
// 7. MaxConcurrentStreams.

func TestMaxConcurrentStreamsRaw(t *testing.T) {
	started := make(chan struct{}, 10)
	release := map[string]chan struct{}{"1": make(chan struct{}), "3": make(chan struct{})}
	impl := &api{x509: func(_ *workloadpb.X509SVIDRequest, stream workloadpb.SpiffeWorkloadAPI_FetchX509SVIDServer) error {
		md, _ := metadata.FromIncomingContext(stream.Context())
		started <- struct{}{}
		select {
		case <-release[md.Get("x-n")[0]]:
		case <-stream.Context().Done():
			return stream.Context().Err()
		}
		return stream.Send(x509Resp(7))
	}}
	ts := startServer(t, h2grpc.Options{MaxConcurrentStreams: 2}, impl)
	r := dialRaw(t, ts.path)
	assert.Equal(t, uint32(2), r.settings[http2.SettingMaxConcurrentStreams])
	assert.Equal(t, uint32(64<<10), r.settings[http2.SettingMaxHeaderListSize])

	r.call(1, x509Path, &workloadpb.X509SVIDRequest{}, "x-n", "1")
	r.call(3, x509Path, &workloadpb.X509SVIDRequest{}, "x-n", "3")
	r.send()
	wait(t, started, "stream 1")
	wait(t, started, "stream 3")

	r.call(5, x509Path, &workloadpb.X509SVIDRequest{}, "x-n", "5")
	r.send()
	resp := r.response(5)
	require.True(t, resp.rst, "third stream not refused")
	assert.Equal(t, http2.ErrCodeRefusedStream, resp.rstCode)
	// A refused unary call too.
	r.call(7, jwtPath, &workloadpb.JWTSVIDRequest{})
	r.send()
	resp = r.response(7)
	require.True(t, resp.rst)
	assert.Equal(t, http2.ErrCodeRefusedStream, resp.rstCode)

	// Once a stream ends, a new one is served.
	close(release["1"])
	var m workloadpb.X509SVIDResponse
	require.NoError(t, proto.Unmarshal(r.okResponse(1), &m))
	assert.Equal(t, "spiffe://test/7", m.Svids[0].SpiffeId)
	r.call(9, jwtPath, &workloadpb.JWTSVIDRequest{Audience: []string{"nine"}})
	r.send()
	var j workloadpb.JWTSVIDResponse
	require.NoError(t, proto.Unmarshal(r.okResponse(9), &j))
	assert.Equal(t, "jwt-for-nine", j.Svids[0].Svid)
	close(release["3"])
	r.okResponse(3)
}

// grpc-go queues calls beyond the server's limit: all complete.
func TestMaxConcurrentStreamsClient(t *testing.T) {
	var active, peak atomic.Int32
	impl := &api{x509: func(_ *workloadpb.X509SVIDRequest, stream workloadpb.SpiffeWorkloadAPI_FetchX509SVIDServer) error {
		n := active.Add(1)
		defer active.Add(-1)
		for {
			p := peak.Load()
			if n <= p || peak.CompareAndSwap(p, n) {
				break
			}
		}
		for i := range 3 {
			if err := stream.Send(x509Resp(i)); err != nil {
				return err
			}
		}
		return nil
	}}
	ts := startServer(t, h2grpc.Options{MaxConcurrentStreams: 2}, impl)
	client, _ := dial(t, ts.path)
	var wg sync.WaitGroup
	for g := range 20 {
		wg.Go(func() { checkMixedCalls(t, client, 2*g+1, 3) }) // streaming first
	}
	wg.Wait()
	assert.LessOrEqual(t, peak.Load(), int32(2))
	assert.Positive(t, peak.Load())
}

// ---------------------------------------------------------------------------
// 8. GracefulStop and Stop.

func TestGracefulStop(t *testing.T) {
	var handlers sync.WaitGroup
	started := make(chan struct{}, 4)
	release := make(chan struct{})
	impl := &api{x509: func(_ *workloadpb.X509SVIDRequest, stream workloadpb.SpiffeWorkloadAPI_FetchX509SVIDServer) error {
		handlers.Add(1)
		defer handlers.Done()
		if err := stream.Send(x509Resp(0)); err != nil {
			return err
		}
		started <- struct{}{}
		select {
		case <-release:
		case <-stream.Context().Done():
			return stream.Context().Err()
		}
		return stream.Send(x509Resp(1))
	}}
	ts := startServer(t, h2grpc.Options{}, impl)

	// A grpc-go client and a raw one, each with a stream open.
	client, cc := dial(t, ts.path)
	stream, err := client.FetchX509SVID(testCtx(t), &workloadpb.X509SVIDRequest{})
	require.NoError(t, err)
	_, err = stream.Recv()
	require.NoError(t, err)
	wait(t, started, "grpc-go stream")
	r := dialRaw(t, ts.path)
	r.call(1, x509Path, &workloadpb.X509SVIDRequest{})
	r.send()
	wait(t, started, "raw stream")
	idle := dialRaw(t, ts.path) // a connection without calls

	stopped := make(chan struct{})
	go func() {
		ts.srv.GracefulStop()
		close(stopped)
	}()
	assert.Equal(t, http2.ErrCodeNo, r.expectGoAway())
	assert.Equal(t, http2.ErrCodeNo, idle.expectGoAway())
	idle.expectClosed() // nothing in flight: closed at once

	// New streams on a connection told to go away are refused.
	r.call(3, jwtPath, &workloadpb.JWTSVIDRequest{})
	r.send()
	resp := r.response(3)
	require.True(t, resp.rst)
	assert.Equal(t, http2.ErrCodeRefusedStream, resp.rstCode)
	// It still answers pings.
	r.ping([8]byte{9, 9})

	select {
	case <-stopped:
		t.Fatal("GracefulStop returned with calls in flight")
	default:
	}

	close(release)
	m, err := stream.Recv()
	require.NoError(t, err)
	assert.Equal(t, "spiffe://test/1", m.Svids[0].SpiffeId)
	_, err = stream.Recv()
	assert.Equal(t, io.EOF, err)
	resp = r.response(1)
	require.False(t, resp.eof, "%v", resp.readErr)
	assert.Equal(t, "0", field(resp.trailers, "grpc-status"))
	msgs := splitMessages(t, resp.data)
	require.Len(t, msgs, 2)
	for i, b := range msgs {
		var x workloadpb.X509SVIDResponse
		require.NoError(t, proto.Unmarshal(b, &x))
		assert.Equal(t, fmt.Sprintf("spiffe://test/%d", i), x.Svids[0].SpiffeId)
	}
	r.expectClosed()

	wait(t, stopped, "GracefulStop")
	handlers.Wait()
	assert.ErrorIs(t, ts.serveErr(t), h2grpc.ErrServerStopped)

	// The server is gone: new calls fail.
	_, err = workloadpb.NewSpiffeWorkloadAPIClient(cc).FetchJWTSVID(testCtx(t), &workloadpb.JWTSVIDRequest{})
	assert.Equal(t, codes.Unavailable, status.Code(err))
	_, err = net.Dial("unix", ts.path)
	assert.Error(t, err)
}

func TestStop(t *testing.T) {
	var active atomic.Int32
	started := make(chan struct{}, 10)
	ctxErrs := make(chan error, 10)
	block := func(ctx context.Context) error {
		active.Add(1)
		defer active.Add(-1)
		started <- struct{}{}
		<-ctx.Done()
		time.Sleep(10 * time.Millisecond) // Stop waits for handlers
		ctxErrs <- ctx.Err()
		return ctx.Err()
	}
	impl := &api{
		jwt: func(ctx context.Context, req *workloadpb.JWTSVIDRequest) (*workloadpb.JWTSVIDResponse, error) {
			return nil, block(ctx)
		},
		x509: func(_ *workloadpb.X509SVIDRequest, stream workloadpb.SpiffeWorkloadAPI_FetchX509SVIDServer) error {
			if err := stream.Send(x509Resp(0)); err != nil {
				return err
			}
			return block(stream.Context())
		},
	}
	ts := startServer(t, h2grpc.Options{}, impl)

	var streams []workloadpb.SpiffeWorkloadAPI_FetchX509SVIDClient
	for range 2 {
		client, _ := dial(t, ts.path)
		s, err := client.FetchX509SVID(testCtx(t), &workloadpb.X509SVIDRequest{})
		require.NoError(t, err)
		_, err = s.Recv()
		require.NoError(t, err)
		streams = append(streams, s)
	}
	client, _ := dial(t, ts.path)
	unaryErr := make(chan error, 1)
	go func() {
		_, err := client.FetchJWTSVID(testCtx(t), &workloadpb.JWTSVIDRequest{})
		unaryErr <- err
	}()
	for range 3 {
		wait(t, started, "handlers")
	}
	r := dialRaw(t, ts.path) // idle raw connection

	stopped := make(chan struct{})
	go func() {
		ts.srv.Stop()
		close(stopped)
	}()
	wait(t, stopped, "Stop")
	assert.Equal(t, int32(0), active.Load(), "Stop returned before the handlers")
	require.Len(t, ctxErrs, 3)
	for range 3 {
		assert.ErrorIs(t, <-ctxErrs, context.Canceled)
	}
	for _, s := range streams {
		_, err := s.Recv()
		assert.Equal(t, codes.Unavailable, status.Code(err), "%v", err)
	}
	assert.Equal(t, codes.Unavailable, status.Code(wait(t, unaryErr, "unary call")))
	r.expectClosed()
	assert.ErrorIs(t, ts.serveErr(t), h2grpc.ErrServerStopped)

	// Stop again, GracefulStop after Stop, and Serve after Stop.
	ts.srv.Stop()
	ts.srv.GracefulStop()
	l, err := net.Listen("unix", socketPath(t))
	require.NoError(t, err)
	assert.ErrorIs(t, ts.srv.Serve(l), h2grpc.ErrServerStopped)
	_, err = l.Accept()
	assert.ErrorIs(t, err, net.ErrClosed, "Serve after Stop must close the listener")
}

// Stop ends a handler blocked in SendMsg on a client that does not read.
func TestStopUnblocksFlowControlledSend(t *testing.T) {
	sendErr := make(chan error, 1)
	impl := &api{x509: func(_ *workloadpb.X509SVIDRequest, stream workloadpb.SpiffeWorkloadAPI_FetchX509SVIDServer) error {
		err := stream.Send(&workloadpb.X509SVIDResponse{Svids: []*workloadpb.X509SVID{{Bundle: make([]byte, 1<<20)}}})
		sendErr <- err
		return err
	}}
	ts := startServer(t, h2grpc.Options{}, impl)
	r := dialRaw(t, ts.path, http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0})
	r.call(1, x509Path, &workloadpb.X509SVIDRequest{})
	r.send()
	for { // the response headers are not flow-controlled
		f, err := r.next()
		require.NoError(t, err)
		if h, ok := f.(*http2.MetaHeadersFrame); ok {
			require.Equal(t, uint32(1), h.StreamID)
			require.False(t, h.StreamEnded())
			break
		}
	}
	stopped := make(chan struct{})
	go func() {
		ts.srv.Stop()
		close(stopped)
	}()
	wait(t, stopped, "Stop")
	assert.Equal(t, codes.Unavailable, status.Code(wait(t, sendErr, "SendMsg")))
	r.expectClosed()
}

// Serve returns the listener's error when it fails for another reason than
// Stop; a server serves several listeners at once.
func TestServeListeners(t *testing.T) {
	ts := startServer(t, h2grpc.Options{}, &api{})
	path2 := socketPath(t)
	l2, err := net.Listen("unix", path2)
	require.NoError(t, err)
	served2 := make(chan error, 1)
	go func() { served2 <- ts.srv.Serve(l2) }()
	assertServes(t, ts.path)
	assertServes(t, path2)

	require.NoError(t, l2.Close())
	err = wait(t, served2, "Serve on a closed listener")
	assert.ErrorIs(t, err, net.ErrClosed)
	assert.NotErrorIs(t, err, h2grpc.ErrServerStopped)
	assertServes(t, ts.path)
}

// ---------------------------------------------------------------------------
// 9. Raw protocol hostility. Each case must leave the server serving.

func TestRawGarbagePreface(t *testing.T) {
	ts := startServer(t, h2grpc.Options{}, &api{})
	nc, err := net.Dial("unix", ts.path)
	require.NoError(t, err)
	defer nc.Close()
	_, err = nc.Write([]byte("GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"))
	require.NoError(t, err)
	expectClosed(t, nc)
	assertServes(t, ts.path)
}

func TestRawPrefaceTimeout(t *testing.T) {
	ts := startServer(t, h2grpc.Options{PrefaceTimeout: 200 * time.Millisecond}, &api{})
	nc, err := net.Dial("unix", ts.path)
	require.NoError(t, err)
	defer nc.Close()
	// A partial preface does not extend the timeout.
	_, err = nc.Write([]byte(http2.ClientPreface[:10]))
	require.NoError(t, err)
	nc2, err := net.Dial("unix", ts.path) // sends nothing at all
	require.NoError(t, err)
	defer nc2.Close()
	expectClosed(t, nc)
	expectClosed(t, nc2)
	// The timeout is for the preface only: an idle connection stays.
	r := dialRaw(t, ts.path)
	time.Sleep(400 * time.Millisecond)
	r.ping([8]byte{4, 0, 0})
	r.call(1, jwtPath, &workloadpb.JWTSVIDRequest{Audience: []string{"late"}})
	r.send()
	var j workloadpb.JWTSVIDResponse
	require.NoError(t, proto.Unmarshal(r.okResponse(1), &j))
	assert.Equal(t, "jwt-for-late", j.Svids[0].Svid)
	assertServes(t, ts.path)
}

func TestRawConnectionErrors(t *testing.T) {
	ts := startServer(t, h2grpc.Options{}, &api{})
	for _, tc := range []struct {
		name  string
		write func(r *rawConn)
		code  http2.ErrCode
	}{
		{"HEADERS on an even stream", func(r *rawConn) {
			r.headers(2, true, reqFields(jwtPath)...)
		}, http2.ErrCodeProtocol},
		{"DATA on a stream never opened", func(r *rawConn) {
			require.NoError(t, r.fr.WriteData(5, true, []byte{0, 0, 0, 0, 0}))
		}, http2.ErrCodeProtocol},
		{"DATA on stream 0", func(r *rawConn) {
			require.NoError(t, r.fr.WriteData(0, true, []byte{0}))
		}, http2.ErrCodeProtocol},
		{"INITIAL_WINDOW_SIZE above 2^31-1", func(r *rawConn) {
			require.NoError(t, r.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 31}))
		}, http2.ErrCodeFlowControl},
		{"MAX_FRAME_SIZE below 16384", func(r *rawConn) {
			require.NoError(t, r.fr.WriteSettings(http2.Setting{ID: http2.SettingMaxFrameSize, Val: 100}))
		}, http2.ErrCodeProtocol},
		{"connection WINDOW_UPDATE overflow", func(r *rawConn) {
			require.NoError(t, r.fr.WriteWindowUpdate(0, 1<<31-1))
		}, http2.ErrCodeFlowControl},
		{"connection WINDOW_UPDATE of 0", func(r *rawConn) {
			require.NoError(t, r.fr.WriteWindowUpdate(0, 0))
		}, http2.ErrCodeProtocol},
		{"PUSH_PROMISE", func(r *rawConn) {
			r.headers(1, false, reqFields(x509Path)...)
			require.NoError(t, r.fr.WritePushPromise(http2.PushPromiseParam{StreamID: 1, PromiseID: 2, BlockFragment: r.block(hf(":method", "GET")), EndHeaders: true}))
		}, http2.ErrCodeProtocol},
		{"CONTINUATION without HEADERS", func(r *rawConn) {
			require.NoError(t, r.fr.WriteContinuation(1, true, r.block(hf("a", "b"))))
		}, http2.ErrCodeProtocol},
		{"HEADERS on a lower stream ID", func(r *rawConn) {
			r.call(5, jwtPath, &workloadpb.JWTSVIDRequest{})
			r.call(3, jwtPath, &workloadpb.JWTSVIDRequest{})
		}, 0}, // any code
		{"garbage hpack", func(r *rawConn) {
			require.NoError(t, r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: []byte{0xff, 0xff, 0xff, 0xff}, EndHeaders: true}))
		}, http2.ErrCodeCompression},
		{"header field above MaxHeaderListSize", func(r *rawConn) {
			block := r.block(append(reqFields(jwtPath), hf("x-huge", strings.Repeat("h", 100<<10)))...)
			require.NoError(t, r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block[:16384]}))
			for block = block[16384:]; len(block) > 0; {
				n := min(len(block), 16384)
				require.NoError(t, r.fr.WriteContinuation(1, n == len(block), block[:n]))
				block = block[n:]
			}
		}, 0},
		{"header list far above MaxHeaderListSize", func(r *rawConn) {
			var fs []hpack.HeaderField
			for i := range 40 {
				fs = append(fs, hf(fmt.Sprintf("x-f%d", i), strings.Repeat(string(rune('a'+i%26)), 8000)))
			}
			block := r.block(append(reqFields(jwtPath), fs...)...)
			require.NoError(t, r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block[:16384]}))
			for block = block[16384:]; len(block) > 0; {
				n := min(len(block), 16384)
				require.NoError(t, r.fr.WriteContinuation(1, n == len(block), block[:n]))
				block = block[n:]
			}
		}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := dialRaw(t, ts.path)
			r.t = t
			tc.write(r)
			r.sendLoose()
			code := r.expectGoAway()
			if tc.code != 0 {
				assert.Equal(t, tc.code, code)
			} else {
				assert.NotEqual(t, http2.ErrCodeNo, code)
			}
			r.expectClosed()
		})
	}
	assertServes(t, ts.path)
}

func TestRawStreamErrors(t *testing.T) {
	var calls atomic.Int32
	impl := &api{
		jwt: func(ctx context.Context, req *workloadpb.JWTSVIDRequest) (*workloadpb.JWTSVIDResponse, error) {
			calls.Add(1)
			return echoJWT(req), nil
		},
		x509: func(_ *workloadpb.X509SVIDRequest, stream workloadpb.SpiffeWorkloadAPI_FetchX509SVIDServer) error {
			if err := stream.Send(x509Resp(0)); err != nil {
				return err
			}
			<-stream.Context().Done()
			return stream.Context().Err()
		},
	}
	ts := startServer(t, h2grpc.Options{}, impl)
	r := dialRaw(t, ts.path)
	id := uint32(1)
	next := func() uint32 { id += 2; return id - 2 }
	works := func() {
		t.Helper()
		n := next()
		r.call(n, jwtPath, &workloadpb.JWTSVIDRequest{Audience: []string{"ok"}})
		r.send()
		var j workloadpb.JWTSVIDResponse
		require.NoError(t, proto.Unmarshal(r.okResponse(n), &j))
		assert.Equal(t, "jwt-for-ok", j.Svids[0].Svid)
	}

	t.Run("SETTINGS are acknowledged", func(t *testing.T) {
		require.NoError(t, r.fr.WriteSettings(http2.Setting{ID: http2.SettingHeaderTableSize, Val: 0}, http2.Setting{ID: http2.SettingMaxFrameSize, Val: 1 << 20}))
		r.send()
		for {
			f, err := r.next()
			require.NoError(t, err)
			if sf, ok := f.(*http2.SettingsFrame); ok && sf.IsAck() {
				break
			}
		}
		works()
	})
	t.Run("PING", func(t *testing.T) {
		data := [8]byte{1, 2, 3, 4, 5, 6, 7, 8}
		require.NoError(t, r.fr.WritePing(false, data))
		// A PING ACK from the client is not answered.
		require.NoError(t, r.fr.WritePing(true, [8]byte{0xee}))
		r.send()
		f, err := r.next()
		require.NoError(t, err)
		p, ok := f.(*http2.PingFrame)
		require.True(t, ok, "got %v", f)
		assert.True(t, p.IsAck())
		assert.Equal(t, data, p.Data)
		works()
	})
	t.Run("non-POST method", func(t *testing.T) {
		n := next()
		fs := reqFields(jwtPath)
		fs[0] = hf(":method", "GET")
		r.headers(n, true, fs...)
		r.send()
		resp := r.response(n)
		assert.True(t, resp.rst)
		assert.Nil(t, resp.headers)
		works()
	})
	t.Run("content-type text/plain", func(t *testing.T) {
		n := next()
		fs := reqFields(jwtPath)
		fs[4] = hf("content-type", "text/plain")
		r.headers(n, false, fs...)
		require.NoError(t, r.fr.WriteData(n, true, grpcFrame(t, &workloadpb.JWTSVIDRequest{})))
		r.send()
		resp := r.response(n)
		require.False(t, resp.rst)
		assert.Equal(t, "415", field(resp.headers, ":status"))
		assert.Equal(t, strconv.Itoa(int(codes.Internal)), field(resp.headers, "grpc-status"))
		assert.Contains(t, field(resp.headers, "grpc-message"), "text/plain")
		works()
	})
	t.Run("content-type variants", func(t *testing.T) {
		for _, ct := range []string{"application/grpc+proto", "application/grpc;charset=utf-8"} {
			n := next()
			fs := reqFields(jwtPath)
			fs[4] = hf("content-type", ct)
			r.headers(n, false, fs...)
			require.NoError(t, r.fr.WriteData(n, true, grpcFrame(t, &workloadpb.JWTSVIDRequest{Audience: []string{"v"}})))
			r.send()
			r.okResponse(n)
		}
		for _, ct := range []string{"application/grpcx", "", "application/json"} {
			n := next()
			fs := reqFields(jwtPath)
			fs[4] = hf("content-type", ct)
			r.headers(n, true, fs...)
			r.send()
			assert.Equal(t, "415", field(r.response(n).headers, ":status"), ct)
		}
	})
	t.Run("unknown frame type and PRIORITY are ignored", func(t *testing.T) {
		require.NoError(t, r.fr.WriteRawFrame(0xbb, 0, 0, []byte("whatever")))
		require.NoError(t, r.fr.WritePriority(id, http2.PriorityParam{StreamDep: 0, Weight: 10}))
		r.send()
		works()
	})
	t.Run("RST_STREAM cancels a stream", func(t *testing.T) {
		n := next()
		r.call(n, x509Path, &workloadpb.X509SVIDRequest{})
		r.send()
		for {
			f, err := r.next()
			require.NoError(t, err)
			if d, ok := f.(*http2.DataFrame); ok && d.StreamID == n {
				break
			}
		}
		require.NoError(t, r.fr.WriteRSTStream(n, http2.ErrCodeCancel))
		r.send()
		works()
	})
	t.Run("client trailers on an open stream", func(t *testing.T) {
		n := next()
		r.call(n, x509Path, &workloadpb.X509SVIDRequest{})
		r.headers(n, true, hf("x-trailer", "t"))
		r.send()
		resp := r.response(n)
		require.True(t, resp.rst)
		assert.Equal(t, http2.ErrCodeProtocol, resp.rstCode)
		works()
	})
	t.Run("stream WINDOW_UPDATE overflow", func(t *testing.T) {
		n := next()
		r.call(n, x509Path, &workloadpb.X509SVIDRequest{})
		require.NoError(t, r.fr.WriteWindowUpdate(n, 1<<31-1))
		r.send()
		resp := r.response(n)
		require.True(t, resp.rst)
		assert.Equal(t, http2.ErrCodeFlowControl, resp.rstCode)
		works()
	})
	t.Run("frames for finished streams are ignored", func(t *testing.T) {
		n := id - 2 // the last call, answered
		require.NoError(t, r.fr.WriteData(n, true, []byte{0}))
		require.NoError(t, r.fr.WriteWindowUpdate(n, 100))
		require.NoError(t, r.fr.WriteRSTStream(n, http2.ErrCodeCancel))
		r.send()
		works()
	})
	assert.Positive(t, calls.Load())
	assertServes(t, ts.path)
}

// ---------------------------------------------------------------------------
// 10. Handshake.

func TestHandshakeError(t *testing.T) {
	var n atomic.Int32
	o := h2grpc.Options{Handshake: func(c net.Conn) (net.Conn, credentials.AuthInfo, error) {
		if n.Add(1) <= 2 {
			return nil, nil, errors.New("go away")
		}
		return handshakeAs("third")(c)
	}}
	got := make(chan string, 1)
	impl := &api{jwt: func(ctx context.Context, req *workloadpb.JWTSVIDRequest) (*workloadpb.JWTSVIDResponse, error) {
		p, _ := peer.FromContext(ctx)
		got <- p.AuthInfo.(testAuth).ID
		return echoJWT(req), nil
	}}
	ts := startServer(t, o, impl)

	// Refused: closed without a byte.
	nc, err := net.Dial("unix", ts.path)
	require.NoError(t, err)
	defer nc.Close()
	require.NoError(t, nc.SetReadDeadline(time.Now().Add(guard)))
	b, err := io.ReadAll(nc)
	require.NoError(t, err)
	assert.Empty(t, b)

	// A grpc-go client whose handshake fails sees Unavailable.
	client, _ := dial(t, ts.path)
	_, err = client.FetchJWTSVID(testCtx(t), &workloadpb.JWTSVIDRequest{})
	assert.Equal(t, codes.Unavailable, status.Code(err))

	// The next connection is served, with the handshake's AuthInfo.
	assertServes(t, ts.path)
	assert.Equal(t, "third", wait(t, got, "handler"))
}

// The Handshake's conn is the one served.
func TestHandshakeWrapsConn(t *testing.T) {
	var read atomic.Int64
	o := h2grpc.Options{Handshake: func(c net.Conn) (net.Conn, credentials.AuthInfo, error) {
		return &countingConn{Conn: c, n: &read}, testAuth{ID: "wrapped"}, nil
	}}
	ts := startServer(t, o, &api{})
	assertServes(t, ts.path)
	assert.Greater(t, read.Load(), int64(len(http2.ClientPreface)))
}

type countingConn struct {
	net.Conn
	n *atomic.Int64
}

func (c *countingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.n.Add(int64(n))
	return n, err
}

// ---------------------------------------------------------------------------
// Regressions: each test once showed a bug, described at its start.

func TestNilHandshakeServes(t *testing.T) {
	// Regression: Options.Handshake left nil makes serveConn call a nil func: the first connection panics the process
	srv := h2grpc.NewServer(h2grpc.Options{}) // no Handshake
	workloadpb.RegisterSpiffeWorkloadAPIServer(srv, &api{})
	path := socketPath(t)
	l, err := net.Listen("unix", path)
	require.NoError(t, err)
	go srv.Serve(l)
	defer srv.Stop()
	assertServes(t, path)
}

func TestResetBeforeRequestEndForgetsStream(t *testing.T) {
	// Regression: RST_STREAM on a stream whose request has not ended leaves it in conn.streams forever (MaxConcurrentStreams slot and buffer leak, GracefulStop hangs)
	ts := startServer(t, h2grpc.Options{MaxConcurrentStreams: 1}, &api{})
	r := dialRaw(t, ts.path)
	// A call whose client gives up before the request is complete, as a
	// grpc-go client does when its deadline passes during a large upload.
	r.headers(1, false, reqFields(validatePath)...)
	require.NoError(t, r.fr.WriteData(1, false, []byte{0, 0, 0, 1, 0}))
	require.NoError(t, r.fr.WriteRSTStream(1, http2.ErrCodeCancel))
	r.call(3, jwtPath, &workloadpb.JWTSVIDRequest{Audience: []string{"three"}})
	r.send()
	resp := r.response(3)
	require.False(t, resp.rst, "stream 3 reset with %v: stream 1 still counts against MaxConcurrentStreams", resp.rstCode)
	assert.Equal(t, "0", field(resp.trailers, "grpc-status"))

	// And GracefulStop does not wait for it.
	stopped := make(chan struct{})
	go func() {
		ts.srv.GracefulStop()
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-time.After(guard):
		r.nc.Close() // let the server go
		t.Fatal("GracefulStop waits for a stream the client reset")
	}
}

func TestGracefulStopKeepsInlineAnswer(t *testing.T) {
	// Regression: GracefulStop's goAway closes the conn as soon as conn.streams is empty, before the reader flushed an inline unary answer (lost)
	started := make(chan struct{}, 1)
	release := make(chan struct{})
	impl := &api{jwt: func(ctx context.Context, req *workloadpb.JWTSVIDRequest) (*workloadpb.JWTSVIDResponse, error) {
		started <- struct{}{}
		<-release
		return echoJWT(req), nil
	}}
	ts := startServer(t, h2grpc.Options{}, impl)
	r := dialRaw(t, ts.path)
	// The call, and the start of a next frame in the same write: the reader
	// does not flush while it holds unread bytes, so after the handler it
	// waits for the rest of that frame. (Without them the answer is lost
	// only when goAway wins the race for the lock.)
	r.call(1, jwtPath, &workloadpb.JWTSVIDRequest{Audience: []string{"in-flight"}})
	require.NoError(t, r.fr.WritePing(false, [8]byte{1}))
	r.wbuf.Truncate(r.wbuf.Len() - 12)
	r.send()
	wait(t, started, "handler")
	stopped := make(chan struct{})
	go func() {
		ts.srv.GracefulStop()
		close(stopped)
	}()
	assert.Equal(t, http2.ErrCodeNo, r.expectGoAway())
	close(release)
	resp := r.response(1)
	require.False(t, resp.eof, "connection closed before the answer of a call in flight: %v", resp.readErr)
	assert.Equal(t, "0", field(resp.trailers, "grpc-status"))
	wait(t, stopped, "GracefulStop")
}

func TestOversizedHeaderListRefused(t *testing.T) {
	// Regression: a header list above MaxHeaderListSize (64 KiB) that the framer truncates (MetaHeadersFrame.Truncated) is served with the excess fields silently dropped
	called := make(chan metadata.MD, 1)
	impl := &api{jwt: func(ctx context.Context, req *workloadpb.JWTSVIDRequest) (*workloadpb.JWTSVIDResponse, error) {
		md, _ := metadata.FromIncomingContext(ctx)
		called <- md
		return echoJWT(req), nil
	}}
	ts := startServer(t, h2grpc.Options{}, impl)
	r := dialRaw(t, ts.path)
	// Five fields of 15000 and 10000 bytes: 70 KiB in all, each in a
	// fragment of its own, so that only the last one crosses the limit.
	frags := [][]byte{r.block(append(reqFields(jwtPath), hf("x-big-0", strings.Repeat("a", 15000)))...)}
	for i := 1; i < 5; i++ {
		n := 15000
		if i == 4 {
			n = 10000
		}
		frags = append(frags, r.block(hf(fmt.Sprintf("x-big-%d", i), strings.Repeat("a", n))))
	}
	require.NoError(t, r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: frags[0]}))
	for i, f := range frags[1:] {
		require.NoError(t, r.fr.WriteContinuation(1, i == len(frags)-2, f))
	}
	require.NoError(t, r.fr.WriteData(1, true, grpcFrame(t, &workloadpb.JWTSVIDRequest{Audience: []string{"a"}})))
	r.sendLoose()
	resp := r.response(1)
	select {
	case md := <-called:
		t.Errorf("handler called with x-big-4 %q dropped", md.Get("x-big-4"))
	default:
	}
	refused := resp.rst || resp.eof || field(resp.headers, ":status") == "431" ||
		field(resp.trailers, "grpc-status") != "" && field(resp.trailers, "grpc-status") != "0"
	assert.True(t, refused, "oversized header list served: %+v", resp.trailers)
}

func TestBlockedSendEndsAtDeadline(t *testing.T) {
	// Regression: SendMsg waiting for flow-control window (cond.Wait) is not woken when the stream's grpc-timeout deadline passes: the handler hangs past its deadline
	sendErr := make(chan error, 1)
	impl := &api{x509: func(_ *workloadpb.X509SVIDRequest, stream workloadpb.SpiffeWorkloadAPI_FetchX509SVIDServer) error {
		err := stream.Send(&workloadpb.X509SVIDResponse{Svids: []*workloadpb.X509SVID{{Bundle: make([]byte, 1000)}}})
		sendErr <- err
		return err
	}}
	ts := startServer(t, h2grpc.Options{}, impl)
	r := dialRaw(t, ts.path, http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0})
	r.call(1, x509Path, &workloadpb.X509SVIDRequest{}, "grpc-timeout", "200m")
	r.send()
	r.waitHeaders(1)
	select {
	case err := <-sendErr:
		assert.Equal(t, codes.DeadlineExceeded, status.Code(err))
	case <-time.After(guard):
		r.nc.Close() // let the handler go
		t.Fatal("SendMsg still blocked long after the deadline")
	}
	resp := r.response(1)
	assert.True(t, resp.rst || field(resp.trailers, "grpc-status") == strconv.Itoa(int(codes.DeadlineExceeded)))
}

func TestUnaryHandlerSetsMetadata(t *testing.T) {
	// Regression: unary handlers' ctx carries no grpc.ServerTransportStream: grpc.SetHeader/SendHeader/SetTrailer fail, so unary calls cannot send response metadata
	errs := make(chan [2]error, 1)
	impl := &api{jwt: func(ctx context.Context, req *workloadpb.JWTSVIDRequest) (*workloadpb.JWTSVIDResponse, error) {
		errs <- [2]error{
			grpc.SetHeader(ctx, metadata.Pairs("x-h", "h")),
			grpc.SetTrailer(ctx, metadata.Pairs("x-t", "t")),
		}
		return echoJWT(req), nil
	}}
	ts := startServer(t, h2grpc.Options{}, impl)
	client, _ := dial(t, ts.path)
	var hdr, tr metadata.MD
	_, err := client.FetchJWTSVID(testCtx(t), &workloadpb.JWTSVIDRequest{}, grpc.Header(&hdr), grpc.Trailer(&tr))
	require.NoError(t, err)
	e := wait(t, errs, "handler")
	assert.NoError(t, e[0])
	assert.NoError(t, e[1])
	assert.Equal(t, []string{"h"}, hdr.Get("x-h"))
	assert.Equal(t, []string{"t"}, tr.Get("x-t"))
}

func TestClientGoAwayKeepsAnswers(t *testing.T) {
	// Regression: a GOAWAY from the client makes handle return io.EOF: the conn closes at once without flushing answers already written and cancels calls in flight
	ts := startServer(t, h2grpc.Options{}, &api{})
	r := dialRaw(t, ts.path)
	// A client that makes its last call and says it will open no more
	// streams (RFC 9113 §6.8: calls in flight still complete).
	r.call(1, jwtPath, &workloadpb.JWTSVIDRequest{Audience: []string{"last"}})
	require.NoError(t, r.fr.WriteGoAway(0, http2.ErrCodeNo, nil))
	r.send()
	var j workloadpb.JWTSVIDResponse
	require.NoError(t, proto.Unmarshal(r.okResponse(1), &j))
	assert.Equal(t, "jwt-for-last", j.Svids[0].Svid)
}

func TestDataAfterMalformedHeadersIgnored(t *testing.T) {
	// Regression: after the framer rejects a HEADERS block with a StreamError, lastID is not advanced: the stream's DATA is then a connection error (GOAWAY) instead of being ignored
	ts := startServer(t, h2grpc.Options{}, &api{})
	r := dialRaw(t, ts.path)
	r.headers(1, false, append(reqFields(jwtPath), hf("X-Upper-Case", "v"))...)
	require.NoError(t, r.fr.WriteData(1, true, grpcFrame(t, &workloadpb.JWTSVIDRequest{})))
	r.send()
	resp := r.response(1)
	require.True(t, resp.rst)
	assert.Equal(t, http2.ErrCodeProtocol, resp.rstCode)
	// Frames on a stream the server reset must be ignored (RFC 9113 §5.1).
	err := r.alive()
	assert.Empty(t, r.goAways, "GOAWAY for DATA on a stream the server reset")
	assert.NoError(t, err, "connection closed")
}

func TestOversizedFrameRefused(t *testing.T) {
	// Regression: the framer's max read frame size is left at 16 MiB while the server advertises the default SETTINGS_MAX_FRAME_SIZE 16384: larger frames are read whole (memory per connection) instead of FRAME_SIZE_ERROR
	ts := startServer(t, h2grpc.Options{}, &api{})
	r := dialRaw(t, ts.path)
	_, advertised := r.settings[http2.SettingMaxFrameSize]
	require.False(t, advertised, "the default, 16384, applies")
	r.headers(1, false, reqFields(validatePath)...)
	require.NoError(t, r.fr.WriteData(1, true, grpcFrame(t, &workloadpb.ValidateJWTSVIDRequest{Svid: strings.Repeat("f", 60000)})))
	r.sendLoose()
	resp := r.response(1)
	assert.True(t, resp.eof, "oversized DATA frame accepted and the call answered: %v", resp.trailers)
	assert.Equal(t, []http2.ErrCode{http2.ErrCodeFrameSize}, r.goAways)
}

// TestConnectionBufferBounded: requests held for calls not yet dispatched
// are bounded per connection (4 × MaxRecvMsgSize); past that a call gets
// ResourceExhausted, and a reset call gives its share back.
func TestConnectionBufferBounded(t *testing.T) {
	const max = 64 << 10
	ts := startServer(t, h2grpc.Options{MaxRecvMsgSize: max}, &api{})
	r := dialRaw(t, ts.path)
	partial := func(id uint32, n int) {
		r.headers(id, false, reqFields(validatePath)...)
		chunk := bytes.Repeat([]byte{'p'}, 15000)
		for sent := 0; sent < n; sent += len(chunk) {
			require.NoError(t, r.fr.WriteData(id, false, chunk[:min(len(chunk), n-sent)]))
		}
		r.send()
	}
	// Four calls of 60 KB each fit (240 KB of 262 KB); the fifth does not.
	for _, id := range []uint32{1, 3, 5, 7} {
		partial(id, 60000)
	}
	partial(9, 60000)
	resp := r.response(9)
	require.False(t, resp.eof, "connection ended: %v", resp.readErr)
	assert.Equal(t, strconv.Itoa(int(codes.ResourceExhausted)), field(resp.trailers, "grpc-status"), "grpc-message %q", field(resp.trailers, "grpc-message"))

	// Resetting two of the held calls makes room for a complete one.
	require.NoError(t, r.fr.WriteRSTStream(1, http2.ErrCodeCancel))
	require.NoError(t, r.fr.WriteRSTStream(3, http2.ErrCodeCancel))
	svid := strings.Repeat("v", 60000)
	r.headers(11, false, reqFields(validatePath)...)
	msg := grpcFrame(t, &workloadpb.ValidateJWTSVIDRequest{Svid: svid})
	for len(msg) > 0 {
		n := min(len(msg), 16000)
		require.NoError(t, r.fr.WriteData(11, n == len(msg), msg[:n]))
		msg = msg[n:]
	}
	r.send()
	var got workloadpb.ValidateJWTSVIDResponse
	require.NoError(t, proto.Unmarshal(r.okResponse(11), &got))
	assert.Equal(t, sum(svid), got.SpiffeId)
	assertServes(t, ts.path)
}

// A server that is built but never served holds no goroutine; one that is
// served stops all of its own.
func TestGoroutinesStartWithServe(t *testing.T) {
	// waitGoroutines polls (in this goroutine: testify's Eventually runs
	// its condition on another) until ok holds for the goroutine count.
	waitGoroutines := func(ok func(n int) bool) int {
		deadline := time.Now().Add(10 * time.Second)
		for {
			n := runtime.NumGoroutine()
			if ok(n) || time.Now().After(deadline) {
				return n
			}
			time.Sleep(time.Millisecond)
		}
	}
	// Goroutines of earlier tests may still be on their way out: the
	// fewest seen over a moment.
	before := runtime.NumGoroutine()
	for range 50 {
		time.Sleep(2 * time.Millisecond)
		before = min(before, runtime.NumGoroutine())
	}
	for range 10 {
		s := h2grpc.NewServer(h2grpc.Options{})
		workloadpb.RegisterSpiffeWorkloadAPIServer(s, &api{})
	}
	require.LessOrEqual(t, runtime.NumGoroutine(), before, "NewServer started goroutines")

	s := h2grpc.NewServer(h2grpc.Options{})
	l, err := net.Listen("unix", filepath.Join(t.TempDir(), "s.sock"))
	require.NoError(t, err)
	done := make(chan error, 1)
	go func() { done <- s.Serve(l) }()
	// The Serve goroutine and at least 4 workers.
	require.GreaterOrEqual(t, waitGoroutines(func(n int) bool { return n >= before+5 }), before+5, "Serve starts its workers")
	s.Stop()
	require.ErrorIs(t, <-done, h2grpc.ErrServerStopped)
	require.LessOrEqual(t, waitGoroutines(func(n int) bool { return n <= before }), before, "goroutines left after Stop")
	// Serving after Stop starts nothing.
	l, err = net.Listen("unix", filepath.Join(t.TempDir(), "s.sock"))
	require.NoError(t, err)
	require.ErrorIs(t, s.Serve(l), h2grpc.ErrServerStopped)
	require.LessOrEqual(t, runtime.NumGoroutine(), before)
}
