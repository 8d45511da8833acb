package azureimds

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"

	"github.com/smallstep/pkcs7"

	"github.com/ferry-id/ferry/attestors/node"
	"github.com/ferry-id/ferry/attestors/node/metadata"
)

// AgentConfig configures the agent half.
type AgentConfig struct {
	// MetadataURL is IMDS's base URL; default DefaultMetadataURL.
	MetadataURL string
	// APIVersion is the api-version parameter; default DefaultAPIVersion.
	APIVersion string
	// Client tunes retries and timeouts; zero takes metadata's defaults.
	Client metadata.Options
}

// Agent is the agent half.
type Agent struct {
	base       *url.URL
	apiVersion string
	client     *metadata.Client
}

var _ node.AgentAttestor = (*Agent)(nil)

// NewAgent returns the agent half.
func NewAgent(c AgentConfig) (*Agent, error) {
	if c.MetadataURL == "" {
		c.MetadataURL = DefaultMetadataURL
	}
	if c.APIVersion == "" {
		c.APIVersion = DefaultAPIVersion
	}
	u, err := url.Parse(c.MetadataURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("azure_imds: metadata_url %q must be an http URL", c.MetadataURL)
	}
	if c.Client.Budget == 0 {
		// The document is fetched while the server waits on the attestation
		// stream (30 s): give up in time for the agent to attest again, with a
		// new nonce, rather than have the stream end under the fetch.
		c.Client.Budget = DefaultFetchBudget
	}
	return &Agent{base: u, apiVersion: c.APIVersion, client: metadata.New(c.Client)}, nil
}

// Name returns "azure_imds".
func (a *Agent) Name() string { return Name }

// Payload returns {}: the server speaks first, with its nonce.
func (a *Agent) Payload(context.Context) ([]byte, error) { return []byte("{}"), nil }

// Respond fetches the attested document for the server's nonce.
func (a *Agent) Respond(ctx context.Context, c []byte) ([]byte, error) {
	var ch challenge
	if err := json.Unmarshal(c, &ch); err != nil {
		return nil, fmt.Errorf("azure_imds: malformed challenge: %w", err)
	}
	if err := checkNonce(ch.Nonce); err != nil {
		return nil, err
	}
	doc, err := a.Fetch(ctx, ch.Nonce)
	if err != nil {
		return nil, err
	}
	return json.Marshal(response{Document: *doc})
}

// Fetch asks IMDS for the attested document bound to nonce. It asks again
// while IMDS answers with a cached document for another nonce.
func (a *Agent) Fetch(ctx context.Context, nonce string) (*Document, error) {
	u := a.base.JoinPath("/metadata/attested/document")
	q := url.Values{}
	q.Set("api-version", a.apiVersion)
	q.Set("nonce", nonce)
	u.RawQuery = q.Encode()
	var doc Document
	_, err := a.client.Do(ctx, func(ctx context.Context) (*http.Request, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
		if err != nil {
			return nil, err
		}
		req.Header.Set("Metadata", "true")
		return req, nil
	}, func(_ http.Header, body []byte) error {
		doc = Document{}
		if err := json.Unmarshal(body, &doc); err != nil {
			return fmt.Errorf("azure_imds: IMDS answer is not an attested document: %w", err)
		}
		if doc.Encoding != "pkcs7" || doc.Signature == "" {
			return fmt.Errorf("azure_imds: IMDS answer has encoding %q and %d bytes of signature, want pkcs7", doc.Encoding, len(doc.Signature))
		}
		got, err := signedNonce(doc)
		if err != nil {
			return err
		}
		if got != nonce {
			return fmt.Errorf("%w: IMDS answered from its cache for another nonce", metadata.ErrRetry)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("azure_imds: attested document: %w", err)
	}
	return &doc, nil
}

// signedNonce reads the nonce of the document's content, without verifying
// anything: the server does that.
func signedNonce(doc Document) (string, error) {
	der, err := base64.StdEncoding.DecodeString(strings.TrimSpace(doc.Signature))
	if err != nil {
		return "", fmt.Errorf("azure_imds: signature is not base64: %w", err)
	}
	p7, err := pkcs7.Parse(der)
	if err != nil {
		return "", fmt.Errorf("azure_imds: signature is not PKCS#7: %w", err)
	}
	c, err := ParseContent(p7.Content)
	if err != nil {
		return "", err
	}
	return c.Nonce, nil
}

func checkNonce(n string) error {
	if len(n) != NonceDigits {
		return errors.New("azure_imds: challenge nonce must be 10 digits")
	}
	for i := 0; i < len(n); i++ {
		if n[i] < '0' || n[i] > '9' {
			return errors.New("azure_imds: challenge nonce must be 10 digits")
		}
	}
	return nil
}
