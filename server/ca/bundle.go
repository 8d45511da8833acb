package ca

import (
	"crypto/x509"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ferry-id/ferry/proto/ferrypb"
)

// Bundle returns the authorities this node has published: its own X.509
// CAs (or, under an upstream CA, the upstream roots) and its JWT keys, with
// their taint flags. Sequence number and refresh hint are left for the
// server, which merges every node's authorities into the trust bundle.
func (c *CA) Bundle() *ferrypb.Bundle {
	c.mu.RLock()
	defer c.mu.RUnlock()
	b := &ferrypb.Bundle{TrustDomain: c.td.Name()}
	roots := c.upstreamPublished
	for _, a := range c.auths {
		if !a.published {
			continue
		}
		switch {
		case a.kind == KindJWT:
			der, err := x509.MarshalPKIXPublicKey(a.key.Public())
			if err != nil {
				continue // keys this package generated always encode
			}
			b.JwtAuthorities = append(b.JwtAuthorities, &ferrypb.JWTAuthority{
				KeyId: a.id, PublicKey: der, ExpiresAt: a.notAfter.Unix(), Tainted: a.tainted,
			})
		case a.intermediate():
			roots = true
		default:
			b.X509Authorities = append(b.X509Authorities, &ferrypb.X509Authority{Certificate: a.cert.Raw, Tainted: a.tainted})
		}
	}
	if roots && c.upstream != nil {
		for _, r := range c.upstream.roots {
			b.X509Authorities = append(b.X509Authorities, &ferrypb.X509Authority{Certificate: r.Raw})
		}
	}
	return b
}

// ToSPIFFEBundle converts a stored bundle to go-spiffe's form, carrying the
// sequence number and refresh hint (when non-zero). Taint flags and JWT key
// expiry have no place there and are dropped.
func ToSPIFFEBundle(b *ferrypb.Bundle) (*spiffebundle.Bundle, error) {
	td, err := spiffeid.TrustDomainFromString(b.GetTrustDomain())
	if err != nil {
		return nil, fmt.Errorf("ca: bundle trust domain: %w", err)
	}
	out := spiffebundle.New(td)
	for i, a := range b.GetX509Authorities() {
		cert, err := x509.ParseCertificate(a.GetCertificate())
		if err != nil {
			return nil, fmt.Errorf("ca: bundle X.509 authority %d: %w", i, err)
		}
		out.AddX509Authority(cert)
	}
	for _, a := range b.GetJwtAuthorities() {
		pub, err := x509.ParsePKIXPublicKey(a.GetPublicKey())
		if err != nil {
			return nil, fmt.Errorf("ca: bundle JWT authority %q: %w", a.GetKeyId(), err)
		}
		if err := out.AddJWTAuthority(a.GetKeyId(), pub); err != nil {
			return nil, fmt.Errorf("ca: bundle JWT authority %q: %w", a.GetKeyId(), err)
		}
	}
	if h := b.GetRefreshHintSeconds(); h > 0 {
		out.SetRefreshHint(time.Duration(h) * time.Second)
	}
	if s := b.GetSequenceNumber(); s > 0 {
		out.SetSequenceNumber(s)
	}
	return out, nil
}

// ToX509Bundle converts a stored bundle to a go-spiffe X.509 bundle.
func ToX509Bundle(b *ferrypb.Bundle) (*x509bundle.Bundle, error) {
	sb, err := ToSPIFFEBundle(b)
	if err != nil {
		return nil, err
	}
	return sb.X509Bundle(), nil
}

// ToJWTBundle converts a stored bundle to a go-spiffe JWT bundle.
func ToJWTBundle(b *ferrypb.Bundle) (*jwtbundle.Bundle, error) {
	sb, err := ToSPIFFEBundle(b)
	if err != nil {
		return nil, err
	}
	return sb.JWTBundle(), nil
}

// FromSPIFFEBundle converts a go-spiffe bundle (e.g. fetched from a
// federated bundle endpoint) to the stored form. JWT authorities come out
// without expiry and nothing is tainted; keys are ordered by key ID.
func FromSPIFFEBundle(sb *spiffebundle.Bundle) (*ferrypb.Bundle, error) {
	b := &ferrypb.Bundle{TrustDomain: sb.TrustDomain().Name()}
	for _, cert := range sb.X509Authorities() {
		b.X509Authorities = append(b.X509Authorities, &ferrypb.X509Authority{Certificate: cert.Raw})
	}
	keys := sb.JWTAuthorities()
	kids := make([]string, 0, len(keys))
	for kid := range keys {
		kids = append(kids, kid)
	}
	slices.SortFunc(kids, strings.Compare)
	for _, kid := range kids {
		der, err := x509.MarshalPKIXPublicKey(keys[kid])
		if err != nil {
			return nil, fmt.Errorf("ca: bundle JWT authority %q: %w", kid, err)
		}
		b.JwtAuthorities = append(b.JwtAuthorities, &ferrypb.JWTAuthority{KeyId: kid, PublicKey: der})
	}
	if h, ok := sb.RefreshHint(); ok {
		b.RefreshHintSeconds = int64(h / time.Second)
	}
	if s, ok := sb.SequenceNumber(); ok {
		b.SequenceNumber = s
	}
	return b, nil
}
