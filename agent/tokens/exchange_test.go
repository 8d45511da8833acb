package tokens_test

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ferry-id/ferry/agent/imds"
	"github.com/ferry-id/ferry/agent/tokens"
	"github.com/stretchr/testify/require"
)

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(tLogWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tLogWriter struct{ t *testing.T }

func (w tLogWriter) Write(p []byte) (int, error) { w.t.Log(string(p)); return len(p), nil }

// authority is an httptest TLS server standing in for the token service.
type authority struct {
	srv   *httptest.Server
	calls atomic.Int32
	// reply answers one token request; form is the parsed body.
	reply func(w http.ResponseWriter, form url.Values)
	// lastPath and lastForm record the last request (read after the call).
	lastPath string
	lastForm url.Values
	lastCT   string
}

func newAuthority(t *testing.T, reply func(w http.ResponseWriter, form url.Values)) *authority {
	a := &authority{reply: reply}
	a.srv = httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		a.calls.Add(1)
		if r.Method != http.MethodPost {
			http.Error(w, "method", http.StatusMethodNotAllowed)
			return
		}
		b, _ := io.ReadAll(r.Body)
		form, err := url.ParseQuery(string(b))
		if err != nil {
			http.Error(w, "form", http.StatusBadRequest)
			return
		}
		a.lastPath, a.lastForm, a.lastCT = r.URL.Path, form, r.Header.Get("Content-Type")
		a.reply(w, form)
	}))
	t.Cleanup(a.srv.Close)
	return a
}

func (a *authority) exchanger(t *testing.T, suffix string) *tokens.Exchanger {
	e, err := tokens.NewExchanger(tokens.ExchangerConfig{Authority: a.srv.URL + suffix, HTTPClient: a.srv.Client(), Logger: testLogger(t)})
	require.NoError(t, err)
	return e
}

func jsonReply(status int, body string, headers ...string) func(http.ResponseWriter, url.Values) {
	return func(w http.ResponseWriter, _ url.Values) {
		for i := 0; i+1 < len(headers); i += 2 {
			w.Header().Set(headers[i], headers[i+1])
		}
		w.Header().Set("Content-Type", "application/json; charset=utf-8")
		w.WriteHeader(status)
		_, _ = io.WriteString(w, body)
	}
}

var req1 = tokens.ExchangeRequest{TenantID: "tenant-1", ClientID: "client-1", Assertion: "header.payload.sig", Resource: "https://management.azure.com"}

func TestExchangeSuccess(t *testing.T) {
	a := newAuthority(t, jsonReply(200, `{"token_type":"Bearer","expires_in":3599,"ext_expires_in":7199,"access_token":"at-1","refresh_in":1800}`))
	before := time.Now()
	tok, err := a.exchanger(t, "").Exchange(context.Background(), req1)
	require.NoError(t, err)

	require.Equal(t, "/tenant-1/oauth2/v2.0/token", a.lastPath)
	require.Equal(t, "application/x-www-form-urlencoded; charset=utf-8", a.lastCT)
	require.Equal(t, url.Values{
		"grant_type":            {"client_credentials"},
		"client_id":             {"client-1"},
		"client_assertion_type": {"urn:ietf:params:oauth:client-assertion-type:jwt-bearer"},
		"client_assertion":      {"header.payload.sig"},
		"scope":                 {"https://management.azure.com/.default"},
	}, a.lastForm)

	require.Equal(t, "at-1", tok.AccessToken)
	require.WithinRange(t, tok.ExpiresOn, before.Add(3599*time.Second), time.Now().Add(3599*time.Second))
	require.Equal(t, 3600*time.Second, tok.ExtExpiresOn.Sub(tok.ExpiresOn))
	require.Equal(t, 1800*time.Second, tok.RefreshOn.Sub(tok.Obtained))
}

func TestExchangeStringLifetimesAndPathPrefix(t *testing.T) {
	a := newAuthority(t, jsonReply(200, `{"token_type":"bearer","expires_in":"600","access_token":"at-2"}`))
	r := req1
	r.Resource = "api://app/.default" // not doubled
	tok, err := a.exchanger(t, "/sts/").Exchange(context.Background(), r)
	require.NoError(t, err)
	require.Equal(t, "/sts/tenant-1/oauth2/v2.0/token", a.lastPath)
	require.Equal(t, "api://app/.default", a.lastForm.Get("scope"))
	require.Equal(t, 600*time.Second, tok.ExpiresOn.Sub(tok.Obtained))
	require.Equal(t, tok.ExpiresOn, tok.ExtExpiresOn)
	require.True(t, tok.RefreshOn.IsZero())
}

// not_before is the access token's nbf, whether or not the authority sent
// it (v2 responses do not); a token that is not a JWT has none.
func TestExchangeNotBefore(t *testing.T) {
	nbf := time.Now().Add(-5 * time.Minute).Truncate(time.Second)
	claims, err := json.Marshal(map[string]any{"aud": "api://app", "nbf": nbf.Unix(), "exp": nbf.Add(time.Hour).Unix()})
	require.NoError(t, err)
	jwtToken := base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"RS256","typ":"JWT"}`)) + "." +
		base64.RawURLEncoding.EncodeToString(claims) + ".c2ln"
	for name, tc := range map[string]struct {
		body string
		want time.Time
	}{
		"v2 response, JWT":         {`{"token_type":"Bearer","expires_in":3599,"access_token":"` + jwtToken + `"}`, nbf},
		"not_before disagrees":     {`{"token_type":"Bearer","expires_in":3599,"not_before":"1","access_token":"` + jwtToken + `"}`, nbf},
		"opaque token, not_before": {`{"token_type":"Bearer","expires_in":3599,"not_before":"1700000000","access_token":"opaque"}`, time.Unix(1700000000, 0)},
		"opaque token":             {`{"token_type":"Bearer","expires_in":3599,"access_token":"opaque"}`, time.Time{}},
	} {
		t.Run(name, func(t *testing.T) {
			a := newAuthority(t, jsonReply(200, tc.body))
			tok, err := a.exchanger(t, "").Exchange(context.Background(), req1)
			require.NoError(t, err)
			require.True(t, tc.want.Equal(tok.NotBefore), "got %v, want %v", tok.NotBefore, tc.want)
		})
	}
}

func TestExchangeErrors(t *testing.T) {
	const fic = `{"error":"invalid_client","error_description":"AADSTS700213: No matching federated identity record found for presented assertion subject 'spiffe://td/x'. Trace ID: t Correlation ID: c Timestamp: 2026-01-01 00:00:00Z","error_codes":[700213],"timestamp":"2026-01-01 00:00:00Z","trace_id":"t-1","correlation_id":"c-1","error_uri":"https://sts/error?code=700213"}`
	for _, tc := range []struct {
		name       string
		reply      func(http.ResponseWriter, url.Values)
		status     int
		code       string
		aadsts     int
		retryAfter time.Duration
	}{
		{"no matching FIC", jsonReply(401, fic), 401, "invalid_client", 700213, 0},
		{"bad scope, code only in description", jsonReply(400, `{"error":"invalid_scope","error_description":"AADSTS70011: The provided value for scope is not valid."}`), 400, "invalid_scope", 70011, 0},
		{"throttled", jsonReply(429, `{"error":"temporarily_unavailable","error_description":"slow down"}`, "Retry-After", "7"), 429, "temporarily_unavailable", 0, 7 * time.Second},
		{"not json", jsonReply(502, `<html>bad gateway</html>`), 502, "", 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := newAuthority(t, tc.reply)
			_, err := a.exchanger(t, "").Exchange(context.Background(), req1)
			var te *tokens.Error
			require.ErrorAs(t, err, &te)
			require.Equal(t, tc.status, te.StatusCode)
			require.Equal(t, tc.code, te.Code)
			require.Equal(t, tc.aadsts, te.AADSTS())
			require.Equal(t, tc.retryAfter, te.RetryAfter)

			var up imds.UpstreamError
			require.ErrorAs(t, err, &up)
			status, code, desc, wait := up.Upstream()
			require.Equal(t, tc.status, status)
			require.Equal(t, tc.code, code)
			require.Equal(t, te.Description, desc)
			require.Equal(t, tc.retryAfter, wait)
		})
	}
}

func TestExchangeMalformedSuccess(t *testing.T) {
	for name, body := range map[string]string{
		"no access_token":     `{"token_type":"Bearer","expires_in":3599}`,
		"decimal expires_in":  `{"token_type":"Bearer","expires_in":3599.5,"access_token":"x"}`,
		"no lifetime":         `{"token_type":"Bearer","access_token":"x"}`,
		"wrong token type":    `{"token_type":"pop","expires_in":3599,"access_token":"x"}`,
		"expired expires_on":  `{"token_type":"Bearer","expires_on":1000,"access_token":"x"}`,
		"not json":            `access_token=x`,
		"negative expires_in": `{"token_type":"Bearer","expires_in":-5,"access_token":"x"}`,
	} {
		t.Run(name, func(t *testing.T) {
			a := newAuthority(t, jsonReply(200, body))
			_, err := a.exchanger(t, "").Exchange(context.Background(), req1)
			require.Error(t, err)
			var te *tokens.Error
			require.False(t, errors.As(err, &te))
		})
	}
}

func TestNewExchangerValidation(t *testing.T) {
	for _, u := range []string{"http://sts.example", "sts.example", "https://", "https://sts.example/?q=1", "::"} {
		_, err := tokens.NewExchanger(tokens.ExchangerConfig{Authority: u})
		require.Error(t, err, u)
	}
	e, err := tokens.NewExchanger(tokens.ExchangerConfig{Authority: "https://sts.example"})
	require.NoError(t, err)
	_, err = e.Exchange(context.Background(), tokens.ExchangeRequest{TenantID: "t"})
	require.Error(t, err)
}

func TestExchangeUntrustedCertificate(t *testing.T) {
	a := newAuthority(t, jsonReply(200, `{"token_type":"Bearer","expires_in":3599,"access_token":"at"}`))
	e, err := tokens.NewExchanger(tokens.ExchangerConfig{Authority: a.srv.URL, HTTPClient: &http.Client{}})
	require.NoError(t, err)
	_, err = e.Exchange(context.Background(), req1)
	require.Error(t, err)
	require.Zero(t, a.calls.Load())
}
