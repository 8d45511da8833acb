// Package logging builds the one log/slog logger each ferry process uses.
package logging

import (
	"fmt"
	"io"
	"log/slog"
	"strings"
)

// New returns a logger writing to w at level ("debug", "info", "warn", "error";
// default info) in format ("text" or "json"; default text).
func New(w io.Writer, level, format string) (*slog.Logger, error) {
	lv, err := ParseLevel(level)
	if err != nil {
		return nil, err
	}
	var v slog.LevelVar
	v.Set(lv)
	return NewLeveled(w, &v, format)
}

// NewLeveled returns a logger writing to w in format whose level is read from
// level at every record, so a process can change it while it runs (on
// SIGHUP, from its reloaded config).
func NewLeveled(w io.Writer, level *slog.LevelVar, format string) (*slog.Logger, error) {
	opts := &slog.HandlerOptions{Level: level}
	switch strings.ToLower(format) {
	case "", "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("logging: unknown format %q", format)
}

// ParseLevel reads a config's log_level: "debug", "info" (or empty), "warn"
// ("warning"), "error", in any case.
func ParseLevel(level string) (slog.Level, error) {
	switch strings.ToLower(level) {
	case "", "info":
		return slog.LevelInfo, nil
	case "debug":
		return slog.LevelDebug, nil
	case "warn", "warning":
		return slog.LevelWarn, nil
	case "error":
		return slog.LevelError, nil
	}
	return 0, fmt.Errorf("logging: unknown level %q", level)
}
