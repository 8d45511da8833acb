package selector_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/internal/selector"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

func sel(t, v string) *ferrypb.Selector { return &ferrypb.Selector{Type: t, Value: v} }

func TestParse(t *testing.T) {
	tests := []struct {
		in        string
		typ, val  string
		wantError string
	}{
		{in: "unix:uid:1000", typ: "unix", val: "uid:1000"},
		{in: "x509pop:subject:cn:node-1", typ: "x509pop", val: "subject:cn:node-1"},
		{in: "systemd:id:ferry-agent.service", typ: "systemd", val: "id:ferry-agent.service"},
		{in: "k8s_psat:cluster:a", typ: "k8s_psat", val: "cluster:a"},
		{in: "a-b:v", typ: "a-b", val: "v"},
		{in: "unix:path:/usr/bin/caf\u00e9", typ: "unix", val: "path:/usr/bin/caf\u00e9"},
		{in: "unix:", wantError: "empty value"},
		{in: "unix", wantError: "want type:value"},
		{in: "", wantError: "want type:value"},
		{in: ":uid:0", wantError: "empty type"},
		{in: "Unix:uid:0", wantError: "not in [a-z0-9_-]"},
		{in: "un ix:uid:0", wantError: "not in [a-z0-9_-]"},
		{in: "unix:uid:0\n", wantError: "control character"},
		{in: "unix:a\x00b", wantError: "control character"},
		{in: "unix:a\u0085b", wantError: "control character"},
		{in: "unix:\xff", wantError: "UTF-8"},
		{in: strings.Repeat("t", selector.MaxTypeLen+1) + ":v", wantError: "type longer"},
		{in: "t:" + strings.Repeat("v", selector.MaxValueLen+1), wantError: "value longer"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := selector.Parse(tt.in)
			if tt.wantError != "" {
				require.Error(t, err)
				assert.ErrorIs(t, err, selector.ErrInvalid)
				assert.Contains(t, err.Error(), tt.wantError)
				assert.True(t, strings.HasPrefix(err.Error(), "selector: "), err.Error())
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.typ, got.GetType())
			assert.Equal(t, tt.val, got.GetValue())
			assert.Equal(t, tt.in, selector.Format(got))
		})
	}
}

func TestParseLimitsAreInclusive(t *testing.T) {
	s := strings.Repeat("t", selector.MaxTypeLen) + ":" + strings.Repeat("v", selector.MaxValueLen)
	_, err := selector.Parse(s)
	require.NoError(t, err)
}

func TestParseErrorDoesNotEchoHugeInput(t *testing.T) {
	in := strings.Repeat("X", 100000)
	_, err := selector.Parse(in)
	require.Error(t, err)
	assert.Less(t, len(err.Error()), 300)
}

func TestParseAll(t *testing.T) {
	got, err := selector.ParseAll([]string{"unix:uid:0", "unix:gid:0"})
	require.NoError(t, err)
	assert.Equal(t, []string{"unix:uid:0", "unix:gid:0"}, []string{selector.Format(got[0]), selector.Format(got[1])})

	_, err = selector.ParseAll([]string{"unix:uid:0", "bad"})
	require.ErrorIs(t, err, selector.ErrInvalid)
}

func TestValidateNil(t *testing.T) {
	require.ErrorIs(t, selector.Validate(nil), selector.ErrInvalid)
}

func TestNewSetSortsAndDedupes(t *testing.T) {
	in := []*ferrypb.Selector{
		sel("unix", "uid:1000"),
		sel("docker", "label:a:b"),
		nil,
		sel("unix", "gid:1000"),
		sel("unix", "uid:1000"),
		sel("docker", "label:a:b"),
	}
	s := selector.NewSet(in...)
	assert.Equal(t, 3, s.Len())
	assert.Equal(t, []string{"docker:label:a:b", "unix:gid:1000", "unix:uid:1000"}, s.Strings())
	assert.Equal(t, "docker:label:a:b,unix:gid:1000,unix:uid:1000", s.String())

	// The set owns copies: changing the input does not change it.
	in[0].Value = "uid:0"
	assert.True(t, s.Contains(sel("unix", "uid:1000")))
	assert.False(t, s.Contains(sel("unix", "uid:0")))

	canon := selector.Canonical(in)
	assert.Len(t, canon, 4)
	assert.Equal(t, "docker:label:a:b", selector.Format(canon[0]))
}

func TestSortIsByTypeThenValue(t *testing.T) {
	// "a:z" must sort before "ab:a" even though "a:z" > "ab:a" as flat strings.
	s := selector.NewSet(sel("ab", "a"), sel("a", "z"))
	assert.Equal(t, []string{"a:z", "ab:a"}, s.Strings())
	assert.Negative(t, selector.Compare(sel("a", "z"), sel("ab", "a")))
}

func TestSubsetAndMatch(t *testing.T) {
	workload := selector.NewSet(sel("unix", "uid:1000"), sel("unix", "gid:1000"), sel("unix", "user:alice"))
	tests := []struct {
		name  string
		entry []*ferrypb.Selector
		want  bool
	}{
		{"one of", []*ferrypb.Selector{sel("unix", "uid:1000")}, true},
		{"all of", []*ferrypb.Selector{sel("unix", "uid:1000"), sel("unix", "gid:1000"), sel("unix", "user:alice")}, true},
		{"duplicated entry selector", []*ferrypb.Selector{sel("unix", "uid:1000"), sel("unix", "uid:1000")}, true},
		{"AND: one missing", []*ferrypb.Selector{sel("unix", "uid:1000"), sel("unix", "gid:0")}, false},
		{"other value", []*ferrypb.Selector{sel("unix", "uid:0")}, false},
		{"other type", []*ferrypb.Selector{sel("docker", "uid:1000")}, false},
		{"superset", []*ferrypb.Selector{sel("unix", "uid:1000"), sel("unix", "gid:1000"), sel("unix", "user:alice"), sel("unix", "group:x")}, false},
		{"empty entry never matches", nil, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			entry := selector.NewSet(tt.entry...)
			assert.Equal(t, tt.want, entry.Match(workload))
			assert.Equal(t, tt.want, selector.Match(tt.entry, workload.Selectors()))
		})
	}
	// Subset keeps set semantics: the empty set is a subset of anything.
	assert.True(t, selector.Set{}.Subset(workload))
	assert.True(t, workload.Subset(workload))
	assert.False(t, workload.Subset(selector.Set{}))
}

func TestUnionAndEqual(t *testing.T) {
	a := selector.NewSet(sel("unix", "uid:1"), sel("unix", "gid:1"))
	b := selector.NewSet(sel("unix", "uid:1"), sel("systemd", "id:a.service"))
	u := a.Union(b)
	assert.Equal(t, []string{"systemd:id:a.service", "unix:gid:1", "unix:uid:1"}, u.Strings())
	assert.True(t, a.Subset(u))
	assert.True(t, b.Subset(u))
	assert.True(t, u.Equal(selector.NewSet(append(a.Selectors(), b.Selectors()...)...)))
	assert.False(t, a.Equal(b))
}

func TestSelectorsReturnsCopy(t *testing.T) {
	s := selector.NewSet(sel("a", "1"), sel("b", "2"))
	got := s.Selectors()
	got[0] = sel("z", "z")
	assert.Equal(t, []string{"a:1", "b:2"}, s.Strings())
}

func TestErrorsAreWrapped(t *testing.T) {
	_, err := selector.Parse("BAD:x")
	assert.True(t, errors.Is(err, selector.ErrInvalid))
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{
		"unix:uid:1000", "x509pop:san:datacenter:us-east", "a:b", ":", "a:", ":b", "A:b",
		"systemd:fragment_path:/etc/systemd/system/x.service", "t:\x00", "t:\xff\xfe", "t:é:é",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		got, err := selector.Parse(in)
		if err != nil {
			if !errors.Is(err, selector.ErrInvalid) {
				t.Fatalf("error %v does not wrap ErrInvalid", err)
			}
			return
		}
		if err := selector.Validate(got); err != nil {
			t.Fatalf("Parse accepted %q but Validate rejects it: %v", in, err)
		}
		if out := selector.Format(got); out != in {
			t.Fatalf("round trip: %q -> %q", in, out)
		}
		again, err := selector.Parse(selector.Format(got))
		if err != nil || !selector.Equal(got, again) {
			t.Fatalf("reparse of %q: %v", in, err)
		}
		if len(got.GetType()) > selector.MaxTypeLen || len(got.GetValue()) > selector.MaxValueLen {
			t.Fatalf("limits not enforced for %q", in)
		}
		s := selector.NewSet(got, again)
		if s.Len() != 1 || !s.Contains(got) || !s.Match(selector.NewSet(got)) {
			t.Fatalf("set of one selector broken for %q", in)
		}
	})
}

func BenchmarkMatch(b *testing.B) {
	var have []*ferrypb.Selector
	for i := 0; i < 20; i++ {
		have = append(have, sel("unix", "supplementary_gid:"+strings.Repeat("1", i+1)))
	}
	have = append(have, sel("unix", "uid:1000"), sel("unix", "gid:1000"), sel("systemd", "id:web.service"))
	workload := selector.NewSet(have...)
	entry := selector.NewSet(sel("unix", "uid:1000"), sel("systemd", "id:web.service"))
	b.Run("Set.Match", func(b *testing.B) {
		for b.Loop() {
			if !entry.Match(workload) {
				b.Fatal("no match")
			}
		}
	})
	b.Run("NewSet", func(b *testing.B) {
		for b.Loop() {
			_ = selector.NewSet(have...)
		}
	})
}
