package jointoken

import "github.com/ferry-id/ferry/internal/selector"

// Selectors declares that a join token yields no node selectors (as SPIRE's):
// a token-attested agent is matched by its SPIFFE ID, not by node-alias
// entries.
func Selectors() selector.Schema {
	return selector.Schema{Type: Name, Class: selector.Node}
}
