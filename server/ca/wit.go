package ca

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"math/big"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// WIT-SVIDs (Workload Identity Tokens, the SPIFFE profile of the IETF WIMSE
// WIT) are JWTs that bind a workload key to a SPIFFE ID: header typ
// "wit+jwt" with alg and kid; claims sub, iat, exp, jti, iss when a JWT
// issuer is configured, and cnf.jwk, the public key (with its alg) the
// workload proves possession of. They carry no aud and are never bearer
// tokens.
//
// ferry signs them with the active JWT authority rather than a separate WIT
// authority: the two profiles cannot be confused (typ, cnf and the absent aud
// differ, and JWT-SVID validators refuse typ "wit+jwt"), and one key set
// means one rotation, one publication path and one bundle. The WIT
// authorities of a ferry bundle are therefore its JWT authorities; see
// WithWITAuthorities.

// WITType is the typ header of a WIT-SVID.
const WITType = "wit+jwt"

// DefaultWITSVIDTTL is the lifetime of a WIT-SVID when the entry sets none.
const DefaultWITSVIDTTL = 5 * time.Minute

// WITSVID is a minted WIT-SVID.
type WITSVID struct {
	Token     string
	SPIFFEID  spiffeid.ID
	KeyID     string
	IssuedAt  time.Time
	ExpiresAt time.Time
}

// MintWITSVID signs a WIT-SVID for id bound to pub, the workload's public key
// (ECDSA P-256/P-384 or RSA of at least 2048 bits). A zero ttl means
// DefaultWITSVIDTTL; the token never outlives its signing key.
func (c *CA) MintWITSVID(id spiffeid.ID, pub crypto.PublicKey, ttl time.Duration) (*WITSVID, error) {
	if err := c.checkWorkloadID(id); err != nil {
		return nil, err
	}
	if err := checkSubjectKey(pub); err != nil {
		return nil, err
	}
	cnf, err := confirmationJWK(pub)
	if err != nil {
		return nil, err
	}
	if ttl < 0 {
		return nil, fmt.Errorf("%w: negative TTL", ErrInvalidRequest)
	}
	if ttl == 0 {
		ttl = DefaultWITSVIDTTL
	}
	s := c.jwtActive.Load()
	now := c.now()
	if s == nil || !now.Before(s.notAfter) {
		return nil, ErrNoAuthority
	}
	exp := earliest(now.Add(ttl), s.notAfter)
	var jti [16]byte
	if _, err := rand.Read(jti[:]); err != nil {
		return nil, fmt.Errorf("ca: WIT-SVID jti: %w", err)
	}
	claims := jwt.MapClaims{
		"sub": id.String(),
		"iat": now.Unix(),
		"exp": exp.Unix(),
		"jti": hex.EncodeToString(jti[:]),
		"cnf": map[string]any{"jwk": cnf},
	}
	if c.issuer != "" {
		claims["iss"] = c.issuer
	}
	tok := jwt.NewWithClaims(s.method, claims)
	tok.Header["typ"] = WITType
	tok.Header["kid"] = s.kid
	signed, err := tok.SignedString(s.key)
	if err != nil {
		return nil, fmt.Errorf("ca: sign WIT-SVID: %w", err)
	}
	return &WITSVID{
		Token: signed, SPIFFEID: id, KeyID: s.kid,
		IssuedAt: now.Truncate(time.Second), ExpiresAt: exp.Truncate(time.Second),
	}, nil
}

// confirmationJWK is the public JWK of pub with the alg the workload signs
// with, as the cnf.jwk claim needs it.
func confirmationJWK(pub crypto.PublicKey) (map[string]any, error) {
	b64 := base64.RawURLEncoding.EncodeToString
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		var crv, alg string
		switch k.Curve {
		case elliptic.P256():
			crv, alg = "P-256", "ES256"
		case elliptic.P384():
			crv, alg = "P-384", "ES384"
		default:
			return nil, fmt.Errorf("%w: EC curve for a WIT-SVID", ErrUnsupportedKey)
		}
		point, err := k.Bytes() // 0x04 || X || Y
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrUnsupportedKey, err)
		}
		size := (len(point) - 1) / 2
		return map[string]any{"kty": "EC", "crv": crv, "alg": alg, "x": b64(point[1 : 1+size]), "y": b64(point[1+size:])}, nil
	case *rsa.PublicKey:
		return map[string]any{"kty": "RSA", "alg": "RS256", "n": b64(k.N.Bytes()), "e": b64(big.NewInt(int64(k.E)).Bytes())}, nil
	}
	return nil, fmt.Errorf("%w: %T for a WIT-SVID", ErrUnsupportedKey, pub)
}

// WithWITAuthorities returns a copy of b whose WIT authorities are its JWT
// authorities: ferry signs WIT-SVIDs with its JWT keys, so that is the WIT
// bundle that verifies them.
func WithWITAuthorities(b *spiffebundle.Bundle) *spiffebundle.Bundle {
	out := b.Clone()
	out.SetWITAuthorities(b.JWTAuthorities())
	return out
}
