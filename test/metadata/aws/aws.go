// Package aws stands in for EC2's instance metadata service (IMDSv2) for
// tests of the aws_iid node attestor: the session token PUT with its TTL
// header, token-guarded GETs (401 without a valid token), the instance
// identity document as EC2 prints it, and its /rsa2048 signature: PKCS#7
// signed data holding the document, signed attributes, SHA-256 with RSA, no
// certificates, base64 in 64-character lines. It signs with a per-region
// self-signed RSA-2048 certificate, as AWS publishes one per region; tests
// configure the ferry server with the test ones.
package aws

import (
	"crypto/rand"
	"encoding/asn1"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/smallstep/pkcs7"

	"github.com/ferry-id/ferry/test/metadata/testpki"
)

// Instance is what the identity document says.
type Instance struct {
	AccountID, Region, AvailabilityZone, InstanceID, InstanceType, ImageID, PendingTime, PrivateIP string
}

// Document prints the identity document as EC2 does (two-space indent,
// " : " separators, nulls for empty product codes).
func (i Instance) Document() string {
	q := strconv.Quote
	return "{\n" +
		"  \"accountId\" : " + q(i.AccountID) + ",\n" +
		"  \"architecture\" : \"x86_64\",\n" +
		"  \"availabilityZone\" : " + q(i.AvailabilityZone) + ",\n" +
		"  \"billingProducts\" : null,\n" +
		"  \"devpayProductCodes\" : null,\n" +
		"  \"marketplaceProductCodes\" : null,\n" +
		"  \"imageId\" : " + q(i.ImageID) + ",\n" +
		"  \"instanceId\" : " + q(i.InstanceID) + ",\n" +
		"  \"instanceType\" : " + q(i.InstanceType) + ",\n" +
		"  \"kernelId\" : null,\n" +
		"  \"pendingTime\" : " + q(i.PendingTime) + ",\n" +
		"  \"privateIp\" : " + q(i.PrivateIP) + ",\n" +
		"  \"ramdiskId\" : null,\n" +
		"  \"region\" : " + q(i.Region) + ",\n" +
		"  \"version\" : \"2017-09-30\"\n" +
		"}"
}

// Signer is one region's signing certificate and key.
type Signer = testpki.CA

// NewSigner returns a self-signed RSA-2048 certificate for a region.
func NewSigner(t testing.TB, region string) *Signer {
	t.Helper()
	return testpki.NewRoot(t, "Amazon Web Services LLC "+region)
}

// Sign returns the /rsa2048 body for doc.
func Sign(t testing.TB, s *Signer, doc string) string {
	t.Helper()
	out, err := sign(s, doc)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func sign(s *Signer, doc string) (string, error) {
	sd, err := pkcs7.NewSignedData([]byte(doc))
	if err != nil {
		return "", err
	}
	sd.SetDigestAlgorithm(pkcs7.OIDDigestAlgorithmSHA256)
	if err := sd.AddSigner(s.Cert, s.Key, pkcs7.SignerInfoConfig{}); err != nil {
		return "", err
	}
	der, err := sd.Finish()
	if err != nil {
		return "", err
	}
	if der, err = dropCertificates(der); err != nil {
		return "", err
	}
	b64 := base64.StdEncoding.EncodeToString(der)
	var lines []string
	for len(b64) > 64 {
		lines = append(lines, b64[:64])
		b64 = b64[64:]
	}
	return strings.Join(append(lines, b64), "\n"), nil
}

// dropCertificates removes the [0] certificates of a ContentInfo holding
// SignedData: AWS leaves its certificate out, verifiers bring it.
func dropCertificates(der []byte) ([]byte, error) {
	var ci struct {
		Type    asn1.ObjectIdentifier
		Content asn1.RawValue `asn1:"explicit,tag:0"`
	}
	if _, err := asn1.Unmarshal(der, &ci); err != nil {
		return nil, err
	}
	var sd asn1.RawValue
	if _, err := asn1.Unmarshal(ci.Content.Bytes, &sd); err != nil {
		return nil, err
	}
	var kept []byte
	for rest := sd.Bytes; len(rest) > 0; {
		var el asn1.RawValue
		var err error
		if rest, err = asn1.Unmarshal(rest, &el); err != nil {
			return nil, err
		}
		if el.Class == asn1.ClassContextSpecific && el.Tag == 0 {
			continue
		}
		kept = append(kept, el.FullBytes...)
	}
	inner, err := asn1.Marshal(asn1.RawValue{Class: asn1.ClassUniversal, Tag: asn1.TagSequence, IsCompound: true, Bytes: kept})
	if err != nil {
		return nil, err
	}
	ci.Content = asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 0, IsCompound: true, Bytes: inner}
	return asn1.Marshal(struct {
		Type    asn1.ObjectIdentifier
		Content asn1.RawValue
	}{ci.Type, ci.Content})
}

// IMDS is a running stand-in.
type IMDS struct {
	srv    *httptest.Server
	signer *Signer

	mu       sync.Mutex
	inst     Instance
	tokens   map[string]bool
	fail     []int
	requests map[string]int
}

// Start serves IMDSv2 for inst, signed by signer, on a loopback port until
// the test ends.
func Start(t testing.TB, signer *Signer, inst Instance) *IMDS {
	t.Helper()
	m := &IMDS{signer: signer, inst: inst, tokens: map[string]bool{}, requests: map[string]int{}}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	m.srv = httptest.NewUnstartedServer(http.HandlerFunc(m.serve))
	m.srv.Listener.Close()
	m.srv.Listener = l
	m.srv.Start()
	t.Cleanup(m.srv.Close)
	return m
}

// URL is the base URL, as the agent's metadata_url.
func (m *IMDS) URL() string { return m.srv.URL }

// SetInstance changes what later documents say.
func (m *IMDS) SetInstance(i Instance) { m.mu.Lock(); m.inst = i; m.mu.Unlock() }

// FailNext makes the next requests answer these statuses, in order.
func (m *IMDS) FailNext(statuses ...int) {
	m.mu.Lock()
	m.fail = append(m.fail, statuses...)
	m.mu.Unlock()
}

// RevokeTokens invalidates every session token handed out so far.
func (m *IMDS) RevokeTokens() { m.mu.Lock(); m.tokens = map[string]bool{}; m.mu.Unlock() }

// Requests counts requests per path.
func (m *IMDS) Requests(path string) int { m.mu.Lock(); defer m.mu.Unlock(); return m.requests[path] }

func plain(w http.ResponseWriter, status int, body string) {
	w.Header().Set("Content-Type", "text/plain")
	w.WriteHeader(status)
	_, _ = fmt.Fprint(w, body)
}

func (m *IMDS) serve(w http.ResponseWriter, r *http.Request) {
	m.mu.Lock()
	m.requests[r.URL.Path]++
	if len(m.fail) > 0 {
		st := m.fail[0]
		m.fail = m.fail[1:]
		m.mu.Unlock()
		plain(w, st, http.StatusText(st))
		return
	}
	m.mu.Unlock()
	if r.URL.Path == "/latest/api/token" {
		switch {
		case r.Method != http.MethodPut:
			plain(w, http.StatusMethodNotAllowed, "Method Not Allowed")
		case r.Header.Get("X-Forwarded-For") != "":
			plain(w, http.StatusForbidden, "Forbidden")
		default:
			ttl, err := strconv.Atoi(r.Header.Get("X-aws-ec2-metadata-token-ttl-seconds"))
			if err != nil || ttl < 1 || ttl > 21600 {
				plain(w, http.StatusBadRequest, "Bad Request")
				return
			}
			b := make([]byte, 28)
			_, _ = rand.Read(b)
			tok := base64.StdEncoding.EncodeToString(append([]byte(hex.EncodeToString(b[:4])), b...))
			m.mu.Lock()
			m.tokens[tok] = true
			m.mu.Unlock()
			w.Header().Set("X-Aws-Ec2-Metadata-Token-Ttl-Seconds", strconv.Itoa(ttl))
			plain(w, http.StatusOK, tok)
		}
		return
	}
	if r.Method != http.MethodGet {
		plain(w, http.StatusMethodNotAllowed, "Method Not Allowed")
		return
	}
	m.mu.Lock()
	ok := m.tokens[r.Header.Get("X-aws-ec2-metadata-token")]
	inst := m.inst
	m.mu.Unlock()
	if !ok {
		plain(w, http.StatusUnauthorized, "Unauthorized")
		return
	}
	switch r.URL.Path {
	case "/latest/dynamic/instance-identity/document":
		w.Header().Set("Content-Type", "text/plain")
		_, _ = fmt.Fprint(w, inst.Document())
	case "/latest/dynamic/instance-identity/rsa2048":
		sig, err := sign(m.signer, inst.Document())
		if err != nil {
			plain(w, http.StatusInternalServerError, err.Error())
			return
		}
		plain(w, http.StatusOK, sig)
	default:
		plain(w, http.StatusNotFound, "Not Found")
	}
}
