package state_test

import (
	"bytes"
	"context"
	"io"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/state"
)

func reportPut(id string, as ...*ferrypb.HeldAuthority) *ferrypb.Command {
	return &ferrypb.Command{Op: &ferrypb.Command_AgentReportPut{AgentReportPut: &ferrypb.AgentReportPut{
		Report: &ferrypb.AgentReport{SpiffeId: id, Authorities: as, ReportedAt: 1_700_000_000}}}}
}

func held(kind, id string, exp int64) *ferrypb.HeldAuthority {
	return &ferrypb.HeldAuthority{Kind: kind, AuthorityId: id, Count: 1, ExpiresAt: exp}
}

// TestAgentReports: an attested agent's report replaces its last one, is
// refused for an unknown agent or with bad authorities, survives a snapshot,
// wakes no watcher of the node table, and goes with the agent on eviction.
func TestAgentReports(t *testing.T) {
	h := newHarness(t, state.Config{})
	const agent = "spiffe://example.org/spire/agent/a"
	require.Equal(t, codes.NotFound, codeOf(h.apply(reportPut(agent, held("x509", "aa", 10))).Status), "not an attested agent")
	res := h.apply(&ferrypb.Command{Op: &ferrypb.Command_NodePut{NodePut: &ferrypb.NodePut{Node: &ferrypb.AttestedNode{SpiffeId: agent, CertSerial: "1"}}}})
	require.Equal(t, codes.OK, codeOf(res.Status), res.Status.GetMessage())

	start := h.s.AppliedIndex()
	res = h.apply(reportPut(agent, held("x509", "aa", 10), held("jwt", "kid1", 20)))
	require.Equal(t, codes.OK, codeOf(res.Status), res.Status.GetMessage())
	got := h.s.View().AgentReport(agent)
	require.Len(t, got.Authorities, 2)
	require.Equal(t, res.Index, got.Revision)
	res = h.apply(reportPut(agent, held("x509", "bb", 30)))
	require.Equal(t, codes.OK, codeOf(res.Status))
	require.Len(t, h.s.View().AgentReport(agent).Authorities, 1, "a report replaces the last one")
	require.Equal(t, "bb", h.s.View().AgentReport(agent).Authorities[0].AuthorityId)

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := h.s.ChangesSince(ctx, start, state.TableNodes)
	require.ErrorIs(t, err, context.Canceled, "reports change no node row")

	for name, as := range map[string][]*ferrypb.HeldAuthority{
		"kind":      {held("pem", "aa", 1)},
		"empty id":  {held("x509", "", 1)},
		"long id":   {held("x509", strings.Repeat("a", 129), 1)},
		"duplicate": {held("jwt", "k", 1), held("jwt", "k", 2)},
	} {
		require.Equal(t, codes.InvalidArgument, codeOf(h.apply(reportPut(agent, as...)).Status), name)
	}
	many := make([]*ferrypb.HeldAuthority, state.MaxReportedAuthorities+1)
	for i := range many {
		many[i] = held("jwt", strings.Repeat("k", i%100+1)+string(rune('a'+i/100)), 1)
	}
	require.Equal(t, codes.InvalidArgument, codeOf(h.apply(reportPut(agent, many...)).Status))
	require.Equal(t, "bb", h.s.View().AgentReport(agent).Authorities[0].AuthorityId, "refused reports change nothing")

	var buf bytes.Buffer
	require.NoError(t, h.s.WriteSnapshot(&buf))
	other, err := state.New(state.Config{})
	require.NoError(t, err)
	require.NoError(t, other.Restore(io.NopCloser(bytes.NewReader(buf.Bytes()))))
	require.True(t, proto.Equal(h.s.View().AgentReport(agent), other.View().AgentReport(agent)))

	res = h.apply(&ferrypb.Command{Op: &ferrypb.Command_NodeDelete{NodeDelete: &ferrypb.NodeDelete{SpiffeId: agent}}})
	require.Equal(t, codes.OK, codeOf(res.Status))
	require.Nil(t, h.s.View().AgentReport(agent), "evicting an agent drops its report")
	require.Empty(t, h.s.View().AgentReports())
}
