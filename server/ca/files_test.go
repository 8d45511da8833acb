package ca_test

import (
	"bytes"
	"context"
	"encoding/pem"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/internal/roottest"
	"github.com/ferry-id/ferry/server/ca"
)

func TestDataDirPermissions(t *testing.T) {
	var logs bytes.Buffer
	e := newEnv(t, func(c *ca.Config) { c.Logger = testLogger(t, &logs) })
	require.NoError(t, e.ca.Rotate(context.Background()))
	_, err := e.ca.Prepare(context.Background(), ca.KindJWT)
	require.NoError(t, err)

	fi, err := os.Stat(e.cfg.DataDir)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o700), fi.Mode().Perm())
	entries, err := os.ReadDir(e.cfg.DataDir)
	require.NoError(t, err)
	keys := 0
	for _, de := range entries {
		fi, err := de.Info()
		require.NoError(t, err)
		assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm(), de.Name())
		if strings.HasSuffix(de.Name(), ".key") {
			keys++
			data, err := os.ReadFile(filepath.Join(e.cfg.DataDir, de.Name()))
			require.NoError(t, err)
			block, _ := pem.Decode(data)
			require.NotNil(t, block)
			assert.Equal(t, "PRIVATE KEY", block.Type)
			assert.NotContains(t, logs.String(), string(data[30:60]), "key material logged")
		}
	}
	assert.Equal(t, 3, keys, "x509 + jwt + prepared jwt")

	state, err := os.ReadFile(filepath.Join(e.cfg.DataDir, "authorities.json"))
	require.NoError(t, err)
	assert.NotContains(t, string(state), "PRIVATE KEY")
	assert.NotContains(t, logs.String(), "PRIVATE KEY")
	assert.Contains(t, logs.String(), "authority activated", "lifecycle is logged")
}

func TestLoosePermissionsAreTightened(t *testing.T) {
	e := newReadyEnv(t, nil)
	dir := e.cfg.DataDir
	require.NoError(t, os.Chmod(dir, 0o755))
	var keyFile string
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	for _, de := range entries {
		if strings.HasSuffix(de.Name(), ".key") {
			keyFile = filepath.Join(dir, de.Name())
		}
	}
	require.NotEmpty(t, keyFile)
	require.NoError(t, os.Chmod(keyFile, 0o644))

	e.reopen(t)
	fi, err := os.Stat(dir)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o700), fi.Mode().Perm())
	fi, err = os.Stat(keyFile)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
}

func TestOrphanKeyFilesRemoved(t *testing.T) {
	e := newReadyEnv(t, nil)
	orphan := filepath.Join(e.cfg.DataDir, "x509-deadbeef.key")
	require.NoError(t, os.WriteFile(orphan, []byte("junk"), 0o600))
	e.reopen(t)
	_, err := os.Stat(orphan)
	assert.ErrorIs(t, err, os.ErrNotExist)
	assert.Len(t, e.ca.List(""), 2)
}

// TestOtherUserCannotReadKeys runs cat as uid 65534 against the data dir
// while the dir's parents are world-searchable, so only the CA's own modes
// stand in the way.
func TestOtherUserCannotReadKeys(t *testing.T) {
	roottest.Require(t)
	if _, err := exec.LookPath("cat"); err != nil {
		roottest.Skipf(t, "cat is not installed")
	}
	e := newReadyEnv(t, nil)
	for d := filepath.Dir(e.cfg.DataDir); d != "/" && d != os.TempDir(); d = filepath.Dir(d) {
		require.NoError(t, os.Chmod(d, 0o755))
	}
	entries, err := os.ReadDir(e.cfg.DataDir)
	require.NoError(t, err)
	for _, de := range entries {
		path := filepath.Join(e.cfg.DataDir, de.Name())
		cmd := exec.Command("cat", path)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		out, err := cmd.CombinedOutput()
		require.Error(t, err, "uid 65534 read %s", de.Name())
		assert.Contains(t, string(out), "Permission denied")
	}
	// The same child can read a world-readable file beside the data dir,
	// so the refusal above is the data dir's doing.
	probe := filepath.Join(filepath.Dir(e.cfg.DataDir), "probe")
	require.NoError(t, os.WriteFile(probe, []byte("ok"), 0o644))
	require.NoError(t, os.Chmod(probe, 0o644))
	cmd := exec.Command("cat", probe)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, string(out))
}
