// Package selector parses, validates, orders and matches selectors: the
// `type:value` attributes that attestors report for nodes and workloads and
// that registration entries are keyed on.
//
// A selector's type names the attestor that produced it ("unix", "x509pop");
// its value is free text that may itself contain ':' ("uid:1000",
// "subject:cn:node-1"). Parse splits at the first ':' only.
//
// Matching has SPIRE's AND semantics: an entry applies to a workload when every
// one of the entry's selectors is among the workload's selectors.
//
// Which types exist, and the form of their values, is not known here: each
// attestor declares the selectors it produces as a Schema, and a Registry of
// those declarations (attestors/catalog) checks registration entries, so that
// an entry no attestor could ever match is refused when it is written.
package selector

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"unicode/utf8"

	"github.com/ferry-id/ferry/proto/ferrypb"
)

// Length caps. A selector travels in registration entries, the Raft log and
// every agent's entry stream, so unbounded values would be a cheap way to bloat
// all three.
const (
	// MaxTypeLen is the longest accepted type, in bytes.
	MaxTypeLen = 64
	// MaxValueLen is the longest accepted value, in bytes.
	MaxValueLen = 1024
)

// ErrInvalid is wrapped by every validation error this package returns.
var ErrInvalid = errors.New("selector: invalid selector")

// Parse parses the CLI form `type:value`. The value is everything after the
// first ':' and may itself contain ':'. The result is validated.
func Parse(s string) (*ferrypb.Selector, error) {
	typ, value, ok := strings.Cut(s, ":")
	if !ok {
		return nil, fmt.Errorf("%w: %q: want type:value", ErrInvalid, truncate(s))
	}
	sel := &ferrypb.Selector{Type: typ, Value: value}
	if err := Validate(sel); err != nil {
		return nil, err
	}
	return sel, nil
}

// ParseAll parses each string with Parse and returns the selectors in input
// order. It stops at the first error.
func ParseAll(ss []string) ([]*ferrypb.Selector, error) {
	out := make([]*ferrypb.Selector, 0, len(ss))
	for _, s := range ss {
		sel, err := Parse(s)
		if err != nil {
			return nil, err
		}
		out = append(out, sel)
	}
	return out, nil
}

// Validate checks sel: type matches [a-z0-9_-]+ and is at most MaxTypeLen
// bytes; value is non-empty, at most MaxValueLen bytes, valid UTF-8 and free
// of control characters (so it is safe to print in logs and CLI output).
func Validate(sel *ferrypb.Selector) error {
	if sel == nil {
		return fmt.Errorf("%w: nil", ErrInvalid)
	}
	if err := ValidateType(sel.GetType()); err != nil {
		return err
	}
	v := sel.GetValue()
	switch {
	case v == "":
		return fmt.Errorf("%w: type %q: empty value", ErrInvalid, sel.GetType())
	case len(v) > MaxValueLen:
		return fmt.Errorf("%w: type %q: value longer than %d bytes", ErrInvalid, sel.GetType(), MaxValueLen)
	case !utf8.ValidString(v):
		return fmt.Errorf("%w: type %q: value is not valid UTF-8", ErrInvalid, sel.GetType())
	}
	for _, r := range v {
		if r < 0x20 || r == 0x7f || (r >= 0x80 && r < 0xa0) {
			return fmt.Errorf("%w: type %q: value contains control character %U", ErrInvalid, sel.GetType(), r)
		}
	}
	return nil
}

// ValidateType checks a selector type on its own: [a-z0-9_-]+, at most
// MaxTypeLen bytes.
func ValidateType(typ string) error {
	if typ == "" {
		return fmt.Errorf("%w: empty type", ErrInvalid)
	}
	if len(typ) > MaxTypeLen {
		return fmt.Errorf("%w: type longer than %d bytes", ErrInvalid, MaxTypeLen)
	}
	for i := 0; i < len(typ); i++ {
		c := typ[i]
		if (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-' {
			continue
		}
		return fmt.Errorf("%w: type %q: character %q not in [a-z0-9_-]", ErrInvalid, truncate(typ), c)
	}
	return nil
}

// Format returns the CLI form `type:value`; Parse(Format(s)) round-trips every
// valid selector.
func Format(sel *ferrypb.Selector) string {
	return sel.GetType() + ":" + sel.GetValue()
}

// Compare orders selectors by type, then value, byte-wise. It is the canonical
// order of a Set.
func Compare(a, b *ferrypb.Selector) int {
	if c := strings.Compare(a.GetType(), b.GetType()); c != 0 {
		return c
	}
	return strings.Compare(a.GetValue(), b.GetValue())
}

// Equal reports whether a and b have the same type and value.
func Equal(a, b *ferrypb.Selector) bool {
	return a.GetType() == b.GetType() && a.GetValue() == b.GetValue()
}

// Set is an immutable, canonically ordered (Compare) and duplicate-free
// collection of selectors. The zero Set is empty and ready to use. A Set is
// safe for concurrent reads.
type Set struct {
	items []*ferrypb.Selector
}

// NewSet returns the canonical set of sels: sorted, duplicates removed, nil
// elements skipped. It copies the selectors, so later changes to sels do not
// affect the set. It does not validate; call Validate on untrusted input first.
func NewSet(sels ...*ferrypb.Selector) Set {
	items := make([]*ferrypb.Selector, 0, len(sels))
	for _, s := range sels {
		if s == nil {
			continue
		}
		items = append(items, &ferrypb.Selector{Type: s.GetType(), Value: s.GetValue()})
	}
	slices.SortFunc(items, Compare)
	items = slices.CompactFunc(items, Equal)
	return Set{items: slices.Clip(items)}
}

// Canonical returns sels sorted and deduplicated, as NewSet(sels...).Selectors().
func Canonical(sels []*ferrypb.Selector) []*ferrypb.Selector {
	return NewSet(sels...).Selectors()
}

// Len returns the number of distinct selectors in s.
func (s Set) Len() int { return len(s.items) }

// Selectors returns the selectors in canonical order. The slice is a fresh copy;
// the selectors it points to are shared with s and must not be modified.
func (s Set) Selectors() []*ferrypb.Selector {
	return slices.Clone(s.items)
}

// Contains reports whether sel is in s.
func (s Set) Contains(sel *ferrypb.Selector) bool {
	if sel == nil {
		return false
	}
	_, ok := slices.BinarySearchFunc(s.items, sel, Compare)
	return ok
}

// Subset reports whether every selector of s is also in of (s ⊆ of). The
// empty set is a subset of every set.
func (s Set) Subset(of Set) bool {
	if len(s.items) > len(of.items) {
		return false
	}
	// Both sides are sorted: one merge walk.
	j := 0
	for _, want := range s.items {
		for j < len(of.items) && Compare(of.items[j], want) < 0 {
			j++
		}
		if j == len(of.items) || !Equal(of.items[j], want) {
			return false
		}
		j++
	}
	return true
}

// Match reports whether an entry with the selectors of s applies to a workload
// or node whose attested selectors are have: s is non-empty and s ⊆ have. An
// entry without selectors matches nothing, so a mistaken empty entry can never
// apply to every workload.
func (s Set) Match(have Set) bool {
	return len(s.items) > 0 && s.Subset(have)
}

// Union returns the set of selectors in s or o.
func (s Set) Union(o Set) Set {
	out := make([]*ferrypb.Selector, 0, len(s.items)+len(o.items))
	i, j := 0, 0
	for i < len(s.items) && j < len(o.items) {
		switch c := Compare(s.items[i], o.items[j]); {
		case c < 0:
			out = append(out, s.items[i])
			i++
		case c > 0:
			out = append(out, o.items[j])
			j++
		default:
			out = append(out, s.items[i])
			i++
			j++
		}
	}
	out = append(out, s.items[i:]...)
	out = append(out, o.items[j:]...)
	return Set{items: out}
}

// Equal reports whether s and o hold the same selectors.
func (s Set) Equal(o Set) bool {
	return slices.EqualFunc(s.items, o.items, Equal)
}

// Strings returns the CLI form of each selector, in canonical order.
func (s Set) Strings() []string {
	out := make([]string, len(s.items))
	for i, sel := range s.items {
		out[i] = Format(sel)
	}
	return out
}

// String returns the selectors in CLI form, comma separated, in canonical order.
func (s Set) String() string {
	return strings.Join(s.Strings(), ",")
}

// Match reports whether an entry with entrySelectors applies to a workload with
// workloadSelectors (AND semantics; see Set.Match).
func Match(entrySelectors, workloadSelectors []*ferrypb.Selector) bool {
	return NewSet(entrySelectors...).Match(NewSet(workloadSelectors...))
}

// truncate shortens s for error messages so a hostile input cannot make an
// error (and the log line carrying it) arbitrarily large.
func truncate(s string) string {
	const max = 80
	if len(s) <= max {
		return s
	}
	return s[:max] + "…"
}
