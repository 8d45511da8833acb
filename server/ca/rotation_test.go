package ca_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/server/ca"
)

// signNow signs one X509-SVID and one JWT-SVID and checks that the
// publisher had seen both signing keys first. It returns the X.509 chain
// and the JWT key ID used.
func signNow(t *testing.T, e *env) ([]*x509.Certificate, string) {
	t.Helper()
	chain, err := e.ca.SignWorkloadX509SVID(makeCSR(t, ecKey(t)), wid("/web"), nil, 0)
	require.NoError(t, err)
	issuer := issuerOf(t, e, chain[0])
	published, _ := e.pub.hasX509(issuer.Certificate)
	require.True(t, published, "X.509 authority %s signed before it was published", issuer.ID)

	svid, err := e.ca.MintJWTSVID(wid("/web"), []string{"aud"}, 0, nil)
	require.NoError(t, err)
	require.NotNil(t, e.pub.hasJWT(svid.KeyID), "JWT key %s signed before it was published", svid.KeyID)
	require.Equal(t, svid.KeyID, decodeSegment(t, strings.Split(svid.Token, ".")[0])["kid"])
	return chain, svid.KeyID
}

func issuerOf(t *testing.T, e *env, leaf *x509.Certificate) ca.Authority {
	t.Helper()
	for _, a := range e.ca.List(ca.KindX509) {
		if bytes.Equal(a.Certificate.SubjectKeyId, leaf.AuthorityKeyId) {
			return a
		}
	}
	t.Fatalf("no authority issued %s", leaf.Subject)
	return ca.Authority{}
}

func ids(as []ca.Authority) []string {
	var out []string
	for _, a := range as {
		out = append(out, a.ID)
	}
	return out
}

func TestRotationTimeline(t *testing.T) {
	ctx := context.Background()
	e := newReadyEnv(t, nil)
	lifetime := ca.DefaultCATTL

	first := map[ca.Kind]ca.Authority{}
	for _, k := range []ca.Kind{ca.KindX509, ca.KindJWT} {
		first[k] = e.active(t, k)
		assert.Equal(t, t0, first[k].IssuedAt)
		assert.Equal(t, t0.Add(lifetime), first[k].NotAfter)
		assert.True(t, first[k].Published)
	}
	chain, kid := signNow(t, e)
	assert.Equal(t, first[ca.KindX509].ID, issuerOf(t, e, chain[0]).ID)
	assert.Equal(t, first[ca.KindJWT].ID, kid)

	// Just before half-life: nothing prepared.
	e.clock.Set(t0.Add(lifetime/2 - time.Second))
	require.NoError(t, e.ca.Rotate(ctx))
	for _, k := range []ca.Kind{ca.KindX509, ca.KindJWT} {
		assert.Empty(t, e.withStatus(k, ca.StatusPrepared), k)
	}

	// At half-life: the next authority is prepared and already published,
	// but the current one keeps signing.
	e.clock.Set(t0.Add(lifetime / 2))
	require.NoError(t, e.ca.Rotate(ctx))
	next := map[ca.Kind]ca.Authority{}
	for _, k := range []ca.Kind{ca.KindX509, ca.KindJWT} {
		p := e.withStatus(k, ca.StatusPrepared)
		require.Len(t, p, 1, k)
		next[k] = p[0]
		assert.True(t, next[k].Published, k)
		assert.Equal(t, e.clock.Now(), next[k].IssuedAt)
		assert.Equal(t, first[k].ID, e.active(t, k).ID)
	}
	published, _ := e.pub.hasX509(next[ca.KindX509].Certificate)
	assert.True(t, published, "prepared X.509 authority published at preparation")
	assert.NotNil(t, e.pub.hasJWT(next[ca.KindJWT].ID), "prepared JWT key published at preparation")
	chain, kid = signNow(t, e)
	assert.Equal(t, first[ca.KindX509].ID, issuerOf(t, e, chain[0]).ID)
	assert.Equal(t, first[ca.KindJWT].ID, kid)

	// Just before 5/6 of the lifetime: still the first authority. The
	// SVID signed now is the last one it signs.
	activateAt := t0.Add(lifetime - lifetime/6)
	e.clock.Set(activateAt.Add(-time.Second))
	require.NoError(t, e.ca.Rotate(ctx))
	lastChain, kid := signNow(t, e)
	assert.Equal(t, first[ca.KindX509].ID, issuerOf(t, e, lastChain[0]).ID)
	assert.Equal(t, first[ca.KindJWT].ID, kid)

	// At 5/6: the prepared authority takes over; the first one is old.
	e.clock.Set(activateAt)
	require.NoError(t, e.ca.Rotate(ctx))
	for _, k := range []ca.Kind{ca.KindX509, ca.KindJWT} {
		assert.Equal(t, next[k].ID, e.active(t, k).ID, k)
		assert.Equal(t, []string{first[k].ID}, ids(e.withStatus(k, ca.StatusOld)), k)
	}
	chain, kid = signNow(t, e)
	assert.Equal(t, next[ca.KindX509].ID, issuerOf(t, e, chain[0]).ID)
	assert.Equal(t, next[ca.KindJWT].ID, kid)

	// The old authority stays published while what it signed is valid:
	// its last SVID still verifies against the bundle until it expires.
	lastExpiry := lastChain[0].NotAfter
	e.clock.Set(lastExpiry.Add(-time.Second))
	require.NoError(t, e.ca.Rotate(ctx))
	bundle, err := ca.ToX509Bundle(e.pub.bundle())
	require.NoError(t, err)
	_, _, err = x509svid.Verify(lastChain, bundle, x509svid.WithTime(e.clock.Now()))
	require.NoError(t, err)
	assert.Empty(t, e.ca.Expired(e.clock.Now()))
	assert.Empty(t, e.ca.Expired(first[ca.KindX509].NotAfter.Add(-time.Second)))

	// Once the old authority's lifetime is over, it is reported expired...
	expired := e.ca.Expired(first[ca.KindX509].NotAfter)
	assert.ElementsMatch(t, []string{first[ca.KindX509].ID, first[ca.KindJWT].ID}, ids(expired))
	// ...and pruned from the bundle and the disk PruneAfter later.
	e.clock.Set(first[ca.KindX509].NotAfter.Add(ca.DefaultPruneAfter - time.Second))
	require.NoError(t, e.ca.Rotate(ctx))
	published, _ = e.pub.hasX509(first[ca.KindX509].Certificate)
	assert.True(t, published)
	e.clock.Set(first[ca.KindX509].NotAfter.Add(ca.DefaultPruneAfter))
	require.NoError(t, e.ca.Rotate(ctx))
	published, _ = e.pub.hasX509(first[ca.KindX509].Certificate)
	assert.False(t, published, "pruned from the bundle")
	assert.Nil(t, e.pub.hasJWT(first[ca.KindJWT].ID))
	for _, a := range e.ca.List("") {
		assert.NotEqual(t, first[a.Kind].ID, a.ID, "pruned from state")
	}
	_, err = os.Stat(filepath.Join(e.cfg.DataDir, "x509-"+first[ca.KindX509].ID+".key"))
	assert.ErrorIs(t, err, os.ErrNotExist, "key deleted")
	_, err = os.Stat(filepath.Join(e.cfg.DataDir, "jwt-"+first[ca.KindJWT].ID+".key"))
	assert.ErrorIs(t, err, os.ErrNotExist, "key deleted")
}

func TestRotationAfterLongOutage(t *testing.T) {
	e := newReadyEnv(t, nil)
	old := e.active(t, ca.KindX509)
	// The node was down past the end of its authority: Rotate must bring
	// up a fresh, published one at once.
	e.clock.Set(old.NotAfter.Add(time.Hour))
	_, err := e.ca.SignWorkloadX509SVID(makeCSR(t, ecKey(t)), wid("/web"), nil, 0)
	require.ErrorIs(t, err, ca.ErrNoAuthority, "no signing with an expired CA")
	require.NoError(t, e.ca.Rotate(context.Background()))
	cur := e.active(t, ca.KindX509)
	assert.NotEqual(t, old.ID, cur.ID)
	assert.Equal(t, e.clock.Now(), cur.IssuedAt)
	signNow(t, e)
}

func TestNothingSignsBeforePublished(t *testing.T) {
	e := newEnv(t, nil)
	e.pub.block = make(chan struct{})
	e.pub.entered = make(chan string, 16)
	done := make(chan error, 1)
	go func() { done <- e.ca.Rotate(context.Background()) }()

	assert.Equal(t, "publish-x509", <-e.pub.entered)
	// The key exists on disk, but its publication has not returned.
	assert.Len(t, e.ca.List(ca.KindX509), 1)
	_, err := e.ca.SignWorkloadX509SVID(makeCSR(t, ecKey(t)), wid("/web"), nil, 0)
	require.ErrorIs(t, err, ca.ErrNoAuthority)
	_, err = e.ca.MintJWTSVID(wid("/web"), []string{"a"}, 0, nil)
	require.ErrorIs(t, err, ca.ErrNoAuthority)

	close(e.pub.block)
	require.NoError(t, <-done)
	signNow(t, e)
}

func TestPublishFailureKeepsPreparedKeyAcrossRestart(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, nil)
	e.pub.setFail(true)
	err := e.ca.Rotate(ctx)
	require.ErrorIs(t, err, errPB)
	_, err = e.ca.SignWorkloadX509SVID(makeCSR(t, ecKey(t)), wid("/web"), nil, 0)
	require.ErrorIs(t, err, ca.ErrNoAuthority)
	prepared := e.withStatus(ca.KindX509, ca.StatusPrepared)
	require.Len(t, prepared, 1)
	assert.False(t, prepared[0].Published)

	e.reopen(t)
	again := e.withStatus(ca.KindX509, ca.StatusPrepared)
	require.Len(t, again, 1)
	assert.Equal(t, prepared[0].ID, again[0].ID, "restart keeps the unpublished key")
	require.ErrorIs(t, e.ca.Rotate(ctx), errPB, "still no activation while the publisher fails")
	assert.Empty(t, e.withStatus(ca.KindX509, ca.StatusActive))

	e.pub.setFail(false)
	require.NoError(t, e.ca.Rotate(ctx))
	assert.Equal(t, prepared[0].ID, e.active(t, ca.KindX509).ID, "the same key, published, then activated")
	assert.Len(t, e.ca.List(ca.KindX509), 1)
	signNow(t, e)
}

func TestRestartReloadsWithoutRekeying(t *testing.T) {
	ctx := context.Background()
	e := newReadyEnv(t, nil)
	e.clock.Set(t0.Add(13 * time.Hour))
	require.NoError(t, e.ca.Rotate(ctx)) // prepares the next authorities
	before := e.ca.List("")
	require.Len(t, before, 4)
	chainBefore, kidBefore := signNow(t, e)
	xb, jb := e.pub.counts()

	e.reopen(t)
	after := e.ca.List("")
	require.Len(t, after, len(before))
	for i := range before {
		assert.Equal(t, before[i].ID, after[i].ID)
		assert.Equal(t, before[i].Status, after[i].Status)
		assert.Equal(t, before[i].IssuedAt.UTC(), after[i].IssuedAt.UTC())
		assert.Equal(t, before[i].NotAfter.UTC(), after[i].NotAfter.UTC())
		assert.True(t, before[i].PublicKey.(interface{ Equal(crypto.PublicKey) bool }).Equal(after[i].PublicKey))
	}
	// Signing works at once after a restart, with the same keys.
	chain, kid := signNow(t, e)
	assert.Equal(t, chainBefore[0].AuthorityKeyId, chain[0].AuthorityKeyId)
	assert.Equal(t, kidBefore, kid)
	require.NoError(t, e.ca.Rotate(ctx))
	assert.Len(t, e.ca.List(""), len(before), "no new keys after restart")
	xa, ja := e.pub.counts()
	assert.Equal(t, xb, xa)
	assert.Equal(t, jb, ja)

	// The prepared authority survives the restart and activates on time.
	e.clock.Set(t0.Add(20 * time.Hour))
	require.NoError(t, e.ca.Rotate(ctx))
	for _, k := range []ca.Kind{ca.KindX509, ca.KindJWT} {
		var prepared string
		for _, a := range before {
			if a.Kind == k && a.Status == ca.StatusPrepared {
				prepared = a.ID
			}
		}
		assert.Equal(t, prepared, e.active(t, k).ID)
	}
}

func TestRestartWithOtherJWTAlgorithmRetiresKey(t *testing.T) {
	e := newReadyEnv(t, nil)
	es := e.active(t, ca.KindJWT)
	e.cfg.JWTAlgorithm = ca.RS256
	e.reopen(t)
	require.NoError(t, e.ca.Rotate(context.Background()))
	rs := e.active(t, ca.KindJWT)
	assert.NotEqual(t, es.ID, rs.ID)
	assert.Equal(t, []string{es.ID}, ids(e.withStatus(ca.KindJWT, ca.StatusOld)))
	assert.Equal(t, ca.RS256, e.ca.JWTAlgorithm())
	svid, err := e.ca.MintJWTSVID(wid("/web"), []string{"a"}, 0, nil)
	require.NoError(t, err)
	assert.Equal(t, "RS256", decodeSegment(t, strings.Split(svid.Token, ".")[0])["alg"])
}

func TestNewRejectsOtherTrustDomainDataDir(t *testing.T) {
	e := newReadyEnv(t, nil)
	cfg := e.cfg
	cfg.TrustDomain = td2
	_, err := ca.New(cfg)
	require.ErrorContains(t, err, "belongs to trust domain")
}

func TestRunRotatesUntilCancelled(t *testing.T) {
	e := newEnv(t, func(c *ca.Config) { c.RotateInterval = time.Millisecond })
	e.pub.entered = make(chan string, 64)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- e.ca.Run(ctx) }()
	<-e.pub.entered
	<-e.pub.entered // x509 and jwt published by the first tick
	require.Eventually(t, func() bool { return len(e.withStatus(ca.KindJWT, ca.StatusActive)) == 1 },
		5*time.Second, time.Millisecond)
	cancel()
	require.NoError(t, <-done)
}

// TestSigningDuringRotation signs from several goroutines while the
// authorities rotate underneath; every SVID must verify against what the
// publisher held right after it was signed.
func TestSigningDuringRotation(t *testing.T) {
	ctx := context.Background()
	e := newReadyEnv(t, func(c *ca.Config) { c.Logger = nil })
	stop := make(chan struct{})
	errs := make(chan error, 4)
	csr := makeCSR(t, ecKey(t))
	for range 2 {
		go func() {
			for {
				select {
				case <-stop:
					errs <- nil
					return
				default:
				}
				chain, err := e.ca.SignWorkloadX509SVID(csr, wid("/web"), nil, time.Minute)
				if err != nil {
					errs <- err
					return
				}
				bundle, err := ca.ToX509Bundle(e.pub.bundle())
				if err == nil {
					_, _, err = x509svid.Verify(chain, bundle, x509svid.WithTime(chain[0].NotBefore.Add(10*time.Second)))
				}
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	for range 3 {
		p, err := e.ca.Prepare(ctx, ca.KindX509)
		require.NoError(t, err)
		_, err = e.ca.Activate(ctx, ca.KindX509, p.ID)
		require.NoError(t, err)
		_ = e.ca.List("")
		_ = e.ca.Bundle()
	}
	close(stop)
	for range 2 {
		require.NoError(t, <-errs)
	}
}

// closed reports whether ch is closed.
func closed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// TestSigningSignal: Signing is what the server's TLS listeners wait for
// before they accept. It closes only once both kinds of authority are
// active and unexpired: after the first Rotate on a fresh data dir, at once
// on a restart, and only after Rotate on a restart past the authorities' end.
func TestSigningSignal(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, nil)
	e.pub.block = make(chan struct{})
	e.pub.entered = make(chan string, 16)
	done := make(chan error, 1)
	go func() { done <- e.ca.Rotate(ctx) }()
	assert.Equal(t, "publish-x509", <-e.pub.entered)
	assert.False(t, closed(e.ca.Signing()), "fresh CA, first authority still being published")
	require.ErrorIs(t, e.ca.SigningErr(), ca.ErrNoAuthority)
	close(e.pub.block)
	require.NoError(t, <-done)
	assert.True(t, closed(e.ca.Signing()), "after the first Rotate")
	require.NoError(t, e.ca.SigningErr())

	e.reopen(t)
	assert.True(t, closed(e.ca.Signing()), "a restart loads its active authorities")
	require.NoError(t, e.ca.SigningErr())

	old := e.active(t, ca.KindX509)
	e.clock.Set(old.NotAfter.Add(time.Hour))
	require.ErrorContains(t, e.ca.SigningErr(), "no unexpired X.509 authority", "expired while running")
	e.reopen(t)
	assert.False(t, closed(e.ca.Signing()), "a restart past the authorities' end waits for new ones")
	require.ErrorIs(t, e.ca.SigningErr(), ca.ErrNoAuthority)
	require.NoError(t, e.ca.Rotate(ctx))
	assert.True(t, closed(e.ca.Signing()))
	require.NoError(t, e.ca.SigningErr())
}
