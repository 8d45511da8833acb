// Package fic holds the rules of federated identity credentials (FICs): which
// credentials may be stored on an identity, and which presented assertions a
// credential accepts.
//
// The server calls Validate and CheckCreate/CheckUpdate before it writes a
// credential; the bridge calls Compile and (*Rule).Match when it exchanges an
// assertion. Matching is exact and case-sensitive on issuer, subject and
// audience, as in Entra; a credential may carry a claims-matching expression
// (see ParseExpression) instead of a subject.
package fic

import (
	"errors"
	"fmt"
	"net/url"
	"strings"

	"github.com/ferry-id/ferry/proto/ferrypb"
)

// Limits of a federated identity credential.
const (
	// DefaultAudience is the audience a credential gets when none is given.
	DefaultAudience = "api://AzureADTokenExchange"

	MinNameLength     = 3
	MaxNameLength     = 120
	MaxIssuerLength   = 600
	MaxSubjectLength  = 600
	MaxAudienceLength = 600
	MaxDescription    = 600
	// MaxPerIdentity is how many credentials one identity may hold.
	MaxPerIdentity = 20
)

// Sentinel errors; Validate and the Check functions wrap them.
var (
	ErrInvalid   = errors.New("fic: invalid federated identity credential")
	ErrTooMany   = errors.New("fic: identity already holds the maximum number of federated identity credentials")
	ErrDuplicate = errors.New("fic: federated identity credential already exists")
	ErrImmutable = errors.New("fic: field is immutable")
)

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, args...))
}

// Normalize fills defaults in place: an empty audience list becomes
// [DefaultAudience]. Call it before Validate when accepting operator input.
func Normalize(fc *ferrypb.FederatedCredential) {
	if len(fc.GetAudiences()) == 0 {
		fc.Audiences = []string{DefaultAudience}
	}
}

// ValidName reports whether name is a valid credential name: 3–120 characters
// from [A-Za-z0-9_-], the first alphanumeric.
func ValidName(name string) bool {
	if len(name) < MinNameLength || len(name) > MaxNameLength {
		return false
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		alnum := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
		if i == 0 && !alnum {
			return false
		}
		if !alnum && c != '-' && c != '_' {
			return false
		}
	}
	return true
}

// Validate checks one credential on its own (not against its siblings). It does
// not fill defaults: a credential without exactly one audience is refused.
func Validate(fc *ferrypb.FederatedCredential) error {
	if fc == nil {
		return invalid("missing credential")
	}
	if fc.GetIdentityObjectId() == "" {
		return invalid("identity object ID is required")
	}
	return ValidateContent(fc)
}

// ValidateContent is Validate without the identity the credential belongs to:
// what an operator writes, checked (by the CLI) before the server sees it.
func ValidateContent(fc *ferrypb.FederatedCredential) error {
	if fc == nil {
		return invalid("missing credential")
	}
	if !ValidName(fc.GetName()) {
		return invalid("name must be %d-%d characters of A-Z, a-z, 0-9, '-' and '_', starting with a letter or digit", MinNameLength, MaxNameLength)
	}
	if err := validateIssuer(fc.GetIssuer()); err != nil {
		return err
	}
	sub, expr := fc.GetSubject(), fc.GetClaimsMatchingExpression()
	switch {
	case sub != "" && expr != "":
		return invalid("subject and claims-matching expression are mutually exclusive")
	case sub == "" && expr == "":
		return invalid("either subject or claims-matching expression is required")
	case len(sub) > MaxSubjectLength:
		return invalid("subject longer than %d characters", MaxSubjectLength)
	case sub != "" && sub != strings.TrimSpace(sub):
		return invalid("subject has leading or trailing whitespace")
	}
	if expr != "" {
		if _, err := ParseExpression(expr); err != nil {
			return fmt.Errorf("%w: %w: %w", ErrInvalid, errExpression, err)
		}
	}
	if n := len(fc.GetAudiences()); n != 1 {
		return invalid("federated identity credentials must have exactly one audience, got %d", n)
	}
	aud := fc.GetAudiences()[0]
	if aud == "" || len(aud) > MaxAudienceLength {
		return invalid("audience must be 1-%d characters", MaxAudienceLength)
	}
	if len(fc.GetDescription()) > MaxDescription {
		return invalid("description longer than %d characters", MaxDescription)
	}
	return nil
}

func validateIssuer(iss string) error {
	if iss == "" {
		return invalid("issuer is required")
	}
	if len(iss) > MaxIssuerLength {
		return invalid("issuer longer than %d characters", MaxIssuerLength)
	}
	if iss != strings.TrimSpace(iss) {
		return invalid("issuer has leading or trailing whitespace")
	}
	u, err := url.Parse(iss)
	if err != nil {
		return invalid("issuer is not a URL: %v", err)
	}
	if u.Scheme != "https" || u.Host == "" || u.User != nil || u.RawQuery != "" || u.Fragment != "" {
		return invalid("issuer must be an https URL with a host and no user info, query or fragment")
	}
	return nil
}

// CheckCreate validates fc and checks it against the credentials the identity
// already holds: at most MaxPerIdentity, names unique (case-insensitively, as
// Graph treats names as keys), and issuer+subject (or issuer+expression) unique.
func CheckCreate(existing []*ferrypb.FederatedCredential, fc *ferrypb.FederatedCredential) error {
	if err := Validate(fc); err != nil {
		return err
	}
	if len(existing) >= MaxPerIdentity {
		return fmt.Errorf("%w (%d)", ErrTooMany, MaxPerIdentity)
	}
	for _, o := range existing {
		if strings.EqualFold(o.GetName(), fc.GetName()) {
			return fmt.Errorf("%w: name %q", ErrDuplicate, fc.GetName())
		}
		if sameTrust(o, fc) {
			return fmt.Errorf("%w: issuer and subject combination already exists on credential %q", ErrDuplicate, o.GetName())
		}
	}
	return nil
}

// CheckUpdate validates next as the new version of the credential named
// next.Name among existing (which includes the old version). Name and identity
// are immutable; a credential of that name must exist.
func CheckUpdate(existing []*ferrypb.FederatedCredential, next *ferrypb.FederatedCredential) error {
	if err := Validate(next); err != nil {
		return err
	}
	var found bool
	for _, o := range existing {
		if o.GetName() == next.GetName() {
			found = true
			if o.GetIdentityObjectId() != next.GetIdentityObjectId() {
				return fmt.Errorf("%w: identity object ID", ErrImmutable)
			}
			continue
		}
		if sameTrust(o, next) {
			return fmt.Errorf("%w: issuer and subject combination already exists on credential %q", ErrDuplicate, o.GetName())
		}
	}
	if !found {
		return fmt.Errorf("%w: no credential named %q (names are immutable)", ErrInvalid, next.GetName())
	}
	return nil
}

func sameTrust(a, b *ferrypb.FederatedCredential) bool {
	return a.GetIssuer() == b.GetIssuer() &&
		a.GetSubject() == b.GetSubject() &&
		a.GetClaimsMatchingExpression() == b.GetClaimsMatchingExpression()
}
