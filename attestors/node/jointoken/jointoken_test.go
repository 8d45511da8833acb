package jointoken_test

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/attestors/node"
	"github.com/ferry-id/ferry/attestors/node/jointoken"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

var td = spiffeid.RequireTrustDomainFromString("example.org")

// memTokens is a hand-written Tokens: a map read under a lock. Spending a
// token is the server's business (it does it with the agent's record), so
// tests spend with spend.
type memTokens struct {
	mu     sync.Mutex
	tokens map[string]*ferrypb.JoinToken
	err    error
	calls  atomic.Int32
	seen   []string
}

func newMemTokens() *memTokens {
	return &memTokens{tokens: map[string]*ferrypb.JoinToken{}}
}

func (m *memTokens) add(token, spiffeID string, expires time.Time) {
	m.mu.Lock()
	defer m.mu.Unlock()
	h := jointoken.Hash(token)
	m.tokens[h] = &ferrypb.JoinToken{Hash: h, SpiffeId: spiffeID, ExpiresAt: expires.Unix()}
}

func (m *memTokens) spend(hash string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.tokens, hash)
}

func (m *memTokens) Lookup(_ context.Context, hash string) (*ferrypb.JoinToken, error) {
	m.calls.Add(1)
	m.mu.Lock()
	defer m.mu.Unlock()
	m.seen = append(m.seen, hash)
	if m.err != nil {
		return nil, m.err
	}
	jt, ok := m.tokens[hash]
	if !ok {
		return nil, jointoken.ErrUnknown
	}
	return jt, nil
}

type fixture struct {
	tokens *memTokens
	server *jointoken.Server
	logs   *bytes.Buffer
	now    time.Time
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	f := &fixture{logs: &bytes.Buffer{}, now: time.Unix(1_800_000_000, 0)}
	clock := func() time.Time { return f.now }
	f.tokens = newMemTokens()
	var err error
	f.server, err = jointoken.NewServer(jointoken.ServerConfig{
		TrustDomain: td,
		Tokens:      f.tokens,
		Now:         clock,
		Log:         slog.New(slog.NewTextHandler(f.logs, nil)),
	})
	require.NoError(t, err)
	return f
}

func (f *fixture) attest(t *testing.T, token string) (*node.Result, error) {
	t.Helper()
	agent, err := jointoken.NewAgent(jointoken.AgentConfig{Token: token})
	require.NoError(t, err)
	return node.Exchange(context.Background(), agent, f.server)
}

func TestGenerate(t *testing.T) {
	seen := map[string]bool{}
	for i := 0; i < 100; i++ {
		tok, err := jointoken.Generate()
		require.NoError(t, err)
		assert.Regexp(t, regexp.MustCompile(`^[A-Za-z0-9_-]{22}$`), tok)
		require.NoError(t, jointoken.Validate(tok))
		assert.False(t, seen[tok], "duplicate token")
		seen[tok] = true
	}
}

func TestHash(t *testing.T) {
	// SHA-256("abc"), FIPS 180-2 test vector.
	assert.Equal(t, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", jointoken.Hash("abc"))
}

func TestAttest(t *testing.T) {
	f := newFixture(t)
	tok, err := jointoken.Generate()
	require.NoError(t, err)
	f.tokens.add(tok, "", f.now.Add(time.Hour))

	res, err := f.attest(t, tok)
	require.NoError(t, err)
	assert.Equal(t, "spiffe://example.org/spire/agent/join_token/"+jointoken.Hash(tok), res.AgentID.String())
	assert.False(t, res.CanReattest)
	assert.Empty(t, res.Selectors)
	// The server spends the token, by its hash, when it records the agent.
	assert.Equal(t, jointoken.Hash(tok), res.JoinTokenHash)
	// Only the hash ever reaches the store.
	assert.Equal(t, []string{jointoken.Hash(tok)}, f.tokens.seen)
	assert.NotContains(t, f.logs.String(), tok)
	assert.NotContains(t, res.AgentID.String(), tok)

	// Attest itself spends nothing: an attestation the server refuses later
	// leaves the token usable.
	_, err = f.attest(t, tok)
	require.NoError(t, err)

	// Spent: unknown from then on, and the error never carries the token.
	f.tokens.spend(res.JoinTokenHash)
	_, err = f.attest(t, tok)
	require.ErrorIs(t, err, jointoken.ErrUnknown)
	assert.NotContains(t, err.Error(), tok)
	assert.NotContains(t, f.logs.String(), tok)
}

func TestAttestFixedID(t *testing.T) {
	f := newFixture(t)
	f.tokens.add("fixed-token-0123456789", "spiffe://example.org/spire/agent/rack-7", f.now.Add(time.Hour))
	res, err := f.attest(t, "fixed-token-0123456789")
	require.NoError(t, err)
	assert.Equal(t, "spiffe://example.org/spire/agent/rack-7", res.AgentID.String())

	for bad, why := range map[string]string{
		"spiffe://other.org/spire/agent/x": `is not a member of trust domain "example.org"`,
		"spiffe://example.org/agent/x":     "is not an agent ID: agent IDs are under spiffe://example.org/spire/agent/",
		"spiffe://example.org/spire/agent": "is not an agent ID",
		"spiffe://example.org":             "is not an agent ID",
		"not a url":                        "scheme is missing or invalid",
	} {
		f.tokens.add("fixed-token-0123456789", bad, f.now.Add(time.Hour))
		_, err := f.attest(t, "fixed-token-0123456789")
		require.Error(t, err, bad)
		assert.Contains(t, err.Error(), "jointoken: token's agent ID: ")
		assert.Contains(t, err.Error(), why)
	}
}

func TestAttestExpired(t *testing.T) {
	f := newFixture(t)
	f.tokens.add("expired-token-0123456789", "", f.now.Add(-time.Second))
	_, err := f.attest(t, "expired-token-0123456789")
	require.ErrorIs(t, err, jointoken.ErrExpired)
	assert.Contains(t, err.Error(), "expired at")
}

func TestAttestStoreError(t *testing.T) {
	f := newFixture(t)
	f.tokens.err = errors.New("not leader")
	_, err := f.attest(t, "some-token-0123456789")
	require.Error(t, err)
	assert.Contains(t, err.Error(), "jointoken: look up token: not leader")
	assert.False(t, errors.Is(err, jointoken.ErrUnknown))
}

func TestAttestMalformedPayload(t *testing.T) {
	f := newFixture(t)
	for _, p := range []string{"", "short", strings.Repeat("a", jointoken.MaxTokenLen+1), "has space 0123456789", "nul\x00-0123456789abc"} {
		_, err := f.server.Attest(context.Background(), []byte(p), nil)
		require.Error(t, err)
		assert.Contains(t, err.Error(), "malformed token")
	}
	assert.Zero(t, f.tokens.calls.Load(), "malformed tokens never reach the store")
}

func TestAgent(t *testing.T) {
	_, err := jointoken.NewAgent(jointoken.AgentConfig{Token: "x"})
	require.Error(t, err)

	a, err := jointoken.NewAgent(jointoken.AgentConfig{Token: "agent-token-0123456789"})
	require.NoError(t, err)
	assert.Equal(t, "join_token", a.Name())
	p, err := a.Payload(context.Background())
	require.NoError(t, err)
	assert.Equal(t, "agent-token-0123456789", string(p))
	_, err = a.Respond(context.Background(), []byte("c"))
	require.ErrorIs(t, err, node.ErrNoChallenge)
}

func TestNewServerValidates(t *testing.T) {
	_, err := jointoken.NewServer(jointoken.ServerConfig{Tokens: newMemTokens()})
	require.Error(t, err)
	_, err = jointoken.NewServer(jointoken.ServerConfig{TrustDomain: td})
	require.Error(t, err)
}
