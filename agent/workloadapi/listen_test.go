package workloadapi_test

import (
	"context"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"github.com/stretchr/testify/require"

	ferrywl "github.com/ferry-id/ferry/agent/workloadapi"
)

func TestListenMakesWorldAccessibleSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "agent", "public", "api.sock")
	l, err := ferrywl.Listen(path)
	require.NoError(t, err)
	defer l.Close()

	fi, err := os.Stat(path)
	require.NoError(t, err)
	require.Equal(t, os.ModeSocket, fi.Mode().Type())
	require.Equal(t, os.FileMode(0o777), fi.Mode().Perm())
	dir, err := os.Stat(filepath.Dir(path))
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o755), dir.Mode().Perm())

	// A second agent must not steal a live socket.
	_, err = ferrywl.Listen(path)
	require.ErrorContains(t, err, "in use")
}

func TestListenReplacesStaleSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "api.sock")
	old, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	require.NoError(t, err)
	old.SetUnlinkOnClose(false) // as after a crash
	require.NoError(t, old.Close())
	_, err = os.Lstat(path)
	require.NoError(t, err)

	l, err := ferrywl.Listen(path)
	require.NoError(t, err)
	require.NoError(t, l.Close())
}

func TestListenRefusals(t *testing.T) {
	t.Run("relative path", func(t *testing.T) {
		_, err := ferrywl.Listen("api.sock")
		require.ErrorContains(t, err, "not absolute")
	})
	t.Run("not a socket", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "api.sock")
		require.NoError(t, os.WriteFile(path, []byte("keep me"), 0o600))
		_, err := ferrywl.Listen(path)
		require.ErrorContains(t, err, "not a socket")
		data, err := os.ReadFile(path)
		require.NoError(t, err)
		require.Equal(t, "keep me", string(data))
	})
	t.Run("writable directory", func(t *testing.T) {
		dir := t.TempDir()
		require.NoError(t, os.Chmod(dir, 0o777))
		_, err := ferrywl.Listen(filepath.Join(dir, "api.sock"))
		require.ErrorContains(t, err, "writable by group or others")
	})
}

func TestNewRequiresManagerAndAttestor(t *testing.T) {
	_, err := ferrywl.New(ferrywl.Config{})
	require.ErrorContains(t, err, "Manager is required")
	_, err = ferrywl.New(ferrywl.Config{Manager: onlyManager{}})
	require.ErrorContains(t, err, "Attestor is required")
}

func TestRunServesUntilCancelled(t *testing.T) {
	mgr := newFakeManager(t, newCA(t, ownTD))
	mgr.setEntries(entry("e1", "spiffe://example.org/web", ""))
	path := filepath.Join(t.TempDir(), "api.sock")
	srv, err := ferrywl.New(ferrywl.Config{
		SocketPath: path,
		Manager:    mgr,
		Attestor:   ferrywl.WorkloadAttestors(mgr, mustUnixAttestor(t)),
		Log:        slog.New(slog.DiscardHandler),
	})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx) }()

	// The socket file appears at bind, before listen: retry until served.
	var svid *x509svid.SVID
	require.Eventually(t, func() bool {
		c, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		svid, err = workloadapi.FetchX509SVID(c, workloadapi.WithAddr("unix://"+path))
		return err == nil
	}, 10*time.Second, 20*time.Millisecond)
	require.Equal(t, "spiffe://example.org/web", svid.ID.String())

	cancel()
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return")
	}
	_, err = os.Lstat(path)
	require.True(t, os.IsNotExist(err), "socket removed on exit")
}
