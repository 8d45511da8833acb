package imds_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/agent/imds"
	"github.com/ferry-id/ferry/internal/hostilecaller"
	"github.com/ferry-id/ferry/internal/roottest"
)

const nobody = 65534

// childResult is what a child process reports on stdout.
type childResult struct {
	ReadErr  string `json:"read_err,omitempty"`
	Content  string `json:"content,omitempty"`
	ListErr  string `json:"list_err,omitempty"`
	Status   int    `json:"status,omitempty"`
	Body     string `json:"body,omitempty"`
	Realm    string `json:"realm,omitempty"`
	Error    string `json:"error,omitempty"`
	AddrsLo  string `json:"addrs_lo,omitempty"`
	Attempts int    `json:"attempts,omitempty"`
}

func TestMain(m *testing.M) {
	hostilecaller.Main()
	switch os.Getenv("IMDS_TEST_CHILD") {
	case "":
		os.Exit(m.Run())
	case "client":
		json.NewEncoder(os.Stdout).Encode(childClient())
	case "addaddr":
		json.NewEncoder(os.Stdout).Encode(childAddAddr())
	}
	os.Exit(0)
}

// childClient optionally lists a directory and reads a file, then optionally
// sends one GET with Metadata: true and an optional Authorization header.
func childClient() childResult {
	var r childResult
	if d := os.Getenv("CHILD_LIST"); d != "" {
		if _, err := os.ReadDir(d); err != nil {
			r.ListErr = err.Error()
		}
	}
	if p := os.Getenv("CHILD_READ"); p != "" {
		b, err := os.ReadFile(p)
		if err != nil {
			r.ReadErr = err.Error()
		}
		r.Content = string(b)
	}
	if u := os.Getenv("CHILD_URL"); u != "" {
		req, _ := http.NewRequest(http.MethodGet, u, nil)
		req.Header.Set("Metadata", "true")
		if a := os.Getenv("CHILD_AUTH"); a != "" {
			req.Header.Set("Authorization", a)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			r.Error = err.Error()
			return r
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		r.Status, r.Body = resp.StatusCode, string(b)
		r.Realm = strings.TrimPrefix(resp.Header.Get("WWW-Authenticate"), "Basic realm=")
	}
	return r
}

func childAddAddr() childResult {
	var r childResult
	a := netip.MustParseAddr(os.Getenv("CHILD_ADDR"))
	for range 2 { // the second add finds it present
		r.Attempts++
		if err := imds.AddLoopbackAddress(a); err != nil {
			r.Error = err.Error()
			return r
		}
	}
	lo, err := net.InterfaceByName("lo")
	if err != nil {
		r.Error = err.Error()
		return r
	}
	addrs, _ := lo.Addrs()
	var s []string
	for _, x := range addrs {
		s = append(s, x.String())
	}
	r.AddrsLo = strings.Join(s, ",")
	return r
}

// childBinary copies the test binary where another uid may execute it.
func childBinary(t *testing.T) string {
	t.Helper()
	exe, err := os.Executable()
	require.NoError(t, err)
	dir := sharedTempDir(t)
	b, err := os.ReadFile(exe)
	require.NoError(t, err)
	p := filepath.Join(dir, "child")
	require.NoError(t, os.WriteFile(p, b, 0o755))
	return p
}

// sharedTempDir is a temporary directory every uid may traverse.
func sharedTempDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "imds-test-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	require.NoError(t, os.Chmod(dir, 0o755))
	return dir
}

// requireRoot: files are chowned to callers and children run under
// another uid.
func requireRoot(t *testing.T) {
	t.Helper()
	roottest.Require(t)
}

// runChild runs the test binary in child mode under uid (nil: as the test
// process) with extra environment and returns its report.
func runChild(t *testing.T, bin string, cred *syscall.Credential, env ...string) childResult {
	t.Helper()
	cmd := exec.Command(bin)
	cmd.Env = append(append(os.Environ(), "IMDS_TEST_CHILD=client"), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	require.NoError(t, err)
	var r childResult
	require.NoError(t, json.Unmarshal(out, &r), string(out))
	return r
}

func asNobody() *syscall.Credential { return &syscall.Credential{Uid: nobody, Gid: nobody} }

// call records one Tokens call.
type call struct {
	Caller  imds.Caller
	Request imds.Request
}

// fakeTokens is a Tokens that records calls and answers from its fields.
type fakeTokens struct {
	mu    sync.Mutex
	calls []call
	tok   imds.Token
	err   error
	panic bool
	// entered, when set, receives a value when Token starts; release, when
	// set, must be closed before Token returns.
	entered chan struct{}
	release chan struct{}
}

func newFakeTokens() *fakeTokens {
	return &fakeTokens{tok: imds.Token{AccessToken: "eyJ0eXAi.fake.token", ClientID: "11111111-2222-3333-4444-555555555555", ExpiresOn: time.Now().Add(24 * time.Hour)}}
}

func (f *fakeTokens) Token(ctx context.Context, c imds.Caller, r imds.Request) (*imds.Token, error) {
	f.mu.Lock()
	f.calls = append(f.calls, call{c, r})
	tok, err, p := f.tok, f.err, f.panic
	entered, release := f.entered, f.release
	f.mu.Unlock()
	if entered != nil {
		entered <- struct{}{}
	}
	if release != nil {
		select {
		case <-release:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if p {
		panic("tokens exploded")
	}
	if err != nil {
		return nil, err
	}
	return &tok, nil
}

func (f *fakeTokens) set(fn func(f *fakeTokens)) { f.mu.Lock(); fn(f); f.mu.Unlock() }

// reset restores the default answer (calls are kept).
func (f *fakeTokens) reset() {
	f.set(func(f *fakeTokens) {
		f.tok, f.err, f.panic = newFakeTokens().tok, nil, false
	})
}

func (f *fakeTokens) Calls() []call {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]call(nil), f.calls...)
}

type upstreamErr struct {
	status    int
	code      string
	desc      string
	retryWait time.Duration
}

func (e *upstreamErr) Error() string { return fmt.Sprintf("upstream %d %s", e.status, e.code) }
func (e *upstreamErr) Upstream() (int, string, string, time.Duration) {
	return e.status, e.code, e.desc, e.retryWait
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(tLogWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tLogWriter struct{ t *testing.T }

func (w tLogWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// startServer starts a server on a free loopback port and stops it at the
// end of the test; it returns the server and its base URL.
func startServer(t *testing.T, c imds.Config) (*imds.Server, string) {
	t.Helper()
	if c.Address == "" && c.Listener == nil {
		c.Address = "127.0.0.1:0"
	}
	if c.Logger == nil {
		c.Logger = testLogger(t)
	}
	s, err := imds.New(c)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		require.NoError(t, <-done)
	})
	return s, "http://" + s.Addr().String()
}

// response is a received answer.
type response struct {
	Status int
	Header http.Header
	Body   string
}

func get(t *testing.T, url string, headers ...string) response {
	t.Helper()
	return do(t, http.MethodGet, url, headers...)
}

func do(t *testing.T, method, url string, headers ...string) response {
	t.Helper()
	req, err := http.NewRequest(method, url, nil)
	require.NoError(t, err)
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Add(headers[i], headers[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return response{resp.StatusCode, resp.Header, string(b)}
}

func tokenURL(base, query string) string {
	return base + imds.TokenPath + "?" + query
}

const mgmt = "api-version=2018-02-01&resource=https%3A%2F%2Fmanagement.azure.com"

// decodeStrings decodes a JSON object whose values must all be strings.
func decodeStrings(t *testing.T, body string) map[string]string {
	t.Helper()
	var raw map[string]any
	require.NoError(t, json.Unmarshal([]byte(body), &raw), body)
	out := make(map[string]string, len(raw))
	for k, v := range raw {
		s, ok := v.(string)
		require.True(t, ok, "field %s is %T, not a string", k, v)
		out[k] = s
	}
	return out
}

var errBoom = errors.New("database on fire")
