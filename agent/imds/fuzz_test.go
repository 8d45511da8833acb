package imds_test

import (
	"context"
	"encoding/json"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ferry-id/ferry/agent/imds"
	"github.com/ferry-id/ferry/agent/peer"
)

// FuzzRequest drives the request parsing through ServeHTTP: nothing may
// panic, every answer is IMDS-shaped JSON, and only a well-formed request
// reaches Tokens.
func FuzzRequest(f *testing.F) {
	f.Add("GET", "/metadata/identity/oauth2/token?"+mgmt, "true", "", "")
	f.Add("GET", "/metadata/identity/oauth2/token", "", "", "")
	f.Add("GET", "/metadata/identity/oauth2/token?"+mgmt+"&client_id=a&client_id=b", "true", "", "")
	f.Add("GET", "/metadata/identity/oauth2/token?"+mgmt+"&Client_ID=a&object_id=b", "true", "", "")
	f.Add("GET", "/metadata/identity/oauth2/token?api-version=2020-06-01&resource=x%2F.default%2F.default", "true", "", "")
	f.Add("GET", "/metadata/identity/oauth2/token?"+mgmt, "true", "1.2.3.4", "")
	f.Add("POST", "/metadata/identity/oauth2/token?"+mgmt, "true", "", "")
	f.Add("GET", "/metadata/identity/oauth2/token?api-version=2019-11-01;resource=x", "true", "", "")
	f.Add("GET", "/metadata/identity/oauth2/token?"+mgmt+"&msi_res_id=%00", "true", "", "Basic abc")
	f.Add("GET", "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=a%22b%5Cc%3Cd%3E%26%C3%A9%FF%E2%80%A8&object_id=%7F%22", "true", "", "")

	toks := &lastTokens{}
	s, err := imds.New(imds.Config{
		Mode:     imds.ModeVM,
		Tokens:   toks,
		Peers:    &peers{sock: peer.Socket{UID: 1000, Inode: 1}, proc: userProc(5, 1000)},
		Listener: closedListener{},
		Logger:   discardLogger(),
	})
	if err != nil {
		f.Fatal(err)
	}
	local := &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 40342}

	f.Fuzz(func(t *testing.T, method, target, metadata, xff, auth string) {
		u, err := url.ParseRequestURI(target)
		if err != nil || !validMethod(method) {
			return
		}
		r := &http.Request{Method: method, URL: u, RequestURI: target, Header: http.Header{},
			RemoteAddr: "127.0.0.1:50000", Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1}
		r = r.WithContext(context.WithValue(context.Background(), http.LocalAddrContextKey, net.Addr(local)))
		if metadata != "" {
			r.Header.Set("Metadata", metadata)
		}
		if xff != "" {
			r.Header.Set("X-Forwarded-For", xff)
		}
		if auth != "" {
			r.Header.Set("Authorization", auth)
		}
		before := toks.count()
		w := httptest.NewRecorder()
		s.ServeHTTP(w, r)

		var body map[string]any
		if err := json.Unmarshal(w.Body.Bytes(), &body); err != nil {
			t.Fatalf("status %d, body not JSON: %q", w.Code, w.Body.String())
		}
		switch w.Code {
		case 200:
			if toks.count() != before+1 {
				t.Fatalf("200 without a Tokens call")
			}
			req := toks.last()
			q, _ := url.ParseQuery(u.RawQuery)
			seen := map[string]bool{}
			for k, v := range q {
				if seen[strings.ToLower(k)] || len(v) != 1 {
					t.Fatalf("duplicate parameter %q accepted", k)
				}
				seen[strings.ToLower(k)] = true
			}
			switch {
			case method != http.MethodGet, u.Path != imds.TokenPath:
				t.Fatalf("accepted %s %s", method, u.Path)
			case metadata != "true":
				t.Fatalf("accepted Metadata %q", metadata)
			case xff != "":
				t.Fatalf("accepted X-Forwarded-For")
			case req.Resource == "" || req.APIVersion == "":
				t.Fatalf("accepted request %+v", req)
			}
			for k, v := range body {
				if _, ok := v.(string); !ok {
					t.Fatalf("field %s is %T", k, v)
				}
			}
			if got, want := body["resource"], viaJSON(req.Resource); got != want {
				t.Fatalf("resource %q, want %q", got, want)
			}
			if k := req.Selector.Kind; k != imds.SelectorNone {
				if got, want := body[string(k)], viaJSON(req.Selector.Value); got != want {
					t.Fatalf("%s %q, want %q", k, got, want)
				}
			}
		case 400, 405: // never 404
			if toks.count() != before {
				t.Fatalf("refused request reached Tokens")
			}
			if _, ok := body["error"].(string); !ok {
				t.Fatalf("error body without error: %s", w.Body.String())
			}
		default:
			t.Fatalf("unexpected status %d: %s", w.Code, w.Body.String())
		}
	})
}

// viaJSON is s after an encoding/json round trip.
func viaJSON(s string) string {
	b, _ := json.Marshal(s)
	var out string
	_ = json.Unmarshal(b, &out)
	return out
}

func validMethod(m string) bool {
	if m == "" {
		return false
	}
	for _, c := range m {
		if c <= ' ' || c >= 0x7f || strings.ContainsRune("()<>@,;:\\\"/[]?={}", c) {
			return false
		}
	}
	return true
}

// closedListener satisfies Config.Listener for a server that is never run.
type closedListener struct{}

func (closedListener) Accept() (net.Conn, error) { return nil, net.ErrClosed }
func (closedListener) Close() error              { return nil }
func (closedListener) Addr() net.Addr            { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)} }

// lastTokens remembers only the last request, so long fuzzing runs stay small.
type lastTokens struct {
	mu  sync.Mutex
	n   int
	req imds.Request
}

func (l *lastTokens) Token(_ context.Context, _ imds.Caller, r imds.Request) (*imds.Token, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.n++
	l.req = r
	cid := "c"
	if r.Selector.Kind == imds.SelectorClientID {
		cid = r.Selector.Value
	}
	return &imds.Token{AccessToken: "a.b.c", ClientID: cid, ExpiresOn: time.Now().Add(time.Hour)}, nil
}

func (l *lastTokens) count() int         { l.mu.Lock(); defer l.mu.Unlock(); return l.n }
func (l *lastTokens) last() imds.Request { l.mu.Lock(); defer l.mu.Unlock(); return l.req }

func discardLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }
