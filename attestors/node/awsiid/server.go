package awsiid

import (
	"context"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"

	"github.com/smallstep/pkcs7"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ferry-id/ferry/attestors/node"
)

// ServerConfig configures the server half.
type ServerConfig struct {
	// TrustDomain is the trust domain agent IDs are issued in.
	TrustDomain spiffeid.TrustDomain
	// RegionCertificates maps each accepted region to AWS's RSA-2048
	// certificate for it. A document from another region is refused.
	RegionCertificates map[string]*x509.Certificate
	// AccountIDs are the accounts whose instances may attest (required).
	AccountIDs []string
	// AllowReattestation admits an instance again while an earlier agent of
	// it still holds a valid SVID. Off by default: the document is static.
	AllowReattestation bool
	// Log receives one line per attestation; default slog.Default().
	Log *slog.Logger
}

// Server is the server half; safe for concurrent use.
type Server struct {
	td       spiffeid.TrustDomain
	certs    map[string]*x509.Certificate
	accounts map[string]bool
	reattest bool
	log      *slog.Logger
}

var _ node.ServerAttestor = (*Server)(nil)

// NewServer validates c and returns the server half.
func NewServer(c ServerConfig) (*Server, error) {
	if c.TrustDomain.IsZero() {
		return nil, errors.New("aws_iid: trust domain is required")
	}
	if len(c.RegionCertificates) == 0 {
		return nil, errors.New("aws_iid: at least one region certificate is required")
	}
	if len(c.AccountIDs) == 0 {
		return nil, errors.New("aws_iid: at least one account ID is required")
	}
	s := &Server{td: c.TrustDomain, certs: map[string]*x509.Certificate{}, accounts: map[string]bool{}, reattest: c.AllowReattestation, log: c.Log}
	for r, cert := range c.RegionCertificates {
		if !regionRE.MatchString(r) {
			return nil, fmt.Errorf("aws_iid: %q is not an AWS region", r)
		}
		if cert == nil {
			return nil, fmt.Errorf("aws_iid: region %s: no certificate", r)
		}
		s.certs[r] = cert
	}
	for _, a := range c.AccountIDs {
		if !accountRE.MatchString(a) {
			return nil, fmt.Errorf("aws_iid: %q is not a 12-digit account ID", a)
		}
		s.accounts[a] = true
	}
	if s.log == nil {
		s.log = slog.Default()
	}
	return s, nil
}

// Name returns "aws_iid".
func (s *Server) Name() string { return Name }

// Attest verifies the signed document and names the agent after the instance.
func (s *Server) Attest(_ context.Context, payload []byte, _ node.ChallengeFunc) (*node.Result, error) {
	doc, err := s.Verify(payload)
	if err != nil {
		s.log.Info("aws_iid attestation rejected", "error", err)
		return nil, err
	}
	res, err := s.result(doc)
	if err != nil {
		s.log.Info("aws_iid attestation rejected", "instance_id", doc.InstanceID, "error", err)
		return nil, err
	}
	s.log.Info("aws_iid attestation succeeded", "agent_id", res.AgentID.String())
	return res, nil
}

// Verify checks the payload's signature and returns the signed document.
func (s *Server) Verify(raw []byte) (*Document, error) {
	if len(raw) > node.MaxPayloadSize {
		return nil, fmt.Errorf("aws_iid: payload is %d bytes, over %d", len(raw), node.MaxPayloadSize)
	}
	var p payload
	if err := json.Unmarshal(raw, &p); err != nil {
		return nil, fmt.Errorf("aws_iid: malformed payload: %w", err)
	}
	der, err := base64.StdEncoding.DecodeString(strings.Join(strings.Fields(p.RSA2048), ""))
	if err != nil {
		return nil, fmt.Errorf("aws_iid: rsa2048 signature is not base64: %w", err)
	}
	p7, err := pkcs7.Parse(der)
	if err != nil {
		return nil, fmt.Errorf("aws_iid: rsa2048 signature is not PKCS#7 signed data: %w", err)
	}
	if len(p7.Signers) != 1 {
		return nil, fmt.Errorf("aws_iid: want one signer, the signature has %d", len(p7.Signers))
	}
	if string(p7.Content) != p.Document {
		return nil, errors.New("aws_iid: the document sent is not the signed document")
	}
	var doc Document
	if err := json.Unmarshal(p7.Content, &doc); err != nil {
		return nil, fmt.Errorf("aws_iid: signed content is not an instance identity document: %w", err)
	}
	// The region names the key; it is trusted only once that key verified it.
	cert, ok := s.certs[doc.Region]
	if !ok {
		return nil, fmt.Errorf("aws_iid: no AWS certificate is configured for region %q", truncate(doc.Region))
	}
	p7.Certificates = []*x509.Certificate{cert}
	if p7.GetOnlySigner() == nil {
		return nil, fmt.Errorf("aws_iid: the document is not signed by the AWS certificate of region %s", doc.Region)
	}
	if err := p7.Verify(); err != nil {
		return nil, fmt.Errorf("aws_iid: signature verification failed: %w", err)
	}
	return &doc, nil
}

func (s *Server) result(doc *Document) (*node.Result, error) {
	if !accountRE.MatchString(doc.AccountID) || !instanceRE.MatchString(doc.InstanceID) {
		return nil, fmt.Errorf("aws_iid: signed document has account %q and instance %q, not AWS's forms", truncate(doc.AccountID), truncate(doc.InstanceID))
	}
	if !s.accounts[doc.AccountID] {
		return nil, fmt.Errorf("aws_iid: account %s is not allowed", doc.AccountID)
	}
	sels, err := node.Selectors(schema, Name,
		"account:id:"+doc.AccountID, "region:"+doc.Region, "az:"+doc.AvailabilityZone,
		"instance:id:"+doc.InstanceID, "instance:type:"+doc.InstanceType, "image:id:"+doc.ImageID)
	if err != nil {
		return nil, fmt.Errorf("aws_iid: signed document: %w", err)
	}
	id, err := node.AgentPath(s.td, Name, doc.AccountID, doc.Region, doc.InstanceID)
	if err != nil {
		return nil, err
	}
	return &node.Result{AgentID: id, Selectors: sels, CanReattest: s.reattest, SingleAgent: !s.reattest}, nil
}

func truncate(s string) string {
	if len(s) > 64 {
		return s[:64] + "…"
	}
	return s
}
