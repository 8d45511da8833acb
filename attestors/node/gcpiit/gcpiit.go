// Package gcpiit is the "gcp_iit" node attestor: a Compute Engine instance
// proves where it runs with the instance identity token Google signs for it.
//
// The agent asks the metadata server for
//
//	GET http://metadata.google.internal/computeMetadata/v1/instance/service-accounts/<account>/identity?audience=<audience>&format=full
//	Metadata-Flavor: Google
//
// never through a proxy, retrying 429 and 5xx with backoff, and accepts the
// answer only with the Metadata-Flavor: Google response header. It sends the
// token (an RS256 JWT) as its payload.
//
// The server verifies the token with Google's keys (a JWKS URL, fetched over
// https and cached, refreshed for an unknown kid at most every few minutes):
// RS256 only, iss https://accounts.google.com, aud the configured audience,
// exp and iat required (Google's tokens live one hour), and its
// google.compute_engine claim for an allowed project.
//
// The token is a bearer credential valid for an hour: whoever read it could
// present it again within that hour. So by default the server admits one
// agent per instance (Result.SingleAgent) unless AllowReattestation.
//
// Agent ID: spiffe://<td>/spire/agent/gcp_iit/<project ID>/<instance ID>, as
// SPIRE's. Selectors:
//
//	gcp_iit:project-id:<project ID>
//	gcp_iit:zone:<zone>
//	gcp_iit:instance-id:<instance ID>
//	gcp_iit:instance-name:<instance name>
//	gcp_iit:sa:<service account email>
//
// Labels, network tags and custom metadata are not in the token: SPIRE reads
// them with the Compute API, which this attestor does not call.
package gcpiit

import (
	"fmt"
	"regexp"

	"github.com/ferry-id/ferry/internal/selector"
)

// Name is the attestor name and selector type.
const Name = "gcp_iit"

// Defaults.
const (
	// DefaultMetadataURL is the metadata server. Google's client libraries
	// take GCE_METADATA_HOST to point elsewhere; the agent's metadata_url
	// does the same.
	DefaultMetadataURL = "http://metadata.google.internal"
	// DefaultServiceAccount is the instance's service account the token is
	// asked for.
	DefaultServiceAccount = "default"
	// DefaultAudience is the audience asked for and required when none is
	// configured.
	DefaultAudience = "ferry-gcp-node-attestor"
	// DefaultJWKSURL is where Google publishes the keys of its ID tokens.
	DefaultJWKSURL = "https://www.googleapis.com/oauth2/v3/certs"
	// Issuer is the iss of Google's ID tokens (also seen without scheme).
	Issuer = "https://accounts.google.com"
)

// ComputeEngine is the google.compute_engine claim of a full-format token.
type ComputeEngine struct {
	InstanceCreationTimestamp int64  `json:"instance_creation_timestamp"`
	InstanceID                string `json:"instance_id"`
	InstanceName              string `json:"instance_name"`
	ProjectID                 string `json:"project_id"`
	ProjectNumber             int64  `json:"project_number"`
	Zone                      string `json:"zone"`
}

var (
	projectRE  = regexp.MustCompile(`^[a-z][a-z0-9-]{4,28}[a-z0-9]$|^[a-z0-9.-]+:[a-z][a-z0-9-]{4,28}[a-z0-9]$`)
	zoneRE     = regexp.MustCompile(`^[a-z]+-[a-z]+[0-9]+-[a-z]$`)
	instanceRE = regexp.MustCompile(`^[0-9]{1,20}$`)
	nameRE     = regexp.MustCompile(`^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$`)
	emailRE    = regexp.MustCompile(`^[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+$`)
)

func match(re *regexp.Regexp, what string) func(string) error {
	return func(s string) error {
		if !re.MatchString(s) {
			return fmt.Errorf("%q is not a GCP %s", s, what)
		}
		return nil
	}
}

// Selectors declares the node selectors this attestor produces (see the
// package comment), for the catalog's registry: node-alias entries are checked
// against it, and the server half emits nothing else.
func Selectors() selector.Schema {
	return selector.Schema{Type: Name, Class: selector.Node, Kinds: []selector.Kind{
		{Name: "project-id", Form: "<project ID>", Help: "google.compute_engine.project_id", Check: match(projectRE, "project ID")},
		{Name: "zone", Form: "<zone>", Help: "google.compute_engine.zone", Check: match(zoneRE, "zone")},
		{Name: "instance-id", Form: "<numeric instance ID>", Help: "google.compute_engine.instance_id", Check: match(instanceRE, "instance ID")},
		{Name: "instance-name", Form: "<instance name>", Help: "google.compute_engine.instance_name", Check: match(nameRE, "instance name")},
		{Name: "sa", Form: "<service account email>", Help: "the service account the token is for", Check: match(emailRE, "service account email")},
	}}
}

var schema = selector.MustRegistry(Selectors())
