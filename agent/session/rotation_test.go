package session

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"io"
	"log/slog"
	"math/big"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/ferry-id/ferry/proto/ferrypb"
)

func heldAuth(kind, id string, exp int64) *ferrypb.HeldAuthority {
	return &ferrypb.HeldAuthority{Kind: kind, AuthorityId: id, Count: 1, ExpiresAt: exp}
}

func TestNeedReport(t *testing.T) {
	a, b := heldAuth("x509", "a", 100), heldAuth("x509", "b", 200)
	for _, tc := range []struct {
		name      string
		sent, cur []*ferrypb.HeldAuthority
		want      bool
	}{
		{"same", []*ferrypb.HeldAuthority{a}, []*ferrypb.HeldAuthority{a}, false},
		{"a new authority", []*ferrypb.HeldAuthority{a}, []*ferrypb.HeldAuthority{a, b}, true},
		{"an authority gone", []*ferrypb.HeldAuthority{a, b}, []*ferrypb.HeldAuthority{b}, true},
		{"another authority", []*ferrypb.HeldAuthority{a}, []*ferrypb.HeldAuthority{heldAuth("x509", "c", 100)}, true},
		{"the signing authority renews", []*ferrypb.HeldAuthority{a, b}, []*ferrypb.HeldAuthority{a, heldAuth("x509", "b", 300)}, false},
		{"the only authority renews", []*ferrypb.HeldAuthority{a}, []*ferrypb.HeldAuthority{heldAuth("x509", "a", 150)}, false},
		{"an older authority lasts longer", []*ferrypb.HeldAuthority{a, b}, []*ferrypb.HeldAuthority{heldAuth("x509", "a", 150), b}, true},
		{"an older authority's SVIDs are replaced", []*ferrypb.HeldAuthority{a, b}, []*ferrypb.HeldAuthority{heldAuth("x509", "a", 50), b}, false},
		{"kinds apart", []*ferrypb.HeldAuthority{heldAuth("jwt", "k", 10), a}, []*ferrypb.HeldAuthority{heldAuth("jwt", "k", 20), a}, false},
	} {
		assert.Equal(t, tc.want, needReport(tc.sent, tc.cur), tc.name)
	}
}

// TestApplyTaintRenewsOwnSVID: a bundle that marks the agent SVID's
// authority tainted schedules its renewal within the jitter and a report at
// once; the same bundle again does neither.
func TestApplyTaintRenewsOwnSVID(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("example.org")
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	require.NoError(t, err)
	caCert, err := x509.ParseCertificate(caDER)
	require.NoError(t, err)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	id := spiffeid.RequireFromPath(td, "/spire/agent/a")
	leafTmpl := &x509.Certificate{SerialNumber: big.NewInt(2), NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		URIs: []*url.URL{id.URL()}}
	leafDER, err := x509.CreateCertificate(rand.Reader, leafTmpl, caCert, key.Public(), caKey)
	require.NoError(t, err)
	leaf, err := x509.ParseCertificate(leafDER)
	require.NoError(t, err)

	const jitter = 20 * time.Second
	sink := &recordingSink{}
	s := &Session{
		cfg:        Config{TrustDomain: td, DataDir: t.TempDir(), Sink: sink, TaintJitter: jitter},
		log:        slog.New(slog.DiscardHandler),
		svid:       &x509svid.SVID{ID: id, Certificates: []*x509.Certificate{leaf}, PrivateKey: key},
		renewKick:  make(chan struct{}, 1),
		reportKick: make(chan struct{}, 1),
	}
	bundle := &ferrypb.Bundle{TrustDomain: td.Name(),
		X509Authorities: []*ferrypb.X509Authority{{Certificate: caDER, Tainted: true}},
		JwtAuthorities:  []*ferrypb.JWTAuthority{{KeyId: "k1", Tainted: true}, {KeyId: "k2"}}}
	before := time.Now()
	s.applyTaint(bundle)
	require.Len(t, sink.taints, 1)
	require.Len(t, sink.taints[0].x509, 1)
	require.Equal(t, []string{"k1"}, sink.taints[0].jwt, "only tainted keys reach the cache")
	require.False(t, s.renewBy.IsZero(), "the agent SVID is renewed early")
	require.False(t, s.renewBy.Before(before))
	require.False(t, s.renewBy.After(time.Now().Add(jitter)))
	require.True(t, s.forceReport.Swap(false), "a new taint is reported at once")
	require.Len(t, s.renewKick, 1)
	require.Len(t, s.reportKick, 1)

	<-s.renewKick
	<-s.reportKick
	at := s.renewBy
	s.applyTaint(bundle)
	require.Equal(t, at, s.renewBy, "the renewal already scheduled stands")
	require.False(t, s.forceReport.Load(), "nothing new to report")
	require.Len(t, s.renewKick, 0)
}

type fakeHolder struct {
	mu      sync.Mutex
	held    []*ferrypb.HeldAuthority
	changed chan struct{}
}

func (h *fakeHolder) HeldAuthorities(time.Time) []*ferrypb.HeldAuthority {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := make([]*ferrypb.HeldAuthority, len(h.held))
	for i, x := range h.held {
		out[i] = proto.Clone(x).(*ferrypb.HeldAuthority)
	}
	return out
}

func (h *fakeHolder) HeldChanged() <-chan struct{} { return h.changed }

func (h *fakeHolder) set(held ...*ferrypb.HeldAuthority) {
	h.mu.Lock()
	h.held = held
	h.mu.Unlock()
	kick(h.changed)
}

// reportingClient records reports, or refuses them with err.
type reportingClient struct {
	ferrypb.AgentClient
	reports chan []*ferrypb.HeldAuthority
	err     error
}

func (c *reportingClient) ReportAuthorities(_ context.Context, req *ferrypb.ReportAuthoritiesRequest, _ ...grpc.CallOption) (*ferrypb.ReportAuthoritiesResponse, error) {
	c.reports <- req.Authorities
	return &ferrypb.ReportAuthoritiesResponse{}, c.err
}

// TestReportLoop: the agent reports what it holds at start, again when the
// set of authorities changes, and at once when asked to (a new taint).
func TestReportLoop(t *testing.T) {
	exp := time.Now().Add(time.Hour).Unix()
	h := &fakeHolder{changed: make(chan struct{}, 1), held: []*ferrypb.HeldAuthority{heldAuth("x509", "a", exp)}}
	cl := &reportingClient{reports: make(chan []*ferrypb.HeldAuthority, 10)}
	s := &Session{
		cfg:        Config{TrustDomain: spiffeid.RequireTrustDomainFromString("example.org"), Holder: h},
		log:        slog.New(slog.DiscardHandler),
		client:     cl,
		renewKick:  make(chan struct{}, 1),
		reportKick: make(chan struct{}, 1),
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); s.reportLoop(ctx) }()
	defer func() { cancel(); <-done }()
	next := func() []*ferrypb.HeldAuthority {
		t.Helper()
		select {
		case r := <-cl.reports:
			return r
		case <-time.After(10 * time.Second):
			t.Fatal("no report")
		}
		return nil
	}
	ids := func(hs []*ferrypb.HeldAuthority) []string {
		var out []string
		for _, x := range hs {
			out = append(out, x.Kind+":"+x.AuthorityId)
		}
		return out
	}
	require.Equal(t, []string{"x509:a"}, ids(next()), "a report at start")
	h.set(heldAuth("jwt", "k", exp), heldAuth("x509", "a", exp))
	require.Equal(t, []string{"jwt:k", "x509:a"}, ids(next()), "a new authority is reported")
	s.forceReport.Store(true)
	kick(s.reportKick)
	require.Equal(t, []string{"jwt:k", "x509:a"}, ids(next()), "a forced report goes out though nothing changed")
}

// TestReportLoopOlderServers: servers that take no reports are asked again
// only now and then.
func TestReportLoopOlderServers(t *testing.T) {
	h := &fakeHolder{changed: make(chan struct{}, 1), held: []*ferrypb.HeldAuthority{heldAuth("x509", "a", time.Now().Add(time.Hour).Unix())}}
	cl := &reportingClient{reports: make(chan []*ferrypb.HeldAuthority, 10), err: status.Error(codes.Unimplemented, "unknown method")}
	var logs bytes.Buffer
	var mu sync.Mutex
	s := &Session{
		cfg:        Config{TrustDomain: spiffeid.RequireTrustDomainFromString("example.org"), Holder: h},
		log:        slog.New(slog.NewTextHandler(&lockedWriter{w: &logs, mu: &mu}, nil)),
		client:     cl,
		renewKick:  make(chan struct{}, 1),
		reportKick: make(chan struct{}, 1),
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); s.reportLoop(ctx) }()
	<-cl.reports
	// A change wakes the loop, which tries again once and logs nothing new.
	h.set(heldAuth("x509", "b", time.Now().Add(time.Hour).Unix()))
	<-cl.reports
	cancel()
	<-done
	mu.Lock()
	defer mu.Unlock()
	require.Equal(t, 1, strings.Count(logs.String(), "take no reports"), logs.String())
	require.NotContains(t, logs.String(), "level=WARN")
}

type lockedWriter struct {
	w  io.Writer
	mu *sync.Mutex
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}
