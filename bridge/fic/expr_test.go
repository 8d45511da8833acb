package fic_test

import (
	"errors"
	"regexp"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/bridge/fic"
)

func TestParseExpression(t *testing.T) {
	e, err := fic.ParseExpression("claims['sub'] matches 'spiffe://example.org/ns/*' and claims['aud'] eq 'x'")
	require.NoError(t, err)
	require.Equal(t, [][]fic.Comparison{{
		{Claim: "sub", Op: fic.OpMatches, Value: "spiffe://example.org/ns/*"},
		{Claim: "aud", Op: fic.OpEq, Value: "x"},
	}}, e.Any)

	e, err = fic.ParseExpression("  claims['a'] eq '1'  or   claims['b'] eq 'it''s' and claims['c'] matches '' ")
	require.NoError(t, err)
	require.Equal(t, [][]fic.Comparison{
		{{Claim: "a", Op: fic.OpEq, Value: "1"}},
		{{Claim: "b", Op: fic.OpEq, Value: "it's"}, {Claim: "c", Op: fic.OpMatches, Value: ""}},
	}, e.Any)
	require.Equal(t, "claims['a'] eq '1' or claims['b'] eq 'it''s' and claims['c'] matches ''", e.String())
}

func TestParseExpressionErrors(t *testing.T) {
	tests := []struct {
		in     string
		offset int
		msg    string
	}{
		{"", 0, "empty expression"},
		{"   ", 3, "empty expression"},
		{"claim['sub'] eq 'x'", 0, "expected claims['name']"},
		{"claims[sub] eq 'x'", 7, "expected a quoted literal"},
		{"claims['sub' eq 'x'", 12, "expected ']'"},
		{"claims['sub']eq 'x'", 13, "expected space before operator"},
		{"claims['sub'] EQ 'x'", 14, "expected operator"},
		{"claims['sub'] eqx 'x'", 14, "expected operator"},
		{"claims['sub'] eq'x'", 14, "expected operator"},
		{"claims['sub'] eq x", 17, "expected a quoted literal"},
		{"claims['sub'] eq 'x", 17, "unterminated literal"},
		{"claims[''] eq 'x'", 7, "empty claim name"},
		{"claims['sub'] eq 'x' and", 24, "expected claims['name']"},
		{"claims['sub'] eq 'x' AND claims['a'] eq 'b'", 21, "expected 'and', 'or' or end"},
		{"claims['sub'] eq 'x' claims['a'] eq 'b'", 21, "expected 'and', 'or' or end"},
		{"claims['sub'] eq 'x''", 17, "unterminated literal"},
		{"claims['sub'] eq 'x'and claims['a'] eq 'b'", 20, "expected 'and', 'or' or end"},
		{"claims['a'] eq '\xff'", 16, "invalid UTF-8"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			_, err := fic.ParseExpression(tt.in)
			var se *fic.SyntaxError
			require.True(t, errors.As(err, &se), "%v", err)
			require.Equal(t, tt.offset, se.Offset, se.Error())
			require.Contains(t, se.Msg, tt.msg)
			require.True(t, strings.HasPrefix(err.Error(), "fic: expression: offset "))
		})
	}
}

func TestParseExpressionLimits(t *testing.T) {
	term := "claims['a'] eq 'b'"
	many := strings.Repeat(term+" and ", fic.MaxComparisons) + term
	_, err := fic.ParseExpression(many)
	require.ErrorContains(t, err, "more than 16 comparisons")

	_, err = fic.ParseExpression(strings.Repeat(term+" and ", fic.MaxComparisons-1) + term)
	require.NoError(t, err)

	_, err = fic.ParseExpression("claims['a'] eq '" + strings.Repeat("x", fic.MaxLiteralLength+1) + "'")
	require.ErrorContains(t, err, "literal longer")

	_, err = fic.ParseExpression(strings.Repeat(" ", fic.MaxExpressionLength+1))
	require.ErrorContains(t, err, "expression longer")
}

func TestEval(t *testing.T) {
	e, err := fic.ParseExpression("claims['sub'] matches 'spiffe://example.org/ns/*/sa/?' and claims['aud'] eq 'x'")
	require.NoError(t, err)
	tests := []struct {
		name   string
		claims map[string]any
		want   bool
	}{
		{"match", map[string]any{"sub": "spiffe://example.org/ns/a/sa/b", "aud": "x"}, true},
		{"aud single array", map[string]any{"sub": "spiffe://example.org/ns/a/b/sa/c", "aud": []any{"x"}}, true},
		{"aud two values", map[string]any{"sub": "spiffe://example.org/ns/a/sa/b", "aud": []any{"x", "y"}}, false},
		{"aud missing", map[string]any{"sub": "spiffe://example.org/ns/a/sa/b"}, false},
		{"aud number", map[string]any{"sub": "spiffe://example.org/ns/a/sa/b", "aud": 1.0}, false},
		{"? needs one char", map[string]any{"sub": "spiffe://example.org/ns/a/sa/", "aud": "x"}, false},
		{"? one char only", map[string]any{"sub": "spiffe://example.org/ns/a/sa/bc", "aud": "x"}, false},
		{"case", map[string]any{"sub": "spiffe://EXAMPLE.org/ns/a/sa/b", "aud": "x"}, false},
		{"aud case", map[string]any{"sub": "spiffe://example.org/ns/a/sa/b", "aud": "X"}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			require.Equal(t, tt.want, e.Eval(tt.claims))
		})
	}

	or, err := fic.ParseExpression("claims['a'] eq '1' and claims['b'] eq '2' or claims['c'] eq '3'")
	require.NoError(t, err)
	require.True(t, or.Eval(map[string]any{"a": "1", "b": "2"}))
	require.True(t, or.Eval(map[string]any{"c": "3"}))
	require.False(t, or.Eval(map[string]any{"a": "1", "c": "4"}))
}

func TestWildcard(t *testing.T) {
	tests := []struct {
		pattern, s string
		want       bool
	}{
		{"", "", true},
		{"", "a", false},
		{"*", "", true},
		{"*", "anything/at/all", true},
		{"a*", "a", true},
		{"a*b", "ab", true},
		{"a*b", "axxxb", true},
		{"a*b", "axxxbc", false},
		{"a*b*c", "abbbcbc", true},
		{"?", "é", true},
		{"??", "é", false},
		{"spiffe://td/ns/*", "spiffe://td/ns/", true},
		{"spiffe://td/ns/*", "spiffe://td/nsx", false},
		{"spiffe://td/ns/*", "spiffe://TD/ns/a", false},
		{"**a**", "bab", true},
		{"a?c", "abc", true},
		{"a?c", "ac", false},
	}
	for _, tt := range tests {
		require.Equal(t, tt.want, fic.Wildcard(tt.pattern, tt.s), "%q ~ %q", tt.pattern, tt.s)
	}
}

// wildcardRegexp is the reference meaning of Wildcard.
func wildcardRegexp(pattern string) *regexp.Regexp {
	var b strings.Builder
	b.WriteString(`^(?s:`)
	for _, r := range pattern {
		switch r {
		case '*':
			b.WriteString(`.*`)
		case '?':
			b.WriteString(`.`)
		default:
			b.WriteString(regexp.QuoteMeta(string(r)))
		}
	}
	b.WriteString(`)$`)
	return regexp.MustCompile(b.String())
}

func FuzzWildcard(f *testing.F) {
	f.Add("a*b?c", "axxbyc")
	f.Add("spiffe://td/*", "spiffe://td/x/y")
	f.Add("*?*", "")
	f.Fuzz(func(t *testing.T, pattern, s string) {
		if !utf8.ValidString(pattern) || !utf8.ValidString(s) || len(pattern) > 64 || len(s) > 256 {
			t.Skip()
		}
		want := wildcardRegexp(pattern).MatchString(s)
		if got := fic.Wildcard(pattern, s); got != want {
			t.Fatalf("Wildcard(%q, %q) = %v, want %v", pattern, s, got, want)
		}
	})
}

func FuzzParseExpression(f *testing.F) {
	f.Add("claims['sub'] matches 'spiffe://example.org/ns/*' and claims['aud'] eq 'x'")
	f.Add("claims['a'] eq 'it''s' or claims['b'] matches '*'")
	f.Add("claims['")
	f.Fuzz(func(t *testing.T, in string) {
		e, err := fic.ParseExpression(in)
		if err != nil {
			var se *fic.SyntaxError
			if !errors.As(err, &se) || se.Offset < 0 || se.Offset > len(in) {
				t.Fatalf("error %v has no valid offset", err)
			}
			return
		}
		// The canonical form parses back to the same expression.
		again, err := fic.ParseExpression(e.String())
		if err != nil {
			t.Fatalf("canonical form %q of %q does not parse: %v", e.String(), in, err)
		}
		require.Equal(t, e, again)
		_ = e.Eval(map[string]any{"sub": "x", "aud": []any{"y"}})
	})
}
