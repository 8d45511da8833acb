package federation_test

import (
	"context"
	"errors"
	"net"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/ca"
	"github.com/ferry-id/ferry/server/federation"
)

var (
	ourTD     = spiffeid.RequireTrustDomainFromString("ours.org")
	foreignTD = spiffeid.RequireTrustDomainFromString("foreign.org")
)

// startRefresher runs a refresher on the fake cluster until the test ends;
// before, if given, is called with it before it runs.
func startRefresher(t *testing.T, c *fakeCluster, cfg federation.RefresherConfig, before ...func(*federation.Refresher)) *federation.Refresher {
	t.Helper()
	cfg.TrustDomain, cfg.State, cfg.Cluster = ourTD, c.store, c
	if cfg.Logger == nil {
		cfg.Logger = testLogger(t)
	}
	if cfg.RetryBackoff == 0 {
		cfg.RetryBackoff = time.Hour // tests drive refreshes with Refresh
	}
	if cfg.MinRefresh == 0 {
		cfg.MinRefresh, cfg.MaxRefresh = time.Hour, time.Hour
	}
	r, err := federation.NewRefresher(cfg)
	require.NoError(t, err)
	for _, f := range before {
		f(r)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = r.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	return r
}

func refresh(t *testing.T, r *federation.Refresher, td spiffeid.TrustDomain) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// The refresher starts its workers once it sees leadership and the
	// relationship; until then Refresh reports that.
	var err error
	for ctx.Err() == nil {
		err = r.Refresh(ctx, td)
		if err == nil || (!errorIs(err, federation.ErrNotLeader) && !errorIs(err, federation.ErrNoRelationship)) {
			return err
		}
		time.Sleep(5 * time.Millisecond)
	}
	return err
}

// observed collects what a refresher reports through federation.Observe.
type observed struct {
	following chan struct{}
	stopped   chan string
}

// observe has the refresher report to o; pass it to startRefresher.
func (o *observed) observe(r *federation.Refresher) {
	o.following, o.stopped = make(chan struct{}, 64), make(chan string, 64)
	federation.Observe(r, func() { o.following <- struct{}{} }, func(td string) { o.stopped <- td })
}

// awaitFollowing waits until the refresher's Run waits for a leadership
// change without leading, every worker of an earlier leadership returned.
func (o *observed) awaitFollowing(t *testing.T) {
	t.Helper()
	select {
	case <-o.following:
	case <-time.After(10 * time.Second):
		t.Fatal("the refresher never settled as a follower")
	}
}

// awaitStopped waits until td's worker returns.
func (o *observed) awaitStopped(t *testing.T, td spiffeid.TrustDomain) {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		select {
		case got := <-o.stopped:
			if got == td.Name() {
				return
			}
		case <-deadline:
			t.Fatalf("the worker of %s never returned", td)
		}
	}
}

func heldSequence(c *fakeCluster, td spiffeid.TrustDomain) uint64 {
	return c.store.View().Bundle(td.Name()).GetSequenceNumber()
}

func TestRefresherHTTPSWeb(t *testing.T) {
	c := newFakeCluster(t)
	foreign := newCA(t, foreignTD.Name(), nopPublisher{}, time.Hour, nil)
	fe := startForeign(t, foreignTD.Name(), nil)
	fe.serve(spiffeBundle(t, foreign, 1, 10*time.Minute))
	putRelationship(c, &ferrypb.FederationRelationship{TrustDomain: foreignTD.Name(), BundleEndpointUrl: fe.srv.URL + "/bundle", Profile: federation.ProfileHTTPSWeb}, nil)

	reg := prometheus.NewRegistry()
	c.setLeader(true)
	r := startRefresher(t, c, federation.RefresherConfig{WebPKIRoots: fe.webRoots(), Metrics: reg})

	// A new leader fetches a relationship never refreshed at once.
	eventually(t, "first fetch committed", func() bool { return heldSequence(c, foreignTD) == 1 })
	held := c.store.View().Bundle(foreignTD.Name())
	want, err := ca.FromSPIFFEBundle(spiffeBundle(t, foreign, 1, 10*time.Minute))
	require.NoError(t, err)
	require.True(t, sameKeys(want, held))
	require.Equal(t, int64(600), held.RefreshHintSeconds)
	eventually(t, "status recorded", func() bool {
		rel := c.store.View().FederationRelationship(foreignTD.Name())
		return rel.LastRefresh > 0 && rel.LastError == ""
	})

	// The foreign CA rotates: the next bundle (higher sequence) replaces it.
	_, err = foreign.Prepare(context.Background(), ca.KindX509)
	require.NoError(t, err)
	fe.serve(spiffeBundle(t, foreign, 2, 10*time.Minute))
	require.NoError(t, refresh(t, r, foreignTD))
	require.Equal(t, uint64(2), heldSequence(c, foreignTD))
	require.Len(t, c.store.View().Bundle(foreignTD.Name()).X509Authorities, 2)

	// Fetching the same bundle again commits no bundle, only the status.
	before := c.store.View().Bundle(foreignTD.Name()).Revision
	require.NoError(t, refresh(t, r, foreignTD))
	require.Equal(t, before, c.store.View().Bundle(foreignTD.Name()).Revision)

	require.Equal(t, 3.0, metricValue(t, reg, "ferry_federation_bundle_refreshes_total", foreignTD.Name(), "success"))
	require.Equal(t, 2.0, metricValue(t, reg, "ferry_federation_bundle_sequence", foreignTD.Name()))
}

func TestRefresherHTTPSSPIFFE(t *testing.T) {
	c := newFakeCluster(t)
	foreign := newCA(t, foreignTD.Name(), nopPublisher{}, time.Hour, nil)
	fe := startForeign(t, foreignTD.Name(), serverCert(t, foreign))
	fe.serve(spiffeBundle(t, foreign, 5, time.Minute))

	// The operator's initial bundle authenticates the first fetch.
	initial, err := ca.FromSPIFFEBundle(spiffeBundle(t, foreign, 0, 0))
	require.NoError(t, err)
	rel := &ferrypb.FederationRelationship{TrustDomain: foreignTD.Name(), BundleEndpointUrl: fe.srv.URL, Profile: federation.ProfileHTTPSSPIFFE,
		EndpointSpiffeId: foreign.ServerID().String()}
	putRelationship(c, rel, initial)
	c.setLeader(true)
	r := startRefresher(t, c, federation.RefresherConfig{})
	require.NoError(t, refresh(t, r, foreignTD))
	require.Equal(t, uint64(5), heldSequence(c, foreignTD))

	// The foreign CA prepares a new authority and publishes it (sequence 6);
	// once it is active the endpoint's SVID comes from it. The bundle fetched
	// in between authenticates the endpoint.
	next, err := foreign.Prepare(context.Background(), ca.KindX509)
	require.NoError(t, err)
	fe.serve(spiffeBundle(t, foreign, 6, time.Minute))
	require.NoError(t, refresh(t, r, foreignTD))
	_, err = foreign.Activate(context.Background(), ca.KindX509, next.ID)
	require.NoError(t, err)
	fe.setCert(serverCert(t, foreign))
	require.NoError(t, refresh(t, r, foreignTD))
	require.Equal(t, uint64(6), heldSequence(c, foreignTD))

	// An endpoint presenting an SVID from a CA we do not hold is refused.
	impostor := newCA(t, foreignTD.Name(), nopPublisher{}, time.Hour, nil)
	fe.setCert(serverCert(t, impostor))
	fe.serve(spiffeBundle(t, impostor, 100, time.Minute))
	err = refresh(t, r, foreignTD)
	require.ErrorContains(t, err, "certificate")
	require.Equal(t, uint64(6), heldSequence(c, foreignTD), "the last good bundle is kept")

	// So is one whose SVID names another SPIFFE ID than the relationship's.
	fe.setCert(serverCert(t, foreign))
	rel.EndpointSpiffeId = "spiffe://foreign.org/someone/else"
	putRelationship(c, rel, nil)
	err = refresh(t, r, foreignTD)
	require.Error(t, err)
	require.Equal(t, uint64(6), heldSequence(c, foreignTD))
	require.Contains(t, c.store.View().FederationRelationship(foreignTD.Name()).LastError, "federation:")
}

func TestRefresherRefusesBadBundles(t *testing.T) {
	foreign := newCA(t, foreignTD.Name(), nopPublisher{}, time.Hour, nil)
	other := newCA(t, "other.org", nopPublisher{}, time.Hour, nil)
	closed, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	unreachable := "https://" + closed.Addr().String() + "/bundle"
	require.NoError(t, closed.Close())

	for _, tc := range []struct {
		name  string
		serve func(fe *foreignEndpoint)
		url   string
		want  string
	}{
		{name: "another trust domain's bundle", want: "trust domain other.org, not foreign.org",
			serve: func(fe *foreignEndpoint) { fe.serve(spiffeBundle(t, other, 9, time.Minute)) }},
		{name: "malformed JWKS", want: "unable to parse JWKS",
			serve: func(fe *foreignEndpoint) { fe.serveRaw([]byte(`{"keys": [{"kty": "EC", "use": "x509-svid"`)) }},
		{name: "not JSON at all", want: "unable to parse JWKS",
			serve: func(fe *foreignEndpoint) { fe.serveRaw([]byte("<html>gateway timeout</html>")) }},
		{name: "key without certificate", want: "federation:",
			serve: func(fe *foreignEndpoint) {
				fe.serveRaw([]byte(`{"keys":[{"kty":"EC","use":"x509-svid","crv":"P-256","x":"AA","y":"AA"}],"spiffe_sequence":9}`))
			}},
		{name: "no authorities", want: "has no authorities",
			serve: func(fe *foreignEndpoint) { fe.serveRaw([]byte(`{"keys":[],"spiffe_sequence":9}`)) }},
		{name: "lower sequence number", want: "sequence number 2: older than the held 3",
			serve: func(fe *foreignEndpoint) { fe.serve(spiffeBundle(t, foreign, 2, time.Minute)) }},
		{name: "same sequence number, other keys", want: "same as the held one but with different authorities",
			serve: func(fe *foreignEndpoint) {
				_, err := foreign.Prepare(context.Background(), ca.KindX509)
				require.NoError(t, err)
				fe.serve(spiffeBundle(t, foreign, 3, time.Minute))
			}},
		{name: "unreachable endpoint", url: unreachable, want: "could not GET bundle",
			serve: func(fe *foreignEndpoint) {}},
		{name: "an error status with a bundle as its body", want: "HTTP status 503",
			serve: func(fe *foreignEndpoint) {
				b, err := spiffeBundle(t, foreign, 9, time.Minute).Marshal()
				require.NoError(t, err)
				fe.serveStatus(http.StatusServiceUnavailable, b)
			}},
		{name: "a body larger than a bundle may be", want: "larger than 524288 bytes",
			serve: func(fe *foreignEndpoint) {
				fe.serveRaw([]byte(`{"keys":[` + strings.Repeat(`{"kty":"EC"},`, 50000) + `{}]}`))
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newFakeCluster(t)
			fe := startForeign(t, foreignTD.Name(), nil)
			good := spiffeBundle(t, foreign, 3, time.Minute)
			fe.serve(good)
			rel := &ferrypb.FederationRelationship{TrustDomain: foreignTD.Name(), BundleEndpointUrl: fe.srv.URL, Profile: federation.ProfileHTTPSWeb}
			putRelationship(c, rel, nil)
			reg := prometheus.NewRegistry()
			c.setLeader(true)
			r := startRefresher(t, c, federation.RefresherConfig{WebPKIRoots: fe.webRoots(), Metrics: reg})
			require.NoError(t, refresh(t, r, foreignTD))
			kept := proto.Clone(c.store.View().Bundle(foreignTD.Name()))

			tc.serve(fe)
			if tc.url != "" {
				rel.BundleEndpointUrl = tc.url
				putRelationship(c, rel, nil)
			}
			err := refresh(t, r, foreignTD)
			require.ErrorContains(t, err, tc.want)
			require.True(t, proto.Equal(kept, c.store.View().Bundle(foreignTD.Name())), "the last good bundle is kept")
			got := c.store.View().FederationRelationship(foreignTD.Name())
			require.Contains(t, got.LastError, tc.want)
			require.NotZero(t, got.LastRefresh)
			// A changed endpoint URL is fetched at once too: one failure or two.
			require.GreaterOrEqual(t, metricValue(t, reg, "ferry_federation_bundle_refreshes_total", foreignTD.Name(), "failure"), 1.0)

			// The endpoint recovers: the error clears.
			fe.serve(spiffeBundle(t, foreign, 4, time.Minute))
			rel.BundleEndpointUrl = fe.srv.URL
			putRelationship(c, rel, nil)
			require.NoError(t, refresh(t, r, foreignTD))
			require.Empty(t, c.store.View().FederationRelationship(foreignTD.Name()).LastError)
			require.Equal(t, uint64(4), heldSequence(c, foreignTD))
		})
	}
}

func TestRefresherOnlyOnLeader(t *testing.T) {
	c := newFakeCluster(t)
	foreign := newCA(t, foreignTD.Name(), nopPublisher{}, time.Hour, nil)
	fe := startForeign(t, foreignTD.Name(), nil)
	fe.serve(spiffeBundle(t, foreign, 1, time.Minute))
	putRelationship(c, &ferrypb.FederationRelationship{TrustDomain: foreignTD.Name(), BundleEndpointUrl: fe.srv.URL, Profile: federation.ProfileHTTPSWeb}, nil)
	var o observed
	r := startRefresher(t, c, federation.RefresherConfig{WebPKIRoots: fe.webRoots()}, o.observe)

	// Run settles as a follower: it started no worker, so nothing fetches.
	o.awaitFollowing(t)
	require.ErrorIs(t, r.Refresh(context.Background(), foreignTD), federation.ErrNotLeader)
	require.Zero(t, fe.hits.Load(), "a follower fetches nothing")

	c.setLeader(true)
	eventually(t, "the leader fetches", func() bool { return heldSequence(c, foreignTD) == 1 })
	require.ErrorIs(t, r.Refresh(context.Background(), spiffeid.RequireTrustDomainFromString("unknown.org")), federation.ErrNoRelationship)

	// Leadership lost and heard of: every worker returns before Run
	// follows again.
	c.setLeader(false)
	o.awaitFollowing(t)
	o.awaitStopped(t, foreignTD)
	require.ErrorIs(t, r.Refresh(context.Background(), foreignTD), federation.ErrNotLeader)

	// Leadership lost but not yet heard of: a fetch still runs, but neither
	// its bundle (a new one) nor its status (the same one again) is
	// committed under the stale token.
	for _, seq := range []uint64{1, 2} {
		c.setLeader(true)
		require.NoError(t, refresh(t, r, foreignTD))
		n := c.commands()
		fe.serve(spiffeBundle(t, foreign, seq, time.Minute))
		c.fence()
		hits := fe.hits.Load()
		require.ErrorIs(t, r.Refresh(context.Background(), foreignTD), federation.ErrNotLeader)
		require.Equal(t, hits+1, fe.hits.Load(), "the fetch ran")
		require.Equal(t, n, c.commands(), "nothing is committed after leadership is lost (bundle sequence %d)", seq)
		require.Equal(t, uint64(1), heldSequence(c, foreignTD))
		o.awaitStopped(t, foreignTD)
	}

	// A new leadership picks up where the last one stopped.
	c.setLeader(true)
	require.NoError(t, refresh(t, r, foreignTD))
	require.Equal(t, uint64(2), heldSequence(c, foreignTD))
}

func TestRefresherSchedule(t *testing.T) {
	c := newFakeCluster(t)
	foreign := newCA(t, foreignTD.Name(), nopPublisher{}, time.Hour, nil)
	fe := startForeign(t, foreignTD.Name(), nil)
	fe.serve(spiffeBundle(t, foreign, 1, time.Second))
	rel := &ferrypb.FederationRelationship{TrustDomain: foreignTD.Name(), BundleEndpointUrl: fe.srv.URL, Profile: federation.ProfileHTTPSWeb}
	putRelationship(c, rel, nil)
	c.setLeader(true)
	// The served hint (1 s) is clamped to the bounds: every 20 ms here.
	var o observed
	r := startRefresher(t, c, federation.RefresherConfig{WebPKIRoots: fe.webRoots(), MinRefresh: 10 * time.Millisecond, MaxRefresh: 20 * time.Millisecond, RetryBackoff: time.Millisecond}, o.observe)
	eventually(t, "refreshes repeat at the hint", func() bool { return fe.hits.Load() >= 5 })

	// A failing endpoint is retried with backoff, and recovers.
	fe.serveRaw([]byte("{"))
	h := fe.hits.Load()
	eventually(t, "retries", func() bool { return fe.hits.Load() >= h+3 })
	eventually(t, "failure recorded", func() bool { return c.store.View().FederationRelationship(foreignTD.Name()).LastError != "" })
	fe.serve(spiffeBundle(t, foreign, 2, time.Second))
	eventually(t, "recovered", func() bool { return heldSequence(c, foreignTD) == 2 })

	// Deleting the relationship stops its refreshes.
	c.must(&ferrypb.Command{Op: &ferrypb.Command_FederationDelete{FederationDelete: &ferrypb.FederationDelete{TrustDomain: foreignTD.Name()}}})
	o.awaitStopped(t, foreignTD)
	require.ErrorIs(t, r.Refresh(context.Background(), foreignTD), federation.ErrNoRelationship)
	require.NotNil(t, c.store.View().Bundle(foreignTD.Name()), "the bundle stays until deleted")
}

func TestCheckBundle(t *testing.T) {
	foreign := newCA(t, foreignTD.Name(), nopPublisher{}, time.Hour, nil)
	require.NoError(t, federation.CheckBundle(foreignTD, spiffeBundle(t, foreign, 1, 0)))
	require.ErrorContains(t, federation.CheckBundle(ourTD, spiffeBundle(t, foreign, 1, 0)), "not ours.org")
	// A leaf certificate is no authority.
	leaf := serverCert(t, foreign).Leaf
	b := spiffeBundle(t, foreign, 1, 0)
	b.AddX509Authority(leaf)
	require.ErrorContains(t, federation.CheckBundle(foreignTD, b), "not a CA")
}

func sameKeys(a, b *ferrypb.Bundle) bool {
	a, b = proto.Clone(a).(*ferrypb.Bundle), proto.Clone(b).(*ferrypb.Bundle)
	for _, x := range []*ferrypb.Bundle{a, b} {
		x.Revision, x.SequenceNumber, x.RefreshHintSeconds = 0, 0, 0
		for _, k := range x.JwtAuthorities {
			k.ExpiresAt = 0
		}
	}
	return proto.Equal(a, b)
}

func errorIs(err, target error) bool { return errors.Is(err, target) }

// metricValue is the value of the series of a metric family with exactly
// the given label values (in any order), or -1 when there is none.
func metricValue(t *testing.T, reg *prometheus.Registry, name string, labels ...string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	require.NoError(t, err)
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	series:
		for _, m := range mf.GetMetric() {
			if len(m.GetLabel()) != len(labels) {
				continue
			}
			for _, l := range m.GetLabel() {
				if !slices.Contains(labels, l.GetValue()) {
					continue series
				}
			}
			if m.GetCounter() != nil {
				return m.GetCounter().GetValue()
			}
			return m.GetGauge().GetValue()
		}
	}
	return -1
}

// TestRefresherHonoursHintOnEveryFetch: the peer's refresh hint sets the next
// refresh on every fetch, also when the bundle is the one already held (an
// operator's bootstrap copy carries no hint), within the documented bounds;
// the relationship records the hint served and when the next fetch is due.
func TestRefresherHonoursHintOnEveryFetch(t *testing.T) {
	c := newFakeCluster(t)
	foreign := newCA(t, foreignTD.Name(), nopPublisher{}, time.Hour, nil)
	fe := startForeign(t, foreignTD.Name(), nil)
	fe.serve(spiffeBundle(t, foreign, 3, 20*time.Second))
	// The operator bootstrapped the very bundle the endpoint serves, without
	// a hint.
	initial, err := ca.FromSPIFFEBundle(spiffeBundle(t, foreign, 3, 0))
	require.NoError(t, err)
	putRelationship(c, &ferrypb.FederationRelationship{TrustDomain: foreignTD.Name(), BundleEndpointUrl: fe.srv.URL, Profile: federation.ProfileHTTPSWeb}, initial)
	bootstrapped := c.store.View().Bundle(foreignTD.Name()).Revision
	now := time.Unix(1_800_000_000, 0)
	c.setLeader(true)
	r := startRefresher(t, c, federation.RefresherConfig{WebPKIRoots: fe.webRoots(), Now: func() time.Time { return now },
		MinRefresh: federation.DefaultMinRefresh, MaxRefresh: federation.DefaultMaxRefresh})

	next := func(hint time.Duration) time.Duration {
		t.Helper()
		fe.serve(spiffeBundle(t, foreign, 3, hint))
		require.NoError(t, refresh(t, r, foreignTD))
		rel := c.store.View().FederationRelationship(foreignTD.Name())
		require.Empty(t, rel.LastError)
		require.Equal(t, now.Unix(), rel.LastRefresh)
		require.Equal(t, int64(hint/time.Second), rel.RefreshHintSeconds, "the hint served is recorded")
		require.Equal(t, bootstrapped, c.store.View().Bundle(foreignTD.Name()).Revision, "an unchanged bundle is not committed again")
		return time.Unix(rel.NextRefresh, 0).Sub(now)
	}
	require.Equal(t, 20*time.Second, next(20*time.Second), "the served hint, though the bundle did not change")
	require.Equal(t, federation.DefaultMinRefresh, next(time.Second), "no faster than the floor")
	require.Equal(t, federation.DefaultMaxRefresh, next(48*time.Hour), "no slower than the ceiling")
	require.Equal(t, federation.DefaultRefreshHint, next(0), "no hint: the default")
}
