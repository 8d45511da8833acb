package tokens

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// AssertionType is the client_assertion_type of a JWT client assertion.
const AssertionType = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

const maxResponse = 1 << 20

// ExchangerConfig configures an Exchanger.
type ExchangerConfig struct {
	// Authority is the token service's base URL, https://host[:port][/path];
	// the tenant and "/oauth2/v2.0/token" are appended.
	Authority string
	// HTTPClient is used for every call; it carries the TLS roots. Default
	// http.DefaultClient.
	HTTPClient *http.Client
	// Logger; default slog.Default().
	Logger *slog.Logger
}

// Exchanger trades a client assertion for an access token at an Entra-style
// token endpoint (client credentials grant, v2 endpoint). It is safe for
// concurrent use.
type Exchanger struct {
	base   *url.URL
	client *http.Client
	log    *slog.Logger
}

// ExchangeRequest is one client-credentials request.
type ExchangeRequest struct {
	TenantID string
	ClientID string
	// Assertion is the client assertion (a JWT-SVID).
	Assertion string
	// Resource is the audience; the scope sent is Resource + "/.default".
	Resource string
}

// NewExchanger validates c and returns an Exchanger.
func NewExchanger(c ExchangerConfig) (*Exchanger, error) {
	u, err := url.Parse(c.Authority)
	if err != nil {
		return nil, fmt.Errorf("tokens: authority: %w", err)
	}
	if u.Scheme != "https" || u.Host == "" || u.RawQuery != "" || u.Fragment != "" {
		return nil, fmt.Errorf("tokens: authority %q must be an https URL without query", c.Authority)
	}
	u.Path = strings.TrimRight(u.Path, "/")
	u.RawPath = ""
	if c.HTTPClient == nil {
		c.HTTPClient = http.DefaultClient
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return &Exchanger{base: u, client: c.HTTPClient, log: c.Logger.With("component", "tokens")}, nil
}

// Exchange posts the request and returns the token, or an *Error carrying
// the authority's answer.
func (e *Exchanger) Exchange(ctx context.Context, r ExchangeRequest) (*Token, error) {
	if r.TenantID == "" || r.ClientID == "" || r.Assertion == "" || r.Resource == "" {
		return nil, errors.New("tokens: exchange needs tenant, client ID, assertion and resource")
	}
	u := *e.base
	u.Path += "/" + url.PathEscape(r.TenantID) + "/oauth2/v2.0/token"
	scope := r.Resource
	if !strings.HasSuffix(scope, "/.default") {
		scope += "/.default"
	}
	form := url.Values{
		"grant_type":            {"client_credentials"},
		"client_id":             {r.ClientID},
		"client_assertion_type": {AssertionType},
		"client_assertion":      {r.Assertion},
		"scope":                 {scope},
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u.String(), strings.NewReader(form.Encode()))
	if err != nil {
		return nil, fmt.Errorf("tokens: %w", err)
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded; charset=utf-8")
	req.Header.Set("Accept", "application/json")
	start := time.Now()
	resp, err := e.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("tokens: token request: %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxResponse+1))
	if err != nil {
		return nil, fmt.Errorf("tokens: token response: %w", err)
	}
	if len(body) > maxResponse {
		return nil, errors.New("tokens: token response too large")
	}
	if resp.StatusCode != http.StatusOK {
		return nil, parseError(resp, body)
	}
	tok, err := parseToken(body, start)
	if err != nil {
		return nil, err
	}
	e.log.Debug("token obtained", "tenant", r.TenantID, "client_id", r.ClientID, "resource", r.Resource,
		"expires_on", tok.ExpiresOn)
	return tok, nil
}

// flexInt is an integer sent as a JSON number or a string.
type flexInt struct {
	v   int64
	set bool
}

func (f *flexInt) UnmarshalJSON(b []byte) error {
	s := string(b)
	if s == "null" {
		return nil
	}
	s = strings.Trim(s, `"`)
	v, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return fmt.Errorf("not an integer: %s", b)
	}
	f.v, f.set = v, true
	return nil
}

type tokenJSON struct {
	AccessToken  string  `json:"access_token"`
	TokenType    string  `json:"token_type"`
	ExpiresIn    flexInt `json:"expires_in"`
	ExtExpiresIn flexInt `json:"ext_expires_in"`
	ExpiresOn    flexInt `json:"expires_on"`
	NotBefore    flexInt `json:"not_before"`
	RefreshIn    flexInt `json:"refresh_in"`
}

// parseToken reads a success response; lifetimes count from sent, the time
// the request left, so clock skew and latency only shorten them.
func parseToken(body []byte, sent time.Time) (*Token, error) {
	var j tokenJSON
	if err := json.Unmarshal(body, &j); err != nil {
		return nil, fmt.Errorf("tokens: malformed token response: %w", err)
	}
	if j.AccessToken == "" {
		return nil, errors.New("tokens: token response without access_token")
	}
	if j.TokenType != "" && !strings.EqualFold(j.TokenType, "Bearer") {
		return nil, fmt.Errorf("tokens: unsupported token_type %q", j.TokenType)
	}
	t := &Token{AccessToken: j.AccessToken, Obtained: sent}
	switch {
	case j.ExpiresIn.set && j.ExpiresIn.v > 0:
		t.ExpiresOn = sent.Add(time.Duration(j.ExpiresIn.v) * time.Second)
	case j.ExpiresOn.set && j.ExpiresOn.v > 0:
		t.ExpiresOn = time.Unix(j.ExpiresOn.v, 0)
	default:
		return nil, errors.New("tokens: token response without a valid expires_in")
	}
	if !t.ExpiresOn.After(sent) {
		return nil, errors.New("tokens: token response already expired")
	}
	t.ExtExpiresOn = t.ExpiresOn
	if j.ExtExpiresIn.set && j.ExtExpiresIn.v > 0 {
		t.ExtExpiresOn = sent.Add(time.Duration(j.ExtExpiresIn.v) * time.Second)
	}
	if j.RefreshIn.set && j.RefreshIn.v > 0 {
		t.RefreshOn = sent.Add(time.Duration(j.RefreshIn.v) * time.Second)
	}
	// not_before is the token's nbf: IMDS passes it on, and v2 responses do
	// not carry it, so it is read from the token itself.
	if nbf := jwtNotBefore(j.AccessToken); !nbf.IsZero() {
		t.NotBefore = nbf
	} else if j.NotBefore.set && j.NotBefore.v > 0 {
		t.NotBefore = time.Unix(j.NotBefore.v, 0)
	}
	return t, nil
}

// Error is an error answered by the token authority.
type Error struct {
	// StatusCode is the HTTP status.
	StatusCode int
	// Code is the OAuth "error" field, e.g. "invalid_client".
	Code        string
	Description string
	// Codes are the AADSTS numbers ("error_codes").
	Codes         []int
	TraceID       string
	CorrelationID string
	// RetryAfter is the Retry-After the authority sent, if any.
	RetryAfter time.Duration
}

func (e *Error) Error() string {
	if e.Code == "" {
		return fmt.Sprintf("tokens: token authority answered %d", e.StatusCode)
	}
	if c := e.AADSTS(); c != 0 {
		return fmt.Sprintf("tokens: token authority answered %d %s (AADSTS%d)", e.StatusCode, e.Code, c)
	}
	return fmt.Sprintf("tokens: token authority answered %d %s", e.StatusCode, e.Code)
}

// AADSTS is the first AADSTS error number, or 0.
func (e *Error) AADSTS() int {
	if len(e.Codes) > 0 {
		return e.Codes[0]
	}
	// Some answers carry the number only in the description.
	if rest, ok := strings.CutPrefix(e.Description, "AADSTS"); ok {
		end := strings.IndexFunc(rest, func(r rune) bool { return r < '0' || r > '9' })
		if end < 0 {
			end = len(rest)
		}
		n, _ := strconv.Atoi(rest[:end])
		return n
	}
	return 0
}

// Upstream implements imds.UpstreamError.
func (e *Error) Upstream() (int, string, string, time.Duration) {
	return e.StatusCode, e.Code, e.Description, e.RetryAfter
}

func parseError(resp *http.Response, body []byte) error {
	e := &Error{StatusCode: resp.StatusCode, RetryAfter: retryAfter(resp.Header.Get("Retry-After"))}
	var j struct {
		Error         string `json:"error"`
		Description   string `json:"error_description"`
		Codes         []int  `json:"error_codes"`
		TraceID       string `json:"trace_id"`
		CorrelationID string `json:"correlation_id"`
	}
	if json.Unmarshal(body, &j) == nil {
		e.Code, e.Description, e.Codes = j.Error, j.Description, j.Codes
		e.TraceID, e.CorrelationID = j.TraceID, j.CorrelationID
	}
	return e
}

func retryAfter(v string) time.Duration {
	if v == "" {
		return 0
	}
	if n, err := strconv.Atoi(v); err == nil && n > 0 {
		return time.Duration(n) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil {
		return max(time.Until(t), 0)
	}
	return 0
}

// jwtNotBefore is the nbf claim of an access token in JWT form, or zero. The
// token is not verified: it came over TLS from the authority, and its nbf is
// only reported to the caller, never trusted for a decision.
func jwtNotBefore(token string) time.Time {
	var claims jwt.RegisteredClaims
	if _, _, err := jwt.NewParser().ParseUnverified(token, &claims); err != nil || claims.NotBefore == nil {
		return time.Time{}
	}
	return claims.NotBefore.Time
}
