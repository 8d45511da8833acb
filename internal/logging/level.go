package logging

import (
	"fmt"
	"io"
	"log/slog"
	"strings"
)

// Levels are the level names New and Level accept, most verbose first.
var Levels = []string{"debug", "info", "warn", "error"}

// ParseLevel reads a level name ("debug", "info", "warn", "error"; "" is
// info, "warning" is warn; any case).
func ParseLevel(s string) (slog.Level, error) {
	switch strings.ToLower(s) {
	case "", "info":
		return slog.LevelInfo, nil
	case "debug":
		return slog.LevelDebug, nil
	case "warn", "warning":
		return slog.LevelWarn, nil
	case "error":
		return slog.LevelError, nil
	}
	return 0, fmt.Errorf("logging: unknown level %q (want debug, info, warn or error)", s)
}

// LevelName is the name ParseLevel reads back for l.
func LevelName(l slog.Level) string {
	switch {
	case l <= slog.LevelDebug:
		return "debug"
	case l <= slog.LevelInfo:
		return "info"
	case l <= slog.LevelWarn:
		return "warn"
	}
	return "error"
}

// Level is a logger's level that an operator may change while the process
// runs (`ferry logger set`), and reset to the one it started with (or was
// last reloaded with). It is safe for concurrent use.
type Level struct {
	v      slog.LevelVar
	launch slog.LevelVar
}

// Get returns the current level.
func (l *Level) Get() slog.Level { return l.v.Level() }

// Launch returns the level the process started with, or the one its last
// Relaunch gave.
func (l *Level) Launch() slog.Level { return l.launch.Level() }

// Set changes the level.
func (l *Level) Set(v slog.Level) { l.v.Set(v) }

// Reset goes back to the launch level.
func (l *Level) Reset() { l.v.Set(l.launch.Level()) }

// Relaunch applies the level of a reloaded config file (SIGHUP): it becomes
// the current level and the one Reset goes back to, as if the process had
// started with it.
func (l *Level) Relaunch(v slog.Level) {
	l.launch.Set(v)
	l.v.Set(v)
}

// NewLeveled is New with a Level the caller may change later.
func NewLeveled(w io.Writer, level, format string) (*slog.Logger, *Level, error) {
	lv, err := ParseLevel(level)
	if err != nil {
		return nil, nil, err
	}
	l := new(Level)
	l.Relaunch(lv)
	log, err := newLogger(w, &l.v, format)
	if err != nil {
		return nil, nil, err
	}
	return log, l, nil
}
