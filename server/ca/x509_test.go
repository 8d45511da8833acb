package ca_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"math/big"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/server/ca"
)

var (
	oidKeyUsage     = asn1.ObjectIdentifier{2, 5, 29, 15}
	oidSAN          = asn1.ObjectIdentifier{2, 5, 29, 17}
	oidBasicConstr  = asn1.ObjectIdentifier{2, 5, 29, 19}
	oidSubjectKeyID = asn1.ObjectIdentifier{2, 5, 29, 14}
)

func extension(cert *x509.Certificate, oid asn1.ObjectIdentifier) (pkix.Extension, bool) {
	for _, e := range cert.Extensions {
		if e.Id.Equal(oid) {
			return e, true
		}
	}
	return pkix.Extension{}, false
}

// checkSVIDProfile checks every field of the X509-SVID profile.
func checkSVIDProfile(t *testing.T, e *env, chain []*x509.Certificate, id spiffeid.ID, pub crypto.PublicKey,
	dns []string, wantKU x509.KeyUsage, signedAt time.Time, wantNotAfter time.Time,
) {
	t.Helper()
	require.NotEmpty(t, chain)
	leaf := chain[0]
	caCert := e.active(t, ca.KindX509).Certificate

	require.Len(t, leaf.URIs, 1, "exactly one URI SAN")
	assert.Equal(t, id.String(), leaf.URIs[0].String())
	assert.Equal(t, dns, leaf.DNSNames)
	assert.Empty(t, leaf.EmailAddresses)
	assert.Empty(t, leaf.IPAddresses)

	assert.True(t, leaf.BasicConstraintsValid)
	assert.False(t, leaf.IsCA)
	bc, ok := extension(leaf, oidBasicConstr)
	require.True(t, ok)
	assert.True(t, bc.Critical, "basic constraints critical")

	assert.Equal(t, wantKU, leaf.KeyUsage)
	ku, ok := extension(leaf, oidKeyUsage)
	require.True(t, ok)
	assert.True(t, ku.Critical, "key usage critical")
	assert.Equal(t, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}, leaf.ExtKeyUsage)
	assert.Empty(t, leaf.UnknownExtKeyUsage)

	assert.Equal(t, []string{"ferry"}, leaf.Subject.Organization)
	if len(dns) > 0 {
		assert.Equal(t, dns[0], leaf.Subject.CommonName)
	} else {
		assert.Empty(t, leaf.Subject.CommonName)
	}
	san, ok := extension(leaf, oidSAN)
	require.True(t, ok)
	assert.False(t, san.Critical, "SAN not critical with a non-empty subject")

	assert.Equal(t, signedAt.Add(-10*time.Second), leaf.NotBefore)
	assert.Equal(t, wantNotAfter, leaf.NotAfter)
	assert.Equal(t, 1, leaf.SerialNumber.Sign(), "positive serial")
	assert.LessOrEqual(t, leaf.SerialNumber.BitLen(), 128)
	assert.Greater(t, leaf.SerialNumber.BitLen(), 64, "random 128-bit serial (fails with probability 2^-64)")

	assert.True(t, leaf.PublicKey.(interface{ Equal(crypto.PublicKey) bool }).Equal(pub), "CSR's public key")
	assert.Equal(t, caCert.SubjectKeyId, leaf.AuthorityKeyId)
	assert.Equal(t, caCert.Subject.String(), leaf.Issuer.String())
	require.NoError(t, leaf.CheckSignatureFrom(caCert))

	// go-spiffe accepts it against the bundle this node published.
	bundle, err := ca.ToX509Bundle(e.pub.bundle())
	require.NoError(t, err)
	gotID, chains, err := x509svid.Verify(chain, bundle, x509svid.WithTime(signedAt))
	require.NoError(t, err)
	assert.Equal(t, id, gotID)
	require.NotEmpty(t, chains)
}

func TestSignWorkloadX509SVIDProfile(t *testing.T) {
	e := newReadyEnv(t, nil)
	e.clock.Add(time.Minute)
	key := ecKey(t)
	id := wid("/ns/prod/sa/web")
	dns := []string{"web.prod.svc", "*.web.example.org"}

	chain, err := e.ca.SignWorkloadX509SVID(makeCSR(t, key), id, dns, 0)
	require.NoError(t, err)
	require.Len(t, chain, 1, "self-signed CA: the leaf alone")
	checkSVIDProfile(t, e, chain, id, key.Public(), dns, x509.KeyUsageDigitalSignature,
		e.clock.Now(), e.clock.Now().Add(ca.DefaultX509SVIDTTL))
	_, hasSKI := extension(chain[0], oidSubjectKeyID)
	assert.False(t, hasSKI)
}

func TestSignWorkloadX509SVIDRSAKeyAddsKeyEncipherment(t *testing.T) {
	e := newReadyEnv(t, nil)
	key := rsaKey(t, 2048)
	id := wid("/rsa")
	chain, err := e.ca.SignWorkloadX509SVID(makeCSR(t, key), id, nil, 10*time.Minute)
	require.NoError(t, err)
	checkSVIDProfile(t, e, chain, id, key.Public(), nil,
		x509.KeyUsageDigitalSignature|x509.KeyUsageKeyEncipherment, e.clock.Now(), e.clock.Now().Add(10*time.Minute))
}

func TestSignAgentAndServerX509SVIDProfile(t *testing.T) {
	e := newReadyEnv(t, nil)
	key := ecKey(t)
	agentID := wid("/spire/agent/join_token/abc")
	chain, err := e.ca.SignAgentX509SVID(key.Public(), agentID, 2*time.Hour)
	require.NoError(t, err)
	checkSVIDProfile(t, e, chain, agentID, key.Public(), nil, x509.KeyUsageDigitalSignature,
		e.clock.Now(), e.clock.Now().Add(2*time.Hour))

	assert.Equal(t, "spiffe://example.org/spire/server", e.ca.ServerID().String())
	skey := ecKey(t)
	chain, err = e.ca.SignServerX509SVID(skey.Public(), []string{"ferry.example.org"}, 0)
	require.NoError(t, err)
	checkSVIDProfile(t, e, chain, e.ca.ServerID(), skey.Public(), []string{"ferry.example.org"},
		x509.KeyUsageDigitalSignature, e.clock.Now(), e.clock.Now().Add(time.Hour))
}

func TestSVIDNotAfterCappedByCA(t *testing.T) {
	e := newReadyEnv(t, nil)
	caCert := e.active(t, ca.KindX509).Certificate
	chain, err := e.ca.SignWorkloadX509SVID(makeCSR(t, ecKey(t)), wid("/long"), nil, 1000*time.Hour)
	require.NoError(t, err)
	assert.Equal(t, caCert.NotAfter, chain[0].NotAfter)
}

func TestCAProfile(t *testing.T) {
	e := newReadyEnv(t, nil)
	a := e.active(t, ca.KindX509)
	c := a.Certificate
	assert.True(t, c.IsCA)
	assert.True(t, c.BasicConstraintsValid)
	assert.Equal(t, x509.KeyUsageCertSign|x509.KeyUsageCRLSign, c.KeyUsage)
	require.Len(t, c.URIs, 1)
	assert.Equal(t, "spiffe://example.org", c.URIs[0].String())
	assert.Equal(t, []string{"node-1"}, c.Subject.OrganizationalUnit)
	assert.Equal(t, t0.Add(-10*time.Second), c.NotBefore)
	assert.Equal(t, t0.Add(ca.DefaultCATTL), c.NotAfter)
	assert.Equal(t, a.ID, hexString(c.SubjectKeyId))
	require.NoError(t, c.CheckSignatureFrom(c), "self-signed")
	_, isEC := c.PublicKey.(*ecdsa.PublicKey)
	assert.True(t, isEC)
}

func hexString(b []byte) string {
	const digits = "0123456789abcdef"
	out := make([]byte, 0, 2*len(b))
	for _, x := range b {
		out = append(out, digits[x>>4], digits[x&15])
	}
	return string(out)
}

func TestSignRejectsBadRequests(t *testing.T) {
	e := newReadyEnv(t, nil)
	good := makeCSR(t, ecKey(t))
	other := spiffeid.RequireFromString("spiffe://other.org/web")
	cases := []struct {
		name string
		id   spiffeid.ID
		dns  []string
		ttl  time.Duration
	}{
		{"foreign trust domain", other, nil, 0},
		{"trust domain ID", td.ID(), nil, 0},
		{"zero ID", spiffeid.ID{}, nil, 0},
		{"reserved agent path", wid("/spire/agent/x"), nil, 0},
		{"server ID", wid("/spire/server"), nil, 0},
		{"negative TTL", wid("/web"), nil, -time.Second},
		{"bad DNS name", wid("/web"), []string{"bad name"}, 0},
		{"empty DNS name", wid("/web"), []string{""}, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := e.ca.SignWorkloadX509SVID(good, tc.id, tc.dns, tc.ttl)
			require.ErrorIs(t, err, ca.ErrInvalidRequest)
		})
	}
	_, err := e.ca.SignAgentX509SVID(ecKey(t).Public(), wid("/web"), 0)
	require.ErrorIs(t, err, ca.ErrInvalidRequest, "agent outside /spire/agent/")
	_, err = e.ca.SignAgentX509SVID(ecKey(t).Public(), wid("/spire/agent"), 0)
	require.ErrorIs(t, err, ca.ErrInvalidRequest)
}

func TestParseCSRHardening(t *testing.T) {
	e := newReadyEnv(t, nil)
	p224, err := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	require.NoError(t, err)
	good := makeCSR(t, ecKey(t))
	badSig := bytes.Clone(good)
	badSig[len(badSig)-3] ^= 0x55 // inside the signature's last integer

	cases := []struct {
		name string
		csr  []byte
		want string
	}{
		{"empty", nil, "empty"},
		{"garbage", []byte("not a csr"), "invalid CSR"},
		{"oversized", make([]byte, ca.MaxCSRSize+1), "exceeds"},
		{"RSA 1024", makeCSR(t, rsaKey(t, 1024)), "RSA key of 1024 bits"},
		{"P-224", makeCSR(t, p224), "curve P-224"},
		{"bad signature", badSig, "bad signature"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ca.ParseCSR(tc.csr)
			require.ErrorIs(t, err, ca.ErrInvalidCSR)
			assert.Contains(t, err.Error(), tc.want)
			_, err = e.ca.SignWorkloadX509SVID(tc.csr, wid("/web"), nil, 0)
			require.ErrorIs(t, err, ca.ErrInvalidCSR)
		})
	}
	_, err = e.ca.SignAgentX509SVID(rsaKey(t, 1024).Public(), wid("/spire/agent/x"), 0)
	require.ErrorIs(t, err, ca.ErrUnsupportedKey)
}

func TestSignBeforeRotateFails(t *testing.T) {
	e := newEnv(t, nil)
	_, err := e.ca.SignWorkloadX509SVID(makeCSR(t, ecKey(t)), wid("/web"), nil, 0)
	require.ErrorIs(t, err, ca.ErrNoAuthority)
	_, err = e.ca.MintJWTSVID(wid("/web"), []string{"a"}, 0, nil)
	require.ErrorIs(t, err, ca.ErrNoAuthority)
}

func TestSignWorkloadX509SVIDsBatch(t *testing.T) {
	e := newReadyEnv(t, nil)
	bundle, err := ca.ToX509Bundle(e.pub.bundle())
	require.NoError(t, err)
	var reqs []ca.X509SVIDRequest
	keys := map[int]*ecdsa.PrivateKey{}
	for i := range 40 {
		k := ecKey(t)
		keys[i] = k
		reqs = append(reqs, ca.X509SVIDRequest{CSR: makeCSR(t, k), SPIFFEID: wid("/w/" + big.NewInt(int64(i)).String())})
	}
	reqs[7].CSR = []byte("junk")
	reqs[9].SPIFFEID = spiffeid.RequireFromString("spiffe://other.org/x")

	res := e.ca.SignWorkloadX509SVIDs(context.Background(), reqs)
	require.Len(t, res, len(reqs))
	for i, r := range res {
		switch i {
		case 7:
			require.ErrorIs(t, r.Err, ca.ErrInvalidCSR)
		case 9:
			require.ErrorIs(t, r.Err, ca.ErrInvalidRequest)
		default:
			require.NoError(t, r.Err, i)
			id, _, err := x509svid.Verify(r.Certificates, bundle, x509svid.WithTime(e.clock.Now()))
			require.NoError(t, err)
			assert.Equal(t, reqs[i].SPIFFEID, id, "result %d in request order", i)
			assert.True(t, keys[i].PublicKey.Equal(r.Certificates[0].PublicKey))
		}
	}

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	for _, r := range e.ca.SignWorkloadX509SVIDs(ctx, reqs[:3]) {
		require.ErrorIs(t, r.Err, context.Canceled)
	}
}
