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
	LogLevel    string                 `hcl:"log_level"`
	LogFormat   string                 `hcl:"log_format"`
	AgentAddr   string                 `hcl:"agent_addr"`
	AdminAddr   string                 `hcl:"admin_addr"`
	Cluster     *clusterBlock          `hcl:"cluster"`
	CA          *caBlock               `hcl:"ca"`
	X509PoP     *x509popBlock          `hcl:"x509pop"`
	OIDC        *oidcBlock             `hcl:"oidc"`
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
	if s.TrustDomain != "" {
		td, err := spiffeid.TrustDomainFromString(s.TrustDomain)
		if err != nil {
			return Config{}, fmt.Errorf("server: trust_domain: %w", err)
		}
		c.TrustDomain = td
	}
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
	if c.CA.JWTIssuer == "" {
		// JWT-SVIDs must name the issuer relying parties discover their keys at.
		c.CA.JWTIssuer = c.OIDC.Issuer
	}
	if c.AdminSocket == "" {
		c.AdminSocket = filepath.Join(c.DataDir, "admin.sock")
	}
	return nil
}
