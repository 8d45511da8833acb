package workloadapi_test

import (
	"os"
	"strconv"
	"testing"
	"time"

	workloadpb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	ferrywl "github.com/ferry-id/ferry/agent/workloadapi"
	"github.com/ferry-id/ferry/test/h2attack"
)

// TestHeaderListCountsDecodedBytes: the header list limit counts what the
// headers decode to, so a 4 KB -bin value repeated by HPACK reference (a
// byte each on the wire) is refused before any handler runs, while the same
// value once is served.
func TestHeaderListCountsDecodedBytes(t *testing.T) {
	f := startServer(t)
	stats := &h2attack.Stats{}
	c, err := h2attack.Dial(f.socket, stats)
	require.NoError(t, err)
	defer c.Close()
	<-c.Settled()
	big := h2attack.BinHeader(3800)
	require.Less(t, ferrywl.DefaultLimits().MaxHeaderListBytes, 3*int(big.Size()))

	// Once: about 4 KB decoded, under the limit. The empty request reaches
	// the handler, which wants an audience.
	id, err := c.Call(h2attack.FetchJWTSVID, big)
	require.NoError(t, err)
	require.NoError(t, c.Send(id, h2attack.Message(0), true))
	require.Eventually(t, func() bool { return stats.Report().Statuses["3"] == 1 }, 10*time.Second, time.Millisecond)
	calls := len(f.log.calls())

	// Three times by reference: a few bytes more on the wire, 12 KB decoded.
	id, err = c.Call(h2attack.FetchJWTSVID, big, big, big)
	require.NoError(t, err)
	require.Less(t, c.LastHeaderBlock(), 64, "the repeats are HPACK references")
	require.NoError(t, c.Send(id, h2attack.Message(0), true))
	require.Eventually(t, func() bool { return stats.Report().Resets >= 1 }, 10*time.Second, time.Millisecond)
	r := stats.Report()
	require.Equal(t, map[string]int64{"3": 1}, r.Statuses, "no handler answered the oversized call")
	require.Len(t, f.log.calls(), calls, "no handler ran")

	// The connection still serves.
	id, err = c.Call(h2attack.FetchJWTSVID, big)
	require.NoError(t, err)
	require.NoError(t, c.Send(id, h2attack.Message(0), true))
	require.Eventually(t, func() bool { return stats.Report().Statuses["3"] == 2 }, 10*time.Second, time.Millisecond)
}

// TestBudgetRefusalsSayWhy: a client over its uid's budget is told which
// limit it hit: a call gets ResourceExhausted naming it, a connection an
// HTTP/2 GOAWAY (ENHANCE_YOUR_CALM) whose debug data names it, which a gRPC
// client reports as Unavailable.
func TestBudgetRefusalsSayWhy(t *testing.T) {
	f := startServer(t, func(c *ferrywl.Config) {
		c.Limits = ferrywl.Limits{MaxConnectionsPerUID: 1, MaxCallsPerUID: 1}
	})
	ctx := testCtx(t)
	held, err := workloadapi.New(ctx, clientOpt(f))
	require.NoError(t, err)
	defer held.Close()
	w := &x509Watcher{updates: make(chan *workloadapi.X509Context, 10)}
	go func() { _ = held.WatchX509Context(ctx, w) }()
	recvContext(t, w)

	// A second call on the same connection: over max_calls_per_uid.
	_, err = held.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "aud1"})
	require.Equal(t, codes.ResourceExhausted, status.Code(err), "%v", err)
	require.ErrorContains(t, err, "max_calls_per_uid")

	// A second connection: over max_connections_per_uid.
	_, err = rawClient(t, f).FetchJWTSVID(withHeader(ctx), &workloadpb.JWTSVIDRequest{Audience: []string{"a"}})
	require.Equal(t, codes.Unavailable, status.Code(err), "%v", err)
	stats := &h2attack.Stats{}
	c, err := h2attack.Dial(f.socket, stats)
	require.NoError(t, err)
	defer c.Close()
	<-c.Settled()
	require.Equal(t, "ENHANCE_YOUR_CALM workload API: connection refused: uid "+strconv.Itoa(os.Getuid())+
		" holds 1 connections, its limit (max_connections_per_uid)", stats.Report().LastGoAway)
}

// TestIdleConnectionClosed: a connection with no call in flight is closed
// after the idle timeout, and its budget freed.
func TestIdleConnectionClosed(t *testing.T) {
	f := startServer(t, func(c *ferrywl.Config) {
		c.Limits = ferrywl.Limits{IdleTimeout: 100 * time.Millisecond}
	})
	stats := &h2attack.Stats{}
	c, err := h2attack.Dial(f.socket, stats)
	require.NoError(t, err)
	defer c.Close()
	select {
	case <-c.Done():
	case <-time.After(30 * time.Second):
		t.Fatal("idle connection still open")
	}
	require.Positive(t, stats.Report().GoAways)
}
