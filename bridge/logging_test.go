package bridge_test

import (
	"bytes"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"testing"

	"github.com/golang-jwt/jwt/v5"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/bridge"
)

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// Assertions and access tokens never reach the log, neither on success nor on
// any refusal.
func TestLogsCarryNoTokens(t *testing.T) {
	var buf lockedBuffer
	f := newFixture(t, func(c *bridge.Config) {
		c.Logger = slog.New(slog.NewJSONHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	})
	good := svid(t)
	res := f.post(t, v2Token, v2Form(good))
	require.Equal(t, http.StatusOK, res.status)
	access := res.body["access_token"].(string)

	bad := []string{
		svid(t, func(c jwt.MapClaims, _ map[string]any) { c["sub"] = "spiffe://example.org/other" }),
		svid(t, func(_ jwt.MapClaims, h map[string]any) { h["kid"] = "unknown" }),
		tamper(good),
		good + "x",
	}
	for _, a := range bad {
		require.NotEqual(t, http.StatusOK, f.post(t, v2Token, v2Form(a)).status)
	}
	logs := buf.String()
	require.Contains(t, logs, "access token issued")
	require.Contains(t, logs, "token request refused")
	for _, secret := range append(bad, good, access) {
		sig := secret[strings.LastIndexByte(secret, '.')+1:]
		require.NotContains(t, logs, sig)
		require.NotContains(t, logs, secret[:strings.IndexByte(secret, '.')+10])
	}
}
