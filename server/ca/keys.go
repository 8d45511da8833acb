package ca

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
)

// Bounds on RSA keys accepted in CSRs: below 2048 bits is weak; above 8192
// bits only makes verification expensive.
const (
	minRSABits = 2048
	maxRSABits = 8192
)

// newKeyFunc returns the generator of a CA key type.
func newKeyFunc(t KeyType) (func() (crypto.Signer, error), error) {
	switch t {
	case KeyECP256:
		return func() (crypto.Signer, error) { return ecdsa.GenerateKey(elliptic.P256(), rand.Reader) }, nil
	case KeyECP384:
		return func() (crypto.Signer, error) { return ecdsa.GenerateKey(elliptic.P384(), rand.Reader) }, nil
	case KeyRSA2048:
		return func() (crypto.Signer, error) { return rsa.GenerateKey(rand.Reader, 2048) }, nil
	case KeyRSA4096:
		return func() (crypto.Signer, error) { return rsa.GenerateKey(rand.Reader, 4096) }, nil
	}
	return nil, fmt.Errorf("ca: unsupported CA key type %q", t)
}

// newJWTKey generates a JWT signing key for alg.
func newJWTKey(alg JWTAlgorithm) (crypto.Signer, error) {
	switch alg {
	case ES256:
		return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case RS256:
		return rsa.GenerateKey(rand.Reader, 2048)
	}
	return nil, fmt.Errorf("ca: unsupported JWT algorithm %q", alg)
}

// checkJWTKey reports whether key can sign JWTs with alg.
func checkJWTKey(alg JWTAlgorithm, key crypto.Signer) error {
	switch k := key.Public().(type) {
	case *ecdsa.PublicKey:
		if alg == ES256 && k.Curve == elliptic.P256() {
			return nil
		}
	case *rsa.PublicKey:
		if alg == RS256 && k.N.BitLen() >= minRSABits {
			return nil
		}
	}
	return fmt.Errorf("ca: JWT key does not match algorithm %s", alg)
}

// checkSubjectKey refuses weak or unsupported keys of SVID subjects.
func checkSubjectKey(pub crypto.PublicKey) error {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if k.Curve == elliptic.P256() || k.Curve == elliptic.P384() {
			return nil
		}
		name := "unknown"
		if k.Curve != nil && k.Curve.Params() != nil {
			name = k.Curve.Params().Name
		}
		return fmt.Errorf("%w: ECDSA curve %s (want P-256 or P-384)", ErrUnsupportedKey, name)
	case *rsa.PublicKey:
		bits := k.N.BitLen()
		if bits < minRSABits || bits > maxRSABits {
			return fmt.Errorf("%w: RSA key of %d bits (want %d to %d)", ErrUnsupportedKey, bits, minRSABits, maxRSABits)
		}
		if k.E < 3 || k.E%2 == 0 {
			return fmt.Errorf("%w: RSA public exponent %d", ErrUnsupportedKey, k.E)
		}
		return nil
	case nil:
		return fmt.Errorf("%w: no key", ErrUnsupportedKey)
	}
	return fmt.Errorf("%w: %T (want ECDSA or RSA)", ErrUnsupportedKey, pub)
}

func encodeKey(key crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("ca: encode key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// decodeKey reads a PEM private key in PKCS#8, PKCS#1 or SEC 1 form.
func decodeKey(data []byte) (crypto.Signer, error) {
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			return nil, errors.New("ca: no PEM private key")
		}
		var key any
		var err error
		switch block.Type {
		case "PRIVATE KEY":
			key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
		case "RSA PRIVATE KEY":
			key, err = x509.ParsePKCS1PrivateKey(block.Bytes)
		case "EC PRIVATE KEY":
			key, err = x509.ParseECPrivateKey(block.Bytes)
		default:
			continue // e.g. EC PARAMETERS
		}
		if err != nil {
			return nil, fmt.Errorf("ca: parse private key: %w", err)
		}
		s, ok := key.(crypto.Signer)
		if !ok {
			return nil, fmt.Errorf("ca: private key %T cannot sign", key)
		}
		return s, nil
	}
}

// parseCertsPEM reads every CERTIFICATE block of data.
func parseCertsPEM(data []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("ca: parse certificate: %w", err)
		}
		certs = append(certs, cert)
	}
	if len(certs) == 0 {
		return nil, errors.New("ca: no PEM certificate")
	}
	return certs, nil
}
