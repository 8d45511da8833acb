// Package jointoken is the "join_token" node attestor: a pre-shared, one-time
// secret that an operator hands to a new agent.
//
// The agent sends the token; the server hashes it (SHA-256, hex) and looks it
// up through Tokens, which the server implements over its replicated state, so
// the raw secret never enters the log, snapshots or backups: only its hash
// does. Attest does not spend the token: it returns its hash in the Result,
// and the server spends it in the same replicated write that records the
// agent, once every other check has passed. So a token is used once across
// the whole cluster, and an attestation the server refuses for a reason the
// agent did not cause (its CA not ready, a leader change) leaves it usable.
//
// The agent ID is the token's fixed SPIFFE ID when one was set (it must be an
// agent ID, under /spire/agent/; node.CheckAgentID), otherwise
// spiffe://<trust domain>/spire/agent/join_token/<hex SHA-256 of the token>.
// SPIRE puts the token itself in that path; an agent ID is printed in logs, in
// certificates and in every API listing, so ferry uses the hash instead (the
// token cannot be recovered from it, and by then it is spent anyway).
// A token-attested agent cannot re-attest: its token is gone.
package jointoken

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ferry-id/ferry/attestors/node"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

// Name is the attestor name.
const Name = "join_token"

// Token length bounds, in bytes. Generated tokens are 22 characters (128
// random bits); operator-chosen ones may be longer, but never short enough to
// guess.
const (
	MinTokenLen = 16
	MaxTokenLen = 256
)

// Sentinel errors returned by Tokens.Lookup and, wrapped, by Server.Attest and
// by the server when it spends a token.
var (
	// ErrUnknown means no such token exists: never created, or already used.
	ErrUnknown = errors.New("jointoken: unknown or already used token")
	// ErrExpired means the token exists but has expired.
	ErrExpired = errors.New("jointoken: token expired")
)

// Tokens looks join tokens up. The server implements it over its replicated
// state.
type Tokens interface {
	// Lookup returns the token with the given hex SHA-256 hash without
	// spending it, or an error wrapping ErrUnknown if there is none. It sees
	// every token created before the call, on any server.
	Lookup(ctx context.Context, hash string) (*ferrypb.JoinToken, error)
}

// Generate returns a new random token: 128 bits, base64url without padding.
func Generate() (string, error) {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("jointoken: generate: %w", err)
	}
	return base64.RawURLEncoding.EncodeToString(b[:]), nil
}

// Hash returns the hex SHA-256 of token, the form in which it is stored.
func Hash(token string) string {
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:])
}

// Validate checks that token has an acceptable length and only URL-safe
// characters ([A-Za-z0-9._~-]). Errors never contain the token.
func Validate(token string) error {
	if len(token) < MinTokenLen || len(token) > MaxTokenLen {
		return fmt.Errorf("jointoken: token must be %d to %d characters, got %d", MinTokenLen, MaxTokenLen, len(token))
	}
	for i := 0; i < len(token); i++ {
		c := token[i]
		if (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '~' || c == '-' {
			continue
		}
		return fmt.Errorf("jointoken: token has a character outside [A-Za-z0-9._~-] at offset %d", i)
	}
	return nil
}

// AgentConfig configures the agent half.
type AgentConfig struct {
	// Token is the join token.
	Token string
}

// Agent is the agent half: it sends the token and expects no challenge.
type Agent struct {
	token string
}

var _ node.AgentAttestor = (*Agent)(nil)

// NewAgent returns the agent half for c.Token.
func NewAgent(c AgentConfig) (*Agent, error) {
	if err := Validate(c.Token); err != nil {
		return nil, err
	}
	return &Agent{token: c.Token}, nil
}

// Name returns "join_token".
func (a *Agent) Name() string { return Name }

// Payload returns the token.
func (a *Agent) Payload(context.Context) ([]byte, error) { return []byte(a.token), nil }

// Respond fails: the server never challenges a join token.
func (a *Agent) Respond(context.Context, []byte) ([]byte, error) {
	return nil, fmt.Errorf("jointoken: %w", node.ErrNoChallenge)
}

// ServerConfig configures the server half.
type ServerConfig struct {
	// TrustDomain is the trust domain agent IDs are issued in.
	TrustDomain spiffeid.TrustDomain
	// Tokens consumes tokens.
	Tokens Tokens
	// Now returns the current time. Defaults to time.Now.
	Now func() time.Time
	// Log receives one line per attestation, without the token. Defaults to
	// slog.Default().
	Log *slog.Logger
}

// Server is the server half. It is safe for concurrent use.
type Server struct {
	td     spiffeid.TrustDomain
	tokens Tokens
	now    func() time.Time
	log    *slog.Logger
}

var _ node.ServerAttestor = (*Server)(nil)

// NewServer returns the server half configured by c.
func NewServer(c ServerConfig) (*Server, error) {
	if c.TrustDomain.IsZero() {
		return nil, errors.New("jointoken: trust domain is required")
	}
	if c.Tokens == nil {
		return nil, errors.New("jointoken: Tokens is required")
	}
	s := &Server{td: c.TrustDomain, tokens: c.Tokens, now: c.Now, log: c.Log}
	if s.now == nil {
		s.now = time.Now
	}
	if s.log == nil {
		s.log = slog.Default()
	}
	return s, nil
}

// Name returns "join_token".
func (s *Server) Name() string { return Name }

// Attest looks the token in payload up and returns the agent's identity, with
// the token's hash in Result.JoinTokenHash for the server to spend.
func (s *Server) Attest(ctx context.Context, payload []byte, _ node.ChallengeFunc) (*node.Result, error) {
	token := string(payload)
	if err := Validate(token); err != nil {
		return nil, fmt.Errorf("jointoken: malformed token: %w", err)
	}
	hash := Hash(token)
	jt, err := s.tokens.Lookup(ctx, hash)
	switch {
	case errors.Is(err, ErrUnknown):
		s.log.Info("join token rejected", "token_hash", hash, "error", err)
		return nil, err
	case err != nil:
		return nil, fmt.Errorf("jointoken: look up token: %w", err)
	case jt == nil || jt.GetHash() != hash:
		return nil, errors.New("jointoken: token store returned a different token")
	}
	if exp := jt.GetExpiresAt(); exp != 0 && !s.now().Before(time.Unix(exp, 0)) {
		s.log.Info("join token rejected", "token_hash", hash, "error", ErrExpired)
		return nil, fmt.Errorf("%w (expired at %s)", ErrExpired, time.Unix(exp, 0).UTC().Format(time.RFC3339))
	}

	var id spiffeid.ID
	if fixed := jt.GetSpiffeId(); fixed != "" {
		id, err = spiffeid.FromString(fixed)
		if err == nil {
			err = node.CheckAgentID(s.td, id)
		}
		if err != nil {
			return nil, fmt.Errorf("jointoken: token's agent ID: %w", err)
		}
	} else {
		id, err = node.AgentPath(s.td, Name, hash)
		if err != nil {
			return nil, fmt.Errorf("jointoken: %w", err)
		}
	}
	return &node.Result{AgentID: id, JoinTokenHash: hash}, nil
}
