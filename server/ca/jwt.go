package ca

import (
	"crypto"
	"fmt"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// maxAudiences bounds the audience of one JWT-SVID.
const maxAudiences = 20

// reservedClaims may not be set through extra claims.
var reservedClaims = map[string]bool{"sub": true, "aud": true, "exp": true, "iat": true, "iss": true, "nbf": true}

// JWTSVID is a minted JWT-SVID.
type JWTSVID struct {
	Token     string
	SPIFFEID  spiffeid.ID
	Audience  []string
	KeyID     string
	IssuedAt  time.Time
	ExpiresAt time.Time
}

// jwtSigner is the active JWT authority as the signing path sees it.
type jwtSigner struct {
	kid      string
	key      crypto.Signer
	method   jwt.SigningMethod
	notAfter time.Time
}

func newJWTSigner(a *authority) *jwtSigner {
	var m jwt.SigningMethod = jwt.SigningMethodES256
	if err := checkJWTKey(RS256, a.key); err == nil {
		m = jwt.SigningMethodRS256
	}
	return &jwtSigner{kid: a.id, key: a.key, method: m, notAfter: a.notAfter}
}

// MintJWTSVID signs a JWT-SVID for id with the active JWT key. The header
// carries alg, kid and typ "JWT"; the claims sub, aud (always an array),
// iat, exp, iss when a JWT issuer is configured, and extra, which may not
// override any of those. A zero ttl means the configured default; the token
// never outlives its key.
func (c *CA) MintJWTSVID(id spiffeid.ID, audience []string, ttl time.Duration, extra map[string]any) (*JWTSVID, error) {
	if err := CheckMemberID(c.td, id); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidRequest, err)
	}
	if err := CheckAudiences(audience); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidRequest, err)
	}
	if ttl < 0 {
		return nil, fmt.Errorf("%w: negative TTL", ErrInvalidRequest)
	}
	if ttl == 0 {
		ttl = c.jwtTTL
	}
	s := c.jwtActive.Load()
	now := c.now()
	if s == nil || !now.Before(s.notAfter) {
		return nil, ErrNoAuthority
	}
	exp := earliest(now.Add(ttl), s.notAfter)
	claims := make(jwt.MapClaims, len(extra)+5)
	for k, v := range extra {
		if reservedClaims[k] {
			return nil, fmt.Errorf("%w: extra claim %q is reserved", ErrInvalidRequest, k)
		}
		claims[k] = v
	}
	claims["sub"] = id.String()
	claims["aud"] = audience
	claims["iat"] = now.Unix()
	claims["exp"] = exp.Unix()
	if c.issuer != "" {
		claims["iss"] = c.issuer
	}
	tok := jwt.NewWithClaims(s.method, claims)
	tok.Header["kid"] = s.kid
	signed, err := tok.SignedString(s.key)
	if err != nil {
		return nil, fmt.Errorf("ca: sign JWT-SVID: %w", err)
	}
	return &JWTSVID{
		Token: signed, SPIFFEID: id, Audience: append([]string(nil), audience...), KeyID: s.kid,
		IssuedAt: now.Truncate(time.Second), ExpiresAt: exp.Truncate(time.Second),
	}, nil
}
