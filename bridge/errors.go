package bridge

import (
	"crypto/rand"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"runtime/debug"
)

// AADSTS codes the bridge returns, with Entra's meaning.
const (
	CodeTokenIssuance        = 50000  // internal failure issuing a token
	CodeInvalidJWT           = 50027  // malformed assertion
	CodeUnsupportedGrantType = 70003  // grant_type other than client_credentials
	CodeInvalidScope         = 70011  // scope unusable
	CodeUnknownTenant        = 90002  // tenant not found
	CodeInvalidRequest       = 90023  // malformed or oversized request
	CodeUnknownClient        = 700016 // client_id not in tenant
	CodeAssertionTime        = 700024 // assertion outside its validity
	CodeBadSignature         = 700027 // assertion signature invalid
	CodeNoFICIssuer          = 700211 // no FIC for the assertion's issuer
	CodeNoFICAudience        = 700212 // no FIC for the assertion's audience
	CodeNoFICSubject         = 700213 // no FIC for the assertion's subject
	// CodeOwnTokenForbidden refuses a token this service issued, presented
	// as a client assertion. Entra's docs say its own tokens cannot be used
	// as the external token of a federated flow (workload-identity-federation,
	// note) without naming a code; the closest documented code is
	// AADSTS700229 ForbiddenTokenType ("Only app-only tokens can be used as
	// Federated Identity Credentials for Microsoft Entra issuer"), the refusal
	// of an Entra-issued token as a federated credential. It fits better than
	// 700211 (no FIC for the issuer: wrong when a FIC names our issuer) or
	// 50027 (malformed: the token is well-formed).
	CodeOwnTokenForbidden      = 700229
	CodeUnknownResource        = 500011  // resource not found in tenant
	CodeMissingParameter       = 900144  // a required parameter is missing
	CodeMethodNotAllowed       = 900561  // endpoint accepts POST only
	CodeScopeNotDefault        = 1002012 // client credentials need <resource>/.default
	CodeUnknownSigningKey      = 7000272 // kid not in the issuer's metadata
	CodeMissingClientAssertion = 7000218 // neither client_assertion nor client_secret
	CodeCaseOnlyMismatch       = 7002138 // FIC matches only case-insensitively
	CodeIssuerMetadata         = 50166   // external OIDC endpoint failed
)

// oauthError is a failed request in Entra's terms.
type oauthError struct {
	status int    // HTTP status
	kind   string // OAuth "error" value
	code   int    // AADSTS code
	msg    string // description without the AADSTS prefix and trailer
}

func (e *oauthError) Error() string {
	return fmt.Sprintf("bridge: %s: AADSTS%d: %s", e.kind, e.code, e.msg)
}

func errf(status int, kind string, code int, format string, args ...any) *oauthError {
	return &oauthError{status: status, kind: kind, code: code, msg: fmt.Sprintf(format, args...)}
}

func invalidClient(code int, format string, args ...any) *oauthError {
	return errf(http.StatusUnauthorized, "invalid_client", code, format, args...)
}

func invalidRequest(code int, format string, args ...any) *oauthError {
	return errf(http.StatusBadRequest, "invalid_request", code, format, args...)
}

func missingParam(name string) *oauthError {
	return invalidRequest(CodeMissingParameter, "The request body must contain the following parameter: '%s'.", name)
}

func unknownTenant(tenant string) *oauthError {
	return errf(http.StatusBadRequest, "invalid_tenant", CodeUnknownTenant,
		"Tenant '%s' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud.", tenant)
}

// errorBody is Entra's error response.
type errorBody struct {
	Error         string `json:"error"`
	Description   string `json:"error_description"`
	ErrorCodes    []int  `json:"error_codes"`
	Timestamp     string `json:"timestamp"`
	TraceID       string `json:"trace_id"`
	CorrelationID string `json:"correlation_id"`
	ErrorURI      string `json:"error_uri"`
}

// writeError sends e in Entra's shape.
func (b *Bridge) writeError(w http.ResponseWriter, r *http.Request, e *oauthError) {
	now := b.cfg.Clock().UTC()
	ts := now.Format("2006-01-02 15:04:05Z")
	trace := newUUID()
	corr := correlationID(r)
	body := errorBody{
		Error:         e.kind,
		Description:   fmt.Sprintf("AADSTS%d: %s Trace ID: %s Correlation ID: %s Timestamp: %s", e.code, e.msg, trace, corr, ts),
		ErrorCodes:    []int{e.code},
		Timestamp:     ts,
		TraceID:       trace,
		CorrelationID: corr,
		ErrorURI:      fmt.Sprintf("%s/error?code=%d", b.baseURL(r), e.code),
	}
	b.log.LogAttrs(r.Context(), slog.LevelInfo, "token request refused",
		slog.String("path", r.URL.Path), slog.Int("status", e.status), slog.String("error", e.kind),
		slog.Int("code", e.code), slog.String("detail", e.msg), slog.String("trace_id", trace),
		slog.String("correlation_id", corr))
	w.Header().Set("x-ms-request-id", trace)
	writeJSON(w, e.status, body)
}

// writeJSON sends v; responses are uncacheable unless the caller set
// Cache-Control.
func writeJSON(w http.ResponseWriter, status int, v any) {
	data, err := json.Marshal(v)
	if err != nil {
		status = http.StatusInternalServerError
		data = []byte(`{"error":"server_error"}`)
	}
	h := w.Header()
	h.Set("Content-Type", "application/json; charset=utf-8")
	if h.Get("Cache-Control") == "" {
		// Tokens and errors must never be cached.
		h.Set("Cache-Control", "no-store, no-cache")
		h.Set("Pragma", "no-cache")
	}
	w.WriteHeader(status)
	_, _ = w.Write(data)
}

// correlationID echoes the client's client-request-id when it is a UUID.
func correlationID(r *http.Request) string {
	if id := r.Header.Get("client-request-id"); isUUID(id) {
		return id
	}
	return newUUID()
}

func isUUID(s string) bool {
	if len(s) != 36 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch i {
		case 8, 13, 18, 23:
			if c != '-' {
				return false
			}
		default:
			if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F') {
				return false
			}
		}
	}
	return true
}

func newUUID() string {
	var u [16]byte
	_, _ = rand.Read(u[:])
	u[6] = u[6]&0x0f | 0x40
	u[8] = u[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:])
}

// statusWriter records whether a response has started.
type statusWriter struct {
	http.ResponseWriter
	wrote bool
}

func (s *statusWriter) WriteHeader(code int) {
	s.wrote = true
	s.ResponseWriter.WriteHeader(code)
}

func (s *statusWriter) Write(p []byte) (int, error) {
	s.wrote = true
	return s.ResponseWriter.Write(p)
}

// recoverer turns a panic into an Entra-style 500 (when nothing was sent yet),
// so that no panic reaches a client.
func (b *Bridge) recoverer(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		sw := &statusWriter{ResponseWriter: w}
		defer func() {
			v := recover()
			if v == nil {
				return
			}
			if v == http.ErrAbortHandler {
				panic(v)
			}
			b.log.Error("panic serving request", "path", r.URL.Path, "panic", fmt.Sprint(v), "stack", string(debug.Stack()))
			if !sw.wrote {
				b.writeError(sw, r, errf(http.StatusInternalServerError, "server_error", CodeTokenIssuance,
					"There was an error issuing a token."))
			}
		}()
		next.ServeHTTP(sw, r)
	})
}
