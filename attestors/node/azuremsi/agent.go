package azuremsi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"

	"github.com/ferry-id/ferry/attestors/node"
	"github.com/ferry-id/ferry/attestors/node/metadata"
)

// AgentConfig configures the agent half.
type AgentConfig struct {
	// Resource is the resource the token is asked for (required); the
	// server's audience must match what the token carries for it.
	Resource string
	// Arc selects the Arc-style endpoint; otherwise VM style.
	Arc bool
	// MetadataURL is IMDS's base URL (VM style); default DefaultMetadataURL.
	MetadataURL string
	// IdentityEndpoint is himds's token URL (Arc style); default
	// $IDENTITY_ENDPOINT, else DefaultIdentityEndpoint.
	IdentityEndpoint string
	// ArcTokenDir is the only directory challenge files are read from;
	// default DefaultArcTokenDir.
	ArcTokenDir string
	// ClientID selects a user-assigned identity; empty asks for the
	// system-assigned one.
	ClientID string
	// Client tunes retries and timeouts; zero takes metadata's defaults.
	Client metadata.Options
}

// Agent is the agent half.
type Agent struct {
	url      string
	arc      bool
	tokenDir string
	client   *metadata.Client
}

var _ node.AgentAttestor = (*Agent)(nil)

// NewAgent returns the agent half.
func NewAgent(c AgentConfig) (*Agent, error) {
	if c.Resource == "" {
		return nil, errors.New("azure_msi: resource is required")
	}
	q := url.Values{}
	q.Set("resource", c.Resource)
	if c.ClientID != "" {
		q.Set("client_id", c.ClientID)
	}
	var base string
	if c.Arc {
		q.Set("api-version", ArcAPIVersion)
		base = c.IdentityEndpoint
		if base == "" {
			base = os.Getenv("IDENTITY_ENDPOINT")
		}
		if base == "" {
			base = DefaultIdentityEndpoint
		}
	} else {
		q.Set("api-version", VMAPIVersion)
		if c.MetadataURL == "" {
			c.MetadataURL = DefaultMetadataURL
		}
		base = strings.TrimSuffix(c.MetadataURL, "/") + "/metadata/identity/oauth2/token"
	}
	u, err := url.Parse(base)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("azure_msi: endpoint %q must be an http URL", base)
	}
	u.RawQuery = q.Encode()
	a := &Agent{url: u.String(), arc: c.Arc, tokenDir: c.ArcTokenDir, client: metadata.New(c.Client)}
	if a.tokenDir == "" {
		a.tokenDir = DefaultArcTokenDir
	}
	return a, nil
}

// Name returns "azure_msi".
func (a *Agent) Name() string { return Name }

// Payload obtains an access token from the managed-identity endpoint.
func (a *Agent) Payload(ctx context.Context) ([]byte, error) {
	body, err := a.get(ctx, "")
	var se *metadata.StatusError
	if a.arc && errors.As(err, &se) && se.Status == http.StatusUnauthorized {
		secret, cerr := a.challenge(se.Header.Get("WWW-Authenticate"))
		if cerr != nil {
			return nil, cerr
		}
		body, err = a.get(ctx, "Basic "+secret)
	}
	if err != nil {
		return nil, fmt.Errorf("azure_msi: managed identity token: %w", err)
	}
	var r struct {
		AccessToken string `json:"access_token"`
	}
	if err := json.Unmarshal(body, &r); err != nil || r.AccessToken == "" {
		return nil, errors.New("azure_msi: the managed-identity endpoint answered no access_token")
	}
	return json.Marshal(payload{Token: r.AccessToken})
}

// Respond refuses: the server sends no challenge.
func (a *Agent) Respond(context.Context, []byte) ([]byte, error) { return nil, node.ErrNoChallenge }

func (a *Agent) get(ctx context.Context, auth string) ([]byte, error) {
	return a.client.Do(ctx, func(ctx context.Context) (*http.Request, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, a.url, nil)
		if err != nil {
			return nil, err
		}
		req.Header.Set("Metadata", "true")
		if auth != "" {
			req.Header.Set("Authorization", auth)
		}
		return req, nil
	}, nil)
}

// challenge reads the Arc challenge file named by www (Basic realm=<path>),
// with the checks Azure's SDKs make: directly in the token directory, a .key
// file, at most MaxChallengeFile bytes.
func (a *Agent) challenge(www string) (string, error) {
	path, ok := strings.CutPrefix(www, "Basic realm=")
	if !ok || path == "" {
		return "", fmt.Errorf("azure_msi: Arc endpoint answered 401 without a Basic realm challenge (%q)", www)
	}
	if filepath.Clean(path) != path || filepath.Dir(path) != filepath.Clean(a.tokenDir) || filepath.Ext(path) != ".key" {
		return "", fmt.Errorf("azure_msi: Arc challenge file %q is not a .key file directly in %s", path, a.tokenDir)
	}
	fi, err := os.Lstat(path)
	if err != nil {
		return "", fmt.Errorf("azure_msi: Arc challenge file: %w", err)
	}
	if !fi.Mode().IsRegular() || fi.Size() > MaxChallengeFile {
		return "", fmt.Errorf("azure_msi: Arc challenge file %s is not a regular file of at most %d bytes", path, MaxChallengeFile)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("azure_msi: Arc challenge file: %w", err)
	}
	return string(b), nil
}
