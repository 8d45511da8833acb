package api

import (
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/ferry-id/ferry/server/ca"
	"github.com/ferry-id/ferry/server/state"
)

// The signing limits shed what is over an agent's rate, then what is over
// the server's, and admit again as the clock moves on. The clock is the
// test's: the path taken is the proof, not the time it took.
func TestSigningLimitsShed(t *testing.T) {
	store, err := state.New(state.Config{})
	require.NoError(t, err)
	now := time.Unix(1_700_000_000, 0)
	a, err := NewAgent(AgentConfig{
		Cluster: noCluster{}, Store: store, Signer: (*ca.CA)(nil), TrustDomain: spiffeid.RequireTrustDomainFromString("example.org"),
		PerAgentRate: 10, GlobalRate: 15, Now: func() time.Time { return now },
	})
	require.NoError(t, err)

	require.NoError(t, a.allow("spiffe://example.org/agent/a", 10), "an agent's whole burst")
	err = a.allow("spiffe://example.org/agent/a", 1)
	require.Equal(t, codes.ResourceExhausted, status.Code(err))
	require.Contains(t, err.Error(), "agent spiffe://example.org/agent/a is over its signing rate (10/s); retry later")

	require.NoError(t, a.allow("spiffe://example.org/agent/b", 5), "the rest of the server's burst")
	err = a.allow("spiffe://example.org/agent/c", 1)
	require.Equal(t, codes.ResourceExhausted, status.Code(err))
	require.Contains(t, err.Error(), "server is over its signing rate (15/s); retry later")

	now = now.Add(time.Second)
	require.NoError(t, a.allow("spiffe://example.org/agent/a", 10), "a second later the agent's rate is back")
	require.NoError(t, a.allow("spiffe://example.org/agent/c", 5))
}

// noCluster is a Cluster the limits never reach.
type noCluster struct{ Cluster }
