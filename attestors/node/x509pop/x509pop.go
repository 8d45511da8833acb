// Package x509pop is the "x509pop" node attestor: proof of possession of a
// private key whose certificate chains to a CA the server trusts, for nodes
// provisioned with an X.509 identity out of band.
//
// Exchange (JSON messages, field for field SPIRE's x509pop wire format):
//
//  1. The agent sends its chain, leaf first: {"certificates": [DER, …]}.
//  2. The server parses and bounds it (at most MaxIntermediates
//     intermediates, RSA 2048–8192 bits or ECDSA P-256/P-384 keys only, a
//     leaf that is not a CA and has the digitalSignature key usage), verifies
//     it against the configured roots at the current time, and only then
//     sends a fresh 32-byte nonce: {"rsa_signature":{"nonce":…}} or
//     {"ecdsa_signature":{"nonce":…}} according to the leaf's key.
//  3. The agent picks its own 32-byte nonce and signs
//     SHA-256(server nonce ‖ agent nonce) with the leaf key (RSA-PSS/SHA-256,
//     or ECDSA returning r and s), sending back its nonce and the signature.
//  4. The server verifies the signature over its own nonce, so a response
//     captured from an earlier exchange is worthless.
//
// The agent ID is spiffe://<td>/spire/agent/x509pop/<SHA-1 fingerprint of the
// leaf DER>, or the path rendered from Config.AgentPathTemplate. Selectors, as
// SPIRE's:
//
//	x509pop:subject:cn:<leaf common name>
//	x509pop:ca:fingerprint:<SHA-1 of each certificate above the leaf, root included>
//	x509pop:serialnumber:<leaf serial, lowercase hex, even length>
//	x509pop:san:<key>:<value>   for each leaf URI SAN x509pop://<td>/<key>/<value>
//
// An x509pop agent can re-attest: it still holds its key.
package x509pop

import (
	"crypto/sha1"
	"crypto/x509"
	"encoding/hex"
	"math/big"
)

// Name is the attestor name and selector type.
const Name = "x509pop"

// Limits.
const (
	// NonceSize is the size of each side's nonce, in bytes.
	NonceSize = 32
	// DefaultMaxIntermediates is the default cap on intermediates in a chain.
	DefaultMaxIntermediates = 4
	// MinRSAKeyBits and MaxRSAKeyBits bound the RSA keys accepted in a chain.
	// The upper bound limits the CPU an unauthenticated payload can cost.
	MinRSAKeyBits = 2048
	MaxRSAKeyBits = 8192
)

// attestationData is the payload.
type attestationData struct {
	// Certificates is the DER chain, leaf first.
	Certificates [][]byte `json:"certificates"`
}

type rsaChallenge struct {
	Nonce []byte `json:"nonce"`
}

type ecdsaChallenge struct {
	Nonce []byte `json:"nonce"`
}

type challenge struct {
	RSASignature   *rsaChallenge   `json:"rsa_signature,omitempty"`
	ECDSASignature *ecdsaChallenge `json:"ecdsa_signature,omitempty"`
}

type rsaResponse struct {
	Nonce     []byte `json:"nonce"`
	Signature []byte `json:"signature"`
}

type ecdsaResponse struct {
	Nonce []byte `json:"nonce"`
	R     []byte `json:"r"`
	S     []byte `json:"s"`
}

type response struct {
	RSASignature   *rsaResponse   `json:"rsa_signature,omitempty"`
	ECDSASignature *ecdsaResponse `json:"ecdsa_signature,omitempty"`
}

// Fingerprint returns the hex SHA-1 of cert's DER encoding, SPIRE's x509pop
// fingerprint. SHA-1 names a certificate that has already been verified; it is
// not relied on for collision resistance.
func Fingerprint(cert *x509.Certificate) string {
	sum := sha1.Sum(cert.Raw)
	return hex.EncodeToString(sum[:])
}

// SerialNumberHex returns n as lowercase hex, left-padded to an even length.
func SerialNumberHex(n *big.Int) string {
	s := n.Text(16)
	if len(s)%2 != 0 {
		s = "0" + s
	}
	return s
}
