package bridge

import (
	crand "crypto/rand"
	"encoding/base64"
	"errors"
	"io"
	"log/slog"
	"math/rand/v2"
	"mime"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/ferry-id/ferry/bridge/assertion"
	"github.com/ferry-id/ferry/bridge/discovery"
	"github.com/ferry-id/ferry/bridge/fic"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

// Protocol constants.
const (
	GrantClientCredentials = "client_credentials"
	AssertionTypeJWTBearer = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
	// AssertionACR is appidacr/azpacr for assertion-authenticated clients
	// ("2": certificate or assertion).
	AssertionACR = "2"
)

func defaultLifetime() time.Duration {
	return 60*time.Minute + rand.N(30*time.Minute+time.Second)
}

// tokenRequest is a parsed token request.
type tokenRequest struct {
	v1        bool
	tenant    *ferrypb.Tenant
	clientID  string
	assertion string
	resource  string // as requested: App ID URI or app ID
}

func (b *Bridge) serveTokenV2(w http.ResponseWriter, r *http.Request) { b.serveToken(w, r, false) }
func (b *Bridge) serveTokenV1(w http.ResponseWriter, r *http.Request) { b.serveToken(w, r, true) }

func (b *Bridge) serveToken(w http.ResponseWriter, r *http.Request, v1 bool) {
	if id := r.Header.Get("client-request-id"); isUUID(id) && r.Header.Get("return-client-request-id") == "true" {
		w.Header().Set("client-request-id", id)
	}
	resp, oerr := b.exchange(r, v1)
	if oerr != nil {
		b.writeError(w, r, oerr)
		return
	}
	writeJSON(w, http.StatusOK, resp)
}

// exchange runs one token request to its response or its Entra error.
func (b *Bridge) exchange(r *http.Request, v1 bool) (any, *oauthError) {
	if r.Method != http.MethodPost {
		return nil, invalidRequest(CodeMethodNotAllowed, "The endpoint only accepts POST requests. Received a %s request.", sanitizeMethod(r.Method))
	}
	req, oerr := b.parseRequest(r, v1)
	if oerr != nil {
		return nil, oerr
	}
	res, oerr := b.resolveResource(req)
	if oerr != nil {
		return nil, oerr
	}
	ident, ok := b.dir.IdentityByClientID(req.tenant.GetId(), req.clientID)
	if !ok {
		return nil, errf(http.StatusBadRequest, "unauthorized_client", CodeUnknownClient,
			"Application with identifier '%s' was not found in the directory '%s'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You may have sent your authentication request to the wrong tenant.",
			req.clientID, req.tenant.GetId())
	}
	if oerr := b.authenticate(r, req, ident); oerr != nil {
		return nil, oerr
	}
	return b.issue(r, req, ident, res)
}

func sanitizeMethod(m string) string {
	if len(m) > 16 || strings.ContainsFunc(m, func(r rune) bool { return r < 'A' || r > 'Z' }) {
		return "non-standard"
	}
	return m
}

func (b *Bridge) parseRequest(r *http.Request, v1 bool) (*tokenRequest, *oauthError) {
	tenantID := r.PathValue("tenant")
	tenant, ok := b.dir.Tenant(tenantID)
	if !ok {
		return nil, unknownTenant(tenantID)
	}
	form, oerr := b.readForm(r)
	if oerr != nil {
		return nil, oerr
	}
	req := &tokenRequest{v1: v1, tenant: tenant}

	grant := form.Get("grant_type")
	switch {
	case grant == "":
		return nil, missingParam("grant_type")
	case grant != GrantClientCredentials:
		return nil, errf(http.StatusBadRequest, "unsupported_grant_type", CodeUnsupportedGrantType,
			"The app requested an unsupported grant type '%s'.", truncate(grant, 64))
	}
	if req.clientID = form.Get("client_id"); req.clientID == "" {
		return nil, missingParam("client_id")
	}
	if v1 {
		if req.resource = form.Get("resource"); req.resource == "" {
			return nil, missingParam("resource")
		}
	} else {
		scope, ok := form["scope"]
		if !ok || scope[0] == "" {
			return nil, missingParam("scope")
		}
		res, oerr := parseScope(scope[0])
		if oerr != nil {
			return nil, oerr
		}
		req.resource = res
	}
	if _, ok := form["client_secret"]; ok {
		return nil, invalidClient(CodeMissingClientAssertion, "Client secrets are not accepted; present a client_assertion.")
	}
	req.assertion = form.Get("client_assertion")
	if req.assertion == "" {
		return nil, invalidClient(CodeMissingClientAssertion, "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.")
	}
	switch at := form.Get("client_assertion_type"); at {
	case "":
		return nil, missingParam("client_assertion_type")
	case AssertionTypeJWTBearer:
	default:
		return nil, invalidRequest(CodeInvalidRequest, "Invalid client_assertion_type '%s'; expected '%s'.", truncate(at, 128), AssertionTypeJWTBearer)
	}
	return req, nil
}

// readForm reads an application/x-www-form-urlencoded body of bounded size.
// Query parameters are not consulted. A parameter given twice is refused.
func (b *Bridge) readForm(r *http.Request) (url.Values, *oauthError) {
	mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if err != nil || mt != "application/x-www-form-urlencoded" {
		// Entra parses nothing from such a body, so the first parameter is missing.
		return nil, missingParam("grant_type")
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, b.cfg.MaxBodyBytes+1))
	if err != nil {
		return nil, invalidRequest(CodeInvalidRequest, "The request body could not be read.")
	}
	if int64(len(body)) > b.cfg.MaxBodyBytes {
		return nil, errf(http.StatusRequestEntityTooLarge, "invalid_request", CodeInvalidRequest,
			"The request body exceeds %d bytes.", b.cfg.MaxBodyBytes)
	}
	form, err := url.ParseQuery(string(body))
	if err != nil {
		return nil, invalidRequest(CodeInvalidRequest, "The request body is not valid application/x-www-form-urlencoded data.")
	}
	for k, v := range form {
		if len(v) > 1 {
			return nil, invalidRequest(CodeInvalidRequest, "The request body contains the parameter '%s' more than once.", truncate(k, 64))
		}
	}
	return form, nil
}

// ignoredScopes are OIDC scopes MSAL appends to every request.
var ignoredScopes = map[string]bool{"openid": true, "offline_access": true, "profile": true}

// parseScope turns "<resource>/.default [openid offline_access profile]" into
// the resource identifier.
func parseScope(scope string) (string, *oauthError) {
	var rest []string
	for s := range strings.FieldsSeq(scope) {
		if !ignoredScopes[s] {
			rest = append(rest, s)
		}
	}
	switch {
	case len(rest) == 0, len(rest) == 1 && !strings.HasSuffix(rest[0], "/.default"):
		return "", errf(http.StatusBadRequest, "invalid_scope", CodeScopeNotDefault,
			"The provided value for scope %s is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI).",
			truncate(scope, 256))
	case len(rest) > 1:
		return "", errf(http.StatusBadRequest, "invalid_scope", CodeInvalidScope,
			"The provided value for the input parameter 'scope' is not valid. The scope %s is not valid. Client credential flows accept exactly one resource.", truncate(scope, 256))
	}
	res := strings.TrimSuffix(rest[0], "/.default")
	if res == "" {
		return "", errf(http.StatusBadRequest, "invalid_scope", CodeInvalidScope,
			"The provided value for the input parameter 'scope' is not valid. The scope %s is not valid.", truncate(scope, 256))
	}
	return res, nil
}

// resolveResource finds the resource a request names. An identifier that
// differs from a registered one only by a trailing slash names it too, as in
// Entra; a v1 token's aud is then the identifier as requested, slash or no
// slash (Entra's "trailing slash and .default": an API that expects
// https://database.windows.net/ in aud is asked for with that slash).
func (b *Bridge) resolveResource(req *tokenRequest) (*ferrypb.Resource, *oauthError) {
	res, ok := b.dir.ResourceByIdentifier(req.tenant.GetId(), req.resource)
	if !ok {
		other := req.resource + "/"
		if strings.HasSuffix(req.resource, "/") {
			other = strings.TrimSuffix(req.resource, "/")
		}
		if other != "" {
			res, ok = b.dir.ResourceByIdentifier(req.tenant.GetId(), other)
		}
	}
	if !ok {
		return nil, errf(http.StatusBadRequest, "invalid_resource", CodeUnknownResource,
			"The resource principal named %s was not found in the tenant named %s. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You might have sent your authentication request to the wrong tenant.",
			truncate(req.resource, 256), req.tenant.GetId())
	}
	return res, nil
}

// authenticate verifies the client assertion and matches it to a federated
// identity credential of ident.
func (b *Bridge) authenticate(r *http.Request, req *tokenRequest, ident *ferrypb.Identity) *oauthError {
	tok, err := assertion.Parse(req.assertion, b.cfg.MaxAssertionSize)
	if err != nil {
		return invalidRequest(CodeInvalidJWT, "JWT token is invalid or malformed: %s", reasonText(err))
	}
	if b.isOwnToken(r, tok) {
		return invalidClient(CodeOwnTokenForbidden,
			"Tokens issued by this token service cannot be used as federated identity credentials.")
	}
	var rules []*fic.Rule
	for _, fc := range b.dir.FederatedCredentials(ident.GetObjectId()) {
		rule, err := b.rule(fc)
		if err != nil {
			b.log.Warn("skipping invalid federated identity credential", "identity", ident.GetObjectId(), "name", fc.GetName(), "error", err)
			continue
		}
		rules = append(rules, rule)
	}
	if len(fic.ByIssuer(rules, tok.Issuer)) == 0 {
		_, err := fic.Select(rules, fic.Assertion{Issuer: tok.Issuer})
		return matchError(err)
	}

	// Keys come only from what is already trusted for this exact issuer: the
	// replicated bundle of a local issuer, or the discovery document of an
	// issuer named by one of this identity's credentials. Nothing named by the
	// token itself is ever fetched.
	now := b.cfg.Clock()
	var key assertion.Key
	if li, ok := b.dir.LocalIssuer(tok.Issuer); ok {
		k, found := b.localKey(li, tok.Kid, now)
		if !found {
			return unknownKey(tok)
		}
		key = k
	} else {
		k, err := b.issuer.Key(r.Context(), tok.Issuer, tok.Kid)
		switch {
		case errors.Is(err, discovery.ErrUnknownKey):
			return unknownKey(tok)
		case err != nil:
			b.log.Warn("issuer metadata unavailable", "issuer", tok.Issuer, "error", err)
			return invalidRequest(CodeIssuerMetadata, "Request to External OIDC endpoint failed.")
		}
		key = k
	}
	if err := tok.VerifySignature(key); err != nil {
		b.log.Debug("assertion signature rejected", "issuer", tok.Issuer, "kid", tok.Kid, "error", err)
		return invalidClient(CodeBadSignature, "Client assertion failed signature validation.")
	}
	if err := tok.CheckTime(now, b.cfg.Leeway); err != nil {
		return invalidClient(CodeAssertionTime, "Client assertion is not within its valid time range. %s", reasonText(err))
	}
	_, err = fic.Select(rules, fic.Assertion{
		Issuer:    tok.Issuer,
		Subject:   tok.Subject,
		Audiences: tok.Audiences,
		Claims:    tok.Claims,
	})
	if err != nil {
		return matchError(err)
	}
	return nil
}

func unknownKey(tok *assertion.Token) *oauthError {
	return invalidClient(CodeUnknownSigningKey,
		"The certificate with identifier '%s' used to sign the federated credential could not be found in the metadata of identity provider '%s'. Please validate that your Identity Provider's metadata exposes the key used to sign the incoming token.",
		truncate(tok.Kid, 128), truncate(tok.Issuer, 600))
}

func reasonText(err error) string {
	var ae *assertion.Error
	if errors.As(err, &ae) {
		return ae.Msg
	}
	return "invalid assertion"
}

func matchError(err error) *oauthError {
	var me *fic.MatchError
	if !errors.As(err, &me) {
		return invalidClient(CodeNoFICSubject, "No matching federated identity record found for presented assertion.")
	}
	v := truncate(me.Value, 600)
	const check = "Please check your federated identity credential Subject, Audience and Issuer against the presented assertion."
	if me.CaseOnly {
		return invalidClient(CodeCaseOnlyMismatch,
			"No matching federated identity record found for presented assertion %s '%s'. The %s matches with case-insensitive comparison, but not with case-sensitive comparison. %s",
			me.Field, v, me.Field, check)
	}
	code := map[fic.Field]int{fic.FieldIssuer: CodeNoFICIssuer, fic.FieldAudience: CodeNoFICAudience, fic.FieldSubject: CodeNoFICSubject}[me.Field]
	return invalidClient(code, "No matching federated identity record found for presented assertion %s '%s'. %s", me.Field, v, check)
}

// isOwnToken reports whether tok was issued by this token service, for any
// tenant and whatever credential names its issuer: its issuer lies under the
// bridge's base URL (the configured one, or the one this request reached;
// scheme and host compared as URLs compare them: case-insensitively, the
// default port implied), or its kid is one of the replicas' keys.
func (b *Bridge) isOwnToken(r *http.Request, tok *assertion.Token) bool {
	for _, base := range []string{b.cfg.BaseURL, b.baseURL(r)} {
		if underBase(tok.Issuer, base) {
			return true
		}
	}
	if tok.Kid == b.signingKey().KID() {
		return true
	}
	for _, k := range b.dir.SigningKeys() {
		if k.GetKid() == tok.Kid {
			return true
		}
	}
	return false
}

// underBase reports whether issuer is base (https://host[:port]) or a path
// under it.
func underBase(issuer, base string) bool {
	if base == "" {
		return false
	}
	u, err := url.Parse(issuer)
	if err != nil || u.Host == "" {
		return false
	}
	bu, err := url.Parse(base)
	if err != nil {
		return false
	}
	return strings.EqualFold(u.Scheme, bu.Scheme) && sameHost(u, bu)
}

// sameHost compares hosts case-insensitively, with https's default port.
func sameHost(a, b *url.URL) bool {
	port := func(u *url.URL) string {
		if p := u.Port(); p != "" {
			return p
		}
		return "443"
	}
	return strings.EqualFold(a.Hostname(), b.Hostname()) && port(a) == port(b)
}

// accessClaims are the claims of an Entra-style app-only access token.
type accessClaims struct {
	Aud      string   `json:"aud"`
	Iss      string   `json:"iss"`
	Iat      int64    `json:"iat"`
	Nbf      int64    `json:"nbf"`
	Exp      int64    `json:"exp"`
	AppID    string   `json:"appid,omitempty"`
	AppIDACR string   `json:"appidacr,omitempty"`
	Azp      string   `json:"azp,omitempty"`
	AzpACR   string   `json:"azpacr,omitempty"`
	Idp      string   `json:"idp"`
	Idtyp    string   `json:"idtyp"`
	Oid      string   `json:"oid"`
	Roles    []string `json:"roles,omitempty"`
	Sub      string   `json:"sub"`
	Tid      string   `json:"tid"`
	Uti      string   `json:"uti"`
	Ver      string   `json:"ver"`
	// XmsMirid is a managed identity's resource ID, as Entra writes it in
	// managed identities' tokens (a VM's or Arc machine's for its
	// system-assigned identity).
	XmsMirid string `json:"xms_mirid,omitempty"`
}

// tokenResponseV2 is the v2 success body; expiry fields are numbers.
type tokenResponseV2 struct {
	TokenType    string `json:"token_type"`
	ExpiresIn    int64  `json:"expires_in"`
	ExtExpiresIn int64  `json:"ext_expires_in"`
	AccessToken  string `json:"access_token"`
}

// tokenResponseV1 is the v1 success body; as Entra, numbers are strings.
type tokenResponseV1 struct {
	TokenType    string `json:"token_type"`
	ExpiresIn    string `json:"expires_in"`
	ExtExpiresIn string `json:"ext_expires_in"`
	ExpiresOn    string `json:"expires_on"`
	NotBefore    string `json:"not_before"`
	Resource     string `json:"resource"`
	AccessToken  string `json:"access_token"`
}

// IssuerV1 and IssuerV2 are the token issuers of a tenant under base.
func IssuerV1(base, tenantID string) string { return base + "/" + tenantID + "/" }

// IssuerV2 is the v2.0 issuer of a tenant under base.
func IssuerV2(base, tenantID string) string { return base + "/" + tenantID + "/v2.0" }

func (b *Bridge) issue(r *http.Request, req *tokenRequest, ident *ferrypb.Identity, res *ferrypb.Resource) (any, *oauthError) {
	now := b.cfg.Clock().Truncate(time.Second)
	life := b.cfg.TokenLifetime()
	exp := now.Add(life)
	// Entra back-dates iat/nbf by five minutes to absorb resource servers' clock skew.
	nbf := now.Add(-5 * time.Minute)
	base := b.baseURL(r)
	tid := req.tenant.GetId()
	c := accessClaims{
		Iat:   nbf.Unix(),
		Nbf:   nbf.Unix(),
		Exp:   exp.Unix(),
		Idtyp: "app",
		Oid:   ident.GetObjectId(),
		Sub:   ident.GetObjectId(),
		Tid:   tid,
		Uti:   newUTI(),
		Roles: roles(b.dir, res, ident),
	}
	if k := ident.GetKind(); k == "user-assigned" || k == "system-assigned" {
		c.XmsMirid = ident.GetResourceId()
	}
	if req.v1 {
		c.Aud = req.resource
		c.Iss = IssuerV1(base, tid)
		c.AppID, c.AppIDACR = ident.GetClientId(), AssertionACR
		c.Ver = "1.0"
	} else {
		c.Aud = res.GetAppId()
		c.Iss = IssuerV2(base, tid)
		c.Azp, c.AzpACR = ident.GetClientId(), AssertionACR
		c.Ver = "2.0"
	}
	c.Idp = c.Iss
	tok, err := b.signingKey().Sign(c, req.v1)
	if err != nil {
		b.log.Error("signing access token failed", "error", err)
		return nil, errf(http.StatusInternalServerError, "server_error", CodeTokenIssuance, "There was an error issuing a token.")
	}
	b.log.LogAttrs(r.Context(), slog.LevelInfo, "access token issued",
		slog.String("tenant", tid), slog.String("client_id", ident.GetClientId()), slog.String("resource", res.GetAppId()),
		slog.String("uti", c.Uti), slog.String("ver", c.Ver))
	in := int64(exp.Sub(now) / time.Second)
	if req.v1 {
		return tokenResponseV1{
			TokenType:    "Bearer",
			ExpiresIn:    strconv.FormatInt(in, 10),
			ExtExpiresIn: strconv.FormatInt(in, 10),
			ExpiresOn:    strconv.FormatInt(exp.Unix(), 10),
			NotBefore:    strconv.FormatInt(nbf.Unix(), 10),
			Resource:     req.resource,
			AccessToken:  tok,
		}, nil
	}
	return tokenResponseV2{TokenType: "Bearer", ExpiresIn: in, ExtExpiresIn: in, AccessToken: tok}, nil
}

// roles lists the values of the app roles of res assigned to ident, sorted.
func roles(dir Directory, res *ferrypb.Resource, ident *ferrypb.Identity) []string {
	as := dir.RoleAssignments(res.GetObjectId(), ident.GetObjectId())
	if len(as) == 0 {
		return nil
	}
	byID := make(map[string]string, len(res.GetAppRoles()))
	for _, ar := range res.GetAppRoles() {
		byID[ar.GetId()] = ar.GetValue()
	}
	var out []string
	for _, a := range as {
		if v, ok := byID[a.GetAppRoleId()]; ok && v != "" {
			out = append(out, v)
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

func newUTI() string {
	var u [16]byte
	_, _ = crand.Read(u[:])
	return base64.RawURLEncoding.EncodeToString(u[:])
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}
