package h2grpc

import (
	"bytes"
	"context"
	"io"
	"net"
	"testing"
	"time"

	workloadpb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// fuzzAPI answers unary calls and streams one message, so that hostile
// frames meet every path: inline calls, streams handed to a worker, resets.
type fuzzAPI struct {
	workloadpb.UnimplementedSpiffeWorkloadAPIServer
}

func (fuzzAPI) FetchJWTSVID(_ context.Context, req *workloadpb.JWTSVIDRequest) (*workloadpb.JWTSVIDResponse, error) {
	return &workloadpb.JWTSVIDResponse{Svids: []*workloadpb.JWTSVID{{SpiffeId: req.SpiffeId, Svid: "t"}}}, nil
}

func (fuzzAPI) FetchX509SVID(_ *workloadpb.X509SVIDRequest, s workloadpb.SpiffeWorkloadAPI_FetchX509SVIDServer) error {
	if err := s.Send(&workloadpb.X509SVIDResponse{Crl: [][]byte{bytes.Repeat([]byte{1}, 70000)}}); err != nil {
		return err
	}
	<-s.Context().Done()
	return nil
}

// fuzzSeed is a valid connection: preface, SETTINGS, a unary call and a
// stream the client then resets.
func fuzzSeed() []byte {
	var buf bytes.Buffer
	buf.WriteString(http2.ClientPreface)
	fr := http2.NewFramer(&buf, nil)
	_ = fr.WriteSettings()
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	for _, call := range []struct {
		id   uint32
		path string
	}{{1, "/SpiffeWorkloadAPI/FetchJWTSVID"}, {3, "/SpiffeWorkloadAPI/FetchX509SVID"}} {
		hb.Reset()
		for _, f := range [][2]string{{":method", "POST"}, {":scheme", "http"}, {":path", call.path}, {"content-type", "application/grpc"}, {"grpc-timeout", "1S"}} {
			_ = enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
		}
		_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: call.id, BlockFragment: hb.Bytes(), EndHeaders: true})
		_ = fr.WriteData(call.id, true, []byte{0, 0, 0, 0, 2, 0x12, 0})
	}
	_ = fr.WriteWindowUpdate(0, 1<<20)
	_ = fr.WriteWindowUpdate(3, 1<<20)
	_ = fr.WritePing(false, [8]byte{1})
	_ = fr.WriteRSTStream(3, http2.ErrCodeCancel)
	_ = fr.WriteGoAway(3, http2.ErrCodeNo, nil)
	return buf.Bytes()
}

// FuzzServeConn feeds arbitrary bytes to a connection after the server's
// preface: the server must neither panic nor hang (every connection ends
// once its client's bytes end), whatever the frames say.
func FuzzServeConn(f *testing.F) {
	seed := fuzzSeed()
	f.Add(seed)
	f.Add(seed[:len(http2.ClientPreface)+20])
	f.Add([]byte(http2.ClientPreface + "\x00\x00\x04\x08\x00\x00\x00\x00\x00\x7f\xff\xff\xff"))
	srv := NewServer(Options{MaxRecvMsgSize: 64 << 10, MaxConcurrentStreams: 8, PrefaceTimeout: time.Second})
	workloadpb.RegisterSpiffeWorkloadAPIServer(srv, fuzzAPI{})
	f.Cleanup(srv.Stop)
	f.Fuzz(func(t *testing.T, in []byte) {
		client, server := net.Pipe()
		done := make(chan struct{})
		srv.wg.Add(1)
		go func() {
			defer srv.wg.Done()
			defer close(done)
			srv.serveConn(server)
		}()
		go func() { _, _ = io.Copy(io.Discard, client) }()
		_, _ = client.Write(in)
		// The client's bytes end; the connection must end too (streams
		// are reset, handlers see their contexts end).
		client.Close()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatalf("connection still served 5 s after its client left")
		}
	})
}
