package signing

import (
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"math/big"
	"time"

	"github.com/ferry-id/ferry/proto/ferrypb"
)

// JWK is one key of a JWKS, in Entra's shape.
type JWK struct {
	Kty string   `json:"kty"`
	Use string   `json:"use"`
	Kid string   `json:"kid"`
	X5t string   `json:"x5t,omitempty"`
	N   string   `json:"n"`
	E   string   `json:"e"`
	X5c []string `json:"x5c,omitempty"`
}

// JWKS is a JSON Web Key Set.
type JWKS struct {
	Keys []JWK `json:"keys"`
}

// BuildJWKS lists the RSA keys among keys, skipping duplicates (by kid), keys
// whose certificate expired before now, and rows that do not parse. Order
// follows the input.
func BuildJWKS(keys []*ferrypb.SigningKey, now time.Time) JWKS {
	out := JWKS{Keys: []JWK{}}
	seen := make(map[string]bool, len(keys))
	for _, sk := range keys {
		if sk == nil || seen[sk.GetKid()] || sk.GetKid() == "" {
			continue
		}
		if na := sk.GetNotAfter(); na != 0 && now.Unix() > na {
			continue
		}
		pk, err := x509.ParsePKIXPublicKey(sk.GetPublicKey())
		if err != nil {
			continue
		}
		rk, ok := pk.(*rsa.PublicKey)
		if !ok {
			continue
		}
		j := JWK{
			Kty: "RSA",
			Use: "sig",
			Kid: sk.GetKid(),
			N:   base64.RawURLEncoding.EncodeToString(rk.N.Bytes()),
			E:   base64.RawURLEncoding.EncodeToString(big.NewInt(int64(rk.E)).Bytes()),
		}
		if c := sk.GetCertificate(); len(c) > 0 {
			j.X5t = Thumbprint(c)
			j.X5c = []string{base64.StdEncoding.EncodeToString(c)}
		}
		seen[sk.GetKid()] = true
		out.Keys = append(out.Keys, j)
	}
	return out
}
