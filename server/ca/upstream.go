package ca

import (
	"crypto"
	"crypto/x509"
	"fmt"
	"os"
	"time"
)

// upstream is a CA, loaded from files, that signs this node's X.509
// authorities as intermediates.
type upstream struct {
	cert *x509.Certificate
	key  crypto.Signer
	// intermediates are the certificates between our CA and the roots,
	// starting with cert unless cert is itself a root.
	intermediates []*x509.Certificate
	roots         []*x509.Certificate
	// notAfter is the earliest expiry on the path to a root: no CA this
	// node makes may outlive it.
	notAfter time.Time
}

func loadUpstream(cfg UpstreamConfig, now time.Time) (*upstream, error) {
	if cfg.CertFile == "" || cfg.KeyFile == "" {
		return nil, fmt.Errorf("ca: upstream CA needs a certificate file and a key file")
	}
	certPEM, err := os.ReadFile(cfg.CertFile)
	if err != nil {
		return nil, fmt.Errorf("ca: upstream certificate: %w", err)
	}
	chain, err := parseCertsPEM(certPEM)
	if err != nil {
		return nil, fmt.Errorf("ca: upstream certificate: %w", err)
	}
	keyPEM, err := os.ReadFile(cfg.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("ca: upstream key: %w", err)
	}
	key, err := decodeKey(keyPEM)
	if err != nil {
		return nil, fmt.Errorf("ca: upstream key: %w", err)
	}
	up := &upstream{cert: chain[0], key: key}
	if !certPublicKey(up.cert, key.Public()) {
		return nil, fmt.Errorf("ca: upstream key does not match the upstream certificate")
	}
	if !up.cert.BasicConstraintsValid || !up.cert.IsCA {
		return nil, fmt.Errorf("ca: upstream certificate is not a CA")
	}
	if up.cert.KeyUsage != 0 && up.cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, fmt.Errorf("ca: upstream certificate may not sign certificates")
	}
	if cfg.BundleFile != "" {
		data, err := os.ReadFile(cfg.BundleFile)
		if err != nil {
			return nil, fmt.Errorf("ca: upstream bundle: %w", err)
		}
		if up.roots, err = parseCertsPEM(data); err != nil {
			return nil, fmt.Errorf("ca: upstream bundle: %w", err)
		}
	} else {
		last := chain[len(chain)-1]
		if last.CheckSignatureFrom(last) != nil {
			return nil, fmt.Errorf("ca: upstream certificate file does not end in a self-signed root and no bundle file was given")
		}
		up.roots = []*x509.Certificate{last}
	}
	roots, inters := x509.NewCertPool(), x509.NewCertPool()
	for _, r := range up.roots {
		roots.AddCert(r)
	}
	isRoot := func(c *x509.Certificate) bool {
		for _, r := range up.roots {
			if r.Equal(c) {
				return true
			}
		}
		return false
	}
	for _, c := range chain {
		if !isRoot(c) {
			up.intermediates = append(up.intermediates, c)
			inters.AddCert(c)
		}
	}
	paths, err := up.cert.Verify(x509.VerifyOptions{
		Roots: roots, Intermediates: inters, CurrentTime: now,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
	if err != nil {
		return nil, fmt.Errorf("ca: upstream certificate does not chain to the upstream roots: %w", err)
	}
	up.notAfter = up.cert.NotAfter
	for _, c := range paths[0] {
		if c.NotAfter.Before(up.notAfter) {
			up.notAfter = c.NotAfter
		}
	}
	return up, nil
}
