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

func TestNewLeveledFollowsTheLevel(t *testing.T) {
	var buf bytes.Buffer
	var lv slog.LevelVar
	lv.Set(slog.LevelWarn)
	log, err := logging.NewLeveled(&buf, &lv, "text")
	require.NoError(t, err)
	log.Info("before")
	l, err := logging.ParseLevel("DEBUG")
	require.NoError(t, err)
	lv.Set(l)
	log.Debug("after")
	require.NotContains(t, buf.String(), "before")
	require.Contains(t, buf.String(), "msg=after")
}
