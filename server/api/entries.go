package api

import (
	"fmt"
	"strings"
	"unicode"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ferry-id/ferry/attestors/catalog"
	"github.com/ferry-id/ferry/internal/selector"
	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/ca"
	"github.com/ferry-id/ferry/server/state"
)

// EntryRules are what a registration entry is checked against before it is
// written: its shape (state.ValidateEntryContent, which the FSM applies too),
// and whether this server could ever serve it: IDs in the trust domain, a
// workload SPIFFE ID the CA would sign, DNS names the CA accepts, and
// selectors some enabled attestor produces. The Admin API applies them with
// the server's trust domain and attestors; the CLI applies them first, with
// what it knows, so that its errors come early and read the same.
type EntryRules struct {
	// TrustDomain the entry's SPIFFE ID and parent ID must be members of;
	// zero skips that check (a client that does not know it).
	TrustDomain spiffeid.TrustDomain
	// Selectors checks selector types and values; nil is
	// catalog.Selectors(), every compiled-in attestor enabled.
	Selectors *selector.Registry
}

// Check returns why e cannot be served, or nil.
func (r EntryRules) Check(e *ferrypb.Entry) error {
	if err := state.ValidateEntryContent(e); err != nil {
		return err
	}
	if strings.ContainsFunc(e.Id, unicode.IsControl) || strings.ContainsFunc(e.Id, unicode.IsSpace) {
		return fmt.Errorf("entry id %q has white space or control characters", e.Id)
	}
	if strings.ContainsFunc(e.Hint, unicode.IsControl) {
		return fmt.Errorf("hint %q has control characters", e.Hint)
	}
	id, _ := spiffeid.FromString(e.SpiffeId) // parsed by ValidateEntryContent
	if err := ca.CheckWorkloadID(r.TrustDomain, id); err != nil {
		return fmt.Errorf("spiffe_id: %w", err)
	}
	parent, _ := spiffeid.FromString(e.ParentId)
	if err := ca.CheckMemberID(r.TrustDomain, parent); err != nil {
		return fmt.Errorf("parent_id: %w", err)
	}
	if id.TrustDomain() != parent.TrustDomain() {
		return fmt.Errorf("parent_id %q is not in the trust domain of spiffe_id %q", e.ParentId, e.SpiffeId)
	}
	reg := r.Selectors
	if reg == nil {
		reg = catalog.Selectors()
	}
	class := SelectorClass(parent)
	for _, s := range e.Selectors {
		if err := reg.Check(class, s); err != nil {
			if class == selector.Node {
				return fmt.Errorf("%w (an entry parented on %s is a node alias, keyed on node selectors)", err, parent)
			}
			return err
		}
	}
	if err := ca.CheckDNSNames(e.DnsNames); err != nil {
		return fmt.Errorf("dns_names: %w", err)
	}
	for _, td := range e.FederatesWith {
		if t, _ := spiffeid.TrustDomainFromString(td); t == id.TrustDomain() {
			return fmt.Errorf("federates_with %q: an entry always receives its own trust domain's bundle", td)
		}
	}
	return nil
}

// SelectorClass returns the class of selectors an entry parented on parent is
// keyed on: node selectors for a node alias (parented on the server's ID),
// workload selectors for every other entry.
func SelectorClass(parent spiffeid.ID) selector.Class {
	if parent.Path() == ca.ServerPath {
		return selector.Node
	}
	return selector.Workload
}

// CheckFilter checks the filters of an entry listing: IDs, when given, must be
// SPIFFE IDs, and selectors ones some attestor produces (an impossible filter
// would silently match nothing).
func (r EntryRules) CheckFilter(spiffeID, parentID string, sels []*ferrypb.Selector) error {
	for _, f := range []struct{ name, v string }{{"spiffe_id", spiffeID}, {"parent_id", parentID}} {
		if f.v == "" {
			continue
		}
		if err := state.ValidateSPIFFEID(f.v); err != nil {
			return fmt.Errorf("filter %s: %w", f.name, err)
		}
	}
	reg := r.Selectors
	if reg == nil {
		reg = catalog.Selectors()
	}
	for _, s := range sels {
		if err := reg.Check(selector.Workload, s); err != nil {
			if reg.Check(selector.Node, s) == nil {
				continue
			}
			return fmt.Errorf("filter: %w", err)
		}
	}
	return nil
}
