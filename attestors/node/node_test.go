package node_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/attestors/node"
)

// echoAgent sends a payload and answers each challenge with a prefix.
type echoAgent struct {
	name    string
	payload []byte
	resp    []byte
}

func (a *echoAgent) Name() string                            { return a.name }
func (a *echoAgent) Payload(context.Context) ([]byte, error) { return a.payload, nil }
func (a *echoAgent) Respond(_ context.Context, c []byte) ([]byte, error) {
	if a.resp != nil {
		return a.resp, nil
	}
	return append([]byte("re:"), c...), nil
}

// twoRoundServer challenges twice and checks the answers.
type twoRoundServer struct{ name string }

func (s *twoRoundServer) Name() string { return s.name }
func (s *twoRoundServer) Attest(ctx context.Context, payload []byte, challenge node.ChallengeFunc) (*node.Result, error) {
	for _, c := range []string{"one", "two"} {
		r, err := challenge(ctx, []byte(c))
		if err != nil {
			return nil, err
		}
		if string(r) != "re:"+c {
			return nil, errors.New("wrong answer")
		}
	}
	id, err := node.AgentPath(spiffeid.RequireTrustDomainFromString("example.org"), s.name, string(payload))
	if err != nil {
		return nil, err
	}
	return &node.Result{AgentID: id}, nil
}

func TestExchange(t *testing.T) {
	res, err := node.Exchange(context.Background(), &echoAgent{name: "t", payload: []byte("host1")}, &twoRoundServer{name: "t"})
	require.NoError(t, err)
	assert.Equal(t, "spiffe://example.org/spire/agent/t/host1", res.AgentID.String())
}

func TestExchangeErrors(t *testing.T) {
	_, err := node.Exchange(context.Background(), &echoAgent{name: "a"}, &twoRoundServer{name: "b"})
	require.ErrorContains(t, err, "does not match")

	big := make([]byte, node.MaxPayloadSize+1)
	_, err = node.Exchange(context.Background(), &echoAgent{name: "t", payload: big}, &twoRoundServer{name: "t"})
	require.ErrorContains(t, err, "payload is")

	_, err = node.Exchange(context.Background(), &echoAgent{name: "t", payload: []byte("h"), resp: big}, &twoRoundServer{name: "t"})
	require.ErrorContains(t, err, "response is")
}

func TestAgentPath(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("example.org")
	id, err := node.AgentPath(td, "x509pop", "abc")
	require.NoError(t, err)
	assert.Equal(t, "spiffe://example.org/spire/agent/x509pop/abc", id.String())

	for _, seg := range []string{"..", "a/b", "", "%2e"} {
		_, err := node.AgentPath(td, "t", seg)
		require.Error(t, err, seg)
		assert.True(t, strings.HasPrefix(err.Error(), "node: "))
	}
	_, err = node.AgentPath(spiffeid.TrustDomain{}, "t", "x")
	require.Error(t, err)
}
