package imds_test

import (
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ferry-id/ferry/agent/imds"
	"github.com/ferry-id/ferry/agent/peer"
	"github.com/ferry-id/ferry/attestors/workload"
	"github.com/stretchr/testify/require"
)

const (
	bodyMetadata   = `{"error":"invalid_request","error_description":"Required metadata header not specified"}`
	bodyNotFound   = `{"error":"invalid_request","error_description":"Identity not found"}`
	bodyAmbiguous  = `{"error":"invalid_request","error_description":"Multiple user assigned identities exist, please specify the clientId / resourceId of the identity in the token request"}`
	bodyNoVersion  = `{"error":"Bad request. api-version was not specified in the request. For more information refer to aka.ms/azureimds","newest-versions":["2020-06-01","2019-11-01","2018-02-01"]}`
	bodyBadVersion = `{"error":"Bad request. api-version is invalid or was not specified in the request. For more information refer to aka.ms/azureimds","newest-versions":["2020-06-01","2019-11-01","2018-02-01"]}`
	bodyNoResource = `{"error":"invalid_request","error_description":"Required audience parameter not specified"}`
	bodyInternal   = `{"error":"unknown","error_description":"Internal error"}`
	bodyUpstream   = `{"error":"unknown","error_description":"Failed to retrieve token from the Active directory"}`
	bodyUnknown    = `{"error":"access_denied","error_description":"The caller could not be identified as a local process"}`
	bodyIDs        = `{"error":"access_denied","error_description":"The caller's user and group ids are not those it connected with"}`
	bodyForwarded  = `{"error":"invalid_request","error_description":"Requests with an X-Forwarded-For or Forwarded header are not accepted"}`
	bodyTooMany    = `{"error":"too_many_requests","error_description":"Too many requests, retry later"}`
)

func manyParams(n int) string {
	var b strings.Builder
	for i := range n {
		fmt.Fprintf(&b, "&p%d=v", i)
	}
	return b.String()
}

func TestRequestErrors(t *testing.T) {
	toks := newFakeTokens()
	_, base := startServer(t, imds.Config{Mode: imds.ModeVM, Tokens: toks})
	md := []string{"Metadata", "true"}
	for _, tc := range []struct {
		name    string
		method  string
		url     string
		headers []string
		status  int
		body    string
	}{
		{"probe: no header, no query", "GET", base + imds.TokenPath, nil, 400, bodyMetadata},
		{"no metadata header", "GET", tokenURL(base, mgmt), nil, 400, bodyMetadata},
		{"metadata false", "GET", tokenURL(base, mgmt), []string{"Metadata", "false"}, 400, bodyMetadata},
		{"metadata upper case", "GET", tokenURL(base, mgmt), []string{"Metadata", "True"}, 400, bodyMetadata},
		{"metadata twice", "GET", tokenURL(base, mgmt), []string{"Metadata", "true", "Metadata", "true"}, 400, bodyMetadata},
		{"x-forwarded-for", "GET", tokenURL(base, mgmt), append(md, "X-Forwarded-For", "10.0.0.1"), 400,
			bodyForwarded},
		{"forwarded", "GET", tokenURL(base, mgmt), append(md, "Forwarded", "for=10.0.0.1"), 400, bodyForwarded},
		{"empty x-forwarded-for", "GET", tokenURL(base, mgmt), append(md, "X-Forwarded-For", ""), 400,
			bodyForwarded},
		{"duplicate resource", "GET", tokenURL(base, mgmt+"&resource=https%3A%2F%2Fvault.azure.net"), md, 400,
			`{"error":"invalid_request","error_description":"Duplicate query parameter: resource"}`},
		{"duplicate differing in case", "GET", tokenURL(base, mgmt+"&Resource=x"), md, 400,
			`{"error":"invalid_request","error_description":"Duplicate query parameter: resource"}`},
		{"duplicate api-version", "GET", tokenURL(base, mgmt+"&api-version=2018-02-01"), md, 400,
			`{"error":"invalid_request","error_description":"Duplicate query parameter: api-version"}`},
		{"malformed query", "GET", tokenURL(base, mgmt+"&x=%zz"), md, 400,
			`{"error":"invalid_request","error_description":"Malformed query string"}`},
		{"no api-version", "GET", tokenURL(base, "resource=https%3A%2F%2Fmanagement.azure.com"), md, 400, bodyNoVersion},
		{"empty api-version", "GET", tokenURL(base, "api-version=&resource=r"), md, 400, bodyNoVersion},
		{"old api-version", "GET", tokenURL(base, "api-version=2017-09-01&resource=r"), md, 400, bodyBadVersion},
		{"garbage api-version", "GET", tokenURL(base, "api-version=latest&resource=r"), md, 400, bodyBadVersion},
		{"no resource", "GET", tokenURL(base, "api-version=2018-02-01"), md, 400, bodyNoResource},
		{"only /.default", "GET", tokenURL(base, "api-version=2018-02-01&resource=%2F.default"), md, 400, bodyNoResource},
		{"control character in resource", "GET", tokenURL(base, "api-version=2018-02-01&resource=a%0Ab"), md, 400,
			`{"error":"invalid_request","error_description":"Invalid resource parameter"}`},
		{"two selectors", "GET", tokenURL(base, mgmt+"&client_id=a&object_id=b"), md, 400,
			`{"error":"invalid_request","error_description":"Only one of client_id, object_id, msi_res_id, mi_res_id or principal_id may be specified"}`},
		{"empty selector", "GET", tokenURL(base, mgmt+"&msi_res_id="), md, 400,
			`{"error":"invalid_request","error_description":"Invalid msi_res_id parameter"}`},
		{"POST", "POST", tokenURL(base, mgmt), md, 405,
			`{"error":"invalid_request","error_description":"The HTTP method is not supported on the endpoint"}`},
		{"DELETE", "DELETE", tokenURL(base, mgmt), md, 405,
			`{"error":"invalid_request","error_description":"The HTTP method is not supported on the endpoint"}`},
		// Never 404: Azure SDK clients retry it for about 100 s.
		{"other path", "GET", base + "/metadata/instance?api-version=2021-02-01", md, 400,
			`{"error":"invalid_request","error_description":"The requested path is not served"}`},
		{"semicolon in query", "GET", tokenURL(base, mgmt+";x=1"), md, 400,
			`{"error":"invalid_request","error_description":"Malformed query string"}`},
		{"duplicate escaped key", "GET", tokenURL(base, mgmt+"&%72esource=x"), md, 400,
			`{"error":"invalid_request","error_description":"Duplicate query parameter: resource"}`},
		{"duplicate unknown parameter", "GET", tokenURL(base, mgmt+"&foo=1&FOO=2"), md, 400,
			`{"error":"invalid_request","error_description":"Duplicate query parameter: foo"}`},
		{"too many parameters", "GET", tokenURL(base, mgmt+manyParams(40)), md, 400,
			`{"error":"invalid_request","error_description":"Too many query parameters"}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := do(t, tc.method, tc.url, tc.headers...)
			require.Equal(t, tc.status, r.Status)
			require.Equal(t, tc.body, r.Body)
			require.Equal(t, "application/json; charset=utf-8", r.Header.Get("Content-Type"))
			if tc.status == 405 {
				require.Equal(t, "GET", r.Header.Get("Allow"))
			}
		})
	}
	require.Empty(t, toks.Calls(), "no invalid request may reach Tokens")
}

func TestTokenErrors(t *testing.T) {
	toks := newFakeTokens()
	_, base := startServer(t, imds.Config{Mode: imds.ModeVM, Tokens: toks})
	md := []string{"Metadata", "true"}
	for _, tc := range []struct {
		name   string
		set    func(f *fakeTokens)
		status int
		body   string
		retry  string
	}{
		{"identity not found", func(f *fakeTokens) { f.err = fmt.Errorf("tokens: no entry: %w", imds.ErrIdentityNotFound) }, 400, bodyNotFound, ""},
		{"several identities", func(f *fakeTokens) { f.err = imds.ErrAmbiguousIdentity }, 400, bodyAmbiguous, ""},
		{"forbidden", func(f *fakeTokens) { f.err = fmt.Errorf("x: %w", imds.ErrForbidden) }, 403,
			`{"error":"access_denied","error_description":"The caller may not use the requested identity"}`, ""},
		{"authority refuses", func(f *fakeTokens) {
			f.err = fmt.Errorf("wrapped: %w", &upstreamErr{401, "invalid_client", "AADSTS700213: No matching federated identity record found.", 0})
		}, 400, `{"error":"invalid_client","error_description":"AADSTS700213: No matching federated identity record found."}`, ""},
		{"authority throttles", func(f *fakeTokens) { f.err = &upstreamErr{429, "throttled", "", 90 * time.Second} }, 429, bodyTooMany, "25"},
		{"authority throttles briefly", func(f *fakeTokens) { f.err = &upstreamErr{429, "", "", 3 * time.Second} }, 429, bodyTooMany, "3"},
		{"authority down", func(f *fakeTokens) { f.err = &upstreamErr{503, "", "", 0} }, 500, bodyUpstream, ""},
		{"other failure", func(f *fakeTokens) { f.err = errBoom }, 500, bodyInternal, ""},
		{"panic", func(f *fakeTokens) { f.panic = true }, 500, bodyInternal, ""},
		{"empty token", func(f *fakeTokens) { f.tok.AccessToken = "" }, 500, bodyInternal, ""},
		{"no expiry", func(f *fakeTokens) { f.tok.ExpiresOn = time.Time{} }, 500, bodyInternal, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			toks.reset()
			toks.set(tc.set)
			r := get(t, tokenURL(base, mgmt), md...)
			require.Equal(t, tc.status, r.Status)
			require.Equal(t, tc.body, r.Body)
			require.Equal(t, tc.retry, r.Header.Get("Retry-After"))
		})
	}
	// The server is still healthy after all that.
	toks.reset()
	require.Equal(t, 200, get(t, tokenURL(base, mgmt), md...).Status)
}

func TestTokenResponse(t *testing.T) {
	toks := newFakeTokens()
	_, base := startServer(t, imds.Config{Mode: imds.ModeVM, Tokens: toks})
	exp := time.Now().Add(24 * time.Hour).Truncate(time.Second)
	nbf := time.Now().Add(-time.Minute).Truncate(time.Second)
	toks.set(func(f *fakeTokens) {
		f.tok = imds.Token{AccessToken: "at.x.y", ClientID: "cid-1", ExpiresOn: exp, NotBefore: nbf, ExtExpiresOn: exp.Add(time.Hour)}
	})

	for _, v := range []string{"2018-02-01", "2019-08-01", "2019-11-01", "2020-06-01", "2021-02-01-preview"} {
		r := get(t, tokenURL(base, "api-version="+v+"&resource=https%3A%2F%2Fmanagement.azure.com%2F.default"), "Metadata", "true")
		require.Equal(t, 200, r.Status, v)
		require.Equal(t, "application/json; charset=utf-8", r.Header.Get("Content-Type"))
		m := decodeStrings(t, r.Body)
		require.ElementsMatch(t, []string{"access_token", "client_id", "expires_in", "expires_on", "ext_expires_in",
			"not_before", "resource", "token_type", "refresh_token"}, keys(m))
		require.Equal(t, "at.x.y", m["access_token"])
		require.Equal(t, "cid-1", m["client_id"])
		require.Equal(t, strconv.FormatInt(exp.Unix(), 10), m["expires_on"])
		require.Equal(t, strconv.FormatInt(nbf.Unix(), 10), m["not_before"])
		in, err := strconv.Atoi(m["expires_in"])
		require.NoError(t, err)
		require.InDelta(t, 24*3600, in, 5)
		ext, err := strconv.Atoi(m["ext_expires_in"])
		require.NoError(t, err)
		require.InDelta(t, 25*3600, ext, 5)
		require.Equal(t, "https://management.azure.com", m["resource"])
		require.Equal(t, "Bearer", m["token_type"])
		require.Equal(t, "", m["refresh_token"])
	}

	calls := toks.Calls()
	require.Len(t, calls, 5)
	c := calls[0]
	require.Equal(t, imds.Request{Resource: "https://management.azure.com", APIVersion: "2018-02-01"}, c.Request)
	require.Equal(t, imds.Caller{UID: uint32(os.Geteuid()), GID: imds.NoGID}, c.Caller)
}

func TestSelectorEcho(t *testing.T) {
	toks := newFakeTokens()
	_, base := startServer(t, imds.Config{Mode: imds.ModeVM, Tokens: toks})
	for _, tc := range []struct {
		param, value, field string
	}{
		{"client_id", "11111111-2222-3333-4444-555555555555", "client_id"},
		{"object_id", "obj-1", "object_id"},
		{"msi_res_id", "/subscriptions/s/resourcegroups/g/providers/Microsoft.ManagedIdentity/userAssignedIdentities/u", "msi_res_id"},
		{"mi_res_id", "/subscriptions/s/rg/u2", "mi_res_id"},
		{"principal_id", "pri-1", "principal_id"},
	} {
		r := get(t, tokenURL(base, mgmt+"&"+tc.param+"="+tc.value), "Metadata", "true")
		require.Equal(t, 200, r.Status, tc.param)
		m := decodeStrings(t, r.Body)
		require.Equal(t, tc.value, m[tc.field], tc.param)
		calls := toks.Calls()
		require.Equal(t, imds.Selector{Kind: imds.SelectorKind(tc.param), Value: tc.value}, calls[len(calls)-1].Request.Selector)
	}

	// Echoing the requested client ID keeps the caller's spelling.
	toks.set(func(f *fakeTokens) { f.tok.ClientID = "abcdef01-2222-3333-4444-555555555555" })
	r := get(t, tokenURL(base, mgmt+"&client_id=ABCDEF01-2222-3333-4444-555555555555"), "Metadata", "true")
	require.Equal(t, 200, r.Status)
	require.Equal(t, "ABCDEF01-2222-3333-4444-555555555555", decodeStrings(t, r.Body)["client_id"])

	// A Tokens answer for a different client ID is a bug, not a token.
	toks.set(func(f *fakeTokens) { f.tok.ClientID = "someone-else" })
	r = get(t, tokenURL(base, mgmt+"&client_id=abcdef01-2222-3333-4444-555555555555"), "Metadata", "true")
	require.Equal(t, 500, r.Status)
	require.Equal(t, bodyInternal, r.Body)
}

func TestResolvePID(t *testing.T) {
	toks := newFakeTokens()
	_, base := startServer(t, imds.Config{Mode: imds.ModeVM, Tokens: toks, ResolvePID: true})
	r := get(t, tokenURL(base, mgmt), "Metadata", "true")
	require.Equal(t, 200, r.Status, r.Body)
	c := toks.Calls()[0].Caller
	require.Equal(t, int32(os.Getpid()), c.PID)
	require.Equal(t, uint32(os.Geteuid()), c.UID)
	require.Equal(t, uint32(os.Getegid()), c.GID)
	require.NotZero(t, c.StartTime)
}

// peers is a Peers that fails every lookup or returns a fixed socket.
type peers struct {
	sock    peer.Socket
	proc    peer.Process
	err     error
	procErr error
	dead    bool
	changed bool
}

func (p *peers) Lookup(_, _ netip.AddrPort) (peer.Socket, error) { return p.sock, p.err }
func (p *peers) FindProcess(uint64) (peer.Process, error)        { return p.proc, p.procErr }
func (p *peers) Verify(peer.Process) error {
	switch {
	case p.dead:
		return peer.ErrNotFound
	case p.changed:
		return fmt.Errorf("%w: changed", workload.ErrCredentialsChanged)
	}
	return nil
}

// userProc is a process whose ids are all uid.
func userProc(pid int32, uid uint32) peer.Process {
	ids := workload.IDs{Real: uid, Effective: uid, Saved: uid, FS: uid}
	return peer.Process{PID: pid, UID: uid, GID: uid, StartTime: 9, Creds: workload.Creds{UID: ids, GID: ids}}
}

func TestUnidentifiedCaller(t *testing.T) {
	setuid := userProc(5, 1000)
	setuid.Creds.UID.Effective = 0
	setgid := userProc(5, 1000)
	setgid.Creds.GID.Saved = 0
	for name, tc := range map[string]struct {
		p    *peers
		body string
	}{
		"no local socket":             {&peers{err: peer.ErrNotFound}, bodyUnknown},
		"no process":                  {&peers{sock: peer.Socket{UID: 1000, Inode: 1}, procErr: peer.ErrNotFound}, bodyUnknown},
		"socket and process disagree": {&peers{sock: peer.Socket{UID: 1000, Inode: 1}, proc: userProc(5, 0)}, bodyIDs},
		"setuid program":              {&peers{sock: peer.Socket{UID: 1000, Inode: 1}, proc: setuid}, bodyIDs},
		"setgid program":              {&peers{sock: peer.Socket{UID: 1000, Inode: 1}, proc: setgid}, bodyIDs},
		"process gone":                {&peers{sock: peer.Socket{UID: 1000, Inode: 1}, proc: userProc(5, 1000), dead: true}, bodyUnknown},
		"process changed its ids":     {&peers{sock: peer.Socket{UID: 1000, Inode: 1}, proc: userProc(5, 1000), changed: true}, bodyIDs},
	} {
		t.Run(name, func(t *testing.T) {
			toks := newFakeTokens()
			_, base := startServer(t, imds.Config{Mode: imds.ModeVM, Tokens: toks, Peers: tc.p, ResolvePID: true})
			r := get(t, tokenURL(base, mgmt), "Metadata", "true")
			require.Equal(t, http.StatusForbidden, r.Status)
			require.Equal(t, tc.body, r.Body)
			require.Empty(t, toks.Calls(), "Tokens is never asked for an unidentified caller")
			// The probe is answered before any caller lookup.
			r = get(t, base+imds.TokenPath)
			require.Equal(t, 400, r.Status)
			require.Equal(t, bodyMetadata, r.Body)
		})
	}
}

func keys(m map[string]string) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	return out
}
