package azureimds

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"slices"
	"strings"
	"time"

	"github.com/smallstep/pkcs7"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ferry-id/ferry/attestors/node"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

// ServerConfig configures the server half.
type ServerConfig struct {
	// TrustDomain is the trust domain agent IDs are issued in.
	TrustDomain spiffeid.TrustDomain
	// Roots are the CAs the IMDS signing certificate must chain to (for
	// Azure: the roots Microsoft names for its TLS certificates).
	Roots []*x509.Certificate
	// Intermediates are pinned intermediate CAs. Azure's documents carry the
	// signing certificate only; Microsoft publishes the intermediates.
	Intermediates []*x509.Certificate
	// MetadataDomains are the accepted signer names: the signing
	// certificate's common name must be one of them or a subdomain of one.
	// Default [DefaultMetadataDomain].
	MetadataDomains []string
	// Tenants maps each accepted tenant ID to the subscription IDs accepted
	// in it. A document whose subscription is listed nowhere is refused.
	Tenants map[string][]string
	// MaxAge is how long after its creation a document is accepted; default
	// DefaultMaxAge.
	MaxAge time.Duration
	// Now returns the current time; default time.Now.
	Now func() time.Time
	// Log receives one line per attestation; default slog.Default().
	Log *slog.Logger
}

// Server is the server half; safe for concurrent use.
type Server struct {
	td      spiffeid.TrustDomain
	roots   *x509.CertPool
	inter   []*x509.Certificate
	domains []string
	subs    map[string]string // lower-case subscription -> tenant
	maxAge  time.Duration
	now     func() time.Time
	log     *slog.Logger
}

var _ node.ServerAttestor = (*Server)(nil)

// NewServer validates c and returns the server half.
func NewServer(c ServerConfig) (*Server, error) {
	if c.TrustDomain.IsZero() {
		return nil, errors.New("azure_imds: trust domain is required")
	}
	if len(c.Roots) == 0 {
		return nil, errors.New("azure_imds: at least one root CA is required")
	}
	if len(c.Tenants) == 0 {
		return nil, errors.New("azure_imds: at least one tenant with its subscriptions is required")
	}
	s := &Server{td: c.TrustDomain, roots: x509.NewCertPool(), inter: c.Intermediates, domains: slices.Clone(c.MetadataDomains),
		subs: map[string]string{}, maxAge: c.MaxAge, now: c.Now, log: c.Log}
	for _, r := range c.Roots {
		s.roots.AddCert(r)
	}
	if len(s.domains) == 0 {
		s.domains = []string{DefaultMetadataDomain}
	}
	for i, d := range s.domains {
		s.domains[i] = strings.ToLower(strings.Trim(d, "."))
		if s.domains[i] == "" {
			return nil, errors.New("azure_imds: empty metadata domain")
		}
	}
	for tenant, subs := range c.Tenants {
		if err := CheckGUID(tenant); err != nil {
			return nil, fmt.Errorf("azure_imds: tenant: %w", err)
		}
		if len(subs) == 0 {
			return nil, fmt.Errorf("azure_imds: tenant %s lists no subscription: the attested document does not name its tenant, so each tenant must list its subscriptions", tenant)
		}
		for _, sub := range subs {
			if err := CheckGUID(sub); err != nil {
				return nil, fmt.Errorf("azure_imds: tenant %s: subscription: %w", tenant, err)
			}
			key := strings.ToLower(sub)
			if other, dup := s.subs[key]; dup && other != strings.ToLower(tenant) {
				return nil, fmt.Errorf("azure_imds: subscription %s is listed under tenants %s and %s", sub, other, tenant)
			}
			s.subs[key] = strings.ToLower(tenant)
		}
	}
	if s.maxAge <= 0 {
		s.maxAge = DefaultMaxAge
	}
	if s.now == nil {
		s.now = time.Now
	}
	if s.log == nil {
		s.log = slog.Default()
	}
	return s, nil
}

// Name returns "azure_imds".
func (s *Server) Name() string { return Name }

// Attest sends a nonce, verifies the attested document the agent returns and
// names the agent after the VM.
func (s *Server) Attest(ctx context.Context, payload []byte, challengeFn node.ChallengeFunc) (*node.Result, error) {
	res, vmID, err := s.attest(ctx, payload, challengeFn)
	if err != nil {
		s.log.Info("azure_imds attestation rejected", "vm_id", vmID, "error", err)
		return nil, err
	}
	s.log.Info("azure_imds attestation succeeded", "agent_id", res.AgentID.String())
	return res, nil
}

func (s *Server) attest(ctx context.Context, payload []byte, challengeFn node.ChallengeFunc) (*node.Result, string, error) {
	if len(payload) > node.MaxPayloadSize {
		return nil, "", fmt.Errorf("azure_imds: payload is %d bytes, over %d", len(payload), node.MaxPayloadSize)
	}
	var empty map[string]json.RawMessage
	if err := json.Unmarshal(payload, &empty); err != nil {
		return nil, "", fmt.Errorf("azure_imds: malformed payload: %w", err)
	}
	if challengeFn == nil {
		return nil, "", errors.New("azure_imds: no challenge channel")
	}
	nonce, err := newNonce()
	if err != nil {
		return nil, "", err
	}
	cb, _ := json.Marshal(challenge{Nonce: nonce})
	rb, err := challengeFn(ctx, cb)
	if err != nil {
		return nil, "", fmt.Errorf("azure_imds: challenge: %w", err)
	}
	if len(rb) > node.MaxPayloadSize {
		return nil, "", fmt.Errorf("azure_imds: response is %d bytes, over %d", len(rb), node.MaxPayloadSize)
	}
	var r response
	if err := json.Unmarshal(rb, &r); err != nil {
		return nil, "", fmt.Errorf("azure_imds: malformed response: %w", err)
	}
	content, err := s.Verify(r.Document)
	if err != nil {
		return nil, "", err
	}
	vmID := content.VMID
	if content.Nonce != nonce {
		return nil, vmID, errors.New("azure_imds: the document's nonce is not this attestation's: a replayed or cached document")
	}
	if err := s.checkTime(content.TimeStamp); err != nil {
		return nil, vmID, err
	}
	if err := CheckGUID(content.VMID); err != nil {
		return nil, vmID, fmt.Errorf("azure_imds: vmId: %w", err)
	}
	if err := CheckGUID(content.SubscriptionID); err != nil {
		return nil, vmID, fmt.Errorf("azure_imds: subscriptionId: %w", err)
	}
	sub := strings.ToLower(content.SubscriptionID)
	tenant, ok := s.subs[sub]
	if !ok {
		return nil, vmID, fmt.Errorf("azure_imds: subscription %s is not allowed", sub)
	}
	vm := strings.ToLower(content.VMID)
	id, err := node.AgentPath(s.td, Name, tenant, sub, vm)
	if err != nil {
		return nil, vmID, err
	}
	sels, err := s.selectors(tenant, sub, vm, content)
	if err != nil {
		return nil, vmID, err
	}
	return &node.Result{AgentID: id, Selectors: sels, CanReattest: true}, vmID, nil
}

// Verify checks doc's PKCS#7 signature, its signer's chain and name, and
// returns the signed content. It does not check the nonce or the times.
func (s *Server) Verify(doc Document) (*Content, error) {
	if doc.Encoding != "pkcs7" {
		return nil, fmt.Errorf("azure_imds: document encoding %q, want pkcs7", doc.Encoding)
	}
	der, err := base64.StdEncoding.DecodeString(strings.TrimSpace(doc.Signature))
	if err != nil {
		return nil, fmt.Errorf("azure_imds: signature is not base64: %w", err)
	}
	p7, err := pkcs7.Parse(der)
	if err != nil {
		return nil, fmt.Errorf("azure_imds: signature is not PKCS#7 signed data: %w", err)
	}
	signer := p7.GetOnlySigner()
	if signer == nil {
		return nil, fmt.Errorf("azure_imds: want exactly one signer with its certificate, the document has %d signers", len(p7.Signers))
	}
	// Chain and name first: the cheapest refusal of a document that Azure
	// did not sign.
	if err := s.checkSignerName(signer); err != nil {
		return nil, err
	}
	inter := x509.NewCertPool()
	for _, c := range s.inter {
		inter.AddCert(c)
	}
	for _, c := range p7.Certificates {
		if c != signer {
			inter.AddCert(c)
		}
	}
	if _, err := signer.Verify(x509.VerifyOptions{Roots: s.roots, Intermediates: inter, CurrentTime: s.now(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return nil, fmt.Errorf("azure_imds: signing certificate %q does not chain to a configured root: %w", signer.Subject.CommonName, err)
	}
	// The library verifies the signature over the content (and the message
	// digest of signed attributes); the chain was checked above.
	if err := p7.Verify(); err != nil {
		return nil, fmt.Errorf("azure_imds: signature verification failed: %w", err)
	}
	return ParseContent(p7.Content)
}

func (s *Server) checkSignerName(c *x509.Certificate) error {
	cn := strings.ToLower(c.Subject.CommonName)
	for _, d := range s.domains {
		if cn == d || strings.HasSuffix(cn, "."+d) {
			return nil
		}
	}
	return fmt.Errorf("azure_imds: document signed by %q, which is not an allowed metadata domain (%s)", c.Subject.CommonName, strings.Join(s.domains, ", "))
}

func (s *Server) checkTime(ts TimeStamp) error {
	now := s.now()
	created, err := time.Parse(TimeLayout, ts.CreatedOn)
	if err != nil {
		return fmt.Errorf("azure_imds: createdOn %q: %w", ts.CreatedOn, err)
	}
	const skew = time.Minute
	if created.After(now.Add(skew)) {
		return fmt.Errorf("azure_imds: document created in the future (%s)", created.UTC().Format(time.RFC3339))
	}
	if now.Sub(created) > s.maxAge {
		return fmt.Errorf("azure_imds: document created %s, more than %s ago", created.UTC().Format(time.RFC3339), s.maxAge)
	}
	if ts.ExpiresOn != "" {
		expires, err := time.Parse(TimeLayout, ts.ExpiresOn)
		if err != nil {
			return fmt.Errorf("azure_imds: expiresOn %q: %w", ts.ExpiresOn, err)
		}
		if !now.Before(expires.Add(skew)) {
			return fmt.Errorf("azure_imds: document expired at %s", expires.UTC().Format(time.RFC3339))
		}
	}
	return nil
}

func (s *Server) selectors(tenant, sub, vm string, c *Content) ([]*ferrypb.Selector, error) {
	values := []string{"tenant-id:" + tenant, "subscription-id:" + sub, "vm-id:" + vm}
	if c.SKU != "" {
		values = append(values, "sku:"+c.SKU)
	}
	if c.Plan.Publisher != "" || c.Plan.Product != "" || c.Plan.Name != "" {
		values = append(values, "plan:"+c.Plan.Publisher+":"+c.Plan.Product+":"+c.Plan.Name)
	}
	sels, err := node.Selectors(schema, Name, values...)
	if err != nil {
		return nil, fmt.Errorf("azure_imds: signed document: %w", err)
	}
	return sels, nil
}

// newNonce returns NonceDigits uniformly random decimal digits.
func newNonce() (string, error) {
	n, err := rand.Int(rand.Reader, big.NewInt(10_000_000_000))
	if err != nil {
		return "", fmt.Errorf("azure_imds: nonce: %w", err)
	}
	return fmt.Sprintf("%010d", n), nil
}
