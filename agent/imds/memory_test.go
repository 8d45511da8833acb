package imds_test

import (
	"context"
	"io"
	"net/http"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/agent/imds"
)

// memoryTokens is fakeTokens that also claims to hold every answer in
// memory, counting how often it is asked.
type memoryTokens struct {
	*fakeTokens
	asked atomic.Int32
}

func (m *memoryTokens) CachedToken(_ context.Context, _ imds.Caller, _ imds.Request) (*imds.Token, bool) {
	m.asked.Add(1)
	m.mu.Lock()
	defer m.mu.Unlock()
	tok := m.tok
	return &tok, true
}

// In VM mode a known caller's answer from memory skips the concurrency
// limit; the first request on a connection, whose caller is not yet known,
// goes through Token.
func TestVMAnswersFromMemory(t *testing.T) {
	toks := &memoryTokens{fakeTokens: newFakeTokens()}
	_, base := startServer(t, imds.Config{Mode: imds.ModeVM, Tokens: toks, MaxConcurrent: 1, QueueWait: 10 * time.Millisecond})
	c := &http.Client{Transport: &http.Transport{MaxConnsPerHost: 1}}
	getOn := func(c *http.Client, query string) (int, map[string]string) {
		req, _ := http.NewRequest(http.MethodGet, tokenURL(base, query), nil)
		req.Header.Set("Metadata", "true")
		resp, err := c.Do(req)
		require.NoError(t, err)
		defer resp.Body.Close()
		var body map[string]string
		if resp.StatusCode == http.StatusOK {
			b, err := io.ReadAll(resp.Body)
			require.NoError(t, err)
			body = decodeStrings(t, string(b))
		}
		return resp.StatusCode, body
	}
	code, _ := getOn(c, mgmt)
	require.Equal(t, 200, code)
	require.Len(t, toks.Calls(), 1)
	require.Zero(t, toks.asked.Load(), "the caller of a new connection is not known yet")

	// Hold the only slot with a slow request on another connection.
	release := make(chan struct{})
	entered := make(chan struct{}, 1)
	toks.set(func(f *fakeTokens) { f.release, f.entered = release, entered })
	slow := make(chan int, 1)
	go func() {
		c2 := &http.Client{Transport: &http.Transport{}}
		code, _ := getOn(c2, mgmt)
		slow <- code
	}()
	<-entered
	for range 3 {
		code, body := getOn(c, mgmt)
		require.Equal(t, 200, code)
		require.Equal(t, "eyJ0eXAi.fake.token", body["access_token"])
	}
	require.EqualValues(t, 3, toks.asked.Load())
	require.Len(t, toks.Calls(), 2, "only the slow request reached Token")
	close(release)
	require.Equal(t, 200, <-slow)
	toks.set(func(f *fakeTokens) { f.release, f.entered = nil, nil })

	// An answer from memory is vetted like any other: one for another
	// client ID is not sent; the full path decides.
	code, _ = getOn(c, mgmt+"&client_id=99999999-2222-3333-4444-555555555555")
	require.Equal(t, 500, code)
	require.Len(t, toks.Calls(), 3)
}

// Arc requests never take an answer from memory: every token needs a fresh,
// one-shot secret bound to the caller.
func TestArcNeverAnswersFromMemory(t *testing.T) {
	toks := &memoryTokens{fakeTokens: newFakeTokens()}
	base, dir := startArc(t, toks, nil)
	path := challenge(t, base, dir)
	secret, err := os.ReadFile(path)
	require.NoError(t, err)
	r := get(t, tokenURL(base, arcQuery), "Metadata", "true", "Authorization", "Basic "+string(secret))
	require.Equal(t, 200, r.Status, r.Body)
	// Same connection pool, caller known: still a challenge, still no replay.
	challenge(t, base, dir)
	r = get(t, tokenURL(base, arcQuery), "Metadata", "true", "Authorization", "Basic "+string(secret))
	require.Equal(t, 401, r.Status)
	require.Zero(t, toks.asked.Load())
	require.Len(t, toks.Calls(), 1)
}
