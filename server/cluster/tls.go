package cluster

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"
)

// TLSFiles names the PEM files of a node's cluster identity.
type TLSFiles struct {
	CAFile   string // cluster CA certificate(s); peers must chain to it
	CertFile string // this node's certificate (chain)
	KeyFile  string // this node's private key; should be 0600
}

// peerTLS holds both halves of the cluster's mutual TLS.
type peerTLS struct {
	server *tls.Config
	client *tls.Config // ServerName is set per dial
	domain string      // trust domain of this node's certificate, "" if it has no cluster URI SAN
}

// keyPair reloads the node certificate when its files change, so a renewed
// certificate is used for new connections without a restart.
type keyPair struct {
	files   TLSFiles
	mu      sync.Mutex
	cert    *tls.Certificate
	certMod time.Time
	keyMod  time.Time
	log     *slog.Logger
}

func (k *keyPair) load() (*tls.Certificate, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	cs, err := os.Stat(k.files.CertFile)
	if err != nil {
		return k.cached(fmt.Errorf("cluster: %w", err))
	}
	ks, err := os.Stat(k.files.KeyFile)
	if err != nil {
		return k.cached(fmt.Errorf("cluster: %w", err))
	}
	if k.cert != nil && cs.ModTime().Equal(k.certMod) && ks.ModTime().Equal(k.keyMod) {
		return k.cert, nil
	}
	if ks.Mode().Perm()&0o077 != 0 && k.log != nil {
		k.log.Warn("cluster: node key file is readable by others", "path", k.files.KeyFile, "mode", ks.Mode().Perm().String())
	}
	cert, err := tls.LoadX509KeyPair(k.files.CertFile, k.files.KeyFile)
	if err != nil {
		return k.cached(fmt.Errorf("cluster: load node certificate: %w", err))
	}
	k.cert, k.certMod, k.keyMod = &cert, cs.ModTime(), ks.ModTime()
	return k.cert, nil
}

// cached keeps serving the last good certificate when a reload fails half-way
// (e.g. while the files are being replaced).
func (k *keyPair) cached(err error) (*tls.Certificate, error) {
	if k.cert != nil {
		return k.cert, nil
	}
	return nil, err
}

func loadPeerTLS(files TLSFiles, log *slog.Logger) (*peerTLS, error) {
	if files.CAFile == "" || files.CertFile == "" || files.KeyFile == "" {
		return nil, errors.New("cluster: TLS CA, certificate and key files are required")
	}
	caPEM, err := os.ReadFile(files.CAFile)
	if err != nil {
		return nil, fmt.Errorf("cluster: read CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("cluster: %s holds no certificate", files.CAFile)
	}
	kp := &keyPair{files: files, log: log}
	cert, err := kp.load()
	if err != nil {
		return nil, err
	}
	leaf := cert.Leaf
	if leaf == nil {
		if leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
			return nil, fmt.Errorf("cluster: parse node certificate: %w", err)
		}
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return nil, fmt.Errorf("cluster: node certificate does not chain to the cluster CA: %w", err)
	}
	p := &peerTLS{}
	if u := clusterURI(leaf); u != nil {
		p.domain = u.Host
	}
	verify := func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) == 0 {
			return errors.New("cluster: peer sent no certificate")
		}
		if p.domain == "" {
			return nil
		}
		u := clusterURI(cs.PeerCertificates[0])
		if u == nil || u.Host != p.domain {
			return fmt.Errorf("cluster: peer certificate is not a node of cluster %q", p.domain)
		}
		return nil
	}
	p.server = &tls.Config{
		MinVersion:       tls.VersionTLS13,
		ClientAuth:       tls.RequireAndVerifyClientCert,
		ClientCAs:        pool,
		GetCertificate:   func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return kp.load() },
		VerifyConnection: verify,
	}
	p.client = &tls.Config{
		MinVersion:           tls.VersionTLS13,
		RootCAs:              pool,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return kp.load() },
		VerifyConnection:     verify,
	}
	return p, nil
}

// clientFor returns the client configuration for dialing addr: the server's
// certificate must name addr's host (an IP SAN for IP addresses).
func (p *peerTLS) clientFor(addr string) *tls.Config {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		host = addr
	}
	c := p.client.Clone()
	c.ServerName = host
	return c
}

// clusterURI returns the certificate's spiffe://<domain>/ferry/cluster/<id> URI SAN.
func clusterURI(cert *x509.Certificate) *url.URL {
	for _, u := range cert.URIs {
		if u.Scheme == "spiffe" && strings.HasPrefix(u.Path, clusterPathPrefix) && len(u.Path) > len(clusterPathPrefix) {
			return u
		}
	}
	return nil
}
