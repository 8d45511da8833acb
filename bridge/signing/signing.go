// Package signing holds a bridge replica's token signing key and renders the
// JSON Web Key Set that lists every replica's public key.
//
// Each replica owns one RSA key (RS256, as Entra). The private half stays in a
// file readable only by its owner; the public half, with a self-signed
// certificate for x5c/x5t, is published through the server as a
// ferrypb.SigningKey so that every replica's JWKS lists every replica's keys.
// The key ID is Entra's: the base64url SHA-1 thumbprint of the certificate, so
// kid and x5t carry the same value.
package signing

import (
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1" //nolint:gosec // x5t is defined as a SHA-1 thumbprint (RFC 7515 §4.1.7).
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"os"
	"path/filepath"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/ferry-id/ferry/proto/ferrypb"
)

// KeyBits is the size of generated RSA keys.
const KeyBits = 2048

// DefaultLifetime is the validity of a generated key's certificate.
const DefaultLifetime = 90 * 24 * time.Hour

// Key is this replica's signing key. It is immutable and safe for concurrent use.
type Key struct {
	priv *rsa.PrivateKey
	cert *x509.Certificate
	kid  string
	pub  *ferrypb.SigningKey
}

// Generate creates a new RSA key with a self-signed certificate valid from now
// for lifetime (DefaultLifetime when zero). owner names the replica.
func Generate(owner string, now time.Time, lifetime time.Duration) (*Key, error) {
	priv, err := rsa.GenerateKey(rand.Reader, KeyBits)
	if err != nil {
		return nil, fmt.Errorf("signing: generate key: %w", err)
	}
	if lifetime <= 0 {
		lifetime = DefaultLifetime
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("signing: serial: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: "ferry bridge token signing " + owner},
		// Backdated for clock skew, by at most a tenth of the lifetime so a
		// short-lived key's rotation schedule still means something.
		NotBefore:             now.Add(-min(5*time.Minute, lifetime/10)),
		NotAfter:              now.Add(lifetime),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &priv.PublicKey, priv)
	if err != nil {
		return nil, fmt.Errorf("signing: self-sign certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("signing: parse certificate: %w", err)
	}
	return newKey(priv, cert, owner)
}

func newKey(priv *rsa.PrivateKey, cert *x509.Certificate, owner string) (*Key, error) {
	pub, ok := cert.PublicKey.(*rsa.PublicKey)
	if !ok || !pub.Equal(&priv.PublicKey) {
		return nil, errors.New("signing: certificate does not match the private key")
	}
	if priv.N.BitLen() < KeyBits {
		return nil, fmt.Errorf("signing: RSA key of %d bits is too small", priv.N.BitLen())
	}
	priv.Precompute()
	spki, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, fmt.Errorf("signing: marshal public key: %w", err)
	}
	kid := Thumbprint(cert.Raw)
	return &Key{
		priv: priv,
		cert: cert,
		kid:  kid,
		pub: &ferrypb.SigningKey{
			Kid:         kid,
			Owner:       owner,
			PublicKey:   spki,
			Certificate: cert.Raw,
			NotAfter:    cert.NotAfter.Unix(),
		},
	}, nil
}

// Thumbprint is the base64url (unpadded) SHA-1 of a DER certificate: Entra's kid
// and the JOSE x5t.
func Thumbprint(certDER []byte) string {
	sum := sha1.Sum(certDER) //nolint:gosec // see import.
	return base64.RawURLEncoding.EncodeToString(sum[:])
}

// LoadOrCreate reads the key file at path, or, when it does not exist, generates
// a key and writes it there with mode 0600. An existing file readable or
// writable by group or others is refused. The file holds a PKCS#8 private key
// and the certificate, PEM-encoded.
func LoadOrCreate(path, owner string, now time.Time) (*Key, error) {
	fi, err := os.Stat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		k, err := Generate(owner, now, 0)
		if err != nil {
			return nil, err
		}
		if err := k.write(path); err != nil {
			return nil, err
		}
		return k, nil
	case err != nil:
		return nil, fmt.Errorf("signing: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("signing: key file %s has mode %v, want 0600", path, fi.Mode().Perm())
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("signing: %w", err)
	}
	return parse(data, owner)
}

func parse(data []byte, owner string) (*Key, error) {
	var priv *rsa.PrivateKey
	var cert *x509.Certificate
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			break
		}
		switch block.Type {
		case "PRIVATE KEY":
			k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
			if err != nil {
				return nil, fmt.Errorf("signing: parse private key: %w", err)
			}
			rk, ok := k.(*rsa.PrivateKey)
			if !ok {
				return nil, fmt.Errorf("signing: private key is %T, want RSA", k)
			}
			priv = rk
		case "CERTIFICATE":
			c, err := x509.ParseCertificate(block.Bytes)
			if err != nil {
				return nil, fmt.Errorf("signing: parse certificate: %w", err)
			}
			cert = c
		}
	}
	if priv == nil || cert == nil {
		return nil, errors.New("signing: key file must hold a PRIVATE KEY and a CERTIFICATE block")
	}
	return newKey(priv, cert, owner)
}

func (k *Key) write(path string) error {
	der, err := x509.MarshalPKCS8PrivateKey(k.priv)
	if err != nil {
		return fmt.Errorf("signing: marshal private key: %w", err)
	}
	data := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
	data = append(data, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: k.cert.Raw})...)
	tmp, err := os.CreateTemp(filepath.Dir(path), ".signing-key-*")
	if err != nil {
		return fmt.Errorf("signing: %w", err)
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return fmt.Errorf("signing: %w", err)
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("signing: write key file: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("signing: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("signing: %w", err)
	}
	// Link rather than rename, so that a file created meanwhile by another
	// process is never replaced.
	if err := os.Link(tmp.Name(), path); err != nil {
		return fmt.Errorf("signing: install key file: %w", err)
	}
	return nil
}

// KID is the key ID (and x5t) this key signs with.
func (k *Key) KID() string { return k.kid }

// Public is the row to publish so that every replica lists this key. The
// caller must not modify it.
func (k *Key) Public() *ferrypb.SigningKey { return k.pub }

// PublicKey is the RSA public key.
func (k *Key) PublicKey() crypto.PublicKey { return &k.priv.PublicKey }

// NotAfter is the end of the certificate's validity.
func (k *Key) NotAfter() time.Time { return k.cert.NotAfter }

// Sign returns a compact RS256 JWS over claims (marshalled with encoding/json).
// The header carries typ "JWT" and kid, plus x5t when withX5t is set (Entra
// puts x5t in v1 tokens only).
func (k *Key) Sign(claims any, withX5t bool) (string, error) {
	hdr := header{Typ: "JWT", Alg: "RS256", Kid: k.kid}
	if withX5t {
		hdr.X5t = k.kid
	}
	h, err := json.Marshal(hdr)
	if err != nil {
		return "", fmt.Errorf("signing: %w", err)
	}
	body, err := json.Marshal(claims)
	if err != nil {
		return "", fmt.Errorf("signing: marshal claims: %w", err)
	}
	enc := base64.RawURLEncoding
	buf := make([]byte, 0, enc.EncodedLen(len(h))+enc.EncodedLen(len(body))+2+enc.EncodedLen(k.priv.Size()))
	buf = enc.AppendEncode(buf, h)
	buf = append(buf, '.')
	buf = enc.AppendEncode(buf, body)
	sig, err := jwt.SigningMethodRS256.Sign(string(buf), k.priv)
	if err != nil {
		return "", fmt.Errorf("signing: sign: %w", err)
	}
	buf = append(buf, '.')
	buf = enc.AppendEncode(buf, sig)
	return string(buf), nil
}

type header struct {
	Typ string `json:"typ"`
	Alg string `json:"alg"`
	X5t string `json:"x5t,omitempty"`
	Kid string `json:"kid"`
}
