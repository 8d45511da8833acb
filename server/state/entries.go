package state

import (
	"fmt"
	"slices"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	"github.com/ferry-id/ferry/proto/ferrypb"
)

// Limits on registration entries.
const (
	maxEntryIDLength = 255
	maxSelectors     = 64
	maxDNSNames      = 64
	maxFederatesWith = 64
	maxHintLength    = 1024
)

// ValidateEntry checks an entry's shape. The FSM runs it on every command, so a
// command that slips past an API is still refused the same way on every node;
// the API checks more first (api.EntryRules: the trust domain, the CA's rules,
// the selector registry), which the FSM does not repeat, so that entries
// written before a rule existed stay readable.
func ValidateEntry(e *ferrypb.Entry) error {
	if e.GetId() == "" {
		return fmt.Errorf("entry id is required")
	}
	return ValidateEntryContent(e)
}

// ValidateEntryContent is ValidateEntry for an entry that may still lack its
// ID (the server assigns one on create).
func ValidateEntryContent(e *ferrypb.Entry) error {
	if len(e.GetId()) > maxEntryIDLength {
		return fmt.Errorf("entry id is longer than %d bytes", maxEntryIDLength)
	}
	if err := ValidateSPIFFEID(e.SpiffeId); err != nil {
		return fmt.Errorf("spiffe_id: %w", err)
	}
	if err := ValidateSPIFFEID(e.ParentId); err != nil {
		return fmt.Errorf("parent_id: %w", err)
	}
	if len(e.Selectors) == 0 {
		return fmt.Errorf("at least one selector is required")
	}
	if len(e.Selectors) > maxSelectors {
		return fmt.Errorf("more than %d selectors", maxSelectors)
	}
	for _, s := range e.Selectors {
		if s.GetType() == "" || s.GetValue() == "" {
			return fmt.Errorf("selector %q: type and value are required", selectorKey(s))
		}
		if strings.ContainsRune(s.Type, ':') {
			return fmt.Errorf("selector type %q contains ':'", s.Type)
		}
	}
	if e.X509SvidTtl < 0 || e.JwtSvidTtl < 0 {
		return fmt.Errorf("ttl must not be negative")
	}
	if len(e.DnsNames) > maxDNSNames {
		return fmt.Errorf("more than %d dns names", maxDNSNames)
	}
	for _, d := range e.DnsNames {
		if d == "" || strings.ContainsAny(d, " /\x00") {
			return fmt.Errorf("dns name %q is not valid", d)
		}
	}
	if len(e.FederatesWith) > maxFederatesWith {
		return fmt.Errorf("more than %d federated trust domains", maxFederatesWith)
	}
	for _, td := range e.FederatesWith {
		if _, err := spiffeid.TrustDomainFromString(td); err != nil {
			return fmt.Errorf("federates_with %q: %w", td, err)
		}
	}
	if len(e.Hint) > maxHintLength {
		return fmt.Errorf("hint is longer than %d bytes", maxHintLength)
	}
	if e.ExpiresAt < 0 {
		return fmt.Errorf("expires_at must not be negative")
	}
	return nil
}

// ValidateSPIFFEID accepts only a canonical SPIFFE ID: go-spiffe's parser already
// refuses percent-encoding, dot segments, empty segments and upper-case trust
// domains; the round trip refuses anything it would have rewritten.
func ValidateSPIFFEID(s string) error {
	id, err := spiffeid.FromString(s)
	if err != nil {
		return err
	}
	if id.String() != s {
		return fmt.Errorf("%q is not in canonical form", s)
	}
	return nil
}

// systemIdentities indexes a command's system-assigned identity details by owner.
func systemIdentities(in []*ferrypb.SystemIdentity) map[string]*ferrypb.SystemIdentity {
	out := make(map[string]*ferrypb.SystemIdentity, len(in))
	for _, si := range in {
		if si != nil {
			out[si.Owner] = si
		}
	}
	return out
}

func (a *applier) createEntries(p *ferrypb.EntriesCreate) *ferrypb.CommandResult {
	res := &ferrypb.CommandResult{Status: ok()}
	sys := systemIdentities(p.SystemIdentities)
	for _, in := range p.Entries {
		st, row, idn := a.createEntry(in, sys)
		res.Items = append(res.Items, st)
		res.Entries = append(res.Entries, row)
		if idn != nil {
			res.Identities = append(res.Identities, idn)
		}
	}
	return res
}

// createEntry creates an entry and, when it asks for one, its system-assigned
// identity: both or neither.
func (a *applier) createEntry(in *ferrypb.Entry, sys map[string]*ferrypb.SystemIdentity) (*ferrypb.Status, *ferrypb.Entry, *ferrypb.Identity) {
	if err := ValidateEntry(in); err != nil {
		return status(codes.InvalidArgument, "invalid entry: %v", err), nil, nil
	}
	if existing := a.entry(in.Id); existing != nil {
		return status(codes.AlreadyExists, "entry %q already exists", in.Id), nil, nil
	}
	if dup := a.similarEntry(in, ""); dup != nil {
		return status(codes.AlreadyExists, "an entry with the same spiffe_id, parent_id and selectors exists: %s", dup.Id), dup, nil
	}
	var prep *systemIdentity
	if in.SystemAssignedIdentity {
		var st *ferrypb.Status
		if prep, st = a.prepareSystemIdentity(sys[in.Id], in.Id, in.SpiffeId); st != nil {
			return st, nil, nil
		}
	}
	e := proto.Clone(in).(*ferrypb.Entry)
	sortSelectors(e.Selectors)
	e.Revision = a.index
	e.CreatedIndex = a.index
	e.CreatedAt = a.now.Unix()
	a.upsert(TableEntries, e.Id, e)
	var idn *ferrypb.Identity
	if prep != nil {
		idn = a.writeSystemIdentity(prep)
	}
	return ok(), e, idn
}

func (a *applier) updateEntries(p *ferrypb.EntriesUpdate) *ferrypb.CommandResult {
	res := &ferrypb.CommandResult{Status: ok()}
	sys := systemIdentities(p.SystemIdentities)
	for _, in := range p.Entries {
		st, row, idn := a.updateEntry(in, sys)
		res.Items = append(res.Items, st)
		res.Entries = append(res.Entries, row)
		if idn != nil {
			res.Identities = append(res.Identities, idn)
		}
	}
	return res
}

// updateEntry replaces an entry. Turning system_assigned_identity on creates
// the identity, turning it off deletes it with its role assignments, and a new
// SPIFFE ID moves the identity's binding along; each with the entry or not at all.
func (a *applier) updateEntry(in *ferrypb.Entry, sys map[string]*ferrypb.SystemIdentity) (*ferrypb.Status, *ferrypb.Entry, *ferrypb.Identity) {
	if err := ValidateEntry(in); err != nil {
		return status(codes.InvalidArgument, "invalid entry: %v", err), nil, nil
	}
	old := a.entry(in.Id)
	if old == nil {
		return status(codes.NotFound, "entry %q not found", in.Id), nil, nil
	}
	if in.Revision != 0 && in.Revision != old.Revision {
		return status(codes.Aborted, "entry %q changed since revision %d (now %d)", in.Id, in.Revision, old.Revision), old, nil
	}
	if dup := a.similarEntry(in, in.Id); dup != nil {
		return status(codes.AlreadyExists, "an entry with the same spiffe_id, parent_id and selectors exists: %s", dup.Id), dup, nil
	}
	cur := a.ownedIdentity(in.Id, "")
	var prep *systemIdentity
	if in.SystemAssignedIdentity && cur == nil {
		var st *ferrypb.Status
		if prep, st = a.prepareSystemIdentity(sys[in.Id], in.Id, in.SpiffeId); st != nil {
			return st, nil, nil
		}
	}
	e := proto.Clone(in).(*ferrypb.Entry)
	sortSelectors(e.Selectors)
	e.Revision = a.index
	e.CreatedIndex = old.CreatedIndex
	e.CreatedAt = old.CreatedAt
	a.upsert(TableEntries, e.Id, e)
	var idn *ferrypb.Identity
	switch {
	case prep != nil:
		idn = a.writeSystemIdentity(prep)
	case cur != nil && !in.SystemAssignedIdentity:
		a.removeIdentity(cur)
		idn = cur
	case cur != nil:
		idn = a.rebindSystemIdentity(cur, in.SpiffeId, sys[in.Id].GetIssuer())
	}
	return ok(), e, idn
}

// deleteEntries deletes entries, each with its system-assigned identity.
func (a *applier) deleteEntries(ids []string) *ferrypb.CommandResult {
	res := &ferrypb.CommandResult{Status: ok()}
	for _, id := range ids {
		old := a.entry(id)
		if old == nil {
			res.Items = append(res.Items, status(codes.NotFound, "entry %q not found", id))
			res.Entries = append(res.Entries, nil)
			continue
		}
		a.delete(TableEntries, id, old)
		if idn := a.ownedIdentity(id, ""); idn != nil {
			a.removeIdentity(idn)
			res.Identities = append(res.Identities, idn)
		}
		res.Items = append(res.Items, ok())
		res.Entries = append(res.Entries, old)
	}
	return res
}

func (a *applier) entry(id string) *ferrypb.Entry {
	raw, err := a.txn.First(TableEntries, "id", id)
	must(err)
	if raw == nil {
		return nil
	}
	return raw.(*ferrypb.Entry)
}

// similarEntry finds another entry with the same SPIFFE ID, parent and selector set.
func (a *applier) similarEntry(e *ferrypb.Entry, except string) *ferrypb.Entry {
	it, err := a.txn.Get(TableEntries, "spiffe_id", e.SpiffeId)
	must(err)
	want := selectorKeys(e.Selectors)
	for raw := it.Next(); raw != nil; raw = it.Next() {
		o := raw.(*ferrypb.Entry)
		if o.Id != except && o.ParentId == e.ParentId && slices.Equal(selectorKeys(o.Selectors), want) {
			return o
		}
	}
	return nil
}

func selectorKeys(sels []*ferrypb.Selector) []string {
	keys := make([]string, 0, len(sels))
	for _, s := range sels {
		keys = append(keys, selectorKey(s))
	}
	slices.Sort(keys)
	return slices.Compact(keys)
}

func sortSelectors(sels []*ferrypb.Selector) {
	slices.SortFunc(sels, func(x, y *ferrypb.Selector) int {
		if c := strings.Compare(x.Type, y.Type); c != 0 {
			return c
		}
		return strings.Compare(x.Value, y.Value)
	})
}
