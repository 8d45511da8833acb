package dev

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// Challenge files go where every caller can reach them: under the data dir
// when others may traverse it, else under the temp dir.
func TestTokenDir(t *testing.T) {
	base, err := os.MkdirTemp("", "ferry-dev-tokendir-")
	require.NoError(t, err)
	defer os.RemoveAll(base)
	require.NoError(t, os.Chmod(base, 0o755))
	open := filepath.Join(base, "open", "data")
	require.NoError(t, os.MkdirAll(open, 0o711))
	got, err := TokenDir(open)
	require.NoError(t, err)
	require.Equal(t, filepath.Join(open, "tokens"), got)

	home := filepath.Join(base, "home")
	require.NoError(t, os.MkdirAll(filepath.Join(home, "data"), 0o711))
	require.NoError(t, os.Chmod(home, 0o750))
	got, err = TokenDir(filepath.Join(home, "data"))
	require.NoError(t, err)
	require.True(t, strings.HasPrefix(got, os.TempDir()), got)
	require.Equal(t, "tokens", filepath.Base(got))
	defer os.RemoveAll(filepath.Dir(got))
	fi, err := os.Stat(filepath.Dir(got))
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o711), fi.Mode().Perm())
	require.True(t, traversable(filepath.Dir(got)))
	again, err := TokenDir(filepath.Join(home, "data"))
	require.NoError(t, err)
	require.Equal(t, got, again, "the same place on every start")

	// A directory of that name that others may write is refused.
	require.NoError(t, os.Chmod(filepath.Dir(got), 0o777))
	_, err = TokenDir(filepath.Join(home, "data"))
	require.Error(t, err)
}

// The Arc endpoint's challenge files go to the one directory Azure SDKs
// accept when the stack can own it, and elsewhere, with the reason, when it
// cannot: another agent serves himds's address, the directory is someone
// else's, or another ferry dev holds it.
func TestChooseArc(t *testing.T) {
	if os.Geteuid() != 0 {
		// Running as another user is the case below; it is the first check.
		a, err := chooseArc(filepath.Join(t.TempDir(), "tokens"), "127.0.0.1:1", t.TempDir())
		require.NoError(t, err)
		require.Contains(t, a.why, "only root")
		t.Skip("the rest needs root")
	}
	// Under a directory every user may traverse, as TokenDir wants.
	base, err := os.MkdirTemp("", "ferry-dev-arc-")
	require.NoError(t, err)
	defer os.RemoveAll(base)
	require.NoError(t, os.Chmod(base, 0o755))
	system := filepath.Join(base, "var", "opt", "azcmagent", "tokens")
	data := filepath.Join(base, "data")
	require.NoError(t, os.MkdirAll(data, 0o711))
	// Port 0 is never served: a dial there is refused.
	const free = "127.0.0.1:0"
	a, err := chooseArc(system, free, data)
	require.NoError(t, err)
	require.Equal(t, system, a.dir)
	require.Empty(t, a.why)
	fi, err := os.Stat(system)
	require.NoError(t, err)
	require.Equal(t, os.ModeDir|0o711, fi.Mode())

	// A second stack finds it taken, and says so.
	b, err := chooseArc(system, free, data)
	require.NoError(t, err)
	require.Equal(t, filepath.Join(data, "tokens"), b.dir)
	require.Equal(t, "another ferry dev uses it", b.why)
	a.release()
	c, err := chooseArc(system, free, data)
	require.NoError(t, err)
	require.Equal(t, system, c.dir, "free again once released")
	c.release()

	// Another agent on himds's address owns it.
	himds, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer himds.Close()
	d, err := chooseArc(system, himds.Addr().String(), data)
	require.NoError(t, err)
	require.Equal(t, filepath.Join(data, "tokens"), d.dir)
	require.Contains(t, d.why, "another agent serves "+himds.Addr().String())

	// A directory of another user's is left alone.
	require.NoError(t, os.Chown(system, 65534, 65534))
	e, err := chooseArc(system, free, data)
	require.NoError(t, err)
	require.Equal(t, filepath.Join(data, "tokens"), e.dir)
	require.Contains(t, e.why, "belongs to uid 65534")
}
