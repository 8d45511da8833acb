package tpm

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/x509"
	"encoding/asn1"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/google/go-attestation/attest"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ferry-id/ferry/attestors/node"
)

// ServerConfig configures the server half.
type ServerConfig struct {
	// TrustDomain is the trust domain agent IDs are issued in.
	TrustDomain spiffeid.TrustDomain
	// ManufacturerCAs are the roots EK certificates must chain to.
	ManufacturerCAs []*x509.Certificate
	// Intermediates are further CA certificates EK chains may go through.
	Intermediates []*x509.Certificate
	// Now returns the current time; default time.Now.
	Now func() time.Time
	// Log receives one line per attestation; default slog.Default().
	Log *slog.Logger
}

// Server is the server half; safe for concurrent use.
type Server struct {
	td    spiffeid.TrustDomain
	roots *x509.CertPool
	inter *x509.CertPool
	now   func() time.Time
	log   *slog.Logger
}

var _ node.ServerAttestor = (*Server)(nil)

// NewServer validates c and returns the server half.
func NewServer(c ServerConfig) (*Server, error) {
	if c.TrustDomain.IsZero() {
		return nil, errors.New("tpm: trust domain is required")
	}
	if len(c.ManufacturerCAs) == 0 {
		return nil, errors.New("tpm: at least one manufacturer CA is required")
	}
	s := &Server{td: c.TrustDomain, roots: x509.NewCertPool(), inter: x509.NewCertPool(), now: c.Now, log: c.Log}
	for _, r := range c.ManufacturerCAs {
		s.roots.AddCert(r)
	}
	for _, r := range c.Intermediates {
		s.inter.AddCert(r)
	}
	if s.now == nil {
		s.now = time.Now
	}
	if s.log == nil {
		s.log = slog.Default()
	}
	return s, nil
}

// Name returns "tpm".
func (s *Server) Name() string { return Name }

// Attest verifies the EK certificate and activates a credential against the
// AK to prove both are on one TPM.
func (s *Server) Attest(ctx context.Context, raw []byte, challengeFn node.ChallengeFunc) (*node.Result, error) {
	res, err := s.attest(ctx, raw, challengeFn)
	if err != nil {
		s.log.Info("tpm attestation rejected", "error", err)
		return nil, err
	}
	s.log.Info("tpm attestation succeeded", "agent_id", res.AgentID.String())
	return res, nil
}

// subjectAltName is the extension TPM EK certificates mark critical and fill
// with a directory name (manufacturer, model, version), which Go's verifier
// does not handle.
var subjectAltName = asn1.ObjectIdentifier{2, 5, 29, 17}

func (s *Server) attest(ctx context.Context, raw []byte, challengeFn node.ChallengeFunc) (*node.Result, error) {
	if len(raw) > node.MaxPayloadSize {
		return nil, fmt.Errorf("tpm: payload is %d bytes, over %d", len(raw), node.MaxPayloadSize)
	}
	var p payload
	if err := json.Unmarshal(raw, &p); err != nil {
		return nil, fmt.Errorf("tpm: malformed payload: %w", err)
	}
	ek, err := attest.ParseEKCertificate(p.EKCert)
	if err != nil {
		return nil, fmt.Errorf("tpm: EK certificate: %w", err)
	}
	unhandled := ek.UnhandledCriticalExtensions[:0]
	for _, oid := range ek.UnhandledCriticalExtensions {
		if !oid.Equal(subjectAltName) {
			unhandled = append(unhandled, oid)
		}
	}
	ek.UnhandledCriticalExtensions = unhandled
	chains, err := ek.Verify(x509.VerifyOptions{Roots: s.roots, Intermediates: s.inter, CurrentTime: s.now(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	if err != nil {
		return nil, fmt.Errorf("tpm: EK certificate does not chain to a configured manufacturer CA: %w", err)
	}
	if challengeFn == nil {
		return nil, errors.New("tpm: no challenge channel")
	}
	params := attest.ActivationParameters{EK: ek.PublicKey, AK: p.AK}
	secret, cred, err := params.Generate()
	if err != nil {
		return nil, fmt.Errorf("tpm: attestation key refused: %w", err)
	}
	cb, err := json.Marshal(challenge{Credential: cred.Credential, Secret: cred.Secret})
	if err != nil {
		return nil, fmt.Errorf("tpm: %w", err)
	}
	rb, err := challengeFn(ctx, cb)
	if err != nil {
		return nil, fmt.Errorf("tpm: challenge: %w", err)
	}
	if len(rb) > node.MaxPayloadSize {
		return nil, fmt.Errorf("tpm: response is %d bytes, over %d", len(rb), node.MaxPayloadSize)
	}
	var r response
	if err := json.Unmarshal(rb, &r); err != nil {
		return nil, fmt.Errorf("tpm: malformed response: %w", err)
	}
	if subtle.ConstantTimeCompare(r.Secret, secret) != 1 {
		return nil, errors.New("tpm: credential activation failed: the AK is not on the TPM of this EK")
	}
	hash, err := PublicKeyHash(ek.PublicKey)
	if err != nil {
		return nil, err
	}
	values := []string{"ek-hash:" + hash}
	for _, ch := range chains {
		for _, c := range ch[1:] {
			sum := sha256.Sum256(c.Raw)
			values = append(values, "ek-ca:"+hex.EncodeToString(sum[:]))
		}
	}
	sels, err := node.Selectors(schema, Name, values...)
	if err != nil {
		return nil, fmt.Errorf("tpm: %w", err)
	}
	id, err := node.AgentPath(s.td, Name, hash)
	if err != nil {
		return nil, err
	}
	return &node.Result{AgentID: id, Selectors: sels, CanReattest: true}, nil
}
