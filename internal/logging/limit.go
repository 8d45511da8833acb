package logging

import (
	"context"
	"log/slog"
	"sync"
	"time"
)

// PerKey writes lines that a caller can provoke (a refused call, a refused
// connection) so that no caller can flood the log: each key (a caller's uid)
// may write Burst lines per Window at Info and above; further lines in the
// window are dropped and counted, and the key's next line after the window
// is preceded by one line saying how many were suppressed. Debug lines are
// not limited: an operator who enables them asks for every call. A PerKey
// is safe for concurrent use.
type PerKey struct {
	log    *slog.Logger
	burst  int
	window time.Duration
	now    func() time.Time

	mu   sync.Mutex
	keys map[uint64]*keyWindow
}

type keyWindow struct {
	start      time.Time
	lines      int
	suppressed int
}

// maxKeys bounds the windows remembered; past it, expired ones are dropped.
const maxKeys = 4096

// NewPerKey returns a PerKey writing to log. burst and window default to 10
// lines per 10 s.
func NewPerKey(log *slog.Logger, burst int, window time.Duration) *PerKey {
	if burst <= 0 {
		burst = 10
	}
	if window <= 0 {
		window = 10 * time.Second
	}
	return &PerKey{log: log, burst: burst, window: window, now: time.Now, keys: make(map[uint64]*keyWindow)}
}

// Logger returns the logger lines are written to.
func (p *PerKey) Logger() *slog.Logger { return p.log }

// Log writes msg at level with attrs, charged to key, unless key has used up
// its lines for the window. keyAttr names the key in the suppressed-count
// line (for example "uid").
func (p *PerKey) Log(ctx context.Context, level slog.Level, keyAttr string, key uint64, msg string, attrs ...slog.Attr) {
	if !p.log.Enabled(ctx, level) {
		return
	}
	if level >= slog.LevelInfo {
		ok, suppressed, since := p.allow(key)
		if !ok {
			return
		}
		if suppressed > 0 {
			p.log.LogAttrs(ctx, slog.LevelWarn, "log lines suppressed", slog.Uint64(keyAttr, key),
				slog.Int("suppressed", suppressed), slog.Duration("over", since),
				slog.String("limit", limitText(p.burst, p.window)))
		}
	}
	p.log.LogAttrs(ctx, level, msg, attrs...)
}

func limitText(burst int, window time.Duration) string {
	return slog.IntValue(burst).String() + " lines per " + window.String()
}

// allow charges a line to key. It reports whether the line may be written
// and, for the first line of a new window, how many lines the previous
// windows suppressed and over how long.
func (p *PerKey) allow(key uint64) (bool, int, time.Duration) {
	now := p.now()
	p.mu.Lock()
	defer p.mu.Unlock()
	w := p.keys[key]
	if w == nil {
		if len(p.keys) >= maxKeys {
			p.pruneLocked(now)
		}
		w = &keyWindow{start: now}
		p.keys[key] = w
	}
	var suppressed int
	var since time.Duration
	if now.Sub(w.start) >= p.window {
		suppressed, since = w.suppressed, now.Sub(w.start)
		w.start, w.lines, w.suppressed = now, 0, 0
	}
	if w.lines >= p.burst {
		w.suppressed++
		return false, 0, 0
	}
	w.lines++
	return true, suppressed, since
}

// pruneLocked forgets windows that have expired; their suppressed counts,
// if any, are lost with them (the map is full: a flood of keys).
func (p *PerKey) pruneLocked(now time.Time) {
	for k, w := range p.keys {
		if now.Sub(w.start) >= p.window {
			delete(p.keys, k)
		}
	}
}
