package server

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/ferry-id/ferry/server/ca"
	"github.com/ferry-id/ferry/server/state"
)

// serverSVIDTTL is the lifetime of the server's own X509-SVID; it is renewed at
// half of that.
const serverSVIDTTL = time.Hour

// svidTLS serves the agent API with this node's server X509-SVID and verifies
// client certificates (agent SVIDs) against the current trust bundle.
type svidTLS struct {
	ca    *ca.CA
	store *state.Store
	td    string
	log   *slog.Logger

	mu       sync.Mutex
	cert     *tls.Certificate
	renewAt  time.Time
	pool     *x509.CertPool
	poolRev  uint64
	poolSeen bool
}

func (s *svidTLS) getCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cert != nil && time.Now().Before(s.renewAt) {
		return s.cert, nil
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	chain, err := s.ca.SignServerX509SVID(key.Public(), []string{"localhost"}, serverSVIDTTL)
	if err != nil {
		if s.cert != nil && time.Now().Before(s.cert.Leaf.NotAfter) {
			// Keep serving the current SVID while the CA cannot sign.
			return s.cert, nil
		}
		return nil, fmt.Errorf("server: no server SVID yet: %w", err)
	}
	c := &tls.Certificate{PrivateKey: crypto.Signer(key), Leaf: chain[0]}
	for _, x := range chain {
		c.Certificate = append(c.Certificate, x.Raw)
	}
	s.cert = c
	s.renewAt = chain[0].NotBefore.Add(chain[0].NotAfter.Sub(chain[0].NotBefore) / 2)
	return c, nil
}

// clientCAs returns the X.509 authorities of our trust domain's bundle.
func (s *svidTLS) clientCAs() *x509.CertPool {
	b := s.store.View().Bundle(s.td)
	s.mu.Lock()
	defer s.mu.Unlock()
	if b != nil && s.poolSeen && b.Revision == s.poolRev {
		return s.pool
	}
	pool := x509.NewCertPool()
	var rev uint64
	if b != nil {
		rev = b.Revision
		for _, a := range b.X509Authorities {
			if c, err := x509.ParseCertificate(a.Certificate); err == nil {
				pool.AddCert(c)
			}
		}
	}
	s.pool, s.poolRev, s.poolSeen = pool, rev, true
	return pool
}

func (s *svidTLS) config() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			return &tls.Config{
				MinVersion:     tls.VersionTLS12,
				GetCertificate: s.getCertificate,
				ClientAuth:     tls.VerifyClientCertIfGiven,
				ClientCAs:      s.clientCAs(),
				NextProtos:     []string{"h2"},
			}, nil
		},
	}
}
