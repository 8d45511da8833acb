// Package sshpop is the "sshpop" node attestor: a machine proves it holds
// the private key of an SSH host certificate signed by a certificate
// authority the server trusts.
//
// Exchange:
//
//  1. The agent sends its host certificate (OpenSSH format, as
//     ssh-keygen -s … -h writes it): {"cert": "<wire format>"}.
//  2. The server checks it is a host certificate, signed by a configured CA,
//     valid now, with at least one principal, and sends a fresh 32-byte
//     nonce: {"nonce": …}.
//  3. The agent picks a nonce of its own and signs
//     SHA-256(server nonce ‖ agent nonce) with the host key:
//     {"nonce": …, "signature": <SSH signature>}.
//  4. The server verifies the signature with the certificate's key.
//
// A captured exchange is worthless (the server's nonce is new each time), so
// the machine can always attest again: a wiped agent gets the same agent ID.
//
// Agent ID: spiffe://<td>/spire/agent/sshpop/<SHA-256 of the host key's
// wire format, hex>. Selectors:
//
//	sshpop:principal:<each principal of the certificate (host names)>
//	sshpop:ca:<SHA-256 of the signing CA key's wire format, hex>
package sshpop

import (
	"crypto/sha256"
	"encoding/hex"

	"golang.org/x/crypto/ssh"

	"github.com/ferry-id/ferry/internal/selector"
)

// Name is the attestor name and selector type.
const Name = "sshpop"

// Defaults, where OpenSSH's host keys live.
const (
	DefaultHostKeyPath  = "/etc/ssh/ssh_host_ed25519_key"
	DefaultHostCertPath = "/etc/ssh/ssh_host_ed25519_key-cert.pub"
	// NonceSize is each side's nonce, in bytes.
	NonceSize = 32
)

type payload struct {
	Cert []byte `json:"cert"`
}

type challenge struct {
	Nonce []byte `json:"nonce"`
}

type response struct {
	Nonce     []byte `json:"nonce"`
	Signature []byte `json:"signature"`
}

// KeyHash returns the hex SHA-256 of k's wire format.
func KeyHash(k ssh.PublicKey) string {
	sum := sha256.Sum256(k.Marshal())
	return hex.EncodeToString(sum[:])
}

// signed returns what the agent signs: SHA-256(server nonce ‖ agent nonce).
func signed(server, agent []byte) []byte {
	h := sha256.New()
	h.Write(server)
	h.Write(agent)
	return h.Sum(nil)
}

// Selectors declares the node selectors this attestor produces (see the
// package comment), for the catalog's registry.
func Selectors() selector.Schema {
	return selector.Schema{Type: Name, Class: selector.Node, Kinds: []selector.Kind{
		{Name: "principal", Form: "<host name>", Help: "a principal of the SSH host certificate"},
		{Name: "ca", Form: "<sha256 hex>", Help: "SHA-256 of the signing CA key", Check: selector.CheckHex(64)},
	}}
}

var schema = selector.MustRegistry(Selectors())
