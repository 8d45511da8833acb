package ca_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/server/ca"
)

func TestManualRotationTaintRevoke(t *testing.T) {
	ctx := context.Background()
	for _, k := range []ca.Kind{ca.KindX509, ca.KindJWT} {
		t.Run(string(k), func(t *testing.T) {
			e := newReadyEnv(t, nil)
			first := e.active(t, k)

			_, err := e.ca.Taint(ctx, k, first.ID)
			require.ErrorIs(t, err, ca.ErrAuthorityState, "active cannot be tainted")
			_, err = e.ca.Revoke(ctx, k, first.ID)
			require.ErrorIs(t, err, ca.ErrAuthorityState, "active cannot be revoked")

			p1, err := e.ca.Prepare(ctx, k)
			require.NoError(t, err)
			assert.Equal(t, ca.StatusPrepared, p1.Status)
			assert.True(t, p1.Published)
			_, err = e.ca.Taint(ctx, k, p1.ID)
			require.ErrorIs(t, err, ca.ErrAuthorityState, "prepared cannot be tainted")

			// Preparing again retires the unused prepared authority.
			p2, err := e.ca.Prepare(ctx, k)
			require.NoError(t, err)
			assert.Equal(t, []string{p1.ID}, ids(e.withStatus(k, ca.StatusOld)))

			_, err = e.ca.Activate(ctx, k, "nope")
			require.ErrorIs(t, err, ca.ErrUnknownAuthority)
			_, err = e.ca.Activate(ctx, k, first.ID)
			require.ErrorIs(t, err, ca.ErrAuthorityState, "only prepared can be activated")
			act, err := e.ca.Activate(ctx, k, p2.ID)
			require.NoError(t, err)
			assert.Equal(t, ca.StatusActive, act.Status)
			assert.ElementsMatch(t, []string{p1.ID, first.ID}, ids(e.withStatus(k, ca.StatusOld)))
			chain, kid := signNow(t, e)
			if k == ca.KindX509 {
				assert.Equal(t, p2.ID, issuerOf(t, e, chain[0]).ID)
			} else {
				assert.Equal(t, p2.ID, kid)
			}

			_, err = e.ca.Revoke(ctx, k, first.ID)
			require.ErrorIs(t, err, ca.ErrAuthorityState, "untainted cannot be revoked")

			tainted, err := e.ca.Taint(ctx, k, first.ID)
			require.NoError(t, err)
			assert.True(t, tainted.Tainted)
			assertTaintedInBundle(t, e, k, first, true)
			_, err = e.ca.Taint(ctx, k, first.ID)
			require.NoError(t, err, "tainting again republishes")

			revoked, err := e.ca.Revoke(ctx, k, first.ID)
			require.NoError(t, err)
			assert.Equal(t, first.ID, revoked.ID)
			assertInBundle(t, e, k, first, false)
			_, err = e.ca.Revoke(ctx, k, first.ID)
			require.ErrorIs(t, err, ca.ErrUnknownAuthority)
			for _, a := range e.ca.List(k) {
				assert.NotEqual(t, first.ID, a.ID)
			}
			_, err = os.Stat(filepath.Join(e.cfg.DataDir, string(k)+"-"+first.ID+".key"))
			assert.ErrorIs(t, err, os.ErrNotExist)

			// All of it survives a restart.
			e.reopen(t)
			assert.Equal(t, p2.ID, e.active(t, k).ID)
			assert.Equal(t, []string{p1.ID}, ids(e.withStatus(k, ca.StatusOld)))
		})
	}
}

func TestTaintPublishFailureIsRetried(t *testing.T) {
	ctx := context.Background()
	e := newReadyEnv(t, nil)
	first := e.active(t, ca.KindJWT)
	p, err := e.ca.Prepare(ctx, ca.KindJWT)
	require.NoError(t, err)
	_, err = e.ca.Activate(ctx, ca.KindJWT, p.ID)
	require.NoError(t, err)

	e.pub.setFail(true)
	_, err = e.ca.Taint(ctx, ca.KindJWT, first.ID)
	require.ErrorIs(t, err, errPB)
	assertTaintedInBundle(t, e, ca.KindJWT, first, false)
	e.pub.setFail(false)
	_, err = e.ca.Taint(ctx, ca.KindJWT, first.ID)
	require.NoError(t, err)
	assertTaintedInBundle(t, e, ca.KindJWT, first, true)
}

func TestManualOpsRejectUnknownKind(t *testing.T) {
	e := newReadyEnv(t, nil)
	_, err := e.ca.Prepare(context.Background(), "wit")
	require.Error(t, err)
	_, err = e.ca.Taint(context.Background(), "", "x")
	require.Error(t, err)
}

func assertInBundle(t *testing.T, e *env, k ca.Kind, a ca.Authority, want bool) {
	t.Helper()
	if k == ca.KindX509 {
		got, _ := e.pub.hasX509(a.Certificate)
		assert.Equal(t, want, got)
	} else {
		assert.Equal(t, want, e.pub.hasJWT(a.ID) != nil)
	}
	found := false
	b := e.ca.Bundle()
	for _, x := range b.X509Authorities {
		found = found || (a.Certificate != nil && string(x.Certificate) == string(a.Certificate.Raw))
	}
	for _, j := range b.JwtAuthorities {
		found = found || j.KeyId == a.ID
	}
	assert.Equal(t, want, found, "in Bundle()")
}

func assertTaintedInBundle(t *testing.T, e *env, k ca.Kind, a ca.Authority, want bool) {
	t.Helper()
	if k == ca.KindX509 {
		published, tainted := e.pub.hasX509(a.Certificate)
		require.True(t, published)
		assert.Equal(t, want, tainted)
	} else {
		j := e.pub.hasJWT(a.ID)
		require.NotNil(t, j)
		assert.Equal(t, want, j.Tainted)
	}
}
