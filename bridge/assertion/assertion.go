// Package assertion parses and verifies client assertions: the JWTs a caller
// presents to the bridge in place of a client secret.
//
// Parsing is strict and bounded: the size is checked before anything is
// decoded, base64url must be canonical, the header may not point at keys
// (jku, x5u, x5c, jwk) or demand extensions (crit), and alg must be one of
// RS/ES/PS 256/384/512. Verification never fetches anything: the caller
// resolves the key by (iss, kid) among keys it already trusts for that issuer
// and hands it to VerifySignature. One-time use of jti is deliberately not
// enforced: unmodified Azure clients resend the same assertion.
package assertion

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strings"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/ferry-id/ferry/internal/jwtform"
)

// DefaultMaxSize bounds the compact serialization of an assertion.
const DefaultMaxSize = 16 << 10

// DefaultLeeway is the clock skew tolerated on exp, nbf and iat.
const DefaultLeeway = 60 * time.Second

// MinRSABits is the smallest RSA key accepted for verification.
const MinRSABits = 2048

// Reason classifies why an assertion was refused.
type Reason int

// Reasons for refusing an assertion.
const (
	// Malformed: not a well-formed JWS/JWT, a forbidden header, or a missing claim.
	Malformed Reason = iota + 1
	// BadSignature: the signature does not verify, or alg and key disagree.
	BadSignature
	// UnknownKey: no trusted key of the issuer has the token's kid.
	UnknownKey
	// TimeRange: expired, not yet valid, or issued in the future.
	TimeRange
	// KeysUnavailable: the issuer's keys could not be obtained.
	KeysUnavailable
)

func (r Reason) String() string {
	switch r {
	case Malformed:
		return "malformed"
	case BadSignature:
		return "bad signature"
	case UnknownKey:
		return "unknown key"
	case TimeRange:
		return "time range"
	case KeysUnavailable:
		return "keys unavailable"
	}
	return fmt.Sprintf("Reason(%d)", int(r))
}

// Error is a refused assertion.
type Error struct {
	Reason Reason
	Msg    string
	Err    error // underlying cause, if any
}

func (e *Error) Error() string {
	if e.Err != nil {
		return fmt.Sprintf("assertion: %s: %s: %v", e.Reason, e.Msg, e.Err)
	}
	return fmt.Sprintf("assertion: %s: %s", e.Reason, e.Msg)
}

func (e *Error) Unwrap() error { return e.Err }

// Errorf returns an *Error of the given reason.
func Errorf(r Reason, format string, args ...any) *Error {
	return &Error{Reason: r, Msg: fmt.Sprintf(format, args...)}
}

// ReasonOf returns the Reason of err, or 0 when err is not an *Error.
func ReasonOf(err error) Reason {
	var e *Error
	if errors.As(err, &e) {
		return e.Reason
	}
	return 0
}

var methods = map[string]jwt.SigningMethod{
	"RS256": jwt.SigningMethodRS256, "RS384": jwt.SigningMethodRS384, "RS512": jwt.SigningMethodRS512,
	"ES256": jwt.SigningMethodES256, "ES384": jwt.SigningMethodES384, "ES512": jwt.SigningMethodES512,
	"PS256": jwt.SigningMethodPS256, "PS384": jwt.SigningMethodPS384, "PS512": jwt.SigningMethodPS512,
}

// AllowedAlg reports whether alg is on the allowlist (RS/ES/PS 256/384/512).
func AllowedAlg(alg string) bool {
	_, ok := methods[alg]
	return ok
}

// Key is a trusted verification key. Alg, when set (from a JWK's "alg"),
// restricts the key to that algorithm.
type Key struct {
	Public crypto.PublicKey
	Alg    string
}

// Token is a parsed, not yet verified, assertion.
type Token struct {
	Raw string

	Alg string
	Kid string
	Typ string

	Issuer    string
	Subject   string
	Audiences []string
	ID        string    // jti, informational only
	Expiry    time.Time // required
	NotBefore time.Time // zero when absent
	IssuedAt  time.Time // zero when absent

	// Claims holds every claim, decoded with json.Number for numbers.
	Claims map[string]any

	signingInput string
	signature    []byte
}

var strictB64 = base64.RawURLEncoding.Strict()

type rawHeader struct {
	Alg  *string         `json:"alg"`
	Kid  *string         `json:"kid"`
	Typ  *string         `json:"typ"`
	Jku  json.RawMessage `json:"jku"`
	X5u  json.RawMessage `json:"x5u"`
	X5c  json.RawMessage `json:"x5c"`
	Jwk  json.RawMessage `json:"jwk"`
	Crit json.RawMessage `json:"crit"`
}

// Parse decodes raw without verifying it. maxSize <= 0 means DefaultMaxSize.
// Errors are *Error with Reason Malformed.
func Parse(raw string, maxSize int) (*Token, error) {
	if maxSize <= 0 {
		maxSize = DefaultMaxSize
	}
	if len(raw) > maxSize {
		return nil, Errorf(Malformed, "assertion is %d bytes, limit %d", len(raw), maxSize)
	}
	if raw == "" {
		return nil, Errorf(Malformed, "empty assertion")
	}
	if strings.Count(raw, ".") != 2 {
		return nil, Errorf(Malformed, "JWT must have three dot-separated parts")
	}
	h64, rest, _ := strings.Cut(raw, ".")
	b64, s64, _ := strings.Cut(rest, ".")

	hdrJSON, err := strictB64.DecodeString(h64)
	if err != nil {
		return nil, &Error{Reason: Malformed, Msg: "header is not base64url", Err: err}
	}
	var hdr rawHeader
	if err := unmarshalObject(hdrJSON, &hdr); err != nil {
		return nil, &Error{Reason: Malformed, Msg: "header is not a JSON object", Err: err}
	}
	switch {
	case hdr.Jku != nil, hdr.X5u != nil, hdr.X5c != nil, hdr.Jwk != nil:
		return nil, Errorf(Malformed, "header may not carry jku, x5u, x5c or jwk")
	case hdr.Crit != nil:
		return nil, Errorf(Malformed, "header may not carry crit")
	case hdr.Alg == nil:
		return nil, Errorf(Malformed, "header has no alg")
	case hdr.Kid == nil || *hdr.Kid == "":
		return nil, Errorf(Malformed, "header has no kid")
	}
	if !AllowedAlg(*hdr.Alg) {
		return nil, Errorf(Malformed, "alg %q is not allowed", truncate(*hdr.Alg))
	}
	t := &Token{Raw: raw, Alg: *hdr.Alg, Kid: *hdr.Kid}
	if hdr.Typ != nil {
		t.Typ = *hdr.Typ
		// Explicit typing (RFC 8725 §3.11): only plain JWTs are client assertions.
		if !strings.EqualFold(t.Typ, "JWT") && !strings.EqualFold(t.Typ, "JOSE") {
			return nil, Errorf(Malformed, "typ %q is not a JWT", truncate(t.Typ))
		}
	}

	body, err := strictB64.DecodeString(b64)
	if err != nil {
		return nil, &Error{Reason: Malformed, Msg: "payload is not base64url", Err: err}
	}
	if err := unmarshalObject(body, &t.Claims); err != nil {
		return nil, &Error{Reason: Malformed, Msg: "payload is not a JSON object", Err: err}
	}
	if err := t.readClaims(); err != nil {
		return nil, err
	}
	t.signature, err = strictB64.DecodeString(s64)
	if err != nil {
		return nil, &Error{Reason: Malformed, Msg: "signature is not base64url", Err: err}
	}
	if len(t.signature) == 0 {
		return nil, Errorf(Malformed, "empty signature")
	}
	t.signingInput = raw[:len(h64)+1+len(b64)]
	return t, nil
}

func unmarshalObject(data []byte, v any) error {
	// A repeated member would be read as its last value here and maybe as
	// its first elsewhere.
	if err := jwtform.UniqueMembers(data); err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if len(bytes.TrimSpace(data[dec.InputOffset():])) != 0 {
		return errors.New("trailing data after JSON object")
	}
	return nil
}

func (t *Token) readClaims() error {
	if t.Claims == nil {
		return Errorf(Malformed, "payload is null")
	}
	var err error
	str := func(name string, required bool) string {
		v, ok := t.Claims[name]
		if !ok {
			if required && err == nil {
				err = Errorf(Malformed, "claim %q is required", name)
			}
			return ""
		}
		s, ok := v.(string)
		if (!ok || s == "") && err == nil {
			err = Errorf(Malformed, "claim %q must be a non-empty string", name)
		}
		return s
	}
	t.Issuer = str("iss", true)
	t.Subject = str("sub", true)
	if _, ok := t.Claims["jti"]; ok {
		t.ID = str("jti", false)
	}
	if err != nil {
		return err
	}
	switch aud := t.Claims["aud"].(type) {
	case string:
		t.Audiences = []string{aud}
	case []any:
		for _, a := range aud {
			s, ok := a.(string)
			if !ok {
				return Errorf(Malformed, `claim "aud" must be a string or an array of strings`)
			}
			t.Audiences = append(t.Audiences, s)
		}
	case nil:
		return Errorf(Malformed, `claim "aud" is required`)
	default:
		return Errorf(Malformed, `claim "aud" must be a string or an array of strings`)
	}
	if t.Expiry, err = numericDate(t.Claims, "exp"); err != nil {
		return err
	}
	if t.Expiry.IsZero() {
		return Errorf(Malformed, `claim "exp" is required`)
	}
	if t.NotBefore, err = numericDate(t.Claims, "nbf"); err != nil {
		return err
	}
	if t.IssuedAt, err = numericDate(t.Claims, "iat"); err != nil {
		return err
	}
	return nil
}

// numericDate reads a NumericDate claim (seconds since the epoch, possibly
// fractional). Absent yields the zero time.
func numericDate(claims map[string]any, name string) (time.Time, error) {
	v, ok := claims[name]
	if !ok {
		return time.Time{}, nil
	}
	n, ok := v.(json.Number)
	if !ok {
		return time.Time{}, Errorf(Malformed, "claim %q must be a number", name)
	}
	f, err := n.Float64()
	// Bound to years 1970..9999 so that time arithmetic cannot overflow.
	if err != nil || math.IsNaN(f) || f <= 0 || f > 253402300799 {
		return time.Time{}, Errorf(Malformed, "claim %q is not a valid NumericDate", name)
	}
	sec, frac := math.Modf(f)
	return time.Unix(int64(sec), int64(frac*1e9)).UTC(), nil
}

func truncate(s string) string {
	if len(s) > 32 {
		return s[:32] + "…"
	}
	return s
}

// VerifySignature checks the signature with k, which must suit the token's alg:
// RSA of at least MinRSABits for RS*/PS*, the matching curve for ES*.
func (t *Token) VerifySignature(k Key) error {
	if k.Alg != "" && k.Alg != t.Alg {
		return Errorf(BadSignature, "key %q is for %s, token uses %s", truncate(t.Kid), truncate(k.Alg), t.Alg)
	}
	m := methods[t.Alg]
	switch pub := k.Public.(type) {
	case *rsa.PublicKey:
		if t.Alg[0] == 'E' {
			return Errorf(BadSignature, "%s needs an EC key", t.Alg)
		}
		if pub.N.BitLen() < MinRSABits {
			return Errorf(BadSignature, "RSA key of %d bits is too small", pub.N.BitLen())
		}
	case *ecdsa.PublicKey:
		want := map[string]elliptic.Curve{"ES256": elliptic.P256(), "ES384": elliptic.P384(), "ES512": elliptic.P521()}[t.Alg]
		if want == nil || pub.Curve != want {
			return Errorf(BadSignature, "%s does not match the key's curve", t.Alg)
		}
	default:
		return Errorf(BadSignature, "unsupported key type %T", k.Public)
	}
	if err := m.Verify(t.signingInput, t.signature, k.Public); err != nil {
		return &Error{Reason: BadSignature, Msg: "signature verification failed", Err: err}
	}
	return nil
}

// CheckTime checks exp, nbf and iat against now with leeway.
func (t *Token) CheckTime(now time.Time, leeway time.Duration) error {
	valid := func() string {
		from := t.NotBefore
		if from.IsZero() {
			from = time.Unix(0, 0).UTC()
		}
		return fmt.Sprintf("Current time: %s, assertion valid from %s, expiry time of assertion %s.",
			stamp(now), stamp(from), stamp(t.Expiry))
	}
	switch {
	case !now.Before(t.Expiry.Add(leeway)):
		return Errorf(TimeRange, "%s", valid())
	case !t.NotBefore.IsZero() && now.Add(leeway).Before(t.NotBefore):
		return Errorf(TimeRange, "%s", valid())
	case !t.IssuedAt.IsZero() && now.Add(leeway).Before(t.IssuedAt):
		return Errorf(TimeRange, "%s (issued in the future)", valid())
	}
	return nil
}

func stamp(t time.Time) string {
	return t.UTC().Format("2006-01-02T15:04:05.0000000Z")
}
