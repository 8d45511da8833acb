package ca

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/hex"
	"fmt"
	"math/big"
	"net/url"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ferry-id/ferry/attestors/node"
)

const (
	// backdate is subtracted from NotBefore to tolerate clock skew.
	backdate = 10 * time.Second
	// MaxCSRSize bounds the DER size of an accepted CSR. An RSA-8192 CSR
	// with a few extensions fits easily.
	MaxCSRSize = 8 << 10
	// maxDNSNames bounds the DNS SANs of one SVID.
	maxDNSNames = 100
	// svidOrganization is the O of every X509-SVID subject.
	svidOrganization = "ferry"
)

// x509Signer is the active X.509 authority as the signing path sees it.
type x509Signer struct {
	id   string
	cert *x509.Certificate
	key  crypto.Signer
	// chain follows the leaf in every SVID: empty for a self-signed CA,
	// else this node's intermediate and the upstream intermediates.
	chain []*x509.Certificate
}

func (c *CA) newX509Authority(now time.Time) (*authority, error) {
	gen, err := newKeyFunc(c.caKeyType)
	if err != nil {
		return nil, err
	}
	key, err := gen()
	if err != nil {
		return nil, fmt.Errorf("ca: generate CA key: %w", err)
	}
	ski, err := subjectKeyID(key.Public())
	if err != nil {
		return nil, err
	}
	id := hex.EncodeToString(ski)
	notAfter := now.Add(c.caTTL)
	tmpl := &x509.Certificate{
		SerialNumber: randomSerial(),
		Subject: pkix.Name{
			Organization:       []string{svidOrganization},
			OrganizationalUnit: []string{c.nodeID},
			CommonName:         "ferry CA",
			SerialNumber:       id,
		},
		URIs:                  []*url.URL{c.td.ID().URL()},
		NotBefore:             now.Add(-backdate),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		SubjectKeyId:          ski,
	}
	parent, parentKey := tmpl, key
	if up := c.upstream; up != nil {
		if !now.Before(up.notAfter) {
			return nil, fmt.Errorf("ca: upstream CA expired at %s", up.notAfter.Format(time.RFC3339))
		}
		notAfter = earliest(notAfter, up.notAfter)
		parent, parentKey = up.cert, up.key
	}
	tmpl.NotAfter = notAfter
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, key.Public(), parentKey)
	if err != nil {
		return nil, fmt.Errorf("ca: create CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("ca: parse CA certificate: %w", err)
	}
	return &authority{
		kind: KindX509, id: id, status: StatusPrepared, issuedAt: now, notAfter: notAfter,
		key: key, cert: cert, keyFile: "x509-" + id + ".key", upstream: c.upstream != nil,
	}, nil
}

// subjectKeyID is RFC 7093 method 1: the leftmost 160 bits of the SHA-256
// of the subjectPublicKey bit string.
func subjectKeyID(pub crypto.PublicKey) ([]byte, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, fmt.Errorf("ca: encode public key: %w", err)
	}
	var spki struct {
		Algorithm pkix.AlgorithmIdentifier
		PublicKey asn1.BitString
	}
	if _, err := asn1.Unmarshal(der, &spki); err != nil {
		return nil, fmt.Errorf("ca: decode public key: %w", err)
	}
	sum := sha256.Sum256(spki.PublicKey.Bytes)
	return sum[:20], nil
}

// randomSerial is a positive 128-bit random serial number.
func randomSerial() *big.Int {
	var b [16]byte
	_, _ = rand.Read(b[:]) // never fails
	n := new(big.Int).SetBytes(b[:])
	if n.Sign() == 0 {
		n.SetInt64(1)
	}
	return n
}

// ParseCSR parses a DER PKCS#10 request, checks its size, its signature and
// its key, and returns its public key. Everything else in the CSR (subject,
// SANs, extensions) is ignored by the CA.
func ParseCSR(der []byte) (crypto.PublicKey, error) {
	if len(der) == 0 {
		return nil, fmt.Errorf("%w: empty", ErrInvalidCSR)
	}
	if len(der) > MaxCSRSize {
		return nil, fmt.Errorf("%w: %d bytes exceeds %d", ErrInvalidCSR, len(der), MaxCSRSize)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidCSR, err)
	}
	// Check the key first: verifying a signature with a huge RSA key is
	// the expensive part.
	if err := checkSubjectKey(csr.PublicKey); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidCSR, err)
	}
	switch csr.SignatureAlgorithm {
	case x509.SHA1WithRSA, x509.ECDSAWithSHA1, x509.MD5WithRSA, x509.DSAWithSHA1, x509.DSAWithSHA256:
		return nil, fmt.Errorf("%w: weak signature algorithm %s", ErrInvalidCSR, csr.SignatureAlgorithm)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("%w: bad signature: %w", ErrInvalidCSR, err)
	}
	return csr.PublicKey, nil
}

// SignWorkloadX509SVID signs an X509-SVID for id, which the caller took from
// a registration entry: the CSR contributes only its public key. dnsNames
// (from the entry) become DNS SANs, the first one the subject CN. A zero ttl
// means the configured default; the SVID never outlives the CA. The result
// is the leaf followed by the intermediates to the bundle.
func (c *CA) SignWorkloadX509SVID(csr []byte, id spiffeid.ID, dnsNames []string, ttl time.Duration) ([]*x509.Certificate, error) {
	if err := c.checkWorkloadID(id); err != nil {
		return nil, err
	}
	pub, err := ParseCSR(csr)
	if err != nil {
		return nil, err
	}
	return c.signX509SVID(pub, id, dnsNames, ttl)
}

// SignAgentX509SVID signs an agent's X509-SVID; id must be under
// AgentPathPrefix. Callers holding a CSR use ParseCSR first.
func (c *CA) SignAgentX509SVID(pub crypto.PublicKey, id spiffeid.ID, ttl time.Duration) ([]*x509.Certificate, error) {
	if err := node.CheckAgentID(c.td, id); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidRequest, err)
	}
	if err := checkSubjectKey(pub); err != nil {
		return nil, err
	}
	return c.signX509SVID(pub, id, nil, ttl)
}

// SignServerX509SVID signs this server's own X509-SVID, whose ID is
// ServerID(); dnsNames are the names agents dial.
func (c *CA) SignServerX509SVID(pub crypto.PublicKey, dnsNames []string, ttl time.Duration) ([]*x509.Certificate, error) {
	if err := checkSubjectKey(pub); err != nil {
		return nil, err
	}
	return c.signX509SVID(pub, c.ServerID(), dnsNames, ttl)
}

func (c *CA) checkWorkloadID(id spiffeid.ID) error {
	if err := CheckWorkloadID(c.td, id); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidRequest, err)
	}
	return nil
}

func (c *CA) signX509SVID(pub crypto.PublicKey, id spiffeid.ID, dnsNames []string, ttl time.Duration) ([]*x509.Certificate, error) {
	s := c.x509Active.Load()
	now := c.now()
	if s == nil || !now.Before(s.cert.NotAfter) {
		return nil, ErrNoAuthority
	}
	if ttl < 0 {
		return nil, fmt.Errorf("%w: negative TTL", ErrInvalidRequest)
	}
	if ttl == 0 {
		ttl = c.x509TTL
	}
	if err := checkDNSNames(dnsNames); err != nil {
		return nil, err
	}
	tmpl := svidTemplate(pub, id, dnsNames, now, earliest(now.Add(ttl), s.cert.NotAfter))
	der, err := x509.CreateCertificate(rand.Reader, tmpl, s.cert, pub, s.key)
	if err != nil {
		return nil, fmt.Errorf("ca: sign X509-SVID: %w", err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("ca: parse X509-SVID: %w", err)
	}
	out := make([]*x509.Certificate, 0, 1+len(s.chain))
	return append(append(out, leaf), s.chain...), nil
}

// svidTemplate is the X509-SVID profile.
func svidTemplate(pub crypto.PublicKey, id spiffeid.ID, dnsNames []string, now, notAfter time.Time) *x509.Certificate {
	ku := x509.KeyUsageDigitalSignature
	if _, ok := pub.(*rsa.PublicKey); ok {
		ku |= x509.KeyUsageKeyEncipherment
	}
	subject := pkix.Name{Organization: []string{svidOrganization}}
	if len(dnsNames) > 0 && len(dnsNames[0]) <= 64 {
		subject.CommonName = dnsNames[0]
	}
	return &x509.Certificate{
		SerialNumber:          randomSerial(),
		Subject:               subject,
		URIs:                  []*url.URL{id.URL()},
		DNSNames:              dnsNames,
		NotBefore:             now.Add(-backdate),
		NotAfter:              notAfter,
		KeyUsage:              ku,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		IsCA:                  false,
	}
}

func checkDNSNames(names []string) error {
	if err := CheckDNSNames(names); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidRequest, err)
	}
	return nil
}

// validDNSName accepts a hostname, optionally with a leading "*." label.
func validDNSName(n string) bool {
	if len(n) == 0 || len(n) > 253 {
		return false
	}
	n = strings.TrimPrefix(n, "*.")
	for label := range strings.SplitSeq(n, ".") {
		if len(label) == 0 || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for i := 0; i < len(label); i++ {
			ch := label[i]
			if !(ch >= 'a' && ch <= 'z' || ch >= 'A' && ch <= 'Z' || ch >= '0' && ch <= '9' || ch == '-' || ch == '_') {
				return false
			}
		}
	}
	return true
}

// X509SVIDRequest is one workload CSR to sign in a batch.
type X509SVIDRequest struct {
	CSR      []byte
	SPIFFEID spiffeid.ID
	DNSNames []string
	TTL      time.Duration
}

// X509SVIDResult is the outcome of one X509SVIDRequest: the leaf and its
// intermediates, or an error.
type X509SVIDResult struct {
	Certificates []*x509.Certificate
	Err          error
}

// SignWorkloadX509SVIDs signs reqs in parallel on all cores and returns one
// result per request, in order. Requests not started when ctx ends fail with
// ctx's error.
func (c *CA) SignWorkloadX509SVIDs(ctx context.Context, reqs []X509SVIDRequest) []X509SVIDResult {
	out := make([]X509SVIDResult, len(reqs))
	workers := min(runtime.GOMAXPROCS(0), len(reqs))
	var next atomic.Int64
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= len(reqs) {
					return
				}
				if err := ctx.Err(); err != nil {
					out[i].Err = err
					continue
				}
				r := reqs[i]
				out[i].Certificates, out[i].Err = c.SignWorkloadX509SVID(r.CSR, r.SPIFFEID, r.DNSNames, r.TTL)
			}
		})
	}
	wg.Wait()
	return out
}
