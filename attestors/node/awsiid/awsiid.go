// Package awsiid is the "aws_iid" node attestor: an EC2 instance proves
// where it runs with its instance identity document and the PKCS#7
// signature AWS makes of it with the RSA-2048 key of the instance's region.
//
// The agent speaks IMDSv2: it asks for a session token
// (PUT /latest/api/token with X-aws-ec2-metadata-token-ttl-seconds), then
// reads /latest/dynamic/instance-identity/document and
// /latest/dynamic/instance-identity/rsa2048 with X-aws-ec2-metadata-token,
// never through a proxy, retrying 429 and 5xx with backoff and asking for a
// new token once if one is refused (401). It sends
// {"document": "<document>", "rsa2048": "<base64 PKCS#7>"}.
//
// The server parses the PKCS#7 signed data (a maintained PKCS#7 library),
// requires the document sent to be byte for byte the signed content, reads
// the region from it, verifies the signature with the certificate configured
// for that region (AWS publishes one RSA-2048 certificate per region), and
// requires the account to be allowed.
//
// The document is static: whoever once read it (any process on the
// instance, a log, a backup) could present it again. So by default the
// server admits one agent per instance (Result.SingleAgent): while an agent
// holds an unexpired SVID for the instance, another attestation is refused;
// evicting the agent, or AllowReattestation, lets the instance attest again,
// with the same agent ID.
//
// Agent ID: spiffe://<td>/spire/agent/aws_iid/<account>/<region>/<instance ID>,
// as SPIRE's. Selectors (what the signed document says):
//
//	aws_iid:account:id:<account ID>
//	aws_iid:region:<region>
//	aws_iid:az:<availability zone>
//	aws_iid:instance:id:<instance ID>
//	aws_iid:instance:type:<instance type>
//	aws_iid:image:id:<AMI ID>
//
// Tags, security groups and IAM roles are not in the document: SPIRE reads
// them with the EC2 and IAM APIs, which this attestor does not call.
package awsiid

import (
	"fmt"
	"regexp"
	"strings"

	"github.com/ferry-id/ferry/internal/selector"
)

// Name is the attestor name and selector type.
const Name = "aws_iid"

// Defaults.
const (
	// DefaultMetadataURL is EC2's instance metadata service.
	DefaultMetadataURL = "http://169.254.169.254"
	// TokenTTLSeconds is the IMDSv2 session token lifetime asked for (the
	// AWS SDKs' default, the maximum).
	TokenTTLSeconds = 21600
)

// payload is the agent's message.
type payload struct {
	Document string `json:"document"`
	RSA2048  string `json:"rsa2048"`
}

// Document is the part of the instance identity document the attestor uses.
type Document struct {
	AccountID        string `json:"accountId"`
	Architecture     string `json:"architecture"`
	AvailabilityZone string `json:"availabilityZone"`
	ImageID          string `json:"imageId"`
	InstanceID       string `json:"instanceId"`
	InstanceType     string `json:"instanceType"`
	PendingTime      string `json:"pendingTime"`
	PrivateIP        string `json:"privateIp"`
	Region           string `json:"region"`
	Version          string `json:"version"`
}

var (
	accountRE  = regexp.MustCompile(`^[0-9]{12}$`)
	regionRE   = regexp.MustCompile(`^[a-z]{2}(-[a-z]+)+-[0-9]+$`)
	instanceRE = regexp.MustCompile(`^i-([0-9a-f]{8}|[0-9a-f]{17})$`)
	imageRE    = regexp.MustCompile(`^ami-([0-9a-f]{8}|[0-9a-f]{17})$`)
	azRE       = regexp.MustCompile(`^[a-z]{2}(-[a-z]+)+-[0-9]+[a-z]?(-[a-z0-9-]+)?$`)
	typeRE     = regexp.MustCompile(`^[a-z0-9][a-z0-9-]*\.[a-z0-9-]+$`)
)

func match(re *regexp.Regexp, what string) func(string) error {
	return func(s string) error {
		if !re.MatchString(s) {
			return fmt.Errorf("%q is not an AWS %s", s, what)
		}
		return nil
	}
}

// Selectors declares the node selectors this attestor produces (see the
// package comment), for the catalog's registry: node-alias entries are checked
// against it, and the server half emits nothing else.
func Selectors() selector.Schema {
	return selector.Schema{Type: Name, Class: selector.Node, Kinds: []selector.Kind{
		{Name: "account", Form: "id:<12-digit account ID>", Help: "signed accountId", Check: prefixed("id:", accountRE, "account ID")},
		{Name: "region", Form: "<region>", Help: "signed region", Check: match(regionRE, "region")},
		{Name: "az", Form: "<availability zone>", Help: "signed availabilityZone", Check: match(azRE, "availability zone")},
		{Name: "instance", Form: "id:<i-…>|type:<instance type>", Help: "signed instanceId or instanceType", Check: func(s string) error {
			if _, ok := strings.CutPrefix(s, "type:"); ok {
				return prefixed("type:", typeRE, "instance type")(s)
			}
			return prefixed("id:", instanceRE, "instance ID")(s)
		}},
		{Name: "image", Form: "id:<ami-…>", Help: "signed imageId", Check: prefixed("id:", imageRE, "AMI ID")},
	}}
}

var schema = selector.MustRegistry(Selectors())

func prefixed(prefix string, re *regexp.Regexp, what string) func(string) error {
	return func(s string) error {
		rest, ok := strings.CutPrefix(s, prefix)
		if !ok {
			return fmt.Errorf("want %s<%s>", prefix, what)
		}
		return match(re, what)(rest)
	}
}
