package fic_test

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/bridge/fic"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

func valid() *ferrypb.FederatedCredential {
	return &ferrypb.FederatedCredential{
		IdentityObjectId: "11111111-1111-1111-1111-111111111111",
		Name:             "web-frontend",
		Issuer:           "https://oidc.example.org",
		Subject:          "spiffe://example.org/ns/web/sa/frontend",
		Audiences:        []string{fic.DefaultAudience},
	}
}

func TestValidate(t *testing.T) {
	require.NoError(t, fic.Validate(valid()))

	long := func(n int) string { return strings.Repeat("a", n) }
	tests := []struct {
		name   string
		mutate func(*ferrypb.FederatedCredential)
		ok     bool
	}{
		{"name 3 chars", func(f *ferrypb.FederatedCredential) { f.Name = "a-b" }, true},
		{"name 120 chars", func(f *ferrypb.FederatedCredential) { f.Name = long(120) }, true},
		{"name 2 chars", func(f *ferrypb.FederatedCredential) { f.Name = "ab" }, false},
		{"name 121 chars", func(f *ferrypb.FederatedCredential) { f.Name = long(121) }, false},
		{"name starts with dash", func(f *ferrypb.FederatedCredential) { f.Name = "-abc" }, false},
		{"name starts with underscore", func(f *ferrypb.FederatedCredential) { f.Name = "_abc" }, false},
		{"name with dot", func(f *ferrypb.FederatedCredential) { f.Name = "a.bc" }, false},
		{"name with space", func(f *ferrypb.FederatedCredential) { f.Name = "a bc" }, false},
		{"name non-ascii", func(f *ferrypb.FederatedCredential) { f.Name = "abcé" }, false},
		{"name digit first", func(f *ferrypb.FederatedCredential) { f.Name = "9_A-z" }, true},
		{"no identity", func(f *ferrypb.FederatedCredential) { f.IdentityObjectId = "" }, false},
		{"no issuer", func(f *ferrypb.FederatedCredential) { f.Issuer = "" }, false},
		{"issuer 600", func(f *ferrypb.FederatedCredential) { f.Issuer = "https://h/" + long(590) }, true},
		{"issuer 601", func(f *ferrypb.FederatedCredential) { f.Issuer = "https://h/" + long(591) }, false},
		{"issuer not url", func(f *ferrypb.FederatedCredential) { f.Issuer = "oidc.example.org" }, false},
		{"issuer http", func(f *ferrypb.FederatedCredential) { f.Issuer = "http://oidc.example.org" }, false},
		{"issuer with query", func(f *ferrypb.FederatedCredential) { f.Issuer = "https://h/?a=b" }, false},
		{"issuer whitespace", func(f *ferrypb.FederatedCredential) { f.Issuer = " https://h" }, false},
		{"issuer trailing slash", func(f *ferrypb.FederatedCredential) { f.Issuer = "https://h/tenant/" }, true},
		{"subject 600", func(f *ferrypb.FederatedCredential) { f.Subject = long(600) }, true},
		{"subject 601", func(f *ferrypb.FederatedCredential) { f.Subject = long(601) }, false},
		{"subject whitespace", func(f *ferrypb.FederatedCredential) { f.Subject = "x " }, false},
		{"neither subject nor expression", func(f *ferrypb.FederatedCredential) { f.Subject = "" }, false},
		{"both subject and expression", func(f *ferrypb.FederatedCredential) {
			f.ClaimsMatchingExpression = "claims['sub'] eq 'x'"
		}, false},
		{"expression only", func(f *ferrypb.FederatedCredential) {
			f.Subject = ""
			f.ClaimsMatchingExpression = "claims['sub'] matches 'spiffe://example.org/ns/*'"
		}, true},
		{"bad expression", func(f *ferrypb.FederatedCredential) {
			f.Subject = ""
			f.ClaimsMatchingExpression = "claims['sub'] like 'x'"
		}, false},
		{"no audience", func(f *ferrypb.FederatedCredential) { f.Audiences = nil }, false},
		{"two audiences", func(f *ferrypb.FederatedCredential) { f.Audiences = []string{"a", "b"} }, false},
		{"empty audience", func(f *ferrypb.FederatedCredential) { f.Audiences = []string{""} }, false},
		{"audience 601", func(f *ferrypb.FederatedCredential) { f.Audiences = []string{long(601)} }, false},
		{"description 601", func(f *ferrypb.FederatedCredential) { f.Description = long(601) }, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fc := valid()
			tt.mutate(fc)
			err := fic.Validate(fc)
			if tt.ok {
				require.NoError(t, err)
				return
			}
			require.ErrorIs(t, err, fic.ErrInvalid)
			require.True(t, strings.HasPrefix(err.Error(), "fic: "), err.Error())
		})
	}
}

func TestNormalizeDefaultsAudience(t *testing.T) {
	fc := valid()
	fc.Audiences = nil
	fic.Normalize(fc)
	require.Equal(t, []string{"api://AzureADTokenExchange"}, fc.Audiences)
	fc.Audiences = []string{"custom"}
	fic.Normalize(fc)
	require.Equal(t, []string{"custom"}, fc.Audiences)
}

func TestCheckCreateLimits(t *testing.T) {
	var existing []*ferrypb.FederatedCredential
	for i := range fic.MaxPerIdentity {
		fc := valid()
		fc.Name = fmt.Sprintf("cred-%02d", i)
		fc.Subject = fmt.Sprintf("spiffe://example.org/w/%d", i)
		require.NoError(t, fic.CheckCreate(existing, fc), "credential %d", i+1)
		existing = append(existing, fc)
	}
	fc := valid()
	fc.Name = "cred-21"
	fc.Subject = "spiffe://example.org/w/21"
	require.ErrorIs(t, fic.CheckCreate(existing, fc), fic.ErrTooMany)
	// One fewer and the same credential fits.
	require.NoError(t, fic.CheckCreate(existing[:19], fc))
}

func TestCheckCreateDuplicates(t *testing.T) {
	a := valid()
	existing := []*ferrypb.FederatedCredential{a}

	sameName := valid()
	sameName.Name = "WEB-frontend"
	sameName.Subject = "other"
	require.ErrorIs(t, fic.CheckCreate(existing, sameName), fic.ErrDuplicate)

	sameTrust := valid()
	sameTrust.Name = "another"
	require.ErrorIs(t, fic.CheckCreate(existing, sameTrust), fic.ErrDuplicate)

	// Subjects differing in case are different subjects.
	caseDiff := valid()
	caseDiff.Name = "another"
	caseDiff.Subject = strings.ToUpper(a.Subject)
	require.NoError(t, fic.CheckCreate(existing, caseDiff))

	otherIssuer := valid()
	otherIssuer.Name = "another"
	otherIssuer.Issuer = "https://other.example.org"
	require.NoError(t, fic.CheckCreate(existing, otherIssuer))
}

func TestCheckUpdate(t *testing.T) {
	a, b := valid(), valid()
	b.Name = "second"
	b.Subject = "spiffe://example.org/second"
	existing := []*ferrypb.FederatedCredential{a, b}

	next := valid()
	next.Subject = "spiffe://example.org/changed"
	require.NoError(t, fic.CheckUpdate(existing, next))

	// Updating to the same trust as a sibling is a duplicate.
	clash := valid()
	clash.Subject = b.Subject
	require.ErrorIs(t, fic.CheckUpdate(existing, clash), fic.ErrDuplicate)

	// Renaming is impossible: the new name does not exist.
	renamed := valid()
	renamed.Name = "renamed"
	renamed.Subject = "spiffe://example.org/renamed"
	require.ErrorIs(t, fic.CheckUpdate(existing, renamed), fic.ErrInvalid)

	moved := valid()
	moved.IdentityObjectId = "22222222-2222-2222-2222-222222222222"
	require.ErrorIs(t, fic.CheckUpdate(existing, moved), fic.ErrImmutable)
}

func rule(t *testing.T, mutate func(*ferrypb.FederatedCredential)) *fic.Rule {
	t.Helper()
	fc := valid()
	if mutate != nil {
		mutate(fc)
	}
	r, err := fic.Compile(fc)
	require.NoError(t, err)
	return r
}

func TestSelect(t *testing.T) {
	exact := rule(t, nil)
	wild := rule(t, func(f *ferrypb.FederatedCredential) {
		f.Name = "wild"
		f.Issuer = "https://other.example.org"
		f.Subject = ""
		f.ClaimsMatchingExpression = "claims['sub'] matches 'spiffe://example.org/ns/*' and claims['env'] eq 'prod'"
	})
	rules := []*fic.Rule{exact, wild}
	good := fic.Assertion{
		Issuer:    "https://oidc.example.org",
		Subject:   "spiffe://example.org/ns/web/sa/frontend",
		Audiences: []string{fic.DefaultAudience},
	}

	r, err := fic.Select(rules, good)
	require.NoError(t, err)
	require.Equal(t, "web-frontend", r.Name)

	wildOK := fic.Assertion{
		Issuer:    "https://other.example.org",
		Subject:   "spiffe://example.org/ns/a/b",
		Audiences: []string{fic.DefaultAudience},
		Claims:    map[string]any{"sub": "spiffe://example.org/ns/a/b", "env": "prod"},
	}
	r, err = fic.Select(rules, wildOK)
	require.NoError(t, err)
	require.Equal(t, "wild", r.Name)

	tests := []struct {
		name     string
		mutate   func(*fic.Assertion)
		field    fic.Field
		caseOnly bool
	}{
		{"unknown issuer", func(a *fic.Assertion) { a.Issuer = "https://evil.example.org" }, fic.FieldIssuer, false},
		{"issuer case", func(a *fic.Assertion) { a.Issuer = "https://OIDC.example.org" }, fic.FieldIssuer, true},
		{"issuer trailing slash", func(a *fic.Assertion) { a.Issuer += "/" }, fic.FieldIssuer, false},
		{"audience", func(a *fic.Assertion) { a.Audiences = []string{"api://other"} }, fic.FieldAudience, false},
		{"audience case", func(a *fic.Assertion) { a.Audiences = []string{"API://AzureADTokenExchange"} }, fic.FieldAudience, true},
		{"no audience", func(a *fic.Assertion) { a.Audiences = nil }, fic.FieldAudience, false},
		{"two audiences", func(a *fic.Assertion) { a.Audiences = append(a.Audiences, "api://other") }, fic.FieldAudience, false},
		{"subject", func(a *fic.Assertion) { a.Subject = "spiffe://example.org/ns/web/sa/backend" }, fic.FieldSubject, false},
		{"subject case", func(a *fic.Assertion) { a.Subject = "spiffe://example.org/ns/web/sa/Frontend" }, fic.FieldSubject, true},
		{"subject prefix", func(a *fic.Assertion) { a.Subject = "spiffe://example.org/ns/web/sa/frontend/x" }, fic.FieldSubject, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := good
			a.Audiences = append([]string(nil), good.Audiences...)
			tt.mutate(&a)
			_, err := fic.Select(rules, a)
			var me *fic.MatchError
			require.True(t, errors.As(err, &me), "%v", err)
			require.Equal(t, tt.field, me.Field)
			require.Equal(t, tt.caseOnly, me.CaseOnly)
		})
	}

	wildBad := wildOK
	wildBad.Claims = map[string]any{"sub": wildOK.Subject, "env": "Prod"}
	_, err = fic.Select(rules, wildBad)
	var me *fic.MatchError
	require.ErrorAs(t, err, &me)
	require.Equal(t, fic.FieldSubject, me.Field)
}
