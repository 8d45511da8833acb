package session

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"log/slog"
	"math/big"
	"net/url"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

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
