package state_test

import (
	"net/url"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ferry-id/ferry/server/state"
)

// canonicalSPIFFEID is the SPIFFE ID grammar written out independently of the
// code under test: "spiffe://", a trust domain of [a-z0-9._-], then zero or more
// "/segment" where a segment is [A-Za-z0-9._-], neither empty nor "." nor "..".
func canonicalSPIFFEID(s string) bool {
	rest, ok := strings.CutPrefix(s, "spiffe://")
	if !ok {
		return false
	}
	td, path, _ := strings.Cut(rest, "/")
	if td == "" {
		return false
	}
	for _, c := range []byte(td) {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '.' || c == '-' || c == '_') {
			return false
		}
	}
	if len(rest) == len(td) {
		return true // no path
	}
	for _, seg := range strings.Split(path, "/") {
		if seg == "" || seg == "." || seg == ".." {
			return false
		}
		for _, c := range []byte(seg) {
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '-' || c == '_') {
				return false
			}
		}
	}
	return true
}

func TestValidateSPIFFEID(t *testing.T) {
	for _, tc := range []struct {
		id string
		ok bool
	}{
		{"spiffe://example.org", true},
		{"spiffe://example.org/ns/prod/sa/web", true},
		{"spiffe://example.org/A.b_c-D", true},
		{"spiffe://example.org/", false},
		{"spiffe://example.org/a/", false},
		{"spiffe://example.org//a", false},
		{"spiffe://example.org/a/../b", false},
		{"spiffe://example.org/./a", false},
		{"spiffe://example.org/a%2Fb", false},
		{"spiffe://example.org/%61", false},
		{"spiffe://Example.org/a", false},
		{"SPIFFE://example.org/a", false},
		{"spiffe://example.org:443/a", false},
		{"spiffe://user@example.org/a", false},
		{"spiffe://example.org/a?b=c", false},
		{"spiffe://example.org/a#b", false},
		{"spiffe:///a", false},
		{"spiffe://", false},
		{"https://example.org/a", false},
		{"", false},
	} {
		err := state.ValidateSPIFFEID(tc.id)
		if (err == nil) != tc.ok {
			t.Errorf("ValidateSPIFFEID(%q) = %v, want ok=%t", tc.id, err, tc.ok)
		}
		if canonicalSPIFFEID(tc.id) != tc.ok {
			t.Errorf("reference grammar disagrees on %q", tc.id)
		}
	}
}

// FuzzValidateSPIFFEID checks that ValidateSPIFFEID accepts exactly the
// canonical SPIFFE IDs, that what it accepts round-trips through parsing, and
// that the canonical form of anything go-spiffe parses is accepted.
func FuzzValidateSPIFFEID(f *testing.F) {
	for _, s := range []string{
		"spiffe://example.org", "spiffe://example.org/ns/prod/sa/web", "spiffe://td/a/../b",
		"spiffe://td/a%2Fb", "spiffe://TD/a", "spiffe://td//a", "spiffe://td/a/", "spiffe://td/./a",
		"spiffe://td:1/a", "spiffe://u@td/a", "spiffe://td/a?q", "spiffe://td/a#f", "spiffe://",
		"spiffe://td/spire/agent/join_token/0a1b", "spiffe://td/\x00", "spiffe://td/é",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		err := state.ValidateSPIFFEID(s)
		if want := canonicalSPIFFEID(s); (err == nil) != want {
			t.Fatalf("ValidateSPIFFEID(%q) = %v; the grammar says canonical=%t", s, err, want)
		}
		if err == nil {
			id, err := spiffeid.FromString(s)
			if err != nil || id.String() != s {
				t.Fatalf("accepted %q does not round-trip: %q, %v", s, id, err)
			}
			var segs []string
			if id.Path() != "" {
				segs = strings.Split(id.Path()[1:], "/")
			}
			again, err := spiffeid.FromSegments(id.TrustDomain(), segs...)
			if err != nil || again != id {
				t.Fatalf("accepted %q does not rebuild from its segments: %q, %v", s, again, err)
			}
			u, err := url.Parse(s)
			if err != nil || u.Scheme != "spiffe" || u.Host != id.TrustDomain().Name() || u.Path != id.Path() ||
				u.User != nil || u.RawQuery != "" || u.Fragment != "" || u.RawPath != "" || u.String() != s {
				t.Fatalf("accepted %q reads differently as a URL: %#v, %v", s, u, err)
			}
		}
		if id, err := spiffeid.FromString(s); err == nil {
			if err := state.ValidateSPIFFEID(id.String()); err != nil {
				t.Fatalf("canonical form %q of %q refused: %v", id.String(), s, err)
			}
		}
	})
}
