package ca

import (
	"fmt"
	"strings"
	"unicode"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// The rules below say which SPIFFE IDs and DNS names the CA signs. The server's
// APIs check registration entries, join tokens and mint requests with the same
// functions before accepting them, and the CLI before sending them, so that
// nothing is accepted that the CA would later refuse to sign. Their errors name
// the ID but not the operation; callers add the field ("spiffe_id: ...").

// CheckMemberID reports whether id is a member of td with a non-empty path. A
// zero td skips the membership check (a client that does not know the
// server's trust domain).
func CheckMemberID(td spiffeid.TrustDomain, id spiffeid.ID) error {
	if id.IsZero() {
		return fmt.Errorf("no SPIFFE ID")
	}
	if !td.IsZero() && !id.MemberOf(td) {
		return fmt.Errorf("%q is not a member of trust domain %q", id.String(), td.Name())
	}
	if id.Path() == "" {
		return fmt.Errorf("%q has no path", id.String())
	}
	return nil
}

// CheckWorkloadID reports whether id may name a workload: a member of td (see
// CheckMemberID) whose path is outside /spire/, which holds the server's and
// the agents' own IDs.
func CheckWorkloadID(td spiffeid.TrustDomain, id spiffeid.ID) error {
	if err := CheckMemberID(td, id); err != nil {
		return err
	}
	if strings.HasPrefix(id.Path()+"/", reservedPathPrefix) {
		return fmt.Errorf("%q is not a workload ID: paths under %s are reserved for servers and agents", id.String(), reservedPathPrefix)
	}
	return nil
}

// CheckDNSNames reports whether names may be an X509-SVID's DNS SANs: at most
// 100 host names, each optionally starting with a "*." label.
func CheckDNSNames(names []string) error {
	if len(names) > maxDNSNames {
		return fmt.Errorf("%d DNS names (at most %d)", len(names), maxDNSNames)
	}
	for _, n := range names {
		if !validDNSName(n) {
			return fmt.Errorf("%q is not a DNS name (labels of letters, digits, '-' and '_', 1-63 characters, not starting or ending with '-'; optionally a leading \"*.\")", n)
		}
	}
	return nil
}

// CheckAudiences reports whether audience may be a JWT-SVID's aud: 1 to 20
// non-empty values, without control characters.
func CheckAudiences(audience []string) error {
	if len(audience) == 0 || len(audience) > maxAudiences {
		return fmt.Errorf("need 1 to %d audiences, got %d", maxAudiences, len(audience))
	}
	for _, a := range audience {
		if a == "" {
			return fmt.Errorf("empty audience")
		}
		if strings.ContainsFunc(a, unicode.IsControl) {
			return fmt.Errorf("audience %q has a control character", a)
		}
	}
	return nil
}
