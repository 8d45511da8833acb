package spire_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/test/rotation"
)

// stepTimeout bounds how long one rotation step may take to reach the other
// side: a bundle refresh (at most 15 s either way with these hints), an
// agent sync, and the expiry of 30 s JWT-SVIDs.
const stepTimeout = 3 * time.Minute

// TestSPIREFederation federates ferry with SPIRE both ways, once with ferry's
// bundle endpoint on https_spiffe and SPIRE's on https_web and once the other
// way round; in each, go-spiffe workloads of both trust domains call each
// other over mutual TLS and with JWT-SVIDs while ferry, then SPIRE, rotates
// its X.509 and JWT authorities (prepare, activate, taint, revoke). Not one
// call and not one bundle fetch may fail from the first prepare on; the time
// each step takes to reach the other side is logged.
func TestSPIREFederation(t *testing.T) {
	for _, tc := range []struct{ ferry, spire string }{
		{ferry: httpsSPIFFE, spire: httpsWeb},
		{ferry: httpsWeb, spire: httpsSPIFFE},
	} {
		short := func(p string) string { return strings.TrimPrefix(p, "https_") }
		t.Run("ferry_"+short(tc.ferry)+"_spire_"+short(tc.spire), func(t *testing.T) {
			t.Parallel()
			federateAndRotate(t, tc.ferry, tc.spire)
		})
	}
}

func federateAndRotate(t *testing.T, ferryProfile, spireProfile string) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	web := newWebPKI(t)
	f := startFerry(t, ferryProfile, web)
	s := startSPIRE(t, spireProfile, web)
	uid := os.Getuid()

	// ferry follows SPIRE's bundle endpoint. https_spiffe needs SPIRE's
	// bundle to authenticate it; https_web trusts the web PKI.
	create := []string{"federation", "create", "--trust-domain", "spire.test", "--bundle-endpoint-url", s.endpoint,
		"--bundle-endpoint-profile", spireProfile}
	if spireProfile == httpsSPIFFE {
		bundle := filepath.Join(f.dir, "spire-bundle.json")
		require.NoError(t, os.WriteFile(bundle, []byte(s.must(t, "bundle", "show", "-format", "spiffe")), 0o644))
		create = append(create, "--endpoint-spiffe-id", "spiffe://spire.test/spire/server",
			"--trust-domain-bundle-path", bundle, "--trust-domain-bundle-format", "spiffe")
	}
	f.must(t, create...)
	out := f.must(t, "federation", "refresh", "--trust-domain", "spire.test")
	require.Contains(t, out, "Status:\t\t\tok", out)

	// SPIRE follows ferry's, with ferry's bundle to start from.
	ferryBundle := filepath.Join(s.dir, "ferry-bundle.json")
	require.NoError(t, os.WriteFile(ferryBundle, []byte(f.must(t, "bundle", "show", "--format", "spiffe")), 0o644))
	screate := []string{"federation", "create", "-trustDomain", "ferry.test", "-bundleEndpointURL", f.endpoint,
		"-bundleEndpointProfile", ferryProfile, "-trustDomainBundlePath", ferryBundle, "-trustDomainBundleFormat", "spiffe"}
	if ferryProfile == httpsSPIFFE {
		screate = append(screate, "-endpointSpiffeID", "spiffe://ferry.test/spire/server")
	}
	s.must(t, screate...)
	s.must(t, "federation", "refresh", "-id", "spiffe://ferry.test")

	// One workload on each side, federating with the other.
	ferryID := spiffeid.RequireFromString("spiffe://ferry.test/wl")
	spireID := spiffeid.RequireFromString("spiffe://spire.test/wl")
	f.must(t, "entry", "create", "--entry-id", "wl", "--spiffe-id", ferryID.String(), "--parent-id", f.agentID,
		"--selector", fmt.Sprintf("unix:uid:%d", uid), "--federates-with", "spire.test")
	s.must(t, "entry", "create", "-parentID", s.agentID, "-spiffeID", spireID.String(),
		"-selector", fmt.Sprintf("unix:uid:%d", uid), "-federatesWith", "spiffe://ferry.test")
	wf, err := rotation.NewWorkload(waitCtx(t, 2*time.Minute), "unix://"+f.agentSck, ferryID, s.td)
	require.NoError(t, err, "the ferry workload")
	t.Cleanup(wf.Close)
	ws, err := rotation.NewWorkload(waitCtx(t, 2*time.Minute), "unix://"+s.agentSck, spireID, f.td)
	require.NoError(t, err, "the SPIRE workload")
	t.Cleanup(ws.Close)

	probe := rotation.Start(ctx, wf, ws)
	require.NoError(t, probe.Arm(2*time.Minute), "steady state: mTLS and JWT-SVIDs both ways")
	armed := time.Now()
	var steps rotation.Steps
	rotateFerry(t, f, s, ws, probe, &steps)
	rotateSPIRE(t, s, f, wf, probe, &steps)
	rounds, failures := probe.Finish()
	t.Logf("ferry's bundle endpoint %s, SPIRE's %s: propagation of each step to the other side (%d rounds of calls):\n%s",
		ferryProfile, spireProfile, rounds, steps.Table())
	require.Empty(t, failures, "calls failed during the rotations:\n%s", strings.Join(failures, "\n"))
	require.Empty(t, s.refreshFailures("ferry.test", armed), "SPIRE failed to fetch ferry's bundle")
	require.Empty(t, f.refreshFailures(armed), "ferry failed to fetch SPIRE's bundle")
}

// rotateFerry takes ferry's X.509 and JWT authorities through prepare,
// activate, taint and revoke, each step timed until SPIRE's side shows it.
func rotateFerry(t *testing.T, f *ferryDomain, s *spireDomain, ws *rotation.Workload, probe *rotation.Probe, steps *rotation.Steps) {
	const td = "ferry.test"
	oldX, oldJ := f.authority(t, "x509", "active"), f.authority(t, "jwt", "active")
	usedKid := func(since time.Time, kid string) func() bool {
		return func() bool { return probe.SawAfter(since, func(r rotation.Round) bool { return r.Kid[td] == kid }) }
	}

	start := time.Now()
	newX, newJ := f.op(t, "x509", "prepare", ""), f.op(t, "jwt", "prepare", "")
	steps.Wait(t, start, stepTimeout,
		rotation.Check{Name: "ferry x509 prepare: SPIRE's workload holds the new CA", OK: func() bool { return ws.HoldsX509(f.td, newX) }},
		rotation.Check{Name: "ferry jwt prepare: SPIRE's workload holds the new key", OK: func() bool { return ws.HoldsJWT(f.td, newJ) }})

	start = time.Now()
	f.op(t, "x509", "activate", newX)
	f.op(t, "jwt", "activate", newJ)
	steps.Wait(t, start, stepTimeout,
		rotation.Check{Name: "ferry x509 activate: SPIRE fetched the bundle from the re-signed endpoint", OK: func() bool { return s.polledAfter(td, start) }},
		rotation.Check{Name: "ferry jwt activate: SPIRE's workload validated a JWT-SVID of the new key", OK: usedKid(start, newJ)})

	start = time.Now()
	f.op(t, "x509", "taint", oldX)
	f.op(t, "jwt", "taint", oldJ)
	steps.Wait(t, start, stepTimeout,
		rotation.Check{Name: "ferry x509 taint: SPIRE's workload accepted an SVID of the new CA", OK: func() bool {
			return probe.SawAfter(start, func(r rotation.Round) bool { return r.SVID[td] == newX })
		}},
		rotation.Check{Name: "ferry x509 taint: no ferry agent holds an SVID of the old CA", OK: func() bool { return f.heldBy(t, "x509", oldX) == 0 }},
		rotation.Check{Name: "ferry jwt taint: SPIRE's workload validated a fresh JWT-SVID of the new key", OK: usedKid(start, newJ)},
		rotation.Check{Name: "ferry jwt taint: every JWT-SVID of the old key expired", OK: func() bool { return f.heldBy(t, "jwt", oldJ) == 0 }})

	start = time.Now()
	f.op(t, "x509", "revoke", oldX)
	f.op(t, "jwt", "revoke", oldJ)
	steps.Wait(t, start, stepTimeout,
		rotation.Check{Name: "ferry x509 revoke: SPIRE's workload no longer trusts the old CA", OK: func() bool { return !ws.HoldsX509(f.td, oldX) }},
		rotation.Check{Name: "ferry jwt revoke: SPIRE's workload no longer holds the old key", OK: func() bool { return !ws.HoldsJWT(f.td, oldJ) }},
		rotation.Check{Name: "ferry revoke: SPIRE fetched the bundle again", OK: func() bool { return s.polledAfter(td, start) }})
}

// rotateSPIRE does the same with SPIRE's authorities, timed until ferry's
// side shows each step.
func rotateSPIRE(t *testing.T, s *spireDomain, f *ferryDomain, wf *rotation.Workload, probe *rotation.Probe, steps *rotation.Steps) {
	const td = "spire.test"
	oldX, _, _ := s.authorities(t, "x509")
	oldJ, _, _ := s.authorities(t, "jwt")
	usedKid := func(since time.Time, kid string) func() bool {
		return func() bool { return probe.SawAfter(since, func(r rotation.Round) bool { return r.Kid[td] == kid }) }
	}

	start := time.Now()
	s.op(t, "x509", "prepare", "")
	s.op(t, "jwt", "prepare", "")
	_, newX, _ := s.authorities(t, "x509")
	_, newJ, _ := s.authorities(t, "jwt")
	require.NotEmpty(t, newX)
	require.NotEmpty(t, newJ)
	steps.Wait(t, start, stepTimeout,
		rotation.Check{Name: "SPIRE x509 prepare: ferry's workload holds the new CA", OK: func() bool { return wf.HoldsX509(s.td, newX) }},
		rotation.Check{Name: "SPIRE jwt prepare: ferry's workload holds the new key", OK: func() bool { return wf.HoldsJWT(s.td, newJ) }})

	start = time.Now()
	s.op(t, "x509", "activate", newX)
	s.op(t, "jwt", "activate", newJ)
	steps.Wait(t, start, stepTimeout,
		rotation.Check{Name: "SPIRE x509 activate: ferry fetched the bundle from the endpoint", OK: func() bool { return f.lastRefresh(t, td).After(start) }},
		rotation.Check{Name: "SPIRE jwt activate: ferry's workload validated a JWT-SVID of the new key", OK: usedKid(start, newJ)})

	start = time.Now()
	s.op(t, "x509", "taint", oldX)
	s.op(t, "jwt", "taint", oldJ)
	steps.Wait(t, start, stepTimeout,
		rotation.Check{Name: "SPIRE x509 taint: ferry's workload accepted an SVID of the new CA", OK: func() bool {
			return probe.SawAfter(start, func(r rotation.Round) bool { return strings.EqualFold(r.SVID[td], newX) })
		}},
		rotation.Check{Name: "SPIRE x509 taint: the SPIRE agent's own SVID is of the new CA", OK: func() bool {
			return strings.EqualFold(s.agentSVIDAuthority(), newX)
		}},
		rotation.Check{Name: "SPIRE jwt taint: ferry's workload validated a fresh JWT-SVID of the new key", OK: usedKid(start, newJ)})

	start = time.Now()
	s.op(t, "x509", "revoke", oldX)
	s.op(t, "jwt", "revoke", oldJ)
	steps.Wait(t, start, stepTimeout,
		rotation.Check{Name: "SPIRE x509 revoke: ferry's workload no longer trusts the old CA", OK: func() bool { return !wf.HoldsX509(s.td, oldX) }},
		rotation.Check{Name: "SPIRE jwt revoke: ferry's workload no longer holds the old key", OK: func() bool { return !wf.HoldsJWT(s.td, oldJ) }},
		rotation.Check{Name: "SPIRE revoke: ferry fetched the bundle again", OK: func() bool { return f.lastRefresh(t, td).After(start) }})
}
