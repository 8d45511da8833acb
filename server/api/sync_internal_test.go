package api

import (
	"fmt"
	"slices"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"

	"github.com/ferry-id/ferry/proto/ferrypb"
)

func syncEntry(i, pad int) *ferrypb.Entry {
	return &ferrypb.Entry{
		Id:        fmt.Sprintf("entry-%05d", i),
		SpiffeId:  fmt.Sprintf("spiffe://example.org/w/%05d/%0*d", i, pad, 0),
		ParentId:  "spiffe://example.org/spire/agent/a",
		Selectors: []*ferrypb.Selector{{Type: "unix", Value: "uid:1000"}},
	}
}

func TestSplitSync(t *testing.T) {
	bundles := []*ferrypb.Bundle{{TrustDomain: "example.org"}}
	msg := &ferrypb.SyncEntriesResponse{Full: true, Bundles: bundles, Revision: 42, AgentIdentity: true}
	for i := range 1000 {
		msg.Entries = append(msg.Entries, syncEntry(i, i%50))
	}
	for i := range 300 {
		msg.DeletedIds = append(msg.DeletedIds, fmt.Sprintf("gone-%05d", i))
	}
	const budget = 8 << 10
	parts := splitSync(msg, budget)
	require.Greater(t, len(parts), 10)
	var entries []*ferrypb.Entry
	var deleted []string
	for i, p := range parts {
		assert.EqualValues(t, 42, p.Revision, "part %d", i)
		assert.True(t, p.AgentIdentity, "part %d", i)
		assert.Equal(t, i == 0, p.Full, "part %d: full only in the first", i)
		assert.Equal(t, i == 0, p.Bundles != nil, "part %d: bundles only in the first", i)
		assert.Equal(t, i < len(parts)-1, p.More, "part %d: more on all but the last", i)
		rest := proto.Clone(p).(*ferrypb.SyncEntriesResponse)
		rest.Entries, rest.DeletedIds = nil, nil
		assert.LessOrEqual(t, proto.Size(p)-proto.Size(rest), budget, "part %d over budget", i)
		entries = append(entries, p.Entries...)
		deleted = append(deleted, p.DeletedIds...)
	}
	assert.True(t, slices.Equal(msg.Entries, entries), "entries in order, each once")
	assert.Equal(t, msg.DeletedIds, deleted)

	small := &ferrypb.SyncEntriesResponse{Revision: 3, Entries: msg.Entries[:3]}
	assert.Equal(t, []*ferrypb.SyncEntriesResponse{small}, splitSync(small, budget), "a message within budget is sent as is")

	// An entry larger than the budget still goes, alone.
	big := &ferrypb.SyncEntriesResponse{Revision: 4, Entries: []*ferrypb.Entry{syncEntry(1, 10), syncEntry(2, 2*budget), syncEntry(3, 10)}}
	parts = splitSync(big, budget)
	require.Len(t, parts, 3)
	for i, p := range parts {
		assert.Equal(t, []*ferrypb.Entry{big.Entries[i]}, p.Entries)
	}
}
