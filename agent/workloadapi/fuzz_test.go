package workloadapi_test

import (
	"bytes"
	"io"
	"net"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"github.com/stretchr/testify/require"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	ferrywl "github.com/ferry-id/ferry/agent/workloadapi"
)

// fuzzSeed is a valid connection: preface, SETTINGS, a unary call, a
// stream the client then resets, and a GOAWAY.
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
		for _, f := range [][2]string{{":method", "POST"}, {":scheme", "http"}, {":path", call.path}, {":authority", "x"},
			{"content-type", "application/grpc"}, {"workload.spiffe.io", "true"}, {"grpc-timeout", "1S"}} {
			_ = enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
		}
		_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: call.id, BlockFragment: hb.Bytes(), EndHeaders: true})
		_ = fr.WriteData(call.id, true, []byte{0, 0, 0, 0, 3, 0x12, 1, 'a'})
	}
	_ = fr.WriteWindowUpdate(0, 1<<20)
	_ = fr.WritePing(false, [8]byte{1})
	_ = fr.WriteRSTStream(3, http2.ErrCodeCancel)
	_ = fr.WriteGoAway(3, http2.ErrCodeNo, nil)
	return buf.Bytes()
}

// FuzzConnection sends arbitrary bytes after the HTTP/2 preface on a real
// connection to the Workload API, inside its budgets: whatever the frames
// say, the agent must neither crash nor leak the connection's budget, and
// must go on serving an ordinary client.
func FuzzConnection(f *testing.F) {
	seed := fuzzSeed()
	f.Add(seed[len(http2.ClientPreface):])
	f.Add(seed[len(http2.ClientPreface) : len(http2.ClientPreface)+20])
	f.Add([]byte("\x00\x00\x04\x08\x00\x00\x00\x00\x00\x7f\xff\xff\xff"))
	fx := startServer(f, func(c *ferrywl.Config) {
		c.Limits = ferrywl.Limits{MaxConnectionsPerUID: 8, MaxCallsPerConnection: 8, IdleTimeout: time.Second}
	})
	f.Fuzz(func(t *testing.T, in []byte) {
		c, err := net.Dial("unix", fx.socket)
		require.NoError(t, err)
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		_, _ = io.WriteString(c, http2.ClientPreface)
		_, _ = c.Write(in)
		_ = c.(*net.UnixConn).CloseWrite()
		// The server ends the connection: its client's bytes have ended.
		_, _ = io.Copy(io.Discard, c)
		c.Close()
		ctx := testCtx(t)
		_, err = workloadapi.FetchX509SVID(ctx, clientOpt(fx))
		require.NoError(t, err, "the agent still serves")
	})
}
