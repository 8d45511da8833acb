package x509pop

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"strings"
	"text/template"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ferry-id/ferry/attestors/node"
	"github.com/ferry-id/ferry/internal/selector"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

// DefaultAgentPathTemplate renders the agent ID path below /spire/agent/.
const DefaultAgentPathTemplate = "{{ .PluginName }}/{{ .Fingerprint }}"

// ServerConfig configures the server half.
type ServerConfig struct {
	// TrustDomain is the trust domain agent IDs are issued in.
	TrustDomain spiffeid.TrustDomain
	// Roots are the CA certificates agent chains must lead to. Load a PEM
	// bundle with LoadCertificates.
	Roots []*x509.Certificate
	// MaxIntermediates caps the intermediates an agent may send. Zero means
	// DefaultMaxIntermediates.
	MaxIntermediates int
	// ExtKeyUsages the leaf must be valid for. Nil means clientAuth: a leaf
	// without an EKU extension or with anyExtendedKeyUsage also passes. Use
	// []x509.ExtKeyUsage{x509.ExtKeyUsageAny} to accept any.
	ExtKeyUsages []x509.ExtKeyUsage
	// AgentPathTemplate is a text/template for the agent ID path below
	// /spire/agent/. It sees the leaf's x509.Certificate fields plus
	// .PluginName, .Fingerprint, .TrustDomain and .SerialNumberHex. Defaults to
	// DefaultAgentPathTemplate. The rendered path is validated as SPIFFE ID
	// path segments, so certificate fields cannot escape it ("..", "%2e").
	AgentPathTemplate string
	// Now returns the current time. Defaults to time.Now.
	Now func() time.Time
	// Log receives one line per attestation. Defaults to slog.Default().
	Log *slog.Logger
}

// Server is the server half. It is safe for concurrent use.
type Server struct {
	td       spiffeid.TrustDomain
	roots    *x509.CertPool
	maxInter int
	ekus     []x509.ExtKeyUsage
	tmpl     *template.Template
	now      func() time.Time
	log      *slog.Logger
}

var _ node.ServerAttestor = (*Server)(nil)

// NewServer returns the server half configured by c.
func NewServer(c ServerConfig) (*Server, error) {
	if c.TrustDomain.IsZero() {
		return nil, errors.New("x509pop: trust domain is required")
	}
	if len(c.Roots) == 0 {
		return nil, errors.New("x509pop: at least one root CA is required")
	}
	s := &Server{
		td:       c.TrustDomain,
		roots:    x509.NewCertPool(),
		maxInter: c.MaxIntermediates,
		ekus:     c.ExtKeyUsages,
		now:      c.Now,
		log:      c.Log,
	}
	for i, r := range c.Roots {
		if !r.IsCA {
			return nil, fmt.Errorf("x509pop: root %d (%s) is not a CA certificate", i, r.Subject)
		}
		s.roots.AddCert(r)
	}
	if s.maxInter < 0 {
		return nil, errors.New("x509pop: MaxIntermediates must not be negative")
	}
	if s.maxInter == 0 {
		s.maxInter = DefaultMaxIntermediates
	}
	if s.ekus == nil {
		s.ekus = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	}
	text := c.AgentPathTemplate
	if text == "" {
		text = DefaultAgentPathTemplate
	}
	tmpl, err := template.New("agent_path").Option("missingkey=error").Parse(text)
	if err != nil {
		return nil, fmt.Errorf("x509pop: agent path template: %w", err)
	}
	s.tmpl = tmpl
	if s.now == nil {
		s.now = time.Now
	}
	if s.log == nil {
		s.log = slog.Default()
	}
	return s, nil
}

// Name returns "x509pop".
func (s *Server) Name() string { return Name }

// Attest verifies the chain in payload, challenges the agent to prove
// possession of the leaf key, and returns its identity.
func (s *Server) Attest(ctx context.Context, payload []byte, challengeFn node.ChallengeFunc) (*node.Result, error) {
	leaf, chains, err := s.verifyChain(payload)
	if err != nil {
		s.log.Info("x509pop attestation rejected", "error", err)
		return nil, err
	}
	if err := s.proveKey(ctx, leaf, challengeFn); err != nil {
		s.log.Info("x509pop attestation rejected", "fingerprint", Fingerprint(leaf), "error", err)
		return nil, err
	}
	id, err := s.agentID(leaf)
	if err != nil {
		return nil, err
	}
	res := &node.Result{AgentID: id, Selectors: s.selectors(leaf, chains), CanReattest: true}
	s.log.Info("x509pop attestation succeeded", "agent_id", id.String(), "fingerprint", Fingerprint(leaf))
	return res, nil
}

// verifyChain parses, bounds and verifies the payload's chain.
func (s *Server) verifyChain(payload []byte) (*x509.Certificate, [][]*x509.Certificate, error) {
	if len(payload) > node.MaxPayloadSize {
		return nil, nil, fmt.Errorf("x509pop: payload is %d bytes, over %d", len(payload), node.MaxPayloadSize)
	}
	var data attestationData
	if err := json.Unmarshal(payload, &data); err != nil {
		return nil, nil, fmt.Errorf("x509pop: malformed payload: %w", err)
	}
	n := len(data.Certificates)
	if n == 0 {
		return nil, nil, errors.New("x509pop: no certificate in payload")
	}
	if n-1 > s.maxInter {
		return nil, nil, fmt.Errorf("x509pop: chain has %d intermediates, more than the %d allowed", n-1, s.maxInter)
	}
	certs := make([]*x509.Certificate, n)
	for i, der := range data.Certificates {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, nil, fmt.Errorf("x509pop: certificate %d: %w", i, err)
		}
		// Before any signature is checked: a huge key is the cheapest way to
		// make an unauthenticated request expensive.
		if err := checkPublicKey(c.PublicKey); err != nil {
			return nil, nil, fmt.Errorf("x509pop: certificate %d: %w", i, err)
		}
		certs[i] = c
	}
	leaf := certs[0]
	if leaf.BasicConstraintsValid && leaf.IsCA {
		return nil, nil, errors.New("x509pop: leaf certificate is a CA")
	}
	if leaf.KeyUsage&x509.KeyUsageDigitalSignature == 0 {
		return nil, nil, errors.New("x509pop: leaf certificate lacks the digitalSignature key usage")
	}
	if leaf.KeyUsage&(x509.KeyUsageCertSign|x509.KeyUsageCRLSign) != 0 {
		return nil, nil, errors.New("x509pop: leaf certificate has CA key usages")
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	chains, err := leaf.Verify(x509.VerifyOptions{
		Roots:         s.roots,
		Intermediates: inter,
		CurrentTime:   s.now(),
		KeyUsages:     s.ekus,
	})
	if err != nil {
		return nil, nil, fmt.Errorf("x509pop: certificate verification failed: %w", err)
	}
	// Chains built from the pool could in principle run longer than what the
	// agent sent in order; keep only those within the depth cap.
	kept := chains[:0]
	for _, ch := range chains {
		if len(ch) <= s.maxInter+2 {
			kept = append(kept, ch)
		}
	}
	if len(kept) == 0 {
		return nil, nil, fmt.Errorf("x509pop: every verified chain is longer than %d intermediates", s.maxInter)
	}
	return leaf, kept, nil
}

func checkPublicKey(pub any) error {
	switch k := pub.(type) {
	case *rsa.PublicKey:
		bits := k.N.BitLen()
		if bits < MinRSAKeyBits || bits > MaxRSAKeyBits {
			return fmt.Errorf("RSA key of %d bits, want %d to %d", bits, MinRSAKeyBits, MaxRSAKeyBits)
		}
		return nil
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P256() && k.Curve != elliptic.P384() {
			return fmt.Errorf("ECDSA curve %s not allowed, want P-256 or P-384", k.Curve.Params().Name)
		}
		return nil
	default:
		return fmt.Errorf("key type %T not allowed, want RSA or ECDSA", pub)
	}
}

// proveKey challenges the agent to sign a fresh nonce with the leaf key.
func (s *Server) proveKey(ctx context.Context, leaf *x509.Certificate, challengeFn node.ChallengeFunc) error {
	if challengeFn == nil {
		return errors.New("x509pop: no challenge channel")
	}
	nonce := make([]byte, NonceSize)
	if _, err := rand.Read(nonce); err != nil {
		return fmt.Errorf("x509pop: nonce: %w", err)
	}
	var c challenge
	switch leaf.PublicKey.(type) {
	case *rsa.PublicKey:
		c.RSASignature = &rsaChallenge{Nonce: nonce}
	case *ecdsa.PublicKey:
		c.ECDSASignature = &ecdsaChallenge{Nonce: nonce}
	}
	cb, err := json.Marshal(c)
	if err != nil {
		return fmt.Errorf("x509pop: marshal challenge: %w", err)
	}
	rb, err := challengeFn(ctx, cb)
	if err != nil {
		return fmt.Errorf("x509pop: challenge: %w", err)
	}
	if len(rb) > node.MaxPayloadSize {
		return fmt.Errorf("x509pop: response is %d bytes, over %d", len(rb), node.MaxPayloadSize)
	}
	var r response
	if err := json.Unmarshal(rb, &r); err != nil {
		return fmt.Errorf("x509pop: malformed response: %w", err)
	}
	switch pub := leaf.PublicKey.(type) {
	case *rsa.PublicKey:
		if r.RSASignature == nil {
			return errors.New("x509pop: expected an RSA signature response")
		}
		digest, err := combineNonces(nonce, r.RSASignature.Nonce)
		if err != nil {
			return err
		}
		if err := rsa.VerifyPSS(pub, crypto.SHA256, digest, r.RSASignature.Signature, nil); err != nil {
			return errors.New("x509pop: RSA signature verification failed")
		}
	case *ecdsa.PublicKey:
		if r.ECDSASignature == nil {
			return errors.New("x509pop: expected an ECDSA signature response")
		}
		digest, err := combineNonces(nonce, r.ECDSASignature.Nonce)
		if err != nil {
			return err
		}
		size := (pub.Curve.Params().BitSize + 7) / 8
		if len(r.ECDSASignature.R) > size || len(r.ECDSASignature.S) > size {
			return errors.New("x509pop: ECDSA signature verification failed")
		}
		rr := new(big.Int).SetBytes(r.ECDSASignature.R)
		ss := new(big.Int).SetBytes(r.ECDSASignature.S)
		if !ecdsa.Verify(pub, digest, rr, ss) {
			return errors.New("x509pop: ECDSA signature verification failed")
		}
	}
	return nil
}

type templateData struct {
	*x509.Certificate
	PluginName      string
	Fingerprint     string
	TrustDomain     string
	SerialNumberHex string
}

func (s *Server) agentID(leaf *x509.Certificate) (spiffeid.ID, error) {
	var b strings.Builder
	err := s.tmpl.Execute(&b, templateData{
		Certificate:     leaf,
		PluginName:      Name,
		Fingerprint:     Fingerprint(leaf),
		TrustDomain:     s.td.Name(),
		SerialNumberHex: SerialNumberHex(leaf.SerialNumber),
	})
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("x509pop: agent path template: %w", err)
	}
	id, err := spiffeid.FromPath(s.td, "/spire/agent/"+b.String())
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("x509pop: agent path %q: %w", truncate(b.String()), err)
	}
	return id, nil
}

func (s *Server) selectors(leaf *x509.Certificate, chains [][]*x509.Certificate) []*ferrypb.Selector {
	var out []*ferrypb.Selector
	add := func(value string) {
		sel := &ferrypb.Selector{Type: Name, Value: value}
		if err := selector.Validate(sel); err != nil {
			s.log.Debug("x509pop: skipping unrepresentable selector", "error", err)
			return
		}
		out = append(out, sel)
	}
	if cn := leaf.Subject.CommonName; cn != "" {
		add("subject:cn:" + cn)
	}
	for _, ch := range chains {
		for _, c := range ch[1:] {
			add("ca:fingerprint:" + Fingerprint(c))
		}
	}
	if leaf.SerialNumber != nil {
		add("serialnumber:" + SerialNumberHex(leaf.SerialNumber))
	}
	prefix := Name + "://" + s.td.Name() + "/"
	for _, u := range leaf.URIs {
		if !strings.HasPrefix(u.String(), prefix) {
			continue
		}
		key, value, ok := strings.Cut(strings.Trim(u.Path, "/"), "/")
		if !ok || key == "" || value == "" {
			s.log.Debug("x509pop: URI SAN without key and value", "uri", truncate(u.Redacted()))
			continue
		}
		add("san:" + key + ":" + value)
	}
	return selector.Canonical(out)
}

func truncate(s string) string {
	if len(s) > 200 {
		return s[:200] + "…"
	}
	return s
}
