package cache

import (
	"github.com/ferry-id/ferry/internal/selector"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

// MatchedEntryIDs returns the IDs of the entries a workload with sels
// matches, in identity order, without minting anything.
func MatchedEntryIDs(c *Cache, sels []*ferrypb.Selector) []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []string
	for _, es := range c.matchLocked(selector.NewSet(sels...)) {
		out = append(out, es.entry.GetId())
	}
	return out
}
