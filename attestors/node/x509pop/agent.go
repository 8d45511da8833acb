package x509pop

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"sync"

	"github.com/ferry-id/ferry/attestors/node"
)

// AgentConfig configures the agent half. Files are read on every Payload, so
// a renewed certificate and key are picked up without a restart.
type AgentConfig struct {
	// CertificatePath is a PEM file holding the leaf certificate, optionally
	// followed by intermediates.
	CertificatePath string
	// IntermediatesPath is an optional PEM file of further intermediates.
	IntermediatesPath string
	// PrivateKeyPath is a PEM file holding the leaf's private key (PKCS#8,
	// SEC 1 "EC PRIVATE KEY" or PKCS#1 "RSA PRIVATE KEY").
	PrivateKeyPath string
}

// Agent is the agent half. Payload and Respond for one attestation must not
// overlap with another attestation on the same Agent.
type Agent struct {
	cfg AgentConfig

	mu  sync.Mutex
	key crypto.Signer // loaded by the last Payload
}

var _ node.AgentAttestor = (*Agent)(nil)

// NewAgent returns the agent half; it loads the files once to report a
// misconfiguration early.
func NewAgent(c AgentConfig) (*Agent, error) {
	if c.CertificatePath == "" || c.PrivateKeyPath == "" {
		return nil, errors.New("x509pop: certificate and private key paths are required")
	}
	if _, _, err := loadAgentFiles(c); err != nil {
		return nil, err
	}
	return &Agent{cfg: c}, nil
}

// Name returns "x509pop".
func (a *Agent) Name() string { return Name }

// Payload loads the chain and key and returns the chain.
func (a *Agent) Payload(context.Context) ([]byte, error) {
	chain, key, err := loadAgentFiles(a.cfg)
	if err != nil {
		return nil, err
	}
	data := attestationData{}
	for _, c := range chain {
		data.Certificates = append(data.Certificates, c.Raw)
	}
	b, err := json.Marshal(data)
	if err != nil {
		return nil, fmt.Errorf("x509pop: marshal payload: %w", err)
	}
	a.mu.Lock()
	a.key = key
	a.mu.Unlock()
	return b, nil
}

// Respond signs the server's nonce together with a fresh nonce of its own.
func (a *Agent) Respond(_ context.Context, challengeBytes []byte) ([]byte, error) {
	a.mu.Lock()
	key := a.key
	a.mu.Unlock()
	if key == nil {
		return nil, errors.New("x509pop: challenge before payload")
	}
	if len(challengeBytes) > node.MaxPayloadSize {
		return nil, errors.New("x509pop: challenge too large")
	}
	var c challenge
	if err := json.Unmarshal(challengeBytes, &c); err != nil {
		return nil, fmt.Errorf("x509pop: malformed challenge: %w", err)
	}
	own := make([]byte, NonceSize)
	if _, err := rand.Read(own); err != nil {
		return nil, fmt.Errorf("x509pop: nonce: %w", err)
	}
	var resp response
	switch k := key.(type) {
	case *rsa.PrivateKey:
		if c.RSASignature == nil {
			return nil, errors.New("x509pop: expected an RSA challenge")
		}
		digest, err := combineNonces(c.RSASignature.Nonce, own)
		if err != nil {
			return nil, err
		}
		sig, err := rsa.SignPSS(rand.Reader, k, crypto.SHA256, digest, nil)
		if err != nil {
			return nil, fmt.Errorf("x509pop: sign: %w", err)
		}
		resp.RSASignature = &rsaResponse{Nonce: own, Signature: sig}
	case *ecdsa.PrivateKey:
		if c.ECDSASignature == nil {
			return nil, errors.New("x509pop: expected an ECDSA challenge")
		}
		digest, err := combineNonces(c.ECDSASignature.Nonce, own)
		if err != nil {
			return nil, err
		}
		r, s, err := ecdsa.Sign(rand.Reader, k, digest)
		if err != nil {
			return nil, fmt.Errorf("x509pop: sign: %w", err)
		}
		resp.ECDSASignature = &ecdsaResponse{Nonce: own, R: r.Bytes(), S: s.Bytes()}
	default:
		return nil, fmt.Errorf("x509pop: unsupported key type %T", key)
	}
	b, err := json.Marshal(resp)
	if err != nil {
		return nil, fmt.Errorf("x509pop: marshal response: %w", err)
	}
	return b, nil
}

// combineNonces returns SHA-256(server ‖ agent), the signed digest.
func combineNonces(server, agent []byte) ([]byte, error) {
	if len(server) != NonceSize {
		return nil, fmt.Errorf("x509pop: server nonce is %d bytes, want %d", len(server), NonceSize)
	}
	if len(agent) != NonceSize {
		return nil, fmt.Errorf("x509pop: agent nonce is %d bytes, want %d", len(agent), NonceSize)
	}
	h := sha256.New()
	h.Write(server)
	h.Write(agent)
	return h.Sum(nil), nil
}

func loadAgentFiles(c AgentConfig) ([]*x509.Certificate, crypto.Signer, error) {
	chain, err := LoadCertificates(c.CertificatePath)
	if err != nil {
		return nil, nil, err
	}
	if c.IntermediatesPath != "" {
		more, err := LoadCertificates(c.IntermediatesPath)
		if err != nil {
			return nil, nil, err
		}
		chain = append(chain, more...)
	}
	key, err := loadPrivateKey(c.PrivateKeyPath)
	if err != nil {
		return nil, nil, err
	}
	if !publicKeyEqual(chain[0].PublicKey, key.Public()) {
		return nil, nil, fmt.Errorf("x509pop: private key in %s does not match the certificate in %s", c.PrivateKeyPath, c.CertificatePath)
	}
	return chain, key, nil
}

// LoadCertificates reads every CERTIFICATE block of a PEM file, in order. It
// fails if there is none.
func LoadCertificates(path string) ([]*x509.Certificate, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("x509pop: %w", err)
	}
	var certs []*x509.Certificate
	for {
		var block *pem.Block
		block, b = pem.Decode(b)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("x509pop: %s: %w", path, err)
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, fmt.Errorf("x509pop: %s: no certificates", path)
	}
	return certs, nil
}

func loadPrivateKey(path string) (crypto.Signer, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("x509pop: %w", err)
	}
	for {
		var block *pem.Block
		block, b = pem.Decode(b)
		if block == nil {
			return nil, fmt.Errorf("x509pop: %s: no private key", path)
		}
		var key any
		switch block.Type {
		case "PRIVATE KEY":
			key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
		case "EC PRIVATE KEY":
			key, err = x509.ParseECPrivateKey(block.Bytes)
		case "RSA PRIVATE KEY":
			key, err = x509.ParsePKCS1PrivateKey(block.Bytes)
		default:
			continue
		}
		if err != nil {
			// The parse error never includes key material.
			return nil, fmt.Errorf("x509pop: %s: %w", path, err)
		}
		switch k := key.(type) {
		case *rsa.PrivateKey:
			return k, nil
		case *ecdsa.PrivateKey:
			return k, nil
		default:
			return nil, fmt.Errorf("x509pop: %s: unsupported key type %T", path, key)
		}
	}
}

func publicKeyEqual(a, b crypto.PublicKey) bool {
	k, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && k.Equal(b)
}
