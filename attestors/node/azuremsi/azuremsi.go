// Package azuremsi is the "azure_msi" node attestor: an Azure VM or Arc
// server proves itself with an access token its managed identity obtains
// from the host's managed-identity endpoint, validated as an Entra token.
//
// The agent asks for a token for the configured resource, VM style
//
//	GET http://169.254.169.254/metadata/identity/oauth2/token?api-version=2018-02-01&resource=<resource>[&client_id=<id>]
//	Metadata: true
//
// or Arc style, with the challenge file Azure Arc's himds hands out:
//
//	GET $IDENTITY_ENDPOINT?api-version=2020-06-01&resource=<resource>     Metadata: true
//	← 401, WWW-Authenticate: Basic realm=/var/opt/azcmagent/tokens/<random>.key
//	GET (again)                                                          Authorization: Basic <file content>
//
// accepting a challenge file only directly in the token directory, with a
// .key suffix and at most 4096 bytes, as Azure's SDKs do. It sends
// {"token": "<access token>"}.
//
// The server validates the token as an Entra access token: its issuer must
// be one of the configured issuer forms for a configured tenant (Entra:
// https://sts.windows.net/<tenant>/ for v1 tokens, the managed-identity
// default, and https://login.microsoftonline.com/<tenant>/v2.0), whose OIDC
// metadata and JWKS are fetched over https and cached (the bridge's key
// cache); RS256; aud the configured audience; exp required, nbf and iat
// honoured with a minute of skew; tid the issuer's tenant; oid a GUID.
//
// Agent ID: spiffe://<td>/spire/agent/azure_msi/<tenant>/<principal (oid)>,
// as SPIRE's. Selectors, from the token's xms_mirid (the resource the
// managed identity belongs to):
//
//	azure_msi:tenant-id:<tenant>
//	azure_msi:principal-id:<oid>
//	azure_msi:subscription-id:<subscription>      from xms_mirid
//	azure_msi:resource-group:<resource group>     from xms_mirid, lower case
//	azure_msi:machine-name:<name>                 a VM's or Arc machine's
//	azure_msi:machine-type:vm|arc                 Microsoft.Compute/virtualMachines or Microsoft.HybridCompute/machines
//	azure_msi:identity-name:<name>                a user-assigned identity's
//
// The token is a bearer credential for its lifetime (an hour or more), and
// on a VM any local process can obtain one: so one agent per principal is
// admitted at a time unless AllowReattestation, and the endpoint should be
// closed to other users (the agent's imds allowed_groups, Arc's himds group).
package azuremsi

import (
	"errors"
	"fmt"
	"regexp"
	"strings"

	"github.com/ferry-id/ferry/attestors/node/azureimds"
	"github.com/ferry-id/ferry/internal/selector"
)

// Name is the attestor name and selector type.
const Name = "azure_msi"

// Defaults.
const (
	// DefaultMetadataURL is Azure IMDS (VM style).
	DefaultMetadataURL = "http://169.254.169.254"
	// DefaultIdentityEndpoint is Arc's himds (Arc style), when
	// IDENTITY_ENDPOINT is not set.
	DefaultIdentityEndpoint = "http://127.0.0.1:40342/metadata/identity/oauth2/token"
	// DefaultArcTokenDir is where himds writes challenge files; Azure's SDKs
	// accept no other.
	DefaultArcTokenDir = "/var/opt/azcmagent/tokens"
	// VMAPIVersion and ArcAPIVersion are the api-versions asked for.
	VMAPIVersion  = "2018-02-01"
	ArcAPIVersion = "2020-06-01"
	// MaxChallengeFile is the largest challenge file read (Azure's SDKs' limit).
	MaxChallengeFile = 4096
)

// DefaultIssuers are Entra's issuer forms; {tenant} stands for the tenant ID.
var DefaultIssuers = []string{"https://sts.windows.net/{tenant}/", "https://login.microsoftonline.com/{tenant}/v2.0"}

type payload struct {
	Token string `json:"token"`
}

// Resource is what an xms_mirid names.
type Resource struct {
	SubscriptionID, ResourceGroup, Provider, Type, Name string
}

var miridRE = regexp.MustCompile(`(?i)^/subscriptions/([^/]+)/resourcegroups/([^/]+)/providers/([^/]+)/(.+)/([^/]+)$`)

// ParseResourceID splits an ARM resource ID
// (/subscriptions/<s>/resourceGroups/<rg>/providers/<provider>/<type>/<name>).
func ParseResourceID(id string) (Resource, error) {
	m := miridRE.FindStringSubmatch(id)
	if m == nil {
		return Resource{}, fmt.Errorf("azure_msi: %q is not an ARM resource ID", id)
	}
	return Resource{SubscriptionID: m[1], ResourceGroup: m[2], Provider: m[3], Type: m[4], Name: m[5]}, nil
}

// MachineType returns "vm" or "arc" for a VM's or an Arc machine's resource,
// "" for anything else.
func (r Resource) MachineType() string {
	switch {
	case strings.EqualFold(r.Provider, "Microsoft.Compute") && strings.EqualFold(r.Type, "virtualMachines"):
		return "vm"
	case strings.EqualFold(r.Provider, "Microsoft.HybridCompute") && strings.EqualFold(r.Type, "machines"):
		return "arc"
	}
	return ""
}

// IsUserAssignedIdentity reports whether r is a user-assigned identity.
func (r Resource) IsUserAssignedIdentity() bool {
	return strings.EqualFold(r.Provider, "Microsoft.ManagedIdentity") && strings.EqualFold(r.Type, "userAssignedIdentities")
}

var (
	nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._()-]{0,89}$`)
)

func checkName(s string) error {
	if !nameRE.MatchString(s) {
		return fmt.Errorf("%q is not an Azure resource name", s)
	}
	return nil
}

// Selectors declares the node selectors this attestor produces (see the
// package comment), for the catalog's registry: node-alias entries are checked
// against it, and the server half emits nothing else.
func Selectors() selector.Schema {
	return selector.Schema{Type: Name, Class: selector.Node, Kinds: []selector.Kind{
		{Name: "tenant-id", Form: "<tenant GUID>", Help: "tid", Check: azureimds.CheckGUID},
		{Name: "principal-id", Form: "<object GUID>", Help: "oid, the managed identity", Check: azureimds.CheckGUID},
		{Name: "subscription-id", Form: "<subscription GUID>", Help: "from xms_mirid", Check: azureimds.CheckGUID},
		{Name: "resource-group", Form: "<resource group>", Help: "from xms_mirid, lower case", Check: checkName},
		{Name: "machine-name", Form: "<name>", Help: "the VM's or Arc machine's name, from xms_mirid", Check: checkName},
		{Name: "machine-type", Form: "vm|arc", Help: "a VM or an Arc machine, from xms_mirid", Check: func(s string) error {
			if s != "vm" && s != "arc" {
				return errors.New("want vm or arc")
			}
			return nil
		}},
		{Name: "identity-name", Form: "<name>", Help: "a user-assigned identity's name, from xms_mirid", Check: checkName},
	}}
}

var schema = selector.MustRegistry(Selectors())
