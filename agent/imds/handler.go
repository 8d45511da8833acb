package imds

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/ferry-id/ferry/agent/peer"
	"github.com/ferry-id/ferry/attestors/workload"
)

// TokenPath is the only path served, with or without a trailing slash, as
// IMDS and himds serve it: msal-node (and so @azure/identity) add the slash
// whenever AZURE_POD_IDENTITY_AUTHORITY_HOST points them elsewhere.
const TokenPath = "/metadata/identity/oauth2/token"

// newestAPIVersions is listed in the api-version errors, as IMDS does.
var newestAPIVersions = []string{"2020-06-01", "2019-11-01", "2018-02-01"}

// oldestAPIVersion is the first IMDS version with the identity endpoint.
const oldestAPIVersion = "2018-02-01"

// reply is an error answer in IMDS's shape.
type reply struct {
	status int
	code   string
	desc   string
	retry  time.Duration // Retry-After, for 429
	header [2]string     // one extra header (WWW-Authenticate, Allow)
	body   []byte        // preformatted body, overrides code/desc
}

func badRequest(desc string) *reply {
	return &reply{status: http.StatusBadRequest, code: "invalid_request", desc: desc}
}

var (
	errMethod = &reply{status: http.StatusMethodNotAllowed, code: "invalid_request",
		desc: "The HTTP method is not supported on the endpoint", header: [2]string{"Allow", http.MethodGet}}
	// Not 404, even for a path not served: Azure SDK clients retry a 404
	// for about 100 s ("IMDS is updating").
	errNotFound          = badRequest("The requested path is not served")
	errMetadata          = badRequest("Required metadata header not specified")
	errForwarded         = badRequest("Requests with an X-Forwarded-For or Forwarded header are not accepted")
	errQuery             = badRequest("Malformed query string")
	errResource          = badRequest("Required audience parameter not specified")
	errSelectors         = badRequest("Only one of client_id, object_id, msi_res_id, mi_res_id or principal_id may be specified")
	errIdentityNotFound  = badRequest("Identity not found")
	errAmbiguousIdentity = badRequest("Multiple user assigned identities exist, please specify the clientId / resourceId of the identity in the token request")
	errForbidden         = &reply{status: http.StatusForbidden, code: "access_denied", desc: "The caller may not use the requested identity"}
	// The closest documented shape: the IMDS error table's 403
	// access_denied. Never "unreachable" in a 403 body: azidentity would
	// take it for Docker Desktop's missing IMDS and try other credentials.
	errNotInGroup = &reply{status: http.StatusForbidden, code: "access_denied",
		desc: "The caller is not a member of a group allowed to request tokens"}
	errUnknownCaller = &reply{status: http.StatusForbidden, code: "access_denied", desc: "The caller could not be identified as a local process"}
	// A caller whose ids are not those of its socket's owner, disagree with
	// each other (a setuid or setgid program) or changed since it was
	// identified.
	errCallerIDs = &reply{status: http.StatusForbidden, code: "access_denied",
		desc: "The caller's user and group ids are not those it connected with"}
	errBadSecret = &reply{status: http.StatusUnauthorized, code: "invalid_request", desc: "Invalid or expired secret"}
	errInternal  = &reply{status: http.StatusInternalServerError, code: "unknown", desc: "Internal error"}
	errUpstream  = &reply{status: http.StatusInternalServerError, code: "unknown", desc: "Failed to retrieve token from the Active directory"}

	errAPIVersionMissing = apiVersionError("Bad request. api-version was not specified in the request. For more information refer to aka.ms/azureimds")
	errAPIVersionInvalid = apiVersionError("Bad request. api-version is invalid or was not specified in the request. For more information refer to aka.ms/azureimds")
)

func apiVersionError(msg string) *reply {
	b, _ := json.Marshal(struct {
		Error          string   `json:"error"`
		NewestVersions []string `json:"newest-versions"`
	}{msg, newestAPIVersions})
	return &reply{status: http.StatusBadRequest, code: "invalid_request", desc: msg, body: b}
}

func (s *Server) tooMany() *reply {
	return &reply{status: http.StatusTooManyRequests, code: "too_many_requests",
		desc: "Too many requests, retry later", retry: s.retryAfter}
}

// ServeHTTP answers one request. A panic below it becomes a 500.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	defer func() {
		if p := recover(); p != nil {
			if p == http.ErrAbortHandler {
				panic(p)
			}
			s.log.Error("panic serving request", "panic", fmt.Sprint(p), "stack", string(debug.Stack()))
			writeReply(w, errInternal)
		}
	}()
	tok, req, rep := s.serve(r)
	if rep != nil {
		if rep.status >= 500 {
			s.log.Warn("token request failed", "status", rep.status, "error", rep.desc)
		} else {
			s.log.Debug("token request refused", "status", rep.status, "error", rep.desc)
		}
		writeReply(w, rep)
		return
	}
	writeToken(w, tok, req)
}

func parse(r *http.Request) (Request, *reply) {
	if r.Method != http.MethodGet {
		return Request{}, errMethod
	}
	if p := r.URL.Path; p != TokenPath && p != TokenPath+"/" {
		return Request{}, errNotFound
	}
	if v := r.Header.Values("Metadata"); len(v) != 1 || v[0] != "true" {
		return Request{}, errMetadata
	}
	// A proxy on the host would relay other machines' requests as its own.
	if _, ok := r.Header["X-Forwarded-For"]; ok {
		return Request{}, errForwarded
	}
	if _, ok := r.Header["Forwarded"]; ok {
		return Request{}, errForwarded
	}
	params, rep := parseQuery(r.URL.RawQuery)
	if rep != nil {
		return Request{}, rep
	}
	var req Request
	req.APIVersion = params.get("api-version")
	if req.APIVersion == "" {
		return Request{}, errAPIVersionMissing
	}
	if !validAPIVersion(req.APIVersion) {
		return Request{}, errAPIVersionInvalid
	}
	req.Resource = strings.TrimSuffix(params.get("resource"), "/.default")
	if req.Resource == "" {
		return Request{}, errResource
	}
	if len(req.Resource) > 2048 || hasControl(req.Resource) {
		return Request{}, badRequest("Invalid resource parameter")
	}
	for _, k := range selectorKinds {
		v, ok := params.lookup(string(k))
		if !ok {
			continue
		}
		if req.Selector.Kind != SelectorNone {
			return Request{}, errSelectors
		}
		if v == "" || len(v) > 1024 || hasControl(v) {
			return Request{}, badRequest("Invalid " + string(k) + " parameter")
		}
		req.Selector = Selector{Kind: k, Value: v}
	}
	return req, nil
}

// maxParams bounds the query parameters of a request; clients send at most
// three.
const maxParams = 32

type param struct{ key, value string }

// query is a parsed query string: keys lower-cased, each at most once.
type query []param

func (q query) lookup(k string) (string, bool) {
	for _, p := range q {
		if p.key == k {
			return p.value, true
		}
	}
	return "", false
}

func (q query) get(k string) string { v, _ := q.lookup(k); return v }

// parseQuery parses raw as url.ParseQuery does (and refuses what it
// refuses: bad escapes, semicolons), but into a small slice, and rejects a
// parameter given twice, compared case-insensitively: IMDS refuses
// duplicates, and a proxy and the endpoint must not read different values.
func parseQuery(raw string) (query, *reply) {
	var buf [8]param
	q := query(buf[:0])
	for raw != "" {
		var pair string
		pair, raw, _ = strings.Cut(raw, "&")
		if strings.Contains(pair, ";") {
			return nil, errQuery
		}
		if pair == "" {
			continue
		}
		k, v, _ := strings.Cut(pair, "=")
		k, err1 := url.QueryUnescape(k)
		v, err2 := url.QueryUnescape(v)
		if err1 != nil || err2 != nil {
			return nil, errQuery
		}
		k = strings.ToLower(k)
		if _, dup := q.lookup(k); dup {
			return nil, badRequest("Duplicate query parameter: " + k)
		}
		if len(q) == maxParams {
			return nil, badRequest("Too many query parameters")
		}
		q = append(q, param{k, v})
	}
	return q, nil
}

// knownAPIVersions are the versions clients send, accepted without parsing.
var knownAPIVersions = map[string]bool{"2018-02-01": true, "2019-08-01": true, "2019-11-01": true, "2020-06-01": true}

// validAPIVersion accepts YYYY-MM-DD (optionally "-preview") from 2018-02-01
// on: VM clients send 2018-02-01, Arc clients 2019-11-01 or 2020-06-01.
func validAPIVersion(v string) bool {
	if knownAPIVersions[v] {
		return true
	}
	d := strings.TrimSuffix(v, "-preview")
	if _, err := time.Parse(time.DateOnly, d); err != nil || len(d) != len(time.DateOnly) {
		return false
	}
	return d >= oldestAPIVersion
}

func hasControl(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] == 0x7f {
			return true
		}
	}
	return false
}

func (s *Server) serve(r *http.Request) (*Token, Request, *reply) {
	req, rep := parse(r)
	if rep != nil {
		return nil, req, rep
	}
	if !s.limit.allowRate() {
		return nil, req, s.tooMany()
	}
	if tok, ok := s.fromMemory(r, req); ok {
		return tok, req, nil
	}
	ctx, cancel := context.WithTimeout(r.Context(), s.timeout)
	defer cancel()
	if !s.limit.acquire(ctx) {
		return nil, req, s.tooMany()
	}
	defer s.limit.release()

	caller, proc, err := s.caller(r)
	if err != nil {
		return nil, req, s.callerError(r, err)
	}
	ctx = withProcess(ctx, proc)

	if s.mode == ModeArc {
		auth := r.Header.Values("Authorization")
		if len(auth) == 0 {
			return nil, req, s.challenge(caller)
		}
		secret, ok := basicSecret(auth[0])
		if len(auth) != 1 || !ok {
			return nil, req, errBadSecret
		}
		if err := s.challenges.redeem(secret, caller); err != nil {
			return nil, req, errBadSecret
		}
	}

	tok, err := s.tokens.Token(ctx, caller, req)
	if err != nil {
		return nil, req, s.tokenError(err, caller)
	}
	if rep := s.check(tok, req, proc); rep != nil {
		return nil, req, rep
	}
	return tok, req, nil
}

// fromMemory answers a VM-style request on a connection whose caller is
// known from an earlier request, when the Tokens has the answer in memory.
// Arc requests always take the full path: each redeems a one-shot secret.
func (s *Server) fromMemory(r *http.Request, req Request) (*Token, bool) {
	if s.cached == nil || s.mode != ModeVM {
		return nil, false
	}
	caller, proc, ok := knownCaller(r)
	if !ok {
		return nil, false
	}
	tok, ok := s.cached.CachedToken(withProcess(r.Context(), proc), caller, req)
	if !ok || s.check(tok, req, proc) != nil {
		// The full path decides again, and reports any failure.
		return nil, false
	}
	return tok, true
}

// callerError logs why the caller of r was refused and picks the reply.
func (s *Server) callerError(r *http.Request, err error) *reply {
	switch {
	case errors.Is(err, errNotAllowed):
		s.log.Info("caller refused by allowed_groups", "remote", r.RemoteAddr, "error", err)
		return errNotInGroup
	case errors.Is(err, workload.ErrCredentialsChanged):
		s.log.Warn("caller refused: its ids are not its socket's", "remote", r.RemoteAddr, "error", err)
		return errCallerIDs
	}
	s.log.Warn("caller not identified", "remote", r.RemoteAddr, "error", err)
	return errUnknownCaller
}

// check vets a token before it is sent: the caller's process is still the
// one identified, with the same ids (not a successor that reused the PID,
// nor a process that changed its ids while the token was fetched).
func (s *Server) check(tok *Token, req Request, proc peer.Process) *reply {
	if err := s.peers.Verify(proc); err != nil {
		if errors.Is(err, workload.ErrCredentialsChanged) {
			s.log.Warn("caller changed its ids during the request", "pid", proc.PID, "error", err)
			return errCallerIDs
		}
		s.log.Warn("caller exited during the request", "pid", proc.PID, "error", err)
		return errUnknownCaller
	}
	if tok == nil || tok.AccessToken == "" || tok.ExpiresOn.IsZero() {
		s.log.Error("token source returned an empty token")
		return errInternal
	}
	if req.Selector.Kind == SelectorClientID && tok.ClientID != "" && !strings.EqualFold(tok.ClientID, req.Selector.Value) {
		s.log.Error("token source returned a token for another client ID", "requested", req.Selector.Value, "got", tok.ClientID)
		return errInternal
	}
	return nil
}

func (s *Server) challenge(c Caller) *reply {
	path, err := s.challenges.issue(c)
	if errors.Is(err, errTooManyChallenges) {
		return s.tooMany()
	}
	if err != nil {
		s.log.Error("issuing challenge", "uid", c.UID, "error", err)
		return errInternal
	}
	return &reply{status: http.StatusUnauthorized, code: "unauthorized_client",
		desc: "Read the file named in WWW-Authenticate and send its content as Basic authorization",
		// Exactly this shape, unquoted: clients split on "Basic realm=".
		header: [2]string{"WWW-Authenticate", "Basic realm=" + path}}
}

func (s *Server) tokenError(err error, c Caller) *reply {
	var up UpstreamError
	switch {
	case errors.Is(err, ErrIdentityNotFound):
		return errIdentityNotFound
	case errors.Is(err, ErrAmbiguousIdentity):
		return errAmbiguousIdentity
	case errors.Is(err, ErrForbidden):
		s.log.Info("caller refused an identity", "uid", c.UID, "pid", c.PID)
		return errForbidden
	case errors.As(err, &up):
		status, code, desc, wait := up.Upstream()
		s.log.Warn("token authority refused", "status", status, "code", code, "error", err)
		switch {
		case status == http.StatusTooManyRequests:
			rep := s.tooMany()
			if wait > 0 {
				rep.retry = min(max(wait, time.Second), 25*time.Second)
			}
			return rep
		case status >= 400 && status < 500 && code != "":
			return &reply{status: http.StatusBadRequest, code: code, desc: desc}
		}
		return errUpstream
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled):
		s.log.Warn("token request timed out", "error", err)
		return errUpstream
	}
	s.log.Error("token source failed", "error", err)
	return errInternal
}

func writeReply(w http.ResponseWriter, rep *reply) {
	h := w.Header()
	h["Content-Type"] = hdrJSON
	if rep.header[0] != "" {
		h.Set(rep.header[0], rep.header[1])
	}
	if rep.retry > 0 {
		h.Set("Retry-After", strconv.Itoa(int(rep.retry/time.Second)))
	}
	body := rep.body
	if body == nil {
		body, _ = json.Marshal(struct {
			Error       string `json:"error"`
			Description string `json:"error_description"`
		}{rep.code, rep.desc})
	}
	w.WriteHeader(rep.status)
	_, _ = w.Write(body)
}

// Header values shared by every response; net/http only reads them.
var (
	hdrJSON    = []string{"application/json; charset=utf-8"}
	hdrNoStore = []string{"no-store"}
)

// bufPool recycles response bodies.
var bufPool = sync.Pool{New: func() any { b := make([]byte, 0, 2048); return &b }}

// writeToken writes IMDS's success body: every value a JSON string, in the
// field order IMDS uses. not_before is the token's own nbf, as in Azure's
// documented response. A user-assigned selector is echoed under its own
// name, because Arc clients reject a response that does not confirm it.
func writeToken(w http.ResponseWriter, tok *Token, req Request) {
	now := time.Now()
	nbf := tok.NotBefore
	if nbf.IsZero() {
		nbf = now
	}
	ext := tok.ExtExpiresOn
	if ext.IsZero() {
		ext = tok.ExpiresOn
	}
	clientID := tok.ClientID
	if req.Selector.Kind == SelectorClientID {
		clientID = req.Selector.Value
	}
	bp := bufPool.Get().(*[]byte)
	b := append((*bp)[:0], '{')
	b = appendField(b, "access_token", tok.AccessToken)
	b = appendField(b, "client_id", clientID)
	b = appendIntField(b, "expires_in", seconds(tok.ExpiresOn.Sub(now)))
	b = appendIntField(b, "expires_on", tok.ExpiresOn.Unix())
	b = appendIntField(b, "ext_expires_in", seconds(ext.Sub(now)))
	b = appendIntField(b, "not_before", nbf.Unix())
	b = appendField(b, "resource", req.Resource)
	b = appendField(b, "token_type", "Bearer")
	b = appendField(b, "refresh_token", "")
	if k := req.Selector.Kind; k != SelectorNone && k != SelectorClientID {
		b = appendField(b, string(k), req.Selector.Value)
	}
	b = append(b, '}')

	h := w.Header()
	h["Content-Type"] = hdrJSON
	h["Cache-Control"] = hdrNoStore
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(b)
	*bp = b
	bufPool.Put(bp)
}

func appendField(b []byte, name, value string) []byte {
	if len(b) > 1 {
		b = append(b, ',')
	}
	b = append(b, '"')
	b = append(b, name...)
	b = append(b, '"', ':')
	return appendJSONString(b, value)
}

func appendIntField(b []byte, name string, v int64) []byte {
	var num [24]byte
	return appendField(b, name, string(strconv.AppendInt(num[:0], v, 10)))
}

// appendJSONString quotes s as a JSON string; invalid UTF-8 becomes U+FFFD,
// as encoding/json does.
func appendJSONString(b []byte, s string) []byte {
	const hexDigits = "0123456789abcdef"
	b = append(b, '"')
	// Access tokens, IDs and URLs need no escaping: copy the plain prefix
	// in one go.
	i := 0
	for i < len(s) && plainJSON[s[i]] {
		i++
	}
	b = append(b, s[:i]...)
	for i < len(s) {
		c := s[i]
		if c < utf8.RuneSelf {
			switch {
			case c == '"' || c == '\\':
				b = append(b, '\\', c)
			case c < 0x20 || c == '<' || c == '>' || c == '&':
				b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
			default:
				b = append(b, c)
			}
			i++
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, `\ufffd`...)
		} else {
			b = append(b, s[i:i+size]...)
		}
		i += size
	}
	return append(b, '"')
}

// plainJSON marks the bytes appendJSONString copies as they are.
var plainJSON = func() (t [256]bool) {
	for c := 0x20; c < utf8.RuneSelf; c++ {
		t[c] = c != '"' && c != '\\' && c != '<' && c != '>' && c != '&' && c != 0x7f
	}
	return t
}()

func seconds(d time.Duration) int64 { return max(int64(d/time.Second), 0) }
