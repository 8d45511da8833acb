package gcpiit

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"

	"github.com/ferry-id/ferry/attestors/node"
	"github.com/ferry-id/ferry/attestors/node/metadata"
)

// AgentConfig configures the agent half.
type AgentConfig struct {
	// MetadataURL is the metadata server's base URL; default DefaultMetadataURL.
	MetadataURL string
	// ServiceAccount is the instance service account the token is for;
	// default DefaultServiceAccount.
	ServiceAccount string
	// Audience is the token's audience; it must be the server's. Default
	// DefaultAudience.
	Audience string
	// Client tunes retries and timeouts; zero takes metadata's defaults.
	Client metadata.Options
}

// Agent is the agent half.
type Agent struct {
	url    string
	client *metadata.Client
}

var _ node.AgentAttestor = (*Agent)(nil)

// NewAgent returns the agent half.
func NewAgent(c AgentConfig) (*Agent, error) {
	if c.MetadataURL == "" {
		c.MetadataURL = DefaultMetadataURL
	}
	if c.ServiceAccount == "" {
		c.ServiceAccount = DefaultServiceAccount
	}
	if c.Audience == "" {
		c.Audience = DefaultAudience
	}
	u, err := url.Parse(c.MetadataURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("gcp_iit: metadata_url %q must be an http URL", c.MetadataURL)
	}
	if strings.ContainsAny(c.ServiceAccount, "/?#") {
		return nil, fmt.Errorf("gcp_iit: service_account %q is not an account name or email", c.ServiceAccount)
	}
	u = u.JoinPath("/computeMetadata/v1/instance/service-accounts", c.ServiceAccount, "identity")
	q := url.Values{}
	q.Set("audience", c.Audience)
	q.Set("format", "full")
	u.RawQuery = q.Encode()
	return &Agent{url: u.String(), client: metadata.New(c.Client)}, nil
}

// Name returns "gcp_iit".
func (a *Agent) Name() string { return Name }

// Payload returns a fresh instance identity token.
func (a *Agent) Payload(ctx context.Context) ([]byte, error) {
	body, err := a.client.Do(ctx, func(ctx context.Context) (*http.Request, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, a.url, nil)
		if err != nil {
			return nil, err
		}
		req.Header.Set("Metadata-Flavor", "Google")
		return req, nil
	}, func(h http.Header, _ []byte) error {
		// Google's clients tell the metadata server by this header: anything
		// else answering at its address is not it.
		if h.Get("Metadata-Flavor") != "Google" {
			return errors.New("gcp_iit: the answer lacks the Metadata-Flavor: Google header: not a GCP metadata server")
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("gcp_iit: instance identity token: %w", err)
	}
	tok := strings.TrimSpace(string(body))
	if strings.Count(tok, ".") != 2 {
		return nil, errors.New("gcp_iit: the metadata server answered something that is not a JWT")
	}
	return []byte(tok), nil
}

// Respond refuses: the server sends no challenge.
func (a *Agent) Respond(context.Context, []byte) ([]byte, error) { return nil, node.ErrNoChallenge }
