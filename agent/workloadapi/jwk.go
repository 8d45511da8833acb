package workloadapi

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"maps"
	"math/big"
	"slices"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
)

// JWK "use" values of the SPIFFE bundle format.
const (
	useJWTSVID = "jwt-svid"
	useWITSVID = "wit-svid"
)

// jwk is one RFC 7517 JSON Web Key, public or private, with the members of
// RFC 7518 (EC, RSA) and RFC 8037 (OKP). Field order is fixed so the same key
// always marshals to the same bytes.
type jwk struct {
	Kty string `json:"kty"`
	Kid string `json:"kid,omitempty"`
	Use string `json:"use,omitempty"`
	Alg string `json:"alg,omitempty"`
	Crv string `json:"crv,omitempty"`
	X   string `json:"x,omitempty"`
	Y   string `json:"y,omitempty"`
	N   string `json:"n,omitempty"`
	E   string `json:"e,omitempty"`
	D   string `json:"d,omitempty"`
	P   string `json:"p,omitempty"`
	Q   string `json:"q,omitempty"`
	DP  string `json:"dp,omitempty"`
	DQ  string `json:"dq,omitempty"`
	QI  string `json:"qi,omitempty"`
}

// jwks is a JWK Set with the SPIFFE bundle members.
type jwks struct {
	Keys        []jwk   `json:"keys"`
	RefreshHint *int64  `json:"spiffe_refresh_hint,omitempty"`
	Sequence    *uint64 `json:"spiffe_sequence,omitempty"`
}

func b64(b []byte) string { return base64.RawURLEncoding.EncodeToString(b) }

// fixed left-pads n to size bytes, as RFC 7518 requires for EC members.
func fixed(n *big.Int, size int) []byte { return n.FillBytes(make([]byte, size)) }

// publicJWK encodes a public key.
func publicJWK(key crypto.PublicKey) (jwk, error) {
	switch k := key.(type) {
	case *ecdsa.PublicKey:
		crv, size, err := curveOf(k.Curve)
		if err != nil {
			return jwk{}, err
		}
		point, err := k.Bytes() // 0x04 || X || Y
		if err != nil {
			return jwk{}, fmt.Errorf("workloadapi: encode EC key: %w", err)
		}
		return jwk{Kty: "EC", Crv: crv, X: b64(point[1 : 1+size]), Y: b64(point[1+size:])}, nil
	case *rsa.PublicKey:
		return jwk{Kty: "RSA", N: b64(k.N.Bytes()), E: b64(big.NewInt(int64(k.E)).Bytes())}, nil
	case ed25519.PublicKey:
		return jwk{Kty: "OKP", Crv: "Ed25519", X: b64(k)}, nil
	default:
		return jwk{}, fmt.Errorf("workloadapi: unsupported public key type %T", key)
	}
}

// privateJWK encodes a private key with its public members.
func privateJWK(key crypto.Signer) (jwk, error) {
	j, err := publicJWK(key.Public())
	if err != nil {
		return jwk{}, err
	}
	switch k := key.(type) {
	case *ecdsa.PrivateKey:
		d, err := k.Bytes()
		if err != nil {
			return jwk{}, fmt.Errorf("workloadapi: encode EC private key: %w", err)
		}
		j.D = b64(d)
	case *rsa.PrivateKey:
		if len(k.Primes) != 2 {
			return jwk{}, fmt.Errorf("workloadapi: RSA key with %d primes is not supported", len(k.Primes))
		}
		k.Precompute()
		j.D = b64(k.D.Bytes())
		j.P = b64(k.Primes[0].Bytes())
		j.Q = b64(k.Primes[1].Bytes())
		j.DP = b64(k.Precomputed.Dp.Bytes())
		j.DQ = b64(k.Precomputed.Dq.Bytes())
		j.QI = b64(k.Precomputed.Qinv.Bytes())
	case ed25519.PrivateKey:
		j.D = b64(k.Seed())
	default:
		return jwk{}, fmt.Errorf("workloadapi: unsupported private key type %T", key)
	}
	return j, nil
}

func curveOf(c elliptic.Curve) (name string, size int, err error) {
	switch c {
	case elliptic.P256():
		return "P-256", 32, nil
	case elliptic.P384():
		return "P-384", 48, nil
	case elliptic.P521():
		return "P-521", 66, nil
	}
	return "", 0, fmt.Errorf("workloadapi: unsupported curve %v", c.Params().Name)
}

// marshalJWKS encodes authorities (keyed by key ID) as a JWK Set of the given
// use, sorted by key ID, with the bundle's refresh hint and sequence number.
func marshalJWKS(b *spiffebundle.Bundle, authorities map[string]crypto.PublicKey, use string) ([]byte, error) {
	doc := jwks{Keys: make([]jwk, 0, len(authorities))}
	for _, kid := range slices.Sorted(maps.Keys(authorities)) {
		j, err := publicJWK(authorities[kid])
		if err != nil {
			return nil, fmt.Errorf("workloadapi: %s authority %q of %s: %w", use, kid, b.TrustDomain(), err)
		}
		j.Kid, j.Use = kid, use
		doc.Keys = append(doc.Keys, j)
	}
	if hint, ok := b.RefreshHint(); ok {
		secs := int64((hint + time.Second - 1) / time.Second)
		doc.RefreshHint = &secs
	}
	if seq, ok := b.SequenceNumber(); ok {
		doc.Sequence = &seq
	}
	return json.Marshal(doc)
}
