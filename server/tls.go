package server

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/ferry-id/ferry/server/ca"
	"github.com/ferry-id/ferry/server/state"
)

// serverSVIDTTL is the lifetime of the server's own X509-SVIDs; they are
// renewed at half of that, or sooner (see serverSVID).
const serverSVIDTTL = time.Hour

// serverSVID is one of this node's server X509-SVIDs (the agent API, the
// admin listener and the https_spiffe bundle endpoint serve one for
// "localhost", the OIDC listener one for its issuer's host). It is signed
// anew at half-life, and at once when the CA's active X.509 authority is no
// longer the one that signed it: a new authority was activated, so the one
// that signed it is on its way to being tainted and revoked. Checked on every
// handshake (one atomic load), so no certificate from a retiring authority is
// served after the switch, and none from a revoked one ever (the SPIFFE
// federation spec requires a bundle endpoint's certificate to verify against
// the bundle its clients hold).
type serverSVID struct {
	ca       *ca.CA
	dnsNames []string
	log      *slog.Logger

	mu      sync.Mutex
	cert    *tls.Certificate
	signer  string // ID of the authority that signed cert
	renewAt time.Time
}

func (s *serverSVID) get(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	active := s.ca.ActiveX509AuthorityID()
	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Now()
	if s.cert != nil && now.Before(s.renewAt) && (s.signer == active || active == "") {
		return s.cert, nil
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	chain, err := s.ca.SignServerX509SVID(key.Public(), s.dnsNames, serverSVIDTTL)
	if err != nil {
		if s.cert != nil && now.Before(s.cert.Leaf.NotAfter) {
			// Keep serving the current SVID while the CA cannot sign.
			return s.cert, nil
		}
		return nil, fmt.Errorf("server: no server SVID yet: %w", err)
	}
	c := &tls.Certificate{PrivateKey: crypto.Signer(key), Leaf: chain[0]}
	for _, x := range chain {
		c.Certificate = append(c.Certificate, x.Raw)
	}
	signer := hex.EncodeToString(chain[0].AuthorityKeyId)
	if s.cert != nil && s.signer != signer && s.log != nil {
		s.log.Info("server SVID signed by the new active X.509 authority", "dns_names", s.dnsNames, "authority_id", signer, "previous", s.signer)
	}
	s.cert, s.signer = c, signer
	s.renewAt = chain[0].NotBefore.Add(chain[0].NotAfter.Sub(chain[0].NotBefore) / 2)
	return c, nil
}

// svidTLS serves the agent API with this node's server X509-SVID and verifies
// client certificates (agent SVIDs) against the current trust bundle.
type svidTLS struct {
	svid  *serverSVID
	store *state.Store
	td    string

	mu       sync.Mutex
	pool     *x509.CertPool
	poolRev  uint64
	poolSeen bool
}

func (s *svidTLS) getCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	return s.svid.get(hello)
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
