package server

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/hashicorp/hcl/hcl/token"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/crypto/ssh"

	nodeattestor "github.com/ferry-id/ferry/attestors/node"
	"github.com/ferry-id/ferry/attestors/node/awsiid"
	"github.com/ferry-id/ferry/attestors/node/azureimds"
	"github.com/ferry-id/ferry/attestors/node/azuremsi"
	"github.com/ferry-id/ferry/attestors/node/gcpiit"
	"github.com/ferry-id/ferry/attestors/node/sshpop"
	"github.com/ferry-id/ferry/attestors/node/tpm"
	"github.com/ferry-id/ferry/attestors/node/x509pop"
	"github.com/ferry-id/ferry/internal/config"
)

// NodeAttestorFunc builds one configured node attestor with the server's logger.
type NodeAttestorFunc func(log *slog.Logger) (nodeattestor.ServerAttestor, error)

type azureIMDSServerBlock struct {
	CABundleFile      string   `hcl:"ca_bundle_file"`
	IntermediatesFile string   `hcl:"intermediates_file"`
	MetadataDomains   []string `hcl:"metadata_domains"`
	MaxDocumentAge    string   `hcl:"max_document_age"`
	// Tenants maps each tenant ID to the subscriptions accepted in it.
	Tenants    map[string][]string    `hcl:"tenants"`
	UnusedKeys map[string][]token.Pos `hcl:",unusedKeyPositions"`
}

type awsIIDServerBlock struct {
	// RegionCertificates maps each region to the PEM file of AWS's RSA-2048
	// certificate for it.
	RegionCertificates map[string]string      `hcl:"region_certificates"`
	AccountIDs         []string               `hcl:"account_ids"`
	AllowReattestation bool                   `hcl:"allow_reattestation"`
	UnusedKeys         map[string][]token.Pos `hcl:",unusedKeyPositions"`
}

type gcpIITServerBlock struct {
	ProjectIDs         []string               `hcl:"project_ids"`
	Audience           string                 `hcl:"audience"`
	JWKSURL            string                 `hcl:"jwks_url"`
	JWKSCAFile         string                 `hcl:"jwks_ca_file"`
	AllowReattestation bool                   `hcl:"allow_reattestation"`
	UnusedKeys         map[string][]token.Pos `hcl:",unusedKeyPositions"`
}

type azureMSIServerBlock struct {
	Tenants            []string               `hcl:"tenants"`
	Audience           string                 `hcl:"audience"`
	Issuers            []string               `hcl:"issuers"`
	CAFile             string                 `hcl:"ca_file"`
	AllowReattestation bool                   `hcl:"allow_reattestation"`
	UnusedKeys         map[string][]token.Pos `hcl:",unusedKeyPositions"`
}

type tpmServerBlock struct {
	// ManufacturerCAFile is a PEM file of TPM manufacturer root CAs.
	ManufacturerCAFile string `hcl:"manufacturer_ca_file"`
	// IntermediatesFile is a PEM file of intermediate CAs EK chains may use.
	IntermediatesFile string                 `hcl:"intermediates_file"`
	UnusedKeys        map[string][]token.Pos `hcl:",unusedKeyPositions"`
}

type sshpopServerBlock struct {
	// CertAuthoritiesFile holds the CA public keys, one per line, as
	// ssh-keygen writes them (ca.pub) or with a @cert-authority marker.
	CertAuthoritiesFile string                 `hcl:"cert_authorities_file"`
	UnusedKeys          map[string][]token.Pos `hcl:",unusedKeyPositions"`
}

// loadSSHAuthorities reads SSH public keys, one per line (known_hosts
// @cert-authority lines and comments allowed).
func loadSSHAuthorities(file string) ([]ssh.PublicKey, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	var keys []ssh.PublicKey
	for n, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if rest, ok := strings.CutPrefix(line, "@cert-authority"); ok {
			// "@cert-authority <host patterns> <key>": drop the patterns.
			if f := strings.Fields(rest); len(f) > 1 {
				line = strings.Join(f[1:], " ")
			}
		}
		k, _, _, _, err := ssh.ParseAuthorizedKey([]byte(line))
		if err != nil {
			return nil, fmt.Errorf("%s line %d: %w", file, n+1, err)
		}
		keys = append(keys, k)
	}
	if len(keys) == 0 {
		return nil, fmt.Errorf("%s: no public key", file)
	}
	return keys, nil
}

// build validates an attestor's configuration now, so a bad setting stops
// the server at start, and returns its constructor for the server's logger.
func build[C any](c C, newServer func(C, *slog.Logger) (nodeattestor.ServerAttestor, error)) (NodeAttestorFunc, error) {
	if _, err := newServer(c, slog.New(slog.DiscardHandler)); err != nil {
		return nil, fmt.Errorf("server: %w", err)
	}
	return func(log *slog.Logger) (nodeattestor.ServerAttestor, error) { return newServer(c, log) }, nil
}

// httpsClient returns a client trusting the CAs in file, or nil (the system
// roots) when file is empty.
func httpsClient(path, file, what string) (*http.Client, error) {
	if file == "" {
		return nil, nil
	}
	roots, err := x509pop.LoadCertificates(config.Resolve(path, file))
	if err != nil {
		return nil, fmt.Errorf("server: %s: %w", what, err)
	}
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	return &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}}}, nil
}

// nodeAttestors loads every configured attestor's files now, so a bad
// setting stops the server at start, and returns their constructors.
func nodeAttestors(b *serverBlock, path string, td spiffeid.TrustDomain) ([]NodeAttestorFunc, error) {
	var out []NodeAttestorFunc
	if td.IsZero() {
		return nil, nil // validate reports it
	}
	if az := b.AzureIMDS; az != nil {
		c := azureimds.ServerConfig{TrustDomain: td, MetadataDomains: az.MetadataDomains, Tenants: az.Tenants}
		var err error
		if az.CABundleFile == "" {
			return nil, fmt.Errorf("server: azure_imds: ca_bundle_file is required")
		}
		if c.Roots, err = x509pop.LoadCertificates(config.Resolve(path, az.CABundleFile)); err != nil {
			return nil, fmt.Errorf("server: azure_imds: ca_bundle_file: %w", err)
		}
		if az.IntermediatesFile != "" {
			if c.Intermediates, err = x509pop.LoadCertificates(config.Resolve(path, az.IntermediatesFile)); err != nil {
				return nil, fmt.Errorf("server: azure_imds: intermediates_file: %w", err)
			}
		}
		if az.MaxDocumentAge != "" {
			if c.MaxAge, err = time.ParseDuration(az.MaxDocumentAge); err != nil {
				return nil, fmt.Errorf("server: azure_imds: max_document_age: %w", err)
			}
		}
		f, err := build(c, func(c azureimds.ServerConfig, log *slog.Logger) (nodeattestor.ServerAttestor, error) {
			c.Log = log.With("attestor", azureimds.Name)
			return azureimds.NewServer(c)
		})
		if err != nil {
			return nil, err
		}
		out = append(out, f)
	}
	if aw := b.AWSIID; aw != nil {
		c := awsiid.ServerConfig{TrustDomain: td, AccountIDs: aw.AccountIDs, AllowReattestation: aw.AllowReattestation, RegionCertificates: map[string]*x509.Certificate{}}
		for region, file := range aw.RegionCertificates {
			certs, err := x509pop.LoadCertificates(config.Resolve(path, file))
			if err != nil {
				return nil, fmt.Errorf("server: aws_iid: region_certificates %s: %w", region, err)
			}
			if len(certs) != 1 {
				return nil, fmt.Errorf("server: aws_iid: region_certificates %s: want one certificate, %s has %d", region, file, len(certs))
			}
			c.RegionCertificates[region] = certs[0]
		}
		f, err := build(c, func(c awsiid.ServerConfig, log *slog.Logger) (nodeattestor.ServerAttestor, error) {
			c.Log = log.With("attestor", awsiid.Name)
			return awsiid.NewServer(c)
		})
		if err != nil {
			return nil, err
		}
		out = append(out, f)
	}
	if gb := b.GCPIIT; gb != nil {
		c := gcpiit.ServerConfig{TrustDomain: td, ProjectIDs: gb.ProjectIDs, Audience: gb.Audience, JWKSURL: gb.JWKSURL, AllowReattestation: gb.AllowReattestation}
		var err error
		if c.HTTPClient, err = httpsClient(path, gb.JWKSCAFile, "gcp_iit: jwks_ca_file"); err != nil {
			return nil, err
		}
		f, err := build(c, func(c gcpiit.ServerConfig, log *slog.Logger) (nodeattestor.ServerAttestor, error) {
			c.Log = log.With("attestor", gcpiit.Name)
			return gcpiit.NewServer(c)
		})
		if err != nil {
			return nil, err
		}
		out = append(out, f)
	}
	if mb := b.AzureMSI; mb != nil {
		c := azuremsi.ServerConfig{TrustDomain: td, Tenants: mb.Tenants, Audience: mb.Audience, Issuers: mb.Issuers, AllowReattestation: mb.AllowReattestation}
		var err error
		if c.HTTPClient, err = httpsClient(path, mb.CAFile, "azure_msi: ca_file"); err != nil {
			return nil, err
		}
		f, err := build(c, func(c azuremsi.ServerConfig, log *slog.Logger) (nodeattestor.ServerAttestor, error) {
			c.Log = log.With("attestor", azuremsi.Name)
			return azuremsi.NewServer(c)
		})
		if err != nil {
			return nil, err
		}
		out = append(out, f)
	}
	if tb := b.TPM; tb != nil {
		c := tpm.ServerConfig{TrustDomain: td}
		var err error
		if tb.ManufacturerCAFile == "" {
			return nil, fmt.Errorf("server: tpm: manufacturer_ca_file is required")
		}
		if c.ManufacturerCAs, err = x509pop.LoadCertificates(config.Resolve(path, tb.ManufacturerCAFile)); err != nil {
			return nil, fmt.Errorf("server: tpm: manufacturer_ca_file: %w", err)
		}
		if tb.IntermediatesFile != "" {
			if c.Intermediates, err = x509pop.LoadCertificates(config.Resolve(path, tb.IntermediatesFile)); err != nil {
				return nil, fmt.Errorf("server: tpm: intermediates_file: %w", err)
			}
		}
		f, err := build(c, func(c tpm.ServerConfig, log *slog.Logger) (nodeattestor.ServerAttestor, error) {
			c.Log = log.With("attestor", tpm.Name)
			return tpm.NewServer(c)
		})
		if err != nil {
			return nil, err
		}
		out = append(out, f)
	}
	if sb := b.SSHPoP; sb != nil {
		if sb.CertAuthoritiesFile == "" {
			return nil, fmt.Errorf("server: sshpop: cert_authorities_file is required")
		}
		keys, err := loadSSHAuthorities(config.Resolve(path, sb.CertAuthoritiesFile))
		if err != nil {
			return nil, fmt.Errorf("server: sshpop: cert_authorities_file: %w", err)
		}
		c := sshpop.ServerConfig{TrustDomain: td, CertAuthorities: keys}
		f, err := build(c, func(c sshpop.ServerConfig, log *slog.Logger) (nodeattestor.ServerAttestor, error) {
			c.Log = log.With("attestor", sshpop.Name)
			return sshpop.NewServer(c)
		})
		if err != nil {
			return nil, err
		}
		out = append(out, f)
	}
	return out, nil
}
