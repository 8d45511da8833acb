package agent

import (
	"fmt"

	"github.com/hashicorp/hcl/hcl/token"

	"github.com/ferry-id/ferry/attestors/node"
	"github.com/ferry-id/ferry/attestors/node/awsiid"
	"github.com/ferry-id/ferry/attestors/node/azureimds"
	"github.com/ferry-id/ferry/attestors/node/azuremsi"
	"github.com/ferry-id/ferry/attestors/node/gcpiit"
	"github.com/ferry-id/ferry/attestors/node/sshpop"
	"github.com/ferry-id/ferry/attestors/node/tpm"
	"github.com/ferry-id/ferry/internal/config"
)

// The agent block's node attestor settings beyond join_token and x509pop.
type azureIMDSAgentBlock struct {
	MetadataURL string                 `hcl:"metadata_url"`
	APIVersion  string                 `hcl:"api_version"`
	UnusedKeys  map[string][]token.Pos `hcl:",unusedKeyPositions"`
}

type awsIIDAgentBlock struct {
	MetadataURL string                 `hcl:"metadata_url"`
	UnusedKeys  map[string][]token.Pos `hcl:",unusedKeyPositions"`
}

type gcpIITAgentBlock struct {
	MetadataURL    string                 `hcl:"metadata_url"`
	ServiceAccount string                 `hcl:"service_account"`
	Audience       string                 `hcl:"audience"`
	UnusedKeys     map[string][]token.Pos `hcl:",unusedKeyPositions"`
}

type azureMSIAgentBlock struct {
	Resource         string                 `hcl:"resource"`
	Endpoint         string                 `hcl:"endpoint"`
	MetadataURL      string                 `hcl:"metadata_url"`
	IdentityEndpoint string                 `hcl:"identity_endpoint"`
	ArcTokenDir      string                 `hcl:"arc_token_dir"`
	ClientID         string                 `hcl:"client_id"`
	UnusedKeys       map[string][]token.Pos `hcl:",unusedKeyPositions"`
}

type tpmAgentBlock struct {
	Device     string                 `hcl:"device"`
	UnusedKeys map[string][]token.Pos `hcl:",unusedKeyPositions"`
}

type sshpopAgentBlock struct {
	HostKeyPath  string                 `hcl:"host_key_path"`
	HostCertPath string                 `hcl:"host_cert_path"`
	UnusedKeys   map[string][]token.Pos `hcl:",unusedKeyPositions"`
}

// cloudAttestors returns the node attestors configured by the blocks of a
// beyond join_token and x509pop (cloud platforms, TPM), by name.
func cloudAttestors(path string, a *agentBlock) (map[string]node.AgentAttestor, error) {
	out := map[string]node.AgentAttestor{}
	if b := a.AzureIMDS; b != nil {
		at, err := azureimds.NewAgent(azureimds.AgentConfig{MetadataURL: b.MetadataURL, APIVersion: b.APIVersion})
		if err != nil {
			return nil, fmt.Errorf("agent: %w", err)
		}
		out[at.Name()] = at
	}
	if b := a.AWSIID; b != nil {
		at, err := awsiid.NewAgent(awsiid.AgentConfig{MetadataURL: b.MetadataURL})
		if err != nil {
			return nil, fmt.Errorf("agent: %w", err)
		}
		out[at.Name()] = at
	}
	if b := a.GCPIIT; b != nil {
		at, err := gcpiit.NewAgent(gcpiit.AgentConfig{MetadataURL: b.MetadataURL, ServiceAccount: b.ServiceAccount, Audience: b.Audience})
		if err != nil {
			return nil, fmt.Errorf("agent: %w", err)
		}
		out[at.Name()] = at
	}
	if b := a.AzureMSI; b != nil {
		if b.Endpoint != "" && b.Endpoint != "vm" && b.Endpoint != "arc" {
			return nil, fmt.Errorf("agent: azure_msi: endpoint %q: want vm or arc", b.Endpoint)
		}
		at, err := azuremsi.NewAgent(azuremsi.AgentConfig{Resource: b.Resource, Arc: b.Endpoint == "arc", MetadataURL: b.MetadataURL,
			IdentityEndpoint: b.IdentityEndpoint, ArcTokenDir: b.ArcTokenDir, ClientID: b.ClientID})
		if err != nil {
			return nil, fmt.Errorf("agent: %w", err)
		}
		out[at.Name()] = at
	}
	if b := a.TPM; b != nil {
		at, err := tpm.NewAgent(tpm.AgentConfig{Device: config.Resolve(path, b.Device)})
		if err != nil {
			return nil, fmt.Errorf("agent: %w", err)
		}
		out[at.Name()] = at
	}
	if b := a.SSHPoP; b != nil {
		at, err := sshpop.NewAgent(sshpop.AgentConfig{HostKeyPath: config.Resolve(path, b.HostKeyPath), HostCertPath: config.Resolve(path, b.HostCertPath)})
		if err != nil {
			return nil, fmt.Errorf("agent: %w", err)
		}
		out[at.Name()] = at
	}
	return out, nil
}
