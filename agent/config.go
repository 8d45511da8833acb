package agent

import (
	"fmt"
	"maps"
	"net/netip"
	"net/url"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/hcl/hcl/token"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ferry-id/ferry/agent/imds"
	"github.com/ferry-id/ferry/agent/workloadapi"
	"github.com/ferry-id/ferry/attestors/node/jointoken"
	"github.com/ferry-id/ferry/attestors/node/x509pop"
	"github.com/ferry-id/ferry/internal/config"
)

type fileConfig struct {
	Agent      *agentBlock            `hcl:"agent"`
	UnusedKeys map[string][]token.Pos `hcl:",unusedKeyPositions"`
}

type agentBlock struct {
	TrustDomain     string                 `hcl:"trust_domain"`
	DataDir         string                 `hcl:"data_dir"`
	ServerAddresses []string               `hcl:"server_addresses"`
	TrustBundleFile string                 `hcl:"trust_bundle_file"`
	SocketPath      string                 `hcl:"socket_path"`
	WorkloadAPIGRPC *string                `hcl:"workload_api_grpc_server"`
	WorkloadAPI     *workloadAPIBlock      `hcl:"workload_api"`
	LogLevel        string                 `hcl:"log_level"`
	LogFormat       string                 `hcl:"log_format"`
	JoinToken       string                 `hcl:"join_token"`
	X509PoP         *x509popAgentBlock     `hcl:"x509pop"`
	AzureIMDS       *azureIMDSAgentBlock   `hcl:"azure_imds"`
	AWSIID          *awsIIDAgentBlock      `hcl:"aws_iid"`
	GCPIIT          *gcpIITAgentBlock      `hcl:"gcp_iit"`
	AzureMSI        *azureMSIAgentBlock    `hcl:"azure_msi"`
	TPM             *tpmAgentBlock         `hcl:"tpm"`
	SSHPoP          *sshpopAgentBlock      `hcl:"sshpop"`
	Systemd         bool                   `hcl:"systemd"`
	IMDS            *imdsBlock             `hcl:"imds"`
	UnusedKeys      map[string][]token.Pos `hcl:",unusedKeyPositions"`
}

type imdsBlock struct {
	ArcAddr            *string                `hcl:"arc_addr"`
	VM                 bool                   `hcl:"vm"`
	VMAddr             string                 `hcl:"vm_addr"`
	AddLoopbackAddress bool                   `hcl:"add_loopback_address"`
	TokenDir           string                 `hcl:"token_dir"`
	Authority          string                 `hcl:"authority"`
	AuthorityCAFile    string                 `hcl:"authority_ca_file"`
	TenantID           string                 `hcl:"tenant_id"`
	AllowedGroups      []string               `hcl:"allowed_groups"`
	AgentIdentities    *bool                  `hcl:"agent_identities"`
	IdentityCacheTTL   string                 `hcl:"identity_cache_ttl"`
	UnusedKeys         map[string][]token.Pos `hcl:",unusedKeyPositions"`
}

// workloadAPIBlock holds the Workload API's limits (workloadapi.Limits);
// an unset key takes its default.
type workloadAPIBlock struct {
	MaxConnections        int                    `hcl:"max_connections"`
	MaxConnectionsPerUID  int                    `hcl:"max_connections_per_uid"`
	MaxCalls              int                    `hcl:"max_calls"`
	MaxCallsPerUID        int                    `hcl:"max_calls_per_uid"`
	MaxCallsPerConnection int                    `hcl:"max_calls_per_connection"`
	IdleTimeout           string                 `hcl:"idle_timeout"`
	HandshakeTimeout      string                 `hcl:"handshake_timeout"`
	MaxHeaderListBytes    int                    `hcl:"max_header_list_bytes"`
	MaxRequestBytes       int                    `hcl:"max_request_bytes"`
	UnusedKeys            map[string][]token.Pos `hcl:",unusedKeyPositions"`
}

// limits validates b and returns the limits it sets.
func (b *workloadAPIBlock) limits() (workloadapi.Limits, error) {
	l := workloadapi.Limits{
		MaxConnections:        b.MaxConnections,
		MaxConnectionsPerUID:  b.MaxConnectionsPerUID,
		MaxCalls:              b.MaxCalls,
		MaxCallsPerUID:        b.MaxCallsPerUID,
		MaxCallsPerConnection: b.MaxCallsPerConnection,
		MaxHeaderListBytes:    b.MaxHeaderListBytes,
		MaxRequestBytes:       b.MaxRequestBytes,
	}
	if b.IdleTimeout != "" {
		d, err := time.ParseDuration(b.IdleTimeout)
		if err != nil || d <= 0 {
			return l, fmt.Errorf("agent: workload_api: idle_timeout %q: want a positive duration such as \"5m\"", b.IdleTimeout)
		}
		l.IdleTimeout = d
	}
	if b.HandshakeTimeout != "" {
		d, err := time.ParseDuration(b.HandshakeTimeout)
		if err != nil || d <= 0 {
			return l, fmt.Errorf("agent: workload_api: handshake_timeout %q: want a positive duration such as \"10s\"", b.HandshakeTimeout)
		}
		l.HandshakeTimeout = d
	}
	if err := l.Validate(); err != nil {
		return l, fmt.Errorf("agent: workload_api: %w", err)
	}
	return l, nil
}

type x509popAgentBlock struct {
	CertFile          string                 `hcl:"cert_file"`
	KeyFile           string                 `hcl:"key_file"`
	IntermediatesFile string                 `hcl:"intermediates_file"`
	UnusedKeys        map[string][]token.Pos `hcl:",unusedKeyPositions"`
}

// FileConfig is agent.conf as read, plus the settings only the CLI uses.
type FileConfig struct {
	Config
	LogLevel, LogFormat string
}

// LoadConfig reads agent.conf. joinToken, when not empty, overrides the file's
// join_token (so a token need not be written to disk).
func LoadConfig(path, joinToken string) (FileConfig, error) {
	var f fileConfig
	if err := config.Decode(path, &f); err != nil {
		return FileConfig{}, err
	}
	a := f.Agent
	if a == nil {
		return FileConfig{}, fmt.Errorf("agent: %s has no agent block", path)
	}
	td, err := spiffeid.TrustDomainFromString(a.TrustDomain)
	if err != nil {
		return FileConfig{}, fmt.Errorf("agent: trust_domain: %w", err)
	}
	out := FileConfig{LogLevel: a.LogLevel, LogFormat: a.LogFormat, Config: Config{
		TrustDomain: td,
		Servers:     a.ServerAddresses,
		DataDir:     config.Resolve(path, a.DataDir),
		SocketPath:  config.Resolve(path, a.SocketPath),
		Systemd:     a.Systemd,
	}}
	if a.WorkloadAPIGRPC != nil {
		return FileConfig{}, fmt.Errorf("agent: workload_api_grpc_server was removed: the Workload API is always served by grpc-go; delete the setting (its limits are in the workload_api block)")
	}
	if a.WorkloadAPI != nil {
		l, err := a.WorkloadAPI.limits()
		if err != nil {
			return FileConfig{}, err
		}
		out.WorkloadAPILimits = l
	}
	if len(out.Servers) == 0 {
		return FileConfig{}, fmt.Errorf("agent: server_addresses is required")
	}
	if out.DataDir == "" {
		return FileConfig{}, fmt.Errorf("agent: data_dir is required")
	}
	if out.SocketPath == "" {
		out.SocketPath = filepath.Join(config.RuntimeDir("agent"), "public", "api.sock")
	}
	if a.TrustBundleFile != "" {
		b, err := x509bundle.Load(td, config.Resolve(path, a.TrustBundleFile))
		if err != nil {
			return FileConfig{}, fmt.Errorf("agent: trust_bundle_file: %w", err)
		}
		out.TrustBundle = b.X509Authorities()
	}
	if joinToken == "" {
		joinToken = a.JoinToken
	}
	cloud, err := cloudAttestors(path, a)
	if err != nil {
		return FileConfig{}, err
	}
	if n := len(cloud) + btoi(joinToken != "") + btoi(a.X509PoP != nil); n > 1 {
		return FileConfig{}, fmt.Errorf("agent: choose one node attestor: join_token, x509pop, %s", strings.Join(slices.Sorted(maps.Keys(cloud)), ", "))
	}
	switch {
	case len(cloud) == 1:
		for _, at := range cloud {
			out.NodeAttestor = at
		}
	case joinToken != "":
		at, err := jointoken.NewAgent(jointoken.AgentConfig{Token: joinToken})
		if err != nil {
			return FileConfig{}, fmt.Errorf("agent: %w", err)
		}
		out.NodeAttestor = at
	case a.X509PoP != nil:
		at, err := x509pop.NewAgent(x509pop.AgentConfig{
			CertificatePath:   config.Resolve(path, a.X509PoP.CertFile),
			PrivateKeyPath:    config.Resolve(path, a.X509PoP.KeyFile),
			IntermediatesPath: config.Resolve(path, a.X509PoP.IntermediatesFile),
		})
		if err != nil {
			return FileConfig{}, fmt.Errorf("agent: %w", err)
		}
		out.NodeAttestor = at
	default:
		// A saved agent SVID may make attestation unnecessary; without one
		// the session reports that no attestor is configured.
		out.NodeAttestor = noAttestor{}
	}
	if a.IMDS != nil {
		ic, err := loadIMDS(path, a.IMDS)
		if err != nil {
			return FileConfig{}, err
		}
		out.IMDS = ic
	}
	if _, err := os.Stat(out.DataDir); err != nil && !os.IsNotExist(err) {
		return FileConfig{}, fmt.Errorf("agent: data_dir: %w", err)
	}
	return out, nil
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// loadIMDS validates the imds block and applies its defaults.
func loadIMDS(path string, b *imdsBlock) (*IMDSConfig, error) {
	c := &IMDSConfig{
		ArcAddr:            imds.DefaultArcAddress,
		VM:                 b.VM,
		VMAddr:             b.VMAddr,
		AddLoopbackAddress: b.AddLoopbackAddress,
		TokenDir:           config.Resolve(path, b.TokenDir),
		Authority:          b.Authority,
		AuthorityCAFile:    config.Resolve(path, b.AuthorityCAFile),
		TenantID:           b.TenantID,
		AgentIdentities:    b.AgentIdentities == nil || *b.AgentIdentities,
	}
	if b.ArcAddr != nil {
		c.ArcAddr = *b.ArcAddr
	}
	if c.VMAddr == "" {
		c.VMAddr = imds.DefaultVMAddress
	}
	if c.TokenDir == "" {
		c.TokenDir = imds.DefaultTokenDir
	}
	if c.ArcAddr == "" && !c.VM {
		return nil, fmt.Errorf("agent: imds: arc_addr is empty and vm is off: nothing to serve")
	}
	for name, addr := range map[string]string{"arc_addr": c.ArcAddr, "vm_addr": c.VMAddr} {
		if addr == "" {
			continue
		}
		if _, err := netip.ParseAddrPort(addr); err != nil {
			return nil, fmt.Errorf("agent: imds: %s: %w", name, err)
		}
	}
	u, err := url.Parse(c.Authority)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return nil, fmt.Errorf("agent: imds: authority %q must be an https URL", c.Authority)
	}
	if c.AuthorityCAFile != "" {
		if _, err := loadCertPool(c.AuthorityCAFile); err != nil {
			return nil, err
		}
	}
	groups, err := resolveGroups(b.AllowedGroups)
	if err != nil {
		return nil, err
	}
	c.AllowedGroups = groups
	if b.IdentityCacheTTL != "" {
		d, err := time.ParseDuration(b.IdentityCacheTTL)
		if err != nil || d <= 0 {
			return nil, fmt.Errorf("agent: imds: identity_cache_ttl %q: want a positive duration such as \"30s\"", b.IdentityCacheTTL)
		}
		c.IdentityCacheTTL = d
	}
	return c, nil
}

// resolveGroups turns allowed_groups (names or numeric gids) into gids. A
// name must exist when the agent starts: a policy naming a missing group
// would admit no one but root, silently.
func resolveGroups(names []string) ([]uint32, error) {
	if names != nil && len(names) == 0 {
		return nil, fmt.Errorf("agent: imds: allowed_groups is empty: omit it to admit every local caller")
	}
	var out []uint32
	for _, n := range names {
		if n == "" {
			return nil, fmt.Errorf("agent: imds: allowed_groups: empty group name")
		}
		if v, err := strconv.ParseUint(n, 10, 32); err == nil {
			out = append(out, uint32(v))
			continue
		}
		g, err := user.LookupGroup(n)
		if err != nil {
			return nil, fmt.Errorf("agent: imds: allowed_groups: %w", err)
		}
		v, err := strconv.ParseUint(g.Gid, 10, 32)
		if err != nil {
			return nil, fmt.Errorf("agent: imds: allowed_groups: group %q has gid %q", n, g.Gid)
		}
		out = append(out, uint32(v))
	}
	return out, nil
}

// ConfigKeys lists every setting agent.conf accepts (docs/config.md is
// checked against it).
func ConfigKeys() []string { return config.Keys(fileConfig{}) }
