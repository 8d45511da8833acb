package server

import (
	"fmt"
	"path/filepath"
	"time"

	"github.com/hashicorp/hcl/hcl/token"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ferry-id/ferry/internal/config"
	"github.com/ferry-id/ferry/server/ca"
	"github.com/ferry-id/ferry/server/cluster"
)

// fileConfig is server.conf as written; LoadConfig turns it into a Config.
type fileConfig struct {
	Server     *serverBlock           `hcl:"server"`
	UnusedKeys map[string][]token.Pos `hcl:",unusedKeyPositions"`
}

type serverBlock struct {
	NodeID      string                 `hcl:"node_id"`
	TrustDomain string                 `hcl:"trust_domain"`
	DataDir     string                 `hcl:"data_dir"`
	AdminSocket string                 `hcl:"admin_socket"`
	HealthAddr  string                 `hcl:"health_addr"`
	Profiling   bool                   `hcl:"profiling"`
	MemoryLimit string                 `hcl:"memory_limit"`
	LogLevel    string                 `hcl:"log_level"`
	LogFormat   string                 `hcl:"log_format"`
	AgentAddr   string                 `hcl:"agent_addr"`
	AdminAddr   string                 `hcl:"admin_addr"`
	Cluster     *clusterBlock          `hcl:"cluster"`
	CA          *caBlock               `hcl:"ca"`
	X509PoP     *x509popBlock          `hcl:"x509pop"`
	OIDC        *oidcBlock             `hcl:"oidc"`
	Federation  *federationBlock       `hcl:"federation"`
	AzureIMDS   *azureIMDSServerBlock  `hcl:"azure_imds"`
	AWSIID      *awsIIDServerBlock     `hcl:"aws_iid"`
	GCPIIT      *gcpIITServerBlock     `hcl:"gcp_iit"`
	AzureMSI    *azureMSIServerBlock   `hcl:"azure_msi"`
	TPM         *tpmServerBlock        `hcl:"tpm"`
	SSHPoP      *sshpopServerBlock     `hcl:"sshpop"`
	UnusedKeys  map[string][]token.Pos `hcl:",unusedKeyPositions"`
}

type caBlock struct {
	TTL          string                 `hcl:"ttl"`
	KeyType      string                 `hcl:"key_type"`
	JWTAlgorithm string                 `hcl:"jwt_algorithm"`
	JWTIssuer    string                 `hcl:"jwt_issuer"`
	X509SVIDTTL  string                 `hcl:"x509_svid_ttl"`
	JWTSVIDTTL   string                 `hcl:"jwt_svid_ttl"`
	AgentSVIDTTL string                 `hcl:"agent_svid_ttl"`
	Upstream     *upstreamBlock         `hcl:"upstream"`
	UnusedKeys   map[string][]token.Pos `hcl:",unusedKeyPositions"`
}

type upstreamBlock struct {
	CertFile   string                 `hcl:"cert_file"`
	KeyFile    string                 `hcl:"key_file"`
	BundleFile string                 `hcl:"bundle_file"`
	UnusedKeys map[string][]token.Pos `hcl:",unusedKeyPositions"`
}

type x509popBlock struct {
	CABundleFile string                 `hcl:"ca_bundle_file"`
	UnusedKeys   map[string][]token.Pos `hcl:",unusedKeyPositions"`
}

type oidcBlock struct {
	Addr       string                 `hcl:"addr"`
	Issuer     string                 `hcl:"issuer"`
	CertFile   string                 `hcl:"cert_file"`
	KeyFile    string                 `hcl:"key_file"`
	UnusedKeys map[string][]token.Pos `hcl:",unusedKeyPositions"`
}

type clusterBlock struct {
	BindAddr          string                 `hcl:"bind_addr"`
	AdvertiseAddr     string                 `hcl:"advertise_addr"`
	Bootstrap         bool                   `hcl:"bootstrap"`
	RetryJoin         []string               `hcl:"retry_join"`
	LogStore          string                 `hcl:"log_store"`
	CAFile            string                 `hcl:"ca_file"`
	CertFile          string                 `hcl:"cert_file"`
	KeyFile           string                 `hcl:"key_file"`
	SnapshotThreshold int                    `hcl:"snapshot_threshold"`
	TrailingLogs      int                    `hcl:"trailing_logs"`
	SnapshotInterval  string                 `hcl:"snapshot_interval"`
	RaftMultiplier    int                    `hcl:"raft_multiplier"`
	UnusedKeys        map[string][]token.Pos `hcl:",unusedKeyPositions"`
}

// LoadConfig reads server.conf. Relative paths in it are relative to the file.
func LoadConfig(path string) (Config, error) {
	var f fileConfig
	if err := config.Decode(path, &f); err != nil {
		return Config{}, err
	}
	if f.Server == nil {
		return Config{}, fmt.Errorf("server: %s has no server block", path)
	}
	s := f.Server
	c := Config{
		NodeID:      s.NodeID,
		DataDir:     config.Resolve(path, s.DataDir),
		AdminSocket: config.Resolve(path, s.AdminSocket),
		HealthAddr:  s.HealthAddr,
		Profiling:   s.Profiling,
		MemoryLimit: s.MemoryLimit,
		LogLevel:    s.LogLevel,
		LogFormat:   s.LogFormat,
		AgentAddr:   s.AgentAddr,
		AdminAddr:   s.AdminAddr,
	}
	if s.X509PoP != nil {
		c.X509PoPBundle = config.Resolve(path, s.X509PoP.CABundleFile)
	}
	if cb := s.CA; cb != nil {
		c.CA = CAConfig{KeyType: cb.KeyType, JWTAlgorithm: cb.JWTAlgorithm, JWTIssuer: cb.JWTIssuer}
		for _, d := range []struct {
			name string
			in   string
			out  *time.Duration
		}{{"ca.ttl", cb.TTL, &c.CA.TTL}, {"ca.x509_svid_ttl", cb.X509SVIDTTL, &c.CA.X509SVIDTTL}, {"ca.jwt_svid_ttl", cb.JWTSVIDTTL, &c.CA.JWTSVIDTTL}, {"ca.agent_svid_ttl", cb.AgentSVIDTTL, &c.CA.AgentSVIDTTL}} {
			if d.in == "" {
				continue
			}
			v, err := time.ParseDuration(d.in)
			if err != nil {
				return Config{}, fmt.Errorf("server: %s: %w", d.name, err)
			}
			*d.out = v
		}
		if u := cb.Upstream; u != nil {
			c.CA.Upstream = &ca.UpstreamConfig{CertFile: config.Resolve(path, u.CertFile), KeyFile: config.Resolve(path, u.KeyFile), BundleFile: config.Resolve(path, u.BundleFile)}
		}
	}
	if o := s.OIDC; o != nil {
		c.OIDC = OIDCConfig{Addr: o.Addr, Issuer: o.Issuer, CertFile: config.Resolve(path, o.CertFile), KeyFile: config.Resolve(path, o.KeyFile)}
	}
	if fb := s.Federation; fb != nil {
		fc, err := fb.config(path)
		if err != nil {
			return Config{}, err
		}
		c.Federation = fc
	}
	if s.TrustDomain != "" {
		td, err := spiffeid.TrustDomainFromString(s.TrustDomain)
		if err != nil {
			return Config{}, fmt.Errorf("server: trust_domain: %w", err)
		}
		c.TrustDomain = td
	}
	na, err := nodeAttestors(s, path, c.TrustDomain)
	if err != nil {
		return Config{}, err
	}
	c.NodeAttestors = na
	if cb := s.Cluster; cb != nil {
		c.Cluster = ClusterConfig{
			BindAddr:          cb.BindAddr,
			AdvertiseAddr:     cb.AdvertiseAddr,
			Bootstrap:         cb.Bootstrap,
			RetryJoin:         cb.RetryJoin,
			LogStore:          cb.LogStore,
			TLS:               cluster.TLSFiles{CAFile: config.Resolve(path, cb.CAFile), CertFile: config.Resolve(path, cb.CertFile), KeyFile: config.Resolve(path, cb.KeyFile)},
			SnapshotThreshold: uint64(max(cb.SnapshotThreshold, 0)),
			TrailingLogs:      uint64(max(cb.TrailingLogs, 0)),
			RaftMultiplier:    cb.RaftMultiplier,
		}
		if cb.RaftMultiplier < 0 || cb.RaftMultiplier > MaxRaftMultiplier {
			return Config{}, fmt.Errorf("server: cluster.raft_multiplier = %d: want 1 to %d (0 means 1)", cb.RaftMultiplier, MaxRaftMultiplier)
		}
		if cb.SnapshotInterval != "" {
			d, err := time.ParseDuration(cb.SnapshotInterval)
			if err != nil {
				return Config{}, fmt.Errorf("server: cluster.snapshot_interval: %w", err)
			}
			c.Cluster.SnapshotInterval = d
		}
	}
	return c, c.validate()
}

func (c *Config) validate() error {
	if c.NodeID == "" {
		return fmt.Errorf("server: node_id is required")
	}
	if c.DataDir == "" {
		return fmt.Errorf("server: data_dir is required")
	}
	if c.TrustDomain.IsZero() {
		return fmt.Errorf("server: trust_domain is required")
	}
	if c.Cluster.BindAddr == "" {
		return fmt.Errorf("server: cluster.bind_addr is required")
	}
	if c.Cluster.TLS.CAFile == "" || c.Cluster.TLS.CertFile == "" || c.Cluster.TLS.KeyFile == "" {
		return fmt.Errorf("server: cluster.ca_file, cert_file and key_file are required (create them with `ferry cluster tls ca create` and `ferry cluster tls cert create`)")
	}
	if c.AgentAddr == "" {
		c.AgentAddr = "127.0.0.1:8081"
	}
	if err := c.OIDC.validate(); err != nil {
		return err
	}
	if err := c.Federation.validate(); err != nil {
		return err
	}
	if c.CA.JWTIssuer == "" {
		// JWT-SVIDs must name the issuer relying parties discover their keys at.
		c.CA.JWTIssuer = c.OIDC.Issuer
	}
	if c.AdminSocket == "" {
		c.AdminSocket = filepath.Join(config.RuntimeDir("server"), "admin.sock")
	}
	return nil
}

// Federation --------------------------------------------------------------------

// FederationConfig is SPIFFE federation: our bundle endpoint, and how to
// authenticate https_web bundle endpoints of federated trust domains.
type FederationConfig struct {
	// BundleEndpoint serves our bundle to federated peers; nil serves none.
	BundleEndpoint *BundleEndpointConfig
	// WebPKICAFile is a PEM file of roots for https_web bundle endpoints;
	// empty uses the system roots.
	WebPKICAFile string
}

// BundleEndpointConfig is federation.bundle_endpoint.
type BundleEndpointConfig struct {
	Addr string
	// Profile is https_spiffe (this node's server X509-SVID, the default) or
	// https_web (CertFile and KeyFile).
	Profile           string
	CertFile, KeyFile string
	// RefreshHint is the spiffe_refresh_hint served (default 5m), lowered to
	// fit several refreshes between a new CA's publication and activation.
	RefreshHint time.Duration
}

type federationBlock struct {
	BundleEndpoint *bundleEndpointBlock   `hcl:"bundle_endpoint"`
	WebPKICAFile   string                 `hcl:"web_pki_ca_file"`
	UnusedKeys     map[string][]token.Pos `hcl:",unusedKeyPositions"`
}

type bundleEndpointBlock struct {
	Addr        string                 `hcl:"addr"`
	Profile     string                 `hcl:"profile"`
	CertFile    string                 `hcl:"cert_file"`
	KeyFile     string                 `hcl:"key_file"`
	RefreshHint string                 `hcl:"refresh_hint"`
	UnusedKeys  map[string][]token.Pos `hcl:",unusedKeyPositions"`
}

func (fb *federationBlock) config(path string) (FederationConfig, error) {
	fc := FederationConfig{WebPKICAFile: config.Resolve(path, fb.WebPKICAFile)}
	if be := fb.BundleEndpoint; be != nil {
		fc.BundleEndpoint = &BundleEndpointConfig{Addr: be.Addr, Profile: be.Profile,
			CertFile: config.Resolve(path, be.CertFile), KeyFile: config.Resolve(path, be.KeyFile)}
		if be.RefreshHint != "" {
			d, err := time.ParseDuration(be.RefreshHint)
			if err != nil {
				return FederationConfig{}, fmt.Errorf("server: federation.bundle_endpoint.refresh_hint: %w", err)
			}
			fc.BundleEndpoint.RefreshHint = d
		}
	}
	return fc, nil
}

func (f *FederationConfig) validate() error {
	be := f.BundleEndpoint
	if be == nil {
		return nil
	}
	if be.Addr == "" {
		return fmt.Errorf("server: federation.bundle_endpoint.addr is required")
	}
	if be.Profile == "" {
		be.Profile = "https_spiffe"
	}
	switch be.Profile {
	case "https_spiffe":
		if be.CertFile != "" || be.KeyFile != "" {
			return fmt.Errorf("server: federation.bundle_endpoint: cert_file and key_file are for the https_web profile")
		}
	case "https_web":
		if be.CertFile == "" || be.KeyFile == "" {
			return fmt.Errorf("server: federation.bundle_endpoint: the https_web profile needs cert_file and key_file")
		}
	default:
		return fmt.Errorf("server: federation.bundle_endpoint.profile %q: want https_spiffe or https_web", be.Profile)
	}
	if be.RefreshHint < 0 || be.RefreshHint >= 24*time.Hour {
		return fmt.Errorf("server: federation.bundle_endpoint.refresh_hint %s: want more than 0 and less than 24h", be.RefreshHint)
	}
	return nil
}

// ConfigKeys lists every setting server.conf accepts (docs/config.md is
// checked against it).
func ConfigKeys() []string { return config.Keys(fileConfig{}) }
