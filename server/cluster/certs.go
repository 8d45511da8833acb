package cluster

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// File names written by CreateCA and CreateNodeCert.
const (
	CAFileName      = "ca.pem"
	CAKeyFileName   = "ca-key.pem"
	NodeFileName    = "node.pem"
	NodeKeyFileName = "node-key.pem"
)

// DefaultTrustDomain names the cluster in node certificates' URI SANs when
// CertOptions.TrustDomain is empty.
const DefaultTrustDomain = "ferry.internal"

// clusterPathPrefix is the path of every node certificate's URI SAN:
// spiffe://<trust domain>/ferry/cluster/<node id>.
const clusterPathPrefix = "/ferry/cluster/"

// CAOptions configures CreateCA.
type CAOptions struct {
	Dir        string        // output directory, created 0700 if missing
	CommonName string        // defaults to "ferry cluster CA"
	Validity   time.Duration // defaults to 5 years
	Force      bool          // overwrite existing files
}

// CAFiles are the paths CreateCA wrote.
type CAFiles struct {
	CertFile string // ca.pem, 0644
	KeyFile  string // ca-key.pem, 0600
}

// CertOptions configures CreateNodeCert.
type CertOptions struct {
	Dir         string // output directory, created 0700 if missing
	CACertFile  string
	CAKeyFile   string
	NodeID      string
	TrustDomain string        // defaults to DefaultTrustDomain
	DNSNames    []string      // added to "localhost"
	IPs         []net.IP      // added to 127.0.0.1 and ::1
	Validity    time.Duration // defaults to 1 year
	Force       bool          // overwrite existing files
}

// CreateCA makes a new cluster CA (ECDSA P-256) and writes ca.pem and ca-key.pem.
// The CA signs node certificates only; it is not a workload trust domain's CA.
func CreateCA(opts CAOptions) (CAFiles, error) {
	if opts.Dir == "" {
		return CAFiles{}, errors.New("cluster: CA directory is required")
	}
	if opts.CommonName == "" {
		opts.CommonName = "ferry cluster CA"
	}
	if opts.Validity == 0 {
		opts.Validity = 5 * 365 * 24 * time.Hour
	}
	files := CAFiles{
		CertFile: filepath.Join(opts.Dir, CAFileName),
		KeyFile:  filepath.Join(opts.Dir, CAKeyFileName),
	}
	if err := prepareOutput(opts.Dir, opts.Force, files.CertFile, files.KeyFile); err != nil {
		return CAFiles{}, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return CAFiles{}, fmt.Errorf("cluster: generate CA key: %w", err)
	}
	serial, err := randomSerial()
	if err != nil {
		return CAFiles{}, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: opts.CommonName},
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              now.Add(opts.Validity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return CAFiles{}, fmt.Errorf("cluster: create CA certificate: %w", err)
	}
	if err := writeKeyAndCert(files.CertFile, files.KeyFile, der, key); err != nil {
		return CAFiles{}, err
	}
	return files, nil
}

// CreateNodeCert signs a certificate for one server node with the cluster CA and
// writes node.pem and node-key.pem. The certificate serves both ends of mutual TLS
// and carries the URI SAN spiffe://<trust domain>/ferry/cluster/<node id>, DNS SAN
// localhost and IP SANs 127.0.0.1 and ::1 besides the names given.
func CreateNodeCert(opts CertOptions) (TLSFiles, error) {
	if opts.Dir == "" {
		return TLSFiles{}, errors.New("cluster: certificate directory is required")
	}
	if err := validNodeID(opts.NodeID); err != nil {
		return TLSFiles{}, err
	}
	if opts.TrustDomain == "" {
		opts.TrustDomain = DefaultTrustDomain
	}
	if opts.Validity == 0 {
		opts.Validity = 365 * 24 * time.Hour
	}
	caCert, caKey, err := loadCA(opts.CACertFile, opts.CAKeyFile)
	if err != nil {
		return TLSFiles{}, err
	}
	files := TLSFiles{
		CAFile:   opts.CACertFile,
		CertFile: filepath.Join(opts.Dir, NodeFileName),
		KeyFile:  filepath.Join(opts.Dir, NodeKeyFileName),
	}
	if err := prepareOutput(opts.Dir, opts.Force, files.CertFile, files.KeyFile); err != nil {
		return TLSFiles{}, err
	}
	id := &url.URL{Scheme: "spiffe", Host: opts.TrustDomain, Path: clusterPathPrefix + opts.NodeID}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return TLSFiles{}, fmt.Errorf("cluster: generate node key: %w", err)
	}
	serial, err := randomSerial()
	if err != nil {
		return TLSFiles{}, err
	}
	now := time.Now()
	notAfter := now.Add(opts.Validity)
	if notAfter.After(caCert.NotAfter) {
		notAfter = caCert.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: opts.NodeID},
		NotBefore:    now.Add(-time.Minute),
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		URIs:         []*url.URL{id},
		DNSNames:     append([]string{"localhost"}, opts.DNSNames...),
		IPAddresses:  append([]net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback}, opts.IPs...),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, key.Public(), caKey)
	if err != nil {
		return TLSFiles{}, fmt.Errorf("cluster: create node certificate: %w", err)
	}
	if err := writeKeyAndCert(files.CertFile, files.KeyFile, der, key); err != nil {
		return TLSFiles{}, err
	}
	return files, nil
}

// validNodeID keeps node IDs usable as a URI path segment and a file name.
func validNodeID(id string) error {
	if id == "" {
		return errors.New("cluster: node ID is required")
	}
	if len(id) > 128 {
		return errors.New("cluster: node ID longer than 128 characters")
	}
	for _, r := range id {
		ok := r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("-_.", r)
		if !ok {
			return fmt.Errorf("cluster: node ID %q: only letters, digits, '-', '_' and '.' are allowed", id)
		}
	}
	return nil
}

func randomSerial() (*big.Int, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("cluster: serial number: %w", err)
	}
	return serial, nil
}

func prepareOutput(dir string, force bool, paths ...string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("cluster: %w", err)
	}
	if force {
		return nil
	}
	for _, p := range paths {
		if _, err := os.Stat(p); err == nil {
			return fmt.Errorf("cluster: %s already exists", p)
		}
	}
	return nil
}

func writeKeyAndCert(certFile, keyFile string, der []byte, key *ecdsa.PrivateKey) error {
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return fmt.Errorf("cluster: marshal key: %w", err)
	}
	if err := writeFileAtomic(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		return err
	}
	return writeFileAtomic(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
}

// writeFileAtomic creates the file with its final mode before any byte is
// written, so a key is never readable by others even for a moment.
func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("cluster: %w", err)
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return fmt.Errorf("cluster: %w", err)
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("cluster: write %s: %w", path, err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("cluster: sync %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("cluster: %w", err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("cluster: %w", err)
	}
	return nil
}

func loadCA(certFile, keyFile string) (*x509.Certificate, any, error) {
	certPEM, err := os.ReadFile(certFile)
	if err != nil {
		return nil, nil, fmt.Errorf("cluster: read CA certificate: %w", err)
	}
	block, _ := pem.Decode(certPEM)
	if block == nil || block.Type != "CERTIFICATE" {
		return nil, nil, fmt.Errorf("cluster: %s: no PEM certificate", certFile)
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, nil, fmt.Errorf("cluster: parse CA certificate: %w", err)
	}
	if !cert.IsCA {
		return nil, nil, fmt.Errorf("cluster: %s is not a CA certificate", certFile)
	}
	keyPEM, err := os.ReadFile(keyFile)
	if err != nil {
		return nil, nil, fmt.Errorf("cluster: read CA key: %w", err)
	}
	kb, _ := pem.Decode(keyPEM)
	if kb == nil {
		return nil, nil, fmt.Errorf("cluster: %s: no PEM key", keyFile)
	}
	key, err := x509.ParsePKCS8PrivateKey(kb.Bytes)
	if err != nil {
		return nil, nil, fmt.Errorf("cluster: parse CA key: %w", err)
	}
	return cert, key, nil
}
