package sshpop

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sync"

	"golang.org/x/crypto/ssh"

	"github.com/ferry-id/ferry/attestors/node"
)

// AgentConfig configures the agent half. The files are read on every
// attestation, so a renewed certificate is picked up without a restart.
type AgentConfig struct {
	// HostKeyPath is the host's private key (OpenSSH format); default
	// DefaultHostKeyPath.
	HostKeyPath string
	// HostCertPath is its certificate; default DefaultHostCertPath.
	HostCertPath string
}

// Agent is the agent half.
type Agent struct {
	cfg AgentConfig

	mu  sync.Mutex
	key ssh.Signer // loaded by the last Payload
}

var _ node.AgentAttestor = (*Agent)(nil)

// NewAgent returns the agent half; it loads the files once to report a
// misconfiguration early.
func NewAgent(c AgentConfig) (*Agent, error) {
	if c.HostKeyPath == "" {
		c.HostKeyPath = DefaultHostKeyPath
	}
	if c.HostCertPath == "" {
		c.HostCertPath = DefaultHostCertPath
	}
	if _, _, err := load(c); err != nil {
		return nil, err
	}
	return &Agent{cfg: c}, nil
}

func load(c AgentConfig) (*ssh.Certificate, ssh.Signer, error) {
	kb, err := os.ReadFile(c.HostKeyPath)
	if err != nil {
		return nil, nil, fmt.Errorf("sshpop: %w", err)
	}
	key, err := ssh.ParsePrivateKey(kb)
	if err != nil {
		return nil, nil, fmt.Errorf("sshpop: %s: %w", c.HostKeyPath, err)
	}
	cb, err := os.ReadFile(c.HostCertPath)
	if err != nil {
		return nil, nil, fmt.Errorf("sshpop: %w", err)
	}
	pub, _, _, _, err := ssh.ParseAuthorizedKey(cb)
	if err != nil {
		return nil, nil, fmt.Errorf("sshpop: %s: %w", c.HostCertPath, err)
	}
	cert, ok := pub.(*ssh.Certificate)
	if !ok {
		return nil, nil, fmt.Errorf("sshpop: %s holds a public key, not a certificate", c.HostCertPath)
	}
	if KeyHash(cert.Key) != KeyHash(key.PublicKey()) {
		return nil, nil, fmt.Errorf("sshpop: the certificate in %s is not for the key in %s", c.HostCertPath, c.HostKeyPath)
	}
	return cert, key, nil
}

// Name returns "sshpop".
func (a *Agent) Name() string { return Name }

// Payload returns the host certificate.
func (a *Agent) Payload(context.Context) ([]byte, error) {
	cert, key, err := load(a.cfg)
	if err != nil {
		return nil, err
	}
	a.mu.Lock()
	a.key = key
	a.mu.Unlock()
	return json.Marshal(payload{Cert: cert.Marshal()})
}

// Respond signs the server's nonce with one of its own.
func (a *Agent) Respond(_ context.Context, c []byte) ([]byte, error) {
	a.mu.Lock()
	key := a.key
	a.mu.Unlock()
	if key == nil {
		return nil, errors.New("sshpop: challenge before payload")
	}
	var ch challenge
	if err := json.Unmarshal(c, &ch); err != nil {
		return nil, fmt.Errorf("sshpop: malformed challenge: %w", err)
	}
	if len(ch.Nonce) != NonceSize {
		return nil, fmt.Errorf("sshpop: server nonce is %d bytes, want %d", len(ch.Nonce), NonceSize)
	}
	own := make([]byte, NonceSize)
	if _, err := rand.Read(own); err != nil {
		return nil, fmt.Errorf("sshpop: nonce: %w", err)
	}
	sig, err := key.Sign(rand.Reader, signed(ch.Nonce, own))
	if err != nil {
		return nil, fmt.Errorf("sshpop: sign: %w", err)
	}
	return json.Marshal(response{Nonce: own, Signature: ssh.Marshal(sig)})
}
