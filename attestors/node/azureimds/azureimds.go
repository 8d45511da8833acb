// Package azureimds is the "azure_imds" node attestor: an Azure VM proves
// where it runs with the attested document that Azure's Instance Metadata
// Service signs for it, bound to a nonce the server chose.
//
// Exchange:
//
//  1. The agent sends an empty payload ({}).
//  2. The server sends {"nonce":"<10 random digits>"} (IMDS takes a 10-digit
//     nonce).
//  3. The agent asks IMDS for
//     GET http://169.254.169.254/metadata/attested/document?api-version=…&nonce=<nonce>
//     with the header Metadata: true, no proxy, retrying 410, 429 and 5xx
//     with backoff for up to 20 s (the server waits on the attestation
//     stream; the agent then attests again with a new nonce, for as long as
//     Azure's 70 s of 410s last), and asking again while IMDS answers from
//     its cache with a document for another nonce. It returns
//     {"document":{"encoding":"pkcs7","signature":"<base64 PKCS#7>"}}, the
//     service's answer as it came.
//  4. The server verifies the PKCS#7 signature (a maintained PKCS#7 library)
//     and the signer's chain to the configured roots through the pinned
//     intermediates, checks the signer's common name is an allowed metadata
//     domain (metadata.azure.com or one of its subdomains by default, as
//     Azure's documentation says to), the nonce, the document's creation time
//     (within MaxAge) and expiry, and that the signed subscription is listed
//     under a configured tenant.
//
// The signed content carries vmId, subscriptionId, sku, plan, licenseType,
// nonce and timeStamp {createdOn, expiresOn} ("MM/dd/yy HH:mm:ss -0000").
// Nothing else that IMDS serves is signed (the VM's name, resource group,
// location and tags in /metadata/instance are not), so no selector comes from
// it. The tenant is the one whose configured subscriptions list the signed
// subscription: the document does not name it.
//
// The agent ID is spiffe://<td>/spire/agent/azure_imds/<tenant>/<subscription>/<vmId>,
// as SPIRE's. Selectors:
//
//	azure_imds:tenant-id:<tenant GUID>
//	azure_imds:subscription-id:<subscription GUID>
//	azure_imds:vm-id:<vmId GUID>
//	azure_imds:sku:<image SKU>                          when not empty
//	azure_imds:plan:<publisher>:<product>:<name>        Marketplace images
//
// Each attestation is bound to a fresh nonce, so a captured document is
// worthless and the VM can always attest again (CanReattest): an agent whose
// data dir was wiped gets the same agent ID.
package azureimds

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/ferry-id/ferry/internal/selector"
)

// Name is the attestor name and selector type.
const Name = "azure_imds"

// Defaults.
const (
	// DefaultMetadataURL is Azure IMDS, reachable only from inside the VM.
	DefaultMetadataURL = "http://169.254.169.254"
	// DefaultAPIVersion is the IMDS api-version asked for; the attested
	// document carries subscriptionId since 2019-04-30 and sku since
	// 2019-11-01.
	DefaultAPIVersion = "2021-02-01"
	// DefaultMetadataDomain is the public cloud's signer name. Sovereign
	// clouds sign as metadata.azure.us, metadata.azure.cn and
	// metadata.microsoftazure.de.
	DefaultMetadataDomain = "metadata.azure.com"
	// DefaultMaxAge is how old a document may be when it reaches the server.
	DefaultMaxAge = 5 * time.Minute
	// DefaultFetchBudget bounds the retries of one document fetch.
	DefaultFetchBudget = 20 * time.Second
	// NonceDigits is the length of the server's nonce (IMDS takes 10 digits).
	NonceDigits = 10
	// TimeLayout is the layout of createdOn and expiresOn.
	TimeLayout = "01/02/06 15:04:05 -0700"
)

// challenge is the server's message.
type challenge struct {
	Nonce string `json:"nonce"`
}

// Document is IMDS's answer to the attested document request.
type Document struct {
	Encoding  string `json:"encoding"`
	Signature string `json:"signature"`
}

// response is the agent's answer to the challenge.
type response struct {
	Document Document `json:"document"`
}

// Content is the signed content of the attested document.
type Content struct {
	LicenseType    string    `json:"licenseType,omitempty"`
	Nonce          string    `json:"nonce"`
	Plan           Plan      `json:"plan"`
	SKU            string    `json:"sku,omitempty"`
	SubscriptionID string    `json:"subscriptionId"`
	TimeStamp      TimeStamp `json:"timeStamp"`
	VMID           string    `json:"vmId"`
}

// Plan is the Marketplace image plan; empty strings for other images.
type Plan struct {
	Name      string `json:"name"`
	Product   string `json:"product"`
	Publisher string `json:"publisher"`
}

// TimeStamp holds the document's creation and expiry, in TimeLayout.
type TimeStamp struct {
	CreatedOn string `json:"createdOn"`
	ExpiresOn string `json:"expiresOn"`
}

// ParseContent decodes signed content.
func ParseContent(b []byte) (*Content, error) {
	var c Content
	if err := json.Unmarshal(b, &c); err != nil {
		return nil, fmt.Errorf("azure_imds: signed content is not the attested document: %w", err)
	}
	return &c, nil
}

// Selectors declares the node selectors this attestor produces (see the
// package comment), for the catalog's registry: node-alias entries are checked
// against it, and the server half emits nothing else.
func Selectors() selector.Schema {
	return selector.Schema{Type: Name, Class: selector.Node, Kinds: []selector.Kind{
		{Name: "tenant-id", Form: "<tenant GUID>", Help: "tenant listing the VM's subscription", Check: CheckGUID},
		{Name: "subscription-id", Form: "<subscription GUID>", Help: "signed subscriptionId", Check: CheckGUID},
		{Name: "vm-id", Form: "<vmId GUID>", Help: "signed vmId", Check: CheckGUID},
		{Name: "sku", Form: "<image SKU>", Help: "signed image SKU"},
		{Name: "plan", Form: "<publisher>:<product>:<name>", Help: "signed Marketplace plan", Check: func(s string) error {
			if strings.Count(s, ":") < 2 {
				return errors.New("want <publisher>:<product>:<name>")
			}
			return nil
		}},
	}}
}

var schema = selector.MustRegistry(Selectors())

// CheckGUID accepts the canonical 8-4-4-4-12 hex form, either case.
func CheckGUID(s string) error {
	if len(s) != 36 {
		return fmt.Errorf("%q is not a GUID", s)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch i {
		case 8, 13, 18, 23:
			if c != '-' {
				return fmt.Errorf("%q is not a GUID", s)
			}
		default:
			if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F') {
				return fmt.Errorf("%q is not a GUID", s)
			}
		}
	}
	return nil
}
