package logging

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestPerKeyLimitsEachKey(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	p := NewPerKey(log, 3, 10*time.Second)
	now := time.Unix(1000, 0)
	p.now = func() time.Time { return now }
	ctx := context.Background()
	for range 100 {
		p.Log(ctx, slog.LevelWarn, "uid", 7, "refused", slog.Int("uid", 7))
	}
	// Another key has its own allowance; debug lines are not limited.
	p.Log(ctx, slog.LevelInfo, "uid", 8, "refused", slog.Int("uid", 8))
	for range 5 {
		p.Log(ctx, slog.LevelDebug, "uid", 7, "served")
	}
	require.Equal(t, 3, strings.Count(buf.String(), "uid=7"))
	require.Equal(t, 1, strings.Count(buf.String(), "uid=8"))
	require.Equal(t, 5, strings.Count(buf.String(), "served"))
	require.NotContains(t, buf.String(), "suppressed")

	// The next window's first line is preceded by the count of those
	// suppressed.
	buf.Reset()
	now = now.Add(11 * time.Second)
	p.Log(ctx, slog.LevelWarn, "uid", 7, "refused", slog.Int("uid", 7))
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	require.Len(t, lines, 2)
	require.Contains(t, lines[0], `level=WARN msg="log lines suppressed" uid=7 suppressed=97 over=11s limit="3 lines per 10s"`)
	require.Contains(t, lines[1], "msg=refused uid=7")

	// Lines below the logger's level use no allowance.
	quiet := NewPerKey(slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelError})), 1, time.Hour)
	for range 10 {
		quiet.Log(ctx, slog.LevelWarn, "uid", 1, "x")
	}
	ok, _, _ := quiet.allow(1)
	require.True(t, ok)
}

func TestPerKeyBoundsKeys(t *testing.T) {
	p := NewPerKey(slog.New(slog.DiscardHandler), 1, time.Second)
	now := time.Unix(1000, 0)
	p.now = func() time.Time { return now }
	for k := range uint64(maxKeys) {
		p.allow(k)
	}
	now = now.Add(2 * time.Second)
	p.allow(maxKeys + 1)
	require.Len(t, p.keys, 1, "expired windows are dropped when the map is full")
}
