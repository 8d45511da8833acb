package service_test

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/bridge/service"
	"github.com/ferry-id/ferry/internal/roottest"
)

// logBuffer is a log destination tests can read while it is written.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// countingListener accepts unix connections and counts them; a connection
// whose first byte is 'm' is the test's own marker.
type countingListener struct {
	path          string
	mu            sync.Mutex
	accepted, own int
}

func listenCounting(t *testing.T, path string) *countingListener {
	t.Helper()
	l, err := net.Listen("unix", path)
	require.NoError(t, err)
	t.Cleanup(func() { l.Close() })
	cl := &countingListener{path: path}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			cl.mu.Lock()
			cl.accepted++
			cl.mu.Unlock()
			go func() {
				defer c.Close()
				b := make([]byte, 1)
				_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
				if _, err := c.Read(b); err == nil && b[0] == 'm' {
					cl.mu.Lock()
					cl.own++
					cl.mu.Unlock()
				}
			}()
		}
	}()
	return cl
}

// others connects once with a marker and waits until it is seen: every
// connection made before it has been accepted by then. It returns how many
// connections were not the test's own.
func (c *countingListener) others(t *testing.T) int {
	t.Helper()
	c.mu.Lock()
	want := c.own + 1
	c.mu.Unlock()
	conn, err := net.Dial("unix", c.path)
	require.NoError(t, err)
	_, err = conn.Write([]byte("m"))
	require.NoError(t, err)
	conn.Close()
	require.Eventually(t, func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.own >= want
	}, 30*time.Second, 20*time.Millisecond)
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.accepted - c.own
}

// TestServerSocketCheckedAtEachDial: a server socket that appears after the
// replica started is checked when the replica dials it. Another user's socket
// is refused (said once in the log, never connected to) and the replica keeps
// trying: once the socket is root's, it connects.
func TestServerSocketCheckedAtEachDial(t *testing.T) {
	roottest.Require(t)
	dir := t.TempDir()
	run := filepath.Join(dir, "run")
	socket := filepath.Join(run, "admin.sock")
	var logs logBuffer
	svc, err := service.New(service.Config{
		ListenAddr: "127.0.0.1:0", DataDir: filepath.Join(dir, "data"), ServerSockets: []string{socket},
		Logger: slog.New(slog.NewTextHandler(&logs, nil)),
	})
	require.NoError(t, err, "no socket yet: nothing to refuse at start")

	require.NoError(t, os.Mkdir(run, 0o755))
	l := listenCounting(t, socket)
	require.NoError(t, os.Lchown(socket, 65534, 65534))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- svc.Run(ctx) }()
	defer func() { cancel(); <-done }()

	require.Eventually(t, func() bool { return strings.Contains(logs.String(), "refusing the server's admin socket") },
		30*time.Second, 20*time.Millisecond, "the refusal is logged")
	require.Equal(t, 0, l.others(t), "the replica connected to another user's socket")
	require.Contains(t, logs.String(), "uid 65534")

	// Root's socket: the replica's next attempt connects.
	require.NoError(t, os.Lchown(socket, 0, 0))
	require.Eventually(t, func() bool {
		l.mu.Lock()
		defer l.mu.Unlock()
		return l.accepted > l.own
	}, 30*time.Second, 20*time.Millisecond, "the replica connects to root's socket")
	require.Equal(t, 1, strings.Count(logs.String(), "refusing the server's admin socket"), "said once, not at every attempt")
}
