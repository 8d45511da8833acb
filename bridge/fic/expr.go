package fic

import (
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"
)

// Expression language
//
// A claims-matching expression compares claims of the presented assertion with
// literals. Its grammar, in EBNF, with tokens separated by one or more ASCII spaces:
//
//	expression = conjunction { "or" conjunction } .
//	conjunction = comparison { "and" comparison } .
//	comparison = "claims[" literal "]" operator literal .
//	operator   = "eq" | "matches" .
//	literal    = "'" { character | "''" } "'" .
//
// Keywords are lower case. "and" binds tighter than "or"; there are no parentheses.
// Inside a literal a doubled quote ('') stands for one quote character.
//
// Semantics:
//   - claims['x'] names the claim x of the assertion. A claim takes part in a
//     comparison only when it is a JSON string, or an array holding exactly one
//     string (as "aud" often is). Any other claim (absent, number, boolean, object,
//     array of several values) makes the comparison false.
//   - eq is exact, case-sensitive equality of the UTF-8 strings.
//   - matches is a case-sensitive wildcard match over the whole value, counted in
//     Unicode code points: '*' matches any sequence of zero or more characters
//     (including '/'), '?' matches exactly one character, every other character
//     matches only itself. There is no escape for '*' or '?'.

// Limits on expressions, so that validation bounds the cost of every match.
const (
	MaxExpressionLength = 2048
	MaxComparisons      = 16
	MaxClaimNameLength  = 256
	MaxLiteralLength    = 600
)

// Op is a comparison operator.
type Op int

// Operators of the expression language.
const (
	OpEq Op = iota + 1
	OpMatches
)

func (o Op) String() string {
	switch o {
	case OpEq:
		return "eq"
	case OpMatches:
		return "matches"
	}
	return fmt.Sprintf("Op(%d)", int(o))
}

// Comparison is one `claims['claim'] op 'value'` term.
type Comparison struct {
	Claim string
	Op    Op
	Value string
}

// Expr is a parsed claims-matching expression: a disjunction of conjunctions.
// An Expr is immutable and safe for concurrent use.
type Expr struct {
	// Any holds the alternatives; the expression is true when every comparison
	// of at least one alternative is true.
	Any [][]Comparison
}

// SyntaxError describes where an expression failed to parse.
type SyntaxError struct {
	Offset int // byte offset into the expression
	Msg    string
}

func (e *SyntaxError) Error() string {
	return fmt.Sprintf("fic: expression: offset %d: %s", e.Offset, e.Msg)
}

// ParseExpression parses a claims-matching expression. Errors are *SyntaxError.
func ParseExpression(s string) (*Expr, error) {
	if len(s) > MaxExpressionLength {
		return nil, &SyntaxError{Offset: MaxExpressionLength, Msg: fmt.Sprintf("expression longer than %d bytes", MaxExpressionLength)}
	}
	if !utf8.ValidString(s) {
		return nil, &SyntaxError{Offset: firstInvalidUTF8(s), Msg: "invalid UTF-8"}
	}
	p := &parser{s: s}
	e, err := p.parse()
	if err != nil {
		return nil, err
	}
	return e, nil
}

func firstInvalidUTF8(s string) int {
	for i, r := range s {
		if r == utf8.RuneError {
			if _, n := utf8.DecodeRuneInString(s[i:]); n == 1 {
				return i
			}
		}
	}
	return 0
}

type parser struct {
	s     string
	pos   int
	count int
}

func (p *parser) errf(format string, args ...any) error {
	return &SyntaxError{Offset: p.pos, Msg: fmt.Sprintf(format, args...)}
}

func (p *parser) parse() (*Expr, error) {
	e := &Expr{}
	p.skipSpace()
	if p.pos == len(p.s) {
		return nil, p.errf("empty expression")
	}
	for {
		conj, err := p.conjunction()
		if err != nil {
			return nil, err
		}
		e.Any = append(e.Any, conj)
		if p.pos == len(p.s) {
			return e, nil
		}
		if !p.keyword("or") {
			p.skipSpace()
			return nil, p.errf("expected 'and', 'or' or end of expression, found %s", p.near())
		}
	}
}

func (p *parser) conjunction() ([]Comparison, error) {
	var out []Comparison
	for {
		c, err := p.comparison()
		if err != nil {
			return nil, err
		}
		out = append(out, c)
		if !p.keyword("and") {
			return out, nil
		}
	}
}

func (p *parser) comparison() (Comparison, error) {
	var c Comparison
	p.count++
	if p.count > MaxComparisons {
		return c, p.errf("more than %d comparisons", MaxComparisons)
	}
	if !strings.HasPrefix(p.s[p.pos:], "claims[") {
		return c, p.errf("expected claims['name'], found %s", p.near())
	}
	p.pos += len("claims[")
	start := p.pos
	name, err := p.literal()
	if err != nil {
		return c, err
	}
	if name == "" {
		return c, &SyntaxError{Offset: start, Msg: "empty claim name"}
	}
	if len(name) > MaxClaimNameLength {
		return c, &SyntaxError{Offset: start, Msg: fmt.Sprintf("claim name longer than %d bytes", MaxClaimNameLength)}
	}
	if p.pos >= len(p.s) || p.s[p.pos] != ']' {
		return c, p.errf("expected ']', found %s", p.near())
	}
	p.pos++
	c.Claim = name
	if !p.requireSpace() {
		return c, p.errf("expected space before operator, found %s", p.near())
	}
	switch {
	case p.word("eq"):
		c.Op = OpEq
	case p.word("matches"):
		c.Op = OpMatches
	default:
		return c, p.errf("expected operator 'eq' or 'matches', found %s", p.near())
	}
	if !p.requireSpace() {
		return c, p.errf("expected space after operator, found %s", p.near())
	}
	start = p.pos
	v, err := p.literal()
	if err != nil {
		return c, err
	}
	if len(v) > MaxLiteralLength {
		return c, &SyntaxError{Offset: start, Msg: fmt.Sprintf("literal longer than %d bytes", MaxLiteralLength)}
	}
	c.Value = v
	return c, nil
}

// literal reads a single-quoted literal at p.pos.
func (p *parser) literal() (string, error) {
	if p.pos >= len(p.s) || p.s[p.pos] != '\'' {
		return "", p.errf("expected a quoted literal, found %s", p.near())
	}
	open := p.pos
	p.pos++
	var b strings.Builder
	for p.pos < len(p.s) {
		ch := p.s[p.pos]
		if ch == '\'' {
			if p.pos+1 < len(p.s) && p.s[p.pos+1] == '\'' {
				b.WriteByte('\'')
				p.pos += 2
				continue
			}
			p.pos++
			return b.String(), nil
		}
		b.WriteByte(ch)
		p.pos++
	}
	return "", &SyntaxError{Offset: open, Msg: "unterminated literal"}
}

// keyword consumes " kw " (spaces on both sides) and reports whether it did.
func (p *parser) keyword(kw string) bool {
	save := p.pos
	if !p.requireSpace() {
		return false
	}
	if p.pos == len(p.s) {
		// Trailing spaces end the expression.
		return false
	}
	if !p.word(kw) {
		p.pos = save
		return false
	}
	if p.pos == len(p.s) {
		// A dangling keyword: the caller reports the missing operand.
		return true
	}
	if !p.requireSpace() {
		p.pos = save
		return false
	}
	return true
}

// word consumes w when it is followed by a space or the end of input.
func (p *parser) word(w string) bool {
	if !strings.HasPrefix(p.s[p.pos:], w) {
		return false
	}
	end := p.pos + len(w)
	if end < len(p.s) && p.s[end] != ' ' {
		return false
	}
	p.pos = end
	return true
}

func (p *parser) requireSpace() bool {
	start := p.pos
	p.skipSpace()
	return p.pos > start
}

func (p *parser) skipSpace() {
	for p.pos < len(p.s) && p.s[p.pos] == ' ' {
		p.pos++
	}
}

func (p *parser) near() string {
	if p.pos >= len(p.s) {
		return "end of expression"
	}
	rest := p.s[p.pos:]
	if len(rest) > 16 {
		rest = rest[:16] + "…"
	}
	return fmt.Sprintf("%q", rest)
}

// String renders e in canonical form (single spaces, quotes doubled); parsing the
// result yields an equal Expr.
func (e *Expr) String() string {
	var b strings.Builder
	for i, conj := range e.Any {
		if i > 0 {
			b.WriteString(" or ")
		}
		for j, c := range conj {
			if j > 0 {
				b.WriteString(" and ")
			}
			b.WriteString("claims[")
			b.WriteString(quote(c.Claim))
			b.WriteString("] ")
			b.WriteString(c.Op.String())
			b.WriteByte(' ')
			b.WriteString(quote(c.Value))
		}
	}
	return b.String()
}

func quote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", "''") + "'"
}

// Eval reports whether the claims satisfy e. Claims are decoded JSON values
// (string, float64 or json.Number, bool, []any, map[string]any).
func (e *Expr) Eval(claims map[string]any) bool {
	for _, conj := range e.Any {
		ok := true
		for _, c := range conj {
			if !c.Eval(claims) {
				ok = false
				break
			}
		}
		if ok {
			return true
		}
	}
	return false
}

// Eval reports whether the claims satisfy this one comparison.
func (c Comparison) Eval(claims map[string]any) bool {
	v, ok := StringClaim(claims, c.Claim)
	if !ok {
		return false
	}
	switch c.Op {
	case OpEq:
		return v == c.Value
	case OpMatches:
		return Wildcard(c.Value, v)
	}
	return false
}

// StringClaim returns the claim as a string when it is a JSON string or an
// array of exactly one string.
func StringClaim(claims map[string]any, name string) (string, bool) {
	switch v := claims[name].(type) {
	case string:
		return v, true
	case []string:
		if len(v) == 1 {
			return v[0], true
		}
	case []any:
		if len(v) == 1 {
			s, ok := v[0].(string)
			return s, ok
		}
	}
	return "", false
}

// Wildcard reports whether s matches pattern, where '*' matches any sequence of
// zero or more characters and '?' exactly one character (Unicode code points).
// Matching is case-sensitive and anchored at both ends. It runs in
// O(len(pattern)·len(s)) time at worst, with no recursion.
func Wildcard(pattern, s string) bool {
	p, t := 0, 0
	starP, starT := -1, 0
	for t < len(s) {
		if p < len(pattern) {
			pr, pn := utf8.DecodeRuneInString(pattern[p:])
			switch pr {
			case '*':
				starP, starT = p, t
				p += pn
				continue
			case '?':
				_, tn := utf8.DecodeRuneInString(s[t:])
				p += pn
				t += tn
				continue
			default:
				tr, tn := utf8.DecodeRuneInString(s[t:])
				if pr == tr && (pr != utf8.RuneError || pn == tn && pattern[p:p+pn] == s[t:t+tn]) {
					p += pn
					t += tn
					continue
				}
			}
		}
		if starP < 0 {
			return false
		}
		// Let the last '*' absorb one more character and retry.
		_, tn := utf8.DecodeRuneInString(s[starT:])
		starT += tn
		t = starT
		p = starP + 1
	}
	for p < len(pattern) && pattern[p] == '*' {
		p++
	}
	return p == len(pattern)
}

// errExpression is wrapped by Validate when the expression does not parse.
var errExpression = errors.New("invalid claims-matching expression")
