package azuremsi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ferry-id/ferry/attestors/node"
	"github.com/ferry-id/ferry/attestors/node/azureimds"
	"github.com/ferry-id/ferry/bridge/discovery"
)

// ServerConfig configures the server half.
type ServerConfig struct {
	// TrustDomain is the trust domain agent IDs are issued in.
	TrustDomain spiffeid.TrustDomain
	// Tenants are the tenant IDs whose managed identities may attest.
	Tenants []string
	// Audience is the aud tokens must carry: the resource agents ask for
	// (v1 tokens, the managed-identity default) or its application ID (v2).
	Audience string
	// Issuers are the issuer forms accepted, {tenant} standing for a
	// configured tenant; default DefaultIssuers. Each must be https: its
	// OIDC metadata names the signing keys.
	Issuers []string
	// HTTPClient fetches OIDC metadata and keys; default the system roots.
	HTTPClient *http.Client
	// AllowReattestation admits a principal again while an earlier agent
	// of it holds a valid SVID.
	AllowReattestation bool
	// Now returns the current time; default time.Now.
	Now func() time.Time
	// Log receives one line per attestation; default slog.Default().
	Log *slog.Logger
}

// Server is the server half; safe for concurrent use.
type Server struct {
	td       spiffeid.TrustDomain
	issuers  map[string]string // issuer -> tenant
	audience string
	keys     *discovery.Cache
	reattest bool
	now      func() time.Time
	log      *slog.Logger
}

var _ node.ServerAttestor = (*Server)(nil)

// NewServer validates c and returns the server half.
func NewServer(c ServerConfig) (*Server, error) {
	if c.TrustDomain.IsZero() {
		return nil, errors.New("azure_msi: trust domain is required")
	}
	if len(c.Tenants) == 0 {
		return nil, errors.New("azure_msi: at least one tenant is required")
	}
	if c.Audience == "" {
		return nil, errors.New("azure_msi: audience is required: the resource agents ask tokens for")
	}
	if len(c.Issuers) == 0 {
		c.Issuers = DefaultIssuers
	}
	s := &Server{td: c.TrustDomain, issuers: map[string]string{}, audience: c.Audience, reattest: c.AllowReattestation, now: c.Now, log: c.Log}
	for _, t := range c.Tenants {
		if err := azureimds.CheckGUID(t); err != nil {
			return nil, fmt.Errorf("azure_msi: tenant: %w", err)
		}
		for _, form := range c.Issuers {
			if !strings.Contains(form, "{tenant}") || !strings.HasPrefix(form, "https://") {
				return nil, fmt.Errorf("azure_msi: issuer %q must be an https URL holding {tenant}", form)
			}
			s.issuers[strings.ReplaceAll(form, "{tenant}", strings.ToLower(t))] = strings.ToLower(t)
		}
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

// Name returns "azure_msi".
func (s *Server) Name() string { return Name }

type claims struct {
	jwt.RegisteredClaims
	Tid      string `json:"tid"`
	Oid      string `json:"oid"`
	XmsMirid string `json:"xms_mirid"`
}

// Attest validates the access token and names the agent after its principal.
func (s *Server) Attest(ctx context.Context, raw []byte, _ node.ChallengeFunc) (*node.Result, error) {
	c, err := s.Verify(ctx, raw)
	if err != nil {
		s.log.Info("azure_msi attestation rejected", "error", err)
		return nil, err
	}
	res, err := s.result(c)
	if err != nil {
		s.log.Info("azure_msi attestation rejected", "principal_id", c.Oid, "error", err)
		return nil, err
	}
	s.log.Info("azure_msi attestation succeeded", "agent_id", res.AgentID.String(), "resource", c.XmsMirid)
	return res, nil
}

// Verify checks the token in the payload and returns its claims.
func (s *Server) Verify(ctx context.Context, raw []byte) (*claims, error) {
	if len(raw) > node.MaxPayloadSize {
		return nil, fmt.Errorf("azure_msi: payload is %d bytes, over %d", len(raw), node.MaxPayloadSize)
	}
	var p payload
	if err := json.Unmarshal(raw, &p); err != nil {
		return nil, fmt.Errorf("azure_msi: malformed payload: %w", err)
	}
	var c claims
	var tenant string
	_, err := jwt.ParseWithClaims(p.Token, &c, func(t *jwt.Token) (any, error) {
		// The issuer picks the keys, so it is checked before anything is
		// fetched: only configured tenants' issuers are ever asked.
		iss, _ := t.Claims.GetIssuer()
		var ok bool
		if tenant, ok = s.issuers[iss]; !ok {
			return nil, fmt.Errorf("issuer %q is not a configured tenant's", truncate(iss))
		}
		kid, _ := t.Header["kid"].(string)
		if kid == "" {
			return nil, errors.New("token has no kid")
		}
		k, err := s.keys.Key(ctx, iss, kid)
		if err != nil {
			return nil, err
		}
		return k.Public, nil
	}, jwt.WithValidMethods([]string{"RS256"}), jwt.WithAudience(s.audience), jwt.WithExpirationRequired(),
		jwt.WithIssuedAt(), jwt.WithLeeway(time.Minute), jwt.WithTimeFunc(s.now))
	if err != nil {
		return nil, fmt.Errorf("azure_msi: access token refused: %w", err)
	}
	if !strings.EqualFold(c.Tid, tenant) {
		return nil, fmt.Errorf("azure_msi: token of tenant %q from the issuer of tenant %s", truncate(c.Tid), tenant)
	}
	if err := azureimds.CheckGUID(c.Oid); err != nil {
		return nil, fmt.Errorf("azure_msi: oid: %w", err)
	}
	c.Tid = tenant
	return &c, nil
}

func (s *Server) result(c *claims) (*node.Result, error) {
	oid := strings.ToLower(c.Oid)
	values := []string{"tenant-id:" + c.Tid, "principal-id:" + oid}
	if c.XmsMirid != "" {
		r, err := ParseResourceID(c.XmsMirid)
		if err != nil {
			return nil, err
		}
		values = append(values, "subscription-id:"+strings.ToLower(r.SubscriptionID), "resource-group:"+strings.ToLower(r.ResourceGroup))
		switch {
		case r.MachineType() != "":
			values = append(values, "machine-name:"+r.Name, "machine-type:"+r.MachineType())
		case r.IsUserAssignedIdentity():
			values = append(values, "identity-name:"+r.Name)
		}
	}
	sels, err := node.Selectors(schema, Name, values...)
	if err != nil {
		return nil, fmt.Errorf("azure_msi: token: %w", err)
	}
	id, err := node.AgentPath(s.td, Name, c.Tid, oid)
	if err != nil {
		return nil, err
	}
	return &node.Result{AgentID: id, Selectors: sels, CanReattest: s.reattest, SingleAgent: !s.reattest}, nil
}

func truncate(s string) string {
	if len(s) > 120 {
		return s[:120] + "…"
	}
	return s
}
