// Package azure stands in for the Azure Instance Metadata Service's attested
// document endpoint, for tests of the azure_imds node attestor: same path,
// same query parameters, same required header, same JSON answer, and a
// PKCS#7 signature shaped as Azure's (signed data holding the JSON content,
// the signing certificate alone, SHA-256 with RSA, no signed attributes),
// made with a test PKI whose root the ferry server is configured to trust.
// It also plays what Azure documents as transient: 410/429/500 answers and
// answers from its cache made for an earlier nonce.
package azure

import (
	"bytes"
	"encoding/asn1"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/smallstep/pkcs7"

	"github.com/ferry-id/ferry/attestors/node/azureimds"
	"github.com/ferry-id/ferry/test/metadata/testpki"
)

// PKI is Azure's shape: a root, an intermediate (which Azure does not put in
// the document: servers pin it) and the signing certificate.
type PKI struct {
	Root, Intermediate, Signer *testpki.CA
}

// NewPKI returns a hierarchy whose signer is named signerCN (Azure's public
// cloud: metadata.azure.com or a subdomain of it).
func NewPKI(t testing.TB, signerCN string) *PKI {
	t.Helper()
	root := testpki.NewRoot(t, "Test Global Root G2")
	inter := root.Intermediate(t, "Test Azure RSA TLS Issuing CA 03")
	return &PKI{Root: root, Intermediate: inter, Signer: inter.Leaf(t, signerCN)}
}

// Sign returns the attested document for content, signed as Azure signs.
func (p *PKI) Sign(t testing.TB, content azureimds.Content) azureimds.Document {
	t.Helper()
	doc, err := p.sign(content)
	if err != nil {
		t.Fatal(err)
	}
	return doc
}

func (p *PKI) sign(content azureimds.Content) (azureimds.Document, error) {
	data, err := json.Marshal(content)
	if err != nil {
		return azureimds.Document{}, err
	}
	sd, err := pkcs7.NewSignedData(data)
	if err != nil {
		return azureimds.Document{}, err
	}
	sd.SetDigestAlgorithm(pkcs7.OIDDigestAlgorithmSHA256)
	sd.SetEncryptionAlgorithm(pkcs7.OIDEncryptionAlgorithmRSA)
	if err := sd.SignWithoutAttr(p.Signer.Cert, p.Signer.Key, pkcs7.SignerInfoConfig{}); err != nil {
		return azureimds.Document{}, err
	}
	der, err := sd.Finish()
	if err != nil {
		return azureimds.Document{}, err
	}
	// Azure names the digest algorithm sha256WithRSAEncryption
	// (1.2.840.113549.1.1.11) where the library writes sha256
	// (2.16.840.1.101.3.4.2.1). Both encode to 11 bytes, so swapping them
	// keeps every length valid and makes the structure Azure's.
	sha256OID, _ := asn1.Marshal(pkcs7.OIDDigestAlgorithmSHA256)
	azureOID, _ := asn1.Marshal(asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 1, 11})
	der = bytes.ReplaceAll(der, sha256OID, azureOID)
	return azureimds.Document{Encoding: "pkcs7", Signature: base64.StdEncoding.EncodeToString(der)}, nil
}

// Time formats t as Azure writes createdOn and expiresOn ("-0000" for UTC).
func Time(t time.Time) string { return t.UTC().Format("01/02/06 15:04:05") + " -0000" }

// VM is what the signed document says about the machine.
type VM struct {
	VMID, SubscriptionID, SKU, LicenseType string
	Plan                                   azureimds.Plan
}

// IMDS is a running stand-in.
type IMDS struct {
	srv *httptest.Server
	pki *PKI

	mu       sync.Mutex
	vm       VM
	fail     []int
	stale    int
	lastDoc  *azureimds.Document
	validFor time.Duration
	age      time.Duration
	requests int
}

// Start serves IMDS for vm on a loopback port until the test ends.
func Start(t testing.TB, pki *PKI, vm VM) *IMDS {
	t.Helper()
	m := &IMDS{pki: pki, vm: vm, validFor: 6 * time.Hour}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	m.srv = httptest.NewUnstartedServer(m.handler())
	m.srv.Listener.Close()
	m.srv.Listener = l
	m.srv.Start()
	t.Cleanup(m.srv.Close)
	return m
}

// URL is the base URL, as the agent's metadata_url.
func (m *IMDS) URL() string { return m.srv.URL }

// SetVM changes what later documents say.
func (m *IMDS) SetVM(vm VM) { m.mu.Lock(); m.vm = vm; m.mu.Unlock() }

// FailNext makes the next requests answer these statuses, in order.
func (m *IMDS) FailNext(statuses ...int) {
	m.mu.Lock()
	m.fail = append(m.fail, statuses...)
	m.mu.Unlock()
}

// ServeStale makes the next n requests answer the last document served (a
// cached one, made for another nonce), as IMDS's cache may.
func (m *IMDS) ServeStale(n int) { m.mu.Lock(); m.stale = n; m.mu.Unlock() }

// Backdate makes documents claim they were created age ago.
func (m *IMDS) Backdate(age time.Duration) { m.mu.Lock(); m.age = age; m.mu.Unlock() }

// Requests counts the attested document requests answered so far.
func (m *IMDS) Requests() int { m.mu.Lock(); defer m.mu.Unlock(); return m.requests }

// imdsError writes IMDS's JSON error shape.
func imdsError(w http.ResponseWriter, status int, code, desc string) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]string{"error": code, "error_description": desc})
}

func (m *IMDS) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/metadata/attested/document", func(w http.ResponseWriter, r *http.Request) {
		m.mu.Lock()
		m.requests++
		m.mu.Unlock()
		switch {
		case r.Header.Get("X-Forwarded-For") != "":
			imdsError(w, http.StatusBadRequest, "invalid_request", "X-Forwarded-For header is not allowed")
			return
		case r.Method != http.MethodGet:
			imdsError(w, http.StatusMethodNotAllowed, "invalid_request", "Only GET is supported")
			return
		case r.Header.Get("Metadata") != "true":
			imdsError(w, http.StatusBadRequest, "invalid_request", "Required metadata header not specified")
			return
		}
		q := r.URL.Query()
		if q.Get("api-version") == "" {
			w.Header().Set("Content-Type", "application/json; charset=utf-8")
			w.WriteHeader(http.StatusBadRequest)
			_, _ = fmt.Fprint(w, `{"error":"Bad request. api-version was not specified in the request. For more information refer to aka.ms/azureimds","newest-versions":["2021-02-01"]}`)
			return
		}
		m.mu.Lock()
		if len(m.fail) > 0 {
			st := m.fail[0]
			m.fail = m.fail[1:]
			m.mu.Unlock()
			imdsError(w, st, "transient", "the stand-in was told to fail this request")
			return
		}
		if m.stale > 0 && m.lastDoc != nil {
			m.stale--
			doc := *m.lastDoc
			m.mu.Unlock()
			writeDoc(w, doc)
			return
		}
		vm, age, validFor := m.vm, m.age, m.validFor
		m.mu.Unlock()
		nonce := q.Get("nonce")
		created := time.Now().Add(-age).UTC()
		if nonce == "" {
			nonce = created.Format("20060102-150405")
		}
		doc, err := m.pki.sign(azureimds.Content{
			LicenseType: vm.LicenseType, Nonce: nonce, Plan: vm.Plan, SKU: vm.SKU, SubscriptionID: vm.SubscriptionID, VMID: vm.VMID,
			TimeStamp: azureimds.TimeStamp{CreatedOn: Time(created), ExpiresOn: Time(created.Add(validFor))},
		})
		if err != nil {
			imdsError(w, http.StatusInternalServerError, "internal_error", err.Error())
			return
		}
		m.mu.Lock()
		m.lastDoc = &doc
		m.mu.Unlock()
		writeDoc(w, doc)
	})
	return mux
}

func writeDoc(w http.ResponseWriter, doc azureimds.Document) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	_ = json.NewEncoder(w).Encode(doc)
}
