package federation_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net/url"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ferry-id/ferry/server/ca"
	"github.com/ferry-id/ferry/server/federation"
)

// FuzzBundleJSON feeds arbitrary bytes through the path a federated peer's
// bundle endpoint response takes: SPIFFE bundle JSON parsing, CheckBundle,
// and conversion to the stored form. Nothing panics, and a bundle that is
// accepted converts back with the same authorities, as agents and workloads
// will receive it.
func FuzzBundleJSON(f *testing.F) {
	td := spiffeid.RequireTrustDomainFromString("peer.example")
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		f.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "peer"},
		NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
		URIs: []*url.URL{td.ID().URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		f.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	sb := spiffebundle.New(td)
	sb.AddX509Authority(cert)
	_ = sb.AddJWTAuthority("k1", &key.PublicKey)
	sb.SetSequenceNumber(3)
	sb.SetRefreshHint(5 * time.Minute)
	good, err := sb.Marshal()
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good)
	f.Add([]byte(`{"keys":[]}`))
	f.Add([]byte(`{"keys":[{"use":"x509-svid","kty":"EC","crv":"P-256","x":"","y":"","x5c":[]}]}`))
	f.Add([]byte(`{"keys":[{"use":"jwt-svid","kty":"RSA","kid":"","n":"AQAB","e":"AQAB"}],"spiffe_sequence":-1,"spiffe_refresh_hint":-5}`))
	f.Add([]byte(`{"keys":null}`))
	f.Add([]byte(`[]`))
	f.Fuzz(func(t *testing.T, data []byte) {
		sb, err := spiffebundle.Parse(td, data)
		if err != nil {
			return
		}
		if err := federation.CheckBundle(td, sb); err != nil {
			return
		}
		stored, err := ca.FromSPIFFEBundle(sb)
		if err != nil {
			return
		}
		back, err := ca.ToSPIFFEBundle(stored)
		if err != nil {
			t.Fatalf("accepted bundle does not convert back: %v\n%s", err, data)
		}
		if len(back.X509Authorities()) != len(sb.X509Authorities()) || len(back.JWTAuthorities()) != len(sb.JWTAuthorities()) {
			t.Fatalf("authorities changed in conversion: %d/%d X.509, %d/%d JWT", len(back.X509Authorities()), len(sb.X509Authorities()), len(back.JWTAuthorities()), len(sb.JWTAuthorities()))
		}
		if _, err := back.Marshal(); err != nil {
			t.Fatalf("accepted bundle cannot be served again: %v", err)
		}
	})
}
