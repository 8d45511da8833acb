package state_test

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/state"
)

// AuthorizedEntry agrees with AuthorizedEntries on random entry graphs:
// entries parented on agents, on node aliases (entries parented on the server
// whose selectors are all among an agent's node selectors), on other entries'
// SPIFFE IDs (nested, with cycles), and on IDs no one holds.
func TestAuthorizedEntryAgreesWithAuthorizedEntries(t *testing.T) {
	const td = "spiffe://example.org"
	serverID := td + "/spire/server"
	agents := map[string][]*ferrypb.Selector{
		td + "/spire/agent/a": {{Type: "node", Value: "n0"}, {Type: "node", Value: "n1"}},
		td + "/spire/agent/b": {{Type: "node", Value: "n2"}},
		td + "/spire/agent/c": nil,
	}
	ids := []string{td + "/w0", td + "/w1", td + "/w2", td + "/w3", td + "/w4", td + "/w5", td + "/alias0", td + "/alias1", td + "/nobody"}
	parents := append([]string{serverID, serverID, serverID}, ids...)
	for id := range agents {
		parents = append(parents, id, id)
	}
	slices.Sort(parents)
	for seed := range uint64(40) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 7))
			h := newHarness(t, state.Config{})
			var all []string
			for i := range 25 {
				e := &ferrypb.Entry{
					Id:       fmt.Sprintf("e%02d", i),
					SpiffeId: ids[rng.IntN(len(ids)-1)], // never "nobody"
					ParentId: parents[rng.IntN(len(parents))],
				}
				if e.ParentId == serverID {
					for _, n := range []string{"n0", "n1", "n2"} {
						if rng.IntN(2) == 0 {
							e.Selectors = append(e.Selectors, &ferrypb.Selector{Type: "node", Value: n})
						}
					}
				}
				e.Selectors = append(e.Selectors, &ferrypb.Selector{Type: "unix", Value: fmt.Sprintf("uid:%d", i)})
				if e.ParentId == serverID && rng.IntN(3) > 0 {
					// Most aliases have node selectors only.
					e.Selectors = e.Selectors[:len(e.Selectors)-1]
				}
				res := h.apply(create(e.Id, e))
				if codeOf(res.Items[0]) == 0 {
					all = append(all, e.Id)
				}
			}
			v := h.s.View()
			for agentID, sels := range agents {
				want := map[string]bool{}
				for _, e := range v.AuthorizedEntries(agentID, serverID, sels) {
					want[e.Id] = true
				}
				for _, id := range append(all, "missing") {
					got := v.AuthorizedEntry(id, agentID, serverID, sels)
					require.Equal(t, want[id], got != nil, "agent %s, entry %s", agentID, id)
					if got != nil {
						require.Equal(t, id, got.Id)
					}
				}
			}
		})
	}
}
