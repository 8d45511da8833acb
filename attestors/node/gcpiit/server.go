package gcpiit

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ferry-id/ferry/attestors/node"
	"github.com/ferry-id/ferry/bridge/discovery"
)

// ServerConfig configures the server half.
type ServerConfig struct {
	// TrustDomain is the trust domain agent IDs are issued in.
	TrustDomain spiffeid.TrustDomain
	// ProjectIDs are the projects whose instances may attest (required).
	ProjectIDs []string
	// Audience is the audience tokens must carry; default DefaultAudience.
	Audience string
	// JWKSURL is where Google's keys are fetched (https); default DefaultJWKSURL.
	JWKSURL string
	// HTTPClient fetches the keys (its transport's roots matter); default
	// a client with the system roots.
	HTTPClient *http.Client
	// AllowReattestation admits an instance again while an earlier agent of
	// it still holds a valid SVID. Off by default: a token stays valid for
	// an hour in anyone's hands.
	AllowReattestation bool
	// Now returns the current time; default time.Now.
	Now func() time.Time
	// Log receives one line per attestation; default slog.Default().
	Log *slog.Logger
}

// Server is the server half; safe for concurrent use.
type Server struct {
	td       spiffeid.TrustDomain
	projects map[string]bool
	audience string
	jwksURL  string
	keys     *discovery.Cache
	reattest bool
	now      func() time.Time
	log      *slog.Logger
}

var _ node.ServerAttestor = (*Server)(nil)

// NewServer validates c and returns the server half.
func NewServer(c ServerConfig) (*Server, error) {
	if c.TrustDomain.IsZero() {
		return nil, errors.New("gcp_iit: trust domain is required")
	}
	if len(c.ProjectIDs) == 0 {
		return nil, errors.New("gcp_iit: at least one project ID is required")
	}
	s := &Server{td: c.TrustDomain, projects: map[string]bool{}, audience: c.Audience, jwksURL: c.JWKSURL,
		reattest: c.AllowReattestation, now: c.Now, log: c.Log}
	for _, p := range c.ProjectIDs {
		if err := match(projectRE, "project ID")(p); err != nil {
			return nil, fmt.Errorf("gcp_iit: %w", err)
		}
		s.projects[p] = true
	}
	if s.audience == "" {
		s.audience = DefaultAudience
	}
	if s.jwksURL == "" {
		s.jwksURL = DefaultJWKSURL
	}
	if s.now == nil {
		s.now = time.Now
	}
	if s.log == nil {
		s.log = slog.Default()
	}
	s.keys = discovery.New(discovery.Config{HTTPClient: c.HTTPClient, Clock: s.now, Logger: s.log})
	return s, nil
}

// Name returns "gcp_iit".
func (s *Server) Name() string { return Name }

type claims struct {
	jwt.RegisteredClaims
	Email         string `json:"email"`
	EmailVerified bool   `json:"email_verified"`
	Google        struct {
		ComputeEngine *ComputeEngine `json:"compute_engine"`
	} `json:"google"`
}

// Attest verifies the instance identity token and names the agent after the
// instance.
func (s *Server) Attest(ctx context.Context, payload []byte, _ node.ChallengeFunc) (*node.Result, error) {
	c, err := s.Verify(ctx, payload)
	if err != nil {
		s.log.Info("gcp_iit attestation rejected", "error", err)
		return nil, err
	}
	res, err := s.result(c)
	if err != nil {
		s.log.Info("gcp_iit attestation rejected", "instance_id", c.Google.ComputeEngine.InstanceID, "error", err)
		return nil, err
	}
	s.log.Info("gcp_iit attestation succeeded", "agent_id", res.AgentID.String())
	return res, nil
}

// Verify checks the token's signature and claims and returns them.
func (s *Server) Verify(ctx context.Context, token []byte) (*claims, error) {
	if len(token) > node.MaxPayloadSize {
		return nil, fmt.Errorf("gcp_iit: token is %d bytes, over %d", len(token), node.MaxPayloadSize)
	}
	var c claims
	_, err := jwt.ParseWithClaims(string(token), &c, func(t *jwt.Token) (any, error) {
		kid, _ := t.Header["kid"].(string)
		if kid == "" {
			return nil, errors.New("token has no kid")
		}
		k, err := s.keys.JWKSKey(ctx, s.jwksURL, kid)
		if err != nil {
			return nil, err
		}
		return k.Public, nil
	}, jwt.WithValidMethods([]string{"RS256"}), jwt.WithAudience(s.audience), jwt.WithExpirationRequired(),
		jwt.WithIssuedAt(), jwt.WithLeeway(time.Minute), jwt.WithTimeFunc(s.now))
	if err != nil {
		return nil, fmt.Errorf("gcp_iit: instance identity token refused: %w", err)
	}
	if c.Issuer != Issuer && c.Issuer != "accounts.google.com" {
		return nil, fmt.Errorf("gcp_iit: token issued by %q, not Google", c.Issuer)
	}
	if c.IssuedAt == nil {
		return nil, errors.New("gcp_iit: token has no iat")
	}
	if c.Google.ComputeEngine == nil {
		return nil, errors.New("gcp_iit: token has no google.compute_engine claim: ask for format=full")
	}
	return &c, nil
}

func (s *Server) result(c *claims) (*node.Result, error) {
	ce := c.Google.ComputeEngine
	sels, err := node.Selectors(schema, Name, "project-id:"+ce.ProjectID, "zone:"+ce.Zone,
		"instance-id:"+ce.InstanceID, "instance-name:"+ce.InstanceName, "sa:"+c.Email)
	if err != nil {
		return nil, fmt.Errorf("gcp_iit: token: %w", err)
	}
	if !c.EmailVerified {
		return nil, errors.New("gcp_iit: the token's service account email is not verified")
	}
	if !s.projects[ce.ProjectID] {
		return nil, fmt.Errorf("gcp_iit: project %s is not allowed", ce.ProjectID)
	}
	if _, err := strconv.ParseUint(ce.InstanceID, 10, 64); err != nil {
		return nil, fmt.Errorf("gcp_iit: instance ID %q: %w", ce.InstanceID, err)
	}
	id, err := node.AgentPath(s.td, Name, ce.ProjectID, ce.InstanceID)
	if err != nil {
		return nil, err
	}
	return &node.Result{AgentID: id, Selectors: sels, CanReattest: s.reattest, SingleAgent: !s.reattest}, nil
}
