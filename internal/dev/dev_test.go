package dev

import (
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
