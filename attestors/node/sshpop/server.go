package sshpop

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/crypto/ssh"

	"github.com/ferry-id/ferry/attestors/node"
)

// ServerConfig configures the server half.
type ServerConfig struct {
	// TrustDomain is the trust domain agent IDs are issued in.
	TrustDomain spiffeid.TrustDomain
	// CertAuthorities are the CA keys host certificates must be signed by.
	CertAuthorities []ssh.PublicKey
	// Now returns the current time; default time.Now.
	Now func() time.Time
	// Log receives one line per attestation; default slog.Default().
	Log *slog.Logger
}

// Server is the server half; safe for concurrent use.
type Server struct {
	td  spiffeid.TrustDomain
	cas map[string]bool // KeyHash
	now func() time.Time
	log *slog.Logger
}

var _ node.ServerAttestor = (*Server)(nil)

// NewServer validates c and returns the server half.
func NewServer(c ServerConfig) (*Server, error) {
	if c.TrustDomain.IsZero() {
		return nil, errors.New("sshpop: trust domain is required")
	}
	if len(c.CertAuthorities) == 0 {
		return nil, errors.New("sshpop: at least one certificate authority is required")
	}
	s := &Server{td: c.TrustDomain, cas: map[string]bool{}, now: c.Now, log: c.Log}
	for _, k := range c.CertAuthorities {
		if _, ok := k.(*ssh.Certificate); ok {
			return nil, errors.New("sshpop: a certificate authority must be a plain public key")
		}
		s.cas[KeyHash(k)] = true
	}
	if s.now == nil {
		s.now = time.Now
	}
	if s.log == nil {
		s.log = slog.Default()
	}
	return s, nil
}

// Name returns "sshpop".
func (s *Server) Name() string { return Name }

// Attest verifies the host certificate and the agent's possession of its key.
func (s *Server) Attest(ctx context.Context, raw []byte, challengeFn node.ChallengeFunc) (*node.Result, error) {
	res, err := s.attest(ctx, raw, challengeFn)
	if err != nil {
		s.log.Info("sshpop attestation rejected", "error", err)
		return nil, err
	}
	s.log.Info("sshpop attestation succeeded", "agent_id", res.AgentID.String())
	return res, nil
}

func (s *Server) attest(ctx context.Context, raw []byte, challengeFn node.ChallengeFunc) (*node.Result, error) {
	if len(raw) > node.MaxPayloadSize {
		return nil, fmt.Errorf("sshpop: payload is %d bytes, over %d", len(raw), node.MaxPayloadSize)
	}
	var p payload
	if err := json.Unmarshal(raw, &p); err != nil {
		return nil, fmt.Errorf("sshpop: malformed payload: %w", err)
	}
	pub, err := ssh.ParsePublicKey(p.Cert)
	if err != nil {
		return nil, fmt.Errorf("sshpop: certificate: %w", err)
	}
	cert, ok := pub.(*ssh.Certificate)
	if !ok {
		return nil, errors.New("sshpop: a plain public key, not a certificate")
	}
	if cert.CertType != ssh.HostCert {
		return nil, errors.New("sshpop: a user certificate, not a host certificate")
	}
	if len(cert.ValidPrincipals) == 0 {
		return nil, errors.New("sshpop: the host certificate names no principal")
	}
	checker := ssh.CertChecker{
		IsHostAuthority: func(auth ssh.PublicKey, _ string) bool { return s.cas[KeyHash(auth)] },
		Clock:           s.now,
	}
	// CheckHostKey checks the type, the authority, the principal, the
	// validity window and the CA's signature.
	if err := checker.CheckHostKey(net.JoinHostPort(cert.ValidPrincipals[0], "22"), nil, cert); err != nil {
		return nil, fmt.Errorf("sshpop: host certificate refused: %w", err)
	}
	if challengeFn == nil {
		return nil, errors.New("sshpop: no challenge channel")
	}
	nonce := make([]byte, NonceSize)
	if _, err := rand.Read(nonce); err != nil {
		return nil, fmt.Errorf("sshpop: nonce: %w", err)
	}
	cb, _ := json.Marshal(challenge{Nonce: nonce})
	rb, err := challengeFn(ctx, cb)
	if err != nil {
		return nil, fmt.Errorf("sshpop: challenge: %w", err)
	}
	if len(rb) > node.MaxPayloadSize {
		return nil, fmt.Errorf("sshpop: response is %d bytes, over %d", len(rb), node.MaxPayloadSize)
	}
	var r response
	if err := json.Unmarshal(rb, &r); err != nil {
		return nil, fmt.Errorf("sshpop: malformed response: %w", err)
	}
	if len(r.Nonce) != NonceSize {
		return nil, fmt.Errorf("sshpop: agent nonce is %d bytes, want %d", len(r.Nonce), NonceSize)
	}
	var sig ssh.Signature
	if err := ssh.Unmarshal(r.Signature, &sig); err != nil {
		return nil, fmt.Errorf("sshpop: malformed signature: %w", err)
	}
	if err := cert.Key.Verify(signed(nonce, r.Nonce), &sig); err != nil {
		return nil, errors.New("sshpop: signature verification failed: the agent does not hold the host key")
	}
	values := []string{"ca:" + KeyHash(cert.SignatureKey)}
	for _, pr := range cert.ValidPrincipals {
		values = append(values, "principal:"+pr)
	}
	sels, err := node.Selectors(schema, Name, values...)
	if err != nil {
		return nil, fmt.Errorf("sshpop: certificate: %w", err)
	}
	id, err := node.AgentPath(s.td, Name, KeyHash(cert.Key))
	if err != nil {
		return nil, err
	}
	return &node.Result{AgentID: id, Selectors: sels, CanReattest: true}, nil
}
