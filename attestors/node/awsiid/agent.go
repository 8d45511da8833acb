package awsiid

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"

	"github.com/ferry-id/ferry/attestors/node"
	"github.com/ferry-id/ferry/attestors/node/metadata"
)

// AgentConfig configures the agent half.
type AgentConfig struct {
	// MetadataURL is the instance metadata service's base URL; default
	// DefaultMetadataURL.
	MetadataURL string
	// Client tunes retries and timeouts; zero takes metadata's defaults.
	Client metadata.Options
}

// Agent is the agent half.
type Agent struct {
	base   *url.URL
	client *metadata.Client
}

var _ node.AgentAttestor = (*Agent)(nil)

// NewAgent returns the agent half.
func NewAgent(c AgentConfig) (*Agent, error) {
	if c.MetadataURL == "" {
		c.MetadataURL = DefaultMetadataURL
	}
	u, err := url.Parse(c.MetadataURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("aws_iid: metadata_url %q must be an http URL", c.MetadataURL)
	}
	return &Agent{base: u, client: metadata.New(c.Client)}, nil
}

// Name returns "aws_iid".
func (a *Agent) Name() string { return Name }

// Payload reads the instance identity document and its RSA-2048 signature.
func (a *Agent) Payload(ctx context.Context) ([]byte, error) {
	token, err := a.token(ctx)
	if err != nil {
		return nil, err
	}
	var p payload
	for _, f := range []struct {
		path string
		out  *string
	}{{"/latest/dynamic/instance-identity/document", &p.Document}, {"/latest/dynamic/instance-identity/rsa2048", &p.RSA2048}} {
		body, err := a.get(ctx, f.path, token)
		var se *metadata.StatusError
		if errors.As(err, &se) && se.Status == http.StatusUnauthorized {
			// The session token expired or was revoked: one new one.
			if token, err = a.token(ctx); err != nil {
				return nil, err
			}
			body, err = a.get(ctx, f.path, token)
		}
		if err != nil {
			return nil, fmt.Errorf("aws_iid: %s: %w", f.path, err)
		}
		*f.out = string(body)
	}
	return json.Marshal(p)
}

// Respond refuses: the server sends no challenge.
func (a *Agent) Respond(context.Context, []byte) ([]byte, error) { return nil, node.ErrNoChallenge }

func (a *Agent) token(ctx context.Context) (string, error) {
	u := a.base.JoinPath("/latest/api/token").String()
	body, err := a.client.Do(ctx, func(ctx context.Context) (*http.Request, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodPut, u, nil)
		if err != nil {
			return nil, err
		}
		req.Header.Set("X-aws-ec2-metadata-token-ttl-seconds", strconv.Itoa(TokenTTLSeconds))
		return req, nil
	}, nil)
	if err != nil {
		return "", fmt.Errorf("aws_iid: IMDSv2 session token: %w", err)
	}
	t := strings.TrimSpace(string(body))
	if t == "" {
		return "", errors.New("aws_iid: IMDSv2 answered an empty session token")
	}
	return t, nil
}

func (a *Agent) get(ctx context.Context, path, token string) ([]byte, error) {
	u := a.base.JoinPath(path).String()
	return a.client.Do(ctx, func(ctx context.Context) (*http.Request, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
		if err != nil {
			return nil, err
		}
		req.Header.Set("X-aws-ec2-metadata-token", token)
		return req, nil
	}, nil)
}
