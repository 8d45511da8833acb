// Package tpm is the "tpm" node attestor: a machine proves it holds a TPM 2.0
// whose endorsement key (EK) certificate chains to a TPM manufacturer CA the
// server trusts, by credential activation with an attestation key (AK) made
// on that TPM for this attestation.
//
// Exchange (the TPM work is github.com/google/go-attestation's, over
// github.com/google/go-tpm):
//
//  1. The agent opens the TPM (the kernel's resource manager /dev/tpmrm0, or
//     a software TPM's unix socket), reads the RSA EK certificate from its NV
//     index (0x01c00002), makes an AK (restricted signing key under the
//     storage root key) and sends {"ek_cert": DER, "ak": the AK's public
//     area, creation data, creation attestation and its signature}.
//  2. The server verifies the EK certificate to the configured manufacturer
//     CAs, checks the AK's properties (fixedTPM, fixedParent,
//     sensitiveDataOrigin, restricted signing) and its creation attestation,
//     and encrypts a fresh random secret to the EK, bound to the AK's name
//     (TPM2_MakeCredential, in software). It sends {"credential", "secret"}.
//  3. The agent has its TPM decrypt it (TPM2_ActivateCredential), which the
//     TPM does only if it holds both the EK and an AK of that name, and
//     answers {"secret"}.
//  4. The server compares the secret in constant time.
//
// The secret is new for each attestation, so a captured exchange is
// worthless, and the machine can always attest again (CanReattest): a wiped
// agent gets the same agent ID.
//
// Agent ID: spiffe://<td>/spire/agent/tpm/<SHA-256 of the EK public key
// (PKIX DER), hex>. Selectors:
//
//	tpm:ek-hash:<SHA-256 of the EK public key, hex>
//	tpm:ek-ca:<SHA-256 of each CA certificate above the EK certificate, hex>
//
// DevID certificates (SPIRE's tpm_devid) are not handled.
package tpm

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"fmt"

	"github.com/google/go-attestation/attest"

	"github.com/ferry-id/ferry/internal/selector"
)

// Name is the attestor name and selector type.
const Name = "tpm"

// DefaultDevice is the kernel's TPM resource manager.
const DefaultDevice = "/dev/tpmrm0"

type payload struct {
	EKCert []byte                       `json:"ek_cert"`
	AK     attest.AttestationParameters `json:"ak"`
}

type challenge struct {
	Credential []byte `json:"credential"`
	Secret     []byte `json:"secret"`
}

type response struct {
	Secret []byte `json:"secret"`
}

// PublicKeyHash returns the hex SHA-256 of pub's PKIX DER encoding.
func PublicKeyHash(pub any) (string, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return "", fmt.Errorf("tpm: EK public key: %w", err)
	}
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:]), nil
}

// Selectors declares the node selectors this attestor produces (see the
// package comment), for the catalog's registry.
func Selectors() selector.Schema {
	return selector.Schema{Type: Name, Class: selector.Node, Kinds: []selector.Kind{
		{Name: "ek-hash", Form: "<sha256 hex>", Help: "SHA-256 of the TPM's EK public key (PKIX DER)", Check: selector.CheckHex(64)},
		{Name: "ek-ca", Form: "<sha256 hex>", Help: "SHA-256 of a CA certificate above the EK certificate", Check: selector.CheckHex(64)},
	}}
}

var schema = selector.MustRegistry(Selectors())
