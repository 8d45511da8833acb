package imds

import (
	"net/url"
	"strings"
	"testing"
)

// FuzzParseQuery holds parseQuery to url.ParseQuery: it refuses what
// ParseQuery refuses, and otherwise gives the same values under lower-cased
// keys, unless a key repeats (case-insensitively) or there are too many.
func FuzzParseQuery(f *testing.F) {
	for _, s := range []string{"", "a=1&b=2", "a=1&A=2", "a=%zz", "a;b=1", "&&a=1&", "=v", "a", "r=api%3A%2F%2Fx&client_id=C", "k+1=v+2"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		got, rep := parseQuery(raw)
		want, err := url.ParseQuery(raw)
		if err != nil {
			if rep == nil {
				t.Fatalf("%q: ParseQuery refuses (%v), parseQuery accepts", raw, err)
			}
			return
		}
		lower := map[string][]string{}
		for k, v := range want {
			lk := strings.ToLower(k)
			lower[lk] = append(lower[lk], v...)
		}
		dup := false
		for _, v := range lower {
			dup = dup || len(v) > 1
		}
		switch {
		case dup || len(lower) > maxParams:
			if rep == nil {
				t.Fatalf("%q: duplicate or too many parameters accepted", raw)
			}
		case rep != nil:
			t.Fatalf("%q: refused: %s", raw, rep.desc)
		default:
			if len(got) != len(lower) {
				t.Fatalf("%q: %d parameters, want %d", raw, len(got), len(lower))
			}
			for k, v := range lower {
				if g, ok := got.lookup(k); !ok || g != v[0] {
					t.Fatalf("%q: %s = %q, want %q", raw, k, g, v[0])
				}
			}
		}
	})
}
