package logging_test

import (
	"bytes"
	"log/slog"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/internal/logging"
)

func TestNew(t *testing.T) {
	var buf bytes.Buffer
	log, err := logging.New(&buf, "warn", "json")
	require.NoError(t, err)
	log.Info("hidden")
	log.Warn("shown", "k", "v")
	require.NotContains(t, buf.String(), "hidden")
	require.Contains(t, buf.String(), `"msg":"shown","k":"v"`)

	_, err = logging.New(&buf, "loud", "")
	require.Error(t, err)
	_, err = logging.New(&buf, "", "xml")
	require.Error(t, err)
}

func TestLevel(t *testing.T) {
	var buf bytes.Buffer
	log, lv, err := logging.NewLeveled(&buf, "warn", "text")
	require.NoError(t, err)
	log.Info("before")
	lv.Set(slog.LevelDebug)
	log.Debug("while debugging")
	lv.Reset()
	log.Info("after")
	require.NotContains(t, buf.String(), "before")
	require.Contains(t, buf.String(), "while debugging")
	require.NotContains(t, buf.String(), "after")
	require.Equal(t, "warn", logging.LevelName(lv.Launch()))
	for _, name := range logging.Levels {
		l, err := logging.ParseLevel(name)
		require.NoError(t, err)
		require.Equal(t, name, logging.LevelName(l))
	}
	// A reload: the file's level is the new launch level.
	lv.Set(slog.LevelError)
	lv.Relaunch(slog.LevelInfo)
	log.Info("reloaded")
	lv.Set(slog.LevelError)
	lv.Reset()
	log.Info("reset to the reloaded level")
	require.Contains(t, buf.String(), "reloaded")
	require.Contains(t, buf.String(), "reset to the reloaded level")
	require.Equal(t, "info", logging.LevelName(lv.Launch()))
	_, err = logging.ParseLevel("loud")
	require.ErrorContains(t, err, "want debug, info, warn or error")
}
