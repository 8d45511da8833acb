package selector

import (
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/ferry-id/ferry/proto/ferrypb"
)

// Class says what a selector describes: the node an agent runs on, or a
// process on it. Node selectors key node-alias entries (entries parented on
// the server's ID); workload selectors key every other entry.
type Class int

// The selector classes.
const (
	Workload Class = iota + 1
	Node
)

func (c Class) String() string {
	switch c {
	case Workload:
		return "workload"
	case Node:
		return "node"
	}
	return "Class(" + strconv.Itoa(int(c)) + ")"
}

// Schema is what one attestor declares about the selectors it produces: their
// type (the attestor's name), whether they describe nodes or workloads, and the
// kinds of value it emits. Every attestor package declares its Schema next to
// the code that produces the selectors (a package-level Selectors function),
// and the catalog of attestors compiled into ferry collects them into a
// Registry; nothing else lists selector types. A Schema with no Kinds says the
// attestor produces no selectors at all (join_token).
type Schema struct {
	// Type is the selector type, [a-z0-9_-]+; by convention the attestor name.
	Type string
	// Class is Node for node attestors, Workload for workload attestors.
	Class Class
	// Kinds are the kinds of value the attestor emits, in the order help text
	// lists them.
	Kinds []Kind
}

// Kind is one kind of selector value. A value is "<Name>:<rest>" (the kind is
// the value up to its first ':', as workload.Kinds has it); Check decides
// whether rest is well-formed.
type Kind struct {
	// Name is the kind, e.g. "uid" in unix:uid:1000.
	Name string
	// Form names what follows "<Name>:" in help and errors, e.g. "<uid>" or
	// "<key>:<value>".
	Form string
	// Help says in a few words what the value is, e.g. "user ID of the
	// process, decimal".
	Help string
	// Check returns why rest is not a value the attestor could produce; nil
	// accepts any rest that passes Validate. Errors should name the expected
	// form, not repeat the input (the caller quotes it).
	Check func(rest string) error
}

// Usage returns the kind's CLI form for type typ, e.g. "unix:uid:<uid>".
func (k Kind) Usage(typ string) string {
	return typ + ":" + k.Name + ":" + k.Form
}

// Registry is the set of selector schemas a process knows: which selector
// types exist, of which class, and the form of their values. A Registry is
// immutable and safe for concurrent use.
type Registry struct {
	byType map[string]*entry
	order  []string // types in registration order
}

type entry struct {
	Schema
	// disabled says the attestor is compiled in but not enabled here, so its
	// selectors can never be produced (see Enable).
	disabled bool
}

// NewRegistry returns the registry of schemas. It refuses a malformed schema:
// a bad type, an unknown class, a duplicate type, or a duplicate or empty kind.
func NewRegistry(schemas ...Schema) (*Registry, error) {
	r := &Registry{byType: make(map[string]*entry, len(schemas))}
	for _, s := range schemas {
		if err := ValidateType(s.Type); err != nil {
			return nil, fmt.Errorf("selector: schema: %w", err)
		}
		if s.Class != Workload && s.Class != Node {
			return nil, fmt.Errorf("selector: schema %q: unknown class %d", s.Type, s.Class)
		}
		if _, dup := r.byType[s.Type]; dup {
			return nil, fmt.Errorf("selector: schema %q declared twice", s.Type)
		}
		seen := map[string]bool{}
		for _, k := range s.Kinds {
			if k.Name == "" || strings.ContainsRune(k.Name, ':') || k.Form == "" {
				return nil, fmt.Errorf("selector: schema %q: kind %q needs a name without ':' and a form", s.Type, k.Name)
			}
			if seen[k.Name] {
				return nil, fmt.Errorf("selector: schema %q: kind %q declared twice", s.Type, k.Name)
			}
			seen[k.Name] = true
		}
		s.Kinds = slices.Clone(s.Kinds)
		r.byType[s.Type] = &entry{Schema: s}
		r.order = append(r.order, s.Type)
	}
	return r, nil
}

// MustRegistry is NewRegistry for schema lists fixed at compile time.
func MustRegistry(schemas ...Schema) *Registry {
	r, err := NewRegistry(schemas...)
	if err != nil {
		panic(err)
	}
	return r
}

// Enable returns a copy of r in which, of the schemas of class c, only those
// of the named types can be produced: the attestors configured here. Selectors
// of the other types of that class are refused by Check as "not enabled",
// which tells an operator more than "unknown". Names r does not know are
// ignored (an attestor without a schema produces no selectors).
func (r *Registry) Enable(c Class, types ...string) *Registry {
	out := &Registry{byType: make(map[string]*entry, len(r.byType)), order: r.order}
	for t, e := range r.byType {
		cp := *e
		if e.Class == c {
			cp.disabled = !slices.Contains(types, t)
		}
		out.byType[t] = &cp
	}
	return out
}

// Types returns the enabled selector types of class c, in registration order.
func (r *Registry) Types(c Class) []string {
	var out []string
	for _, t := range r.order {
		if e := r.byType[t]; e.Class == c && !e.disabled {
			out = append(out, t)
		}
	}
	return out
}

// Forms returns the CLI form of every enabled selector kind of class c
// ("unix:uid:<uid>", ...), in registration order.
func (r *Registry) Forms(c Class) []string {
	var out []string
	for _, t := range r.Types(c) {
		for _, k := range r.byType[t].Kinds {
			out = append(out, k.Usage(t))
		}
	}
	return out
}

// Help returns one line per enabled selector kind of class c, "  form  help",
// aligned, for --help texts.
func (r *Registry) Help(c Class) string {
	var rows [][2]string
	width := 0
	for _, t := range r.Types(c) {
		for _, k := range r.byType[t].Kinds {
			u := k.Usage(t)
			width = max(width, len(u))
			rows = append(rows, [2]string{u, k.Help})
		}
	}
	var b strings.Builder
	for _, row := range rows {
		fmt.Fprintf(&b, "  %-*s  %s\n", width, row[0], row[1])
	}
	return b.String()
}

// ErrUnknownType is wrapped by Check's error for a selector type no enabled
// attestor of the class produces.
var ErrUnknownType = errors.New("unknown selector type")

// Check reports whether sel could be produced by an enabled attestor of class
// c: it passes Validate, its type is one of c's, its kind is one the attestor
// emits and the rest of its value has the kind's form. Every error wraps
// ErrInvalid, names the selector and lists what would be accepted instead.
func (r *Registry) Check(c Class, sel *ferrypb.Selector) error {
	if err := Validate(sel); err != nil {
		return err
	}
	q := strconv.Quote(truncate(Format(sel)))
	e, ok := r.byType[sel.GetType()]
	switch {
	case !ok:
		return fmt.Errorf("%w %s: %w; %s", ErrInvalid, q, ErrUnknownType, r.expect(c))
	case e.Class != c:
		return fmt.Errorf("%w %s: %s is a %s selector type, not a %s one; %s", ErrInvalid, q, e.Type, e.Class, c, r.expect(c))
	case e.disabled:
		return fmt.Errorf("%w %s: the %s attestor is not enabled here; %s", ErrInvalid, q, e.Type, r.expect(c))
	case len(e.Kinds) == 0:
		return fmt.Errorf("%w %s: the %s attestor produces no selectors; %s", ErrInvalid, q, e.Type, r.expect(c))
	}
	name, rest, _ := strings.Cut(sel.GetValue(), ":")
	i := slices.IndexFunc(e.Kinds, func(k Kind) bool { return k.Name == name })
	if i < 0 {
		return fmt.Errorf("%w %s: %s selectors are %s", ErrInvalid, q, e.Type, strings.Join(kindForms(e), ", "))
	}
	k := e.Kinds[i]
	if rest == "" {
		return fmt.Errorf("%w %s: want %s (%s)", ErrInvalid, q, k.Usage(e.Type), k.Help)
	}
	if k.Check != nil {
		if err := k.Check(rest); err != nil {
			return fmt.Errorf("%w %s: want %s (%s): %v", ErrInvalid, q, k.Usage(e.Type), k.Help, err)
		}
	}
	return nil
}

// Parse parses the CLI form type:value and checks it as Check does.
func (r *Registry) Parse(c Class, s string) (*ferrypb.Selector, error) {
	sel, err := Parse(s)
	if err != nil {
		return nil, fmt.Errorf("%w; %s", err, r.expect(c))
	}
	if err := r.Check(c, sel); err != nil {
		return nil, err
	}
	return sel, nil
}

// expect says which selectors class c takes, for error messages.
func (r *Registry) expect(c Class) string {
	forms := r.Forms(c)
	if len(forms) == 0 {
		return fmt.Sprintf("no enabled attestor produces %s selectors", c)
	}
	return fmt.Sprintf("%s selectors are %s", c, strings.Join(forms, ", "))
}

func kindForms(e *entry) []string {
	out := make([]string, len(e.Kinds))
	for i, k := range e.Kinds {
		out[i] = k.Usage(e.Type)
	}
	return out
}

// Value checks shared by attestor schemas.

// CheckUint32 accepts a decimal number in [0, 2^32-1] without sign or leading
// zeros, as the kernel prints uids and gids.
func CheckUint32(s string) error {
	if len(s) > 1 && s[0] == '0' {
		return errors.New("no leading zeros")
	}
	if _, err := strconv.ParseUint(s, 10, 32); err != nil {
		return errors.New("not a decimal number from 0 to 4294967295")
	}
	return nil
}

// CheckName accepts a user or group name: no ':' (the passwd and group file
// separator), no '/' and no white space.
func CheckName(s string) error {
	if strings.ContainsAny(s, ":/ \t") {
		return errors.New("a user or group name has no ':', '/' or white space")
	}
	return nil
}

// CheckAbsPath accepts an absolute file path.
func CheckAbsPath(s string) error {
	if !strings.HasPrefix(s, "/") {
		return errors.New("not an absolute path")
	}
	return nil
}

// CheckHex returns a check accepting exactly n lower-case hex digits (n = 0:
// any non-zero even number), the form attestors print digests and serials in.
func CheckHex(n int) func(string) error {
	return func(s string) error {
		if n > 0 && len(s) != n {
			return fmt.Errorf("want %d lower-case hex digits, got %d characters", n, len(s))
		}
		if n == 0 && len(s)%2 != 0 {
			return errors.New("want an even number of lower-case hex digits")
		}
		for i := 0; i < len(s); i++ {
			if c := s[i]; !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
				return errors.New("want lower-case hex digits")
			}
		}
		return nil
	}
}

// CheckKeyValue accepts "<key>:<value>" with both parts non-empty.
func CheckKeyValue(s string) error {
	if k, v, ok := strings.Cut(s, ":"); !ok || k == "" || v == "" {
		return errors.New("want <key>:<value>")
	}
	return nil
}
