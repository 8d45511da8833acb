package fic

import (
	"fmt"
	"strings"

	"github.com/ferry-id/ferry/proto/ferrypb"
)

// Rule is a validated credential ready for matching. A Rule is immutable and
// safe for concurrent use.
type Rule struct {
	Name     string
	Issuer   string
	Subject  string // empty when Expr is set
	Audience string
	Expr     *Expr // nil when Subject is set
}

// Compile validates fc and parses its expression once.
func Compile(fc *ferrypb.FederatedCredential) (*Rule, error) {
	if err := Validate(fc); err != nil {
		return nil, err
	}
	r := &Rule{
		Name:     fc.GetName(),
		Issuer:   fc.GetIssuer(),
		Subject:  fc.GetSubject(),
		Audience: fc.GetAudiences()[0],
	}
	if x := fc.GetClaimsMatchingExpression(); x != "" {
		e, err := ParseExpression(x)
		if err != nil {
			return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
		}
		r.Expr = e
	}
	return r, nil
}

// Assertion is what matching needs from a verified assertion.
type Assertion struct {
	Issuer    string
	Subject   string
	Audiences []string
	Claims    map[string]any // all claims, for expressions
}

// Field names the assertion value that failed to match.
type Field string

// Fields reported by MatchError.
const (
	FieldIssuer   Field = "issuer"
	FieldAudience Field = "audience"
	FieldSubject  Field = "subject"
)

// MatchError says why no rule accepted an assertion.
type MatchError struct {
	Field Field
	Value string // the assertion's value for Field
	// CaseOnly is set when some rule would match with case-insensitive comparison.
	CaseOnly bool
}

func (e *MatchError) Error() string {
	msg := fmt.Sprintf("fic: no matching federated identity credential for assertion %s %q", e.Field, e.Value)
	if e.CaseOnly {
		msg += " (matches only case-insensitively)"
	}
	return msg
}

// ByIssuer returns the rules whose issuer equals iss exactly.
func ByIssuer(rules []*Rule, iss string) []*Rule {
	var out []*Rule
	for _, r := range rules {
		if r.Issuer == iss {
			out = append(out, r)
		}
	}
	return out
}

// Select returns the first rule that accepts a, checking issuer, then audience,
// then subject (or expression), each exactly and case-sensitively. An assertion
// must carry exactly one audience: a token minted for several audiences could be
// replayed to each of them. On failure the error is a *MatchError naming the
// first field no candidate rule accepted.
func Select(rules []*Rule, a Assertion) (*Rule, error) {
	cands := ByIssuer(rules, a.Issuer)
	if len(cands) == 0 {
		caseOnly := false
		for _, r := range rules {
			caseOnly = caseOnly || strings.EqualFold(r.Issuer, a.Issuer)
		}
		return nil, &MatchError{Field: FieldIssuer, Value: a.Issuer, CaseOnly: caseOnly}
	}
	aud := strings.Join(a.Audiences, " ")
	var byAud []*Rule
	caseOnly := false
	for _, r := range cands {
		if len(a.Audiences) != 1 {
			break
		}
		if r.Audience == a.Audiences[0] {
			byAud = append(byAud, r)
		} else if strings.EqualFold(r.Audience, a.Audiences[0]) {
			caseOnly = true
		}
	}
	if len(byAud) == 0 {
		return nil, &MatchError{Field: FieldAudience, Value: aud, CaseOnly: caseOnly}
	}
	caseOnly = false
	for _, r := range byAud {
		if r.Expr != nil {
			if r.Expr.Eval(a.Claims) {
				return r, nil
			}
			continue
		}
		if r.Subject == a.Subject {
			return r, nil
		}
		caseOnly = caseOnly || strings.EqualFold(r.Subject, a.Subject)
	}
	return nil, &MatchError{Field: FieldSubject, Value: a.Subject, CaseOnly: caseOnly}
}
