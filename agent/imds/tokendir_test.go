package imds_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/agent/imds"
	"github.com/ferry-id/ferry/internal/roottest"
)

// TestArcTokenDirParentsChecked: the directory above the challenge files'
// must be one no other user can change (they could swap the token directory
// for theirs); the endpoint refuses to start and names it.
func TestArcTokenDirParentsChecked(t *testing.T) {
	roottest.Require(t)
	parent := filepath.Join(sharedTempDir(t), "azcmagent")
	require.NoError(t, os.Mkdir(parent, 0o755))
	require.NoError(t, os.Chown(parent, nobody, nobody))
	_, err := imds.New(imds.Config{Mode: imds.ModeArc, Tokens: newFakeTokens(), TokenDir: filepath.Join(parent, "tokens"), Address: "127.0.0.1:0"})
	require.ErrorContains(t, err, parent+" (owner uid 65534")
	_, err = os.Lstat(filepath.Join(parent, "tokens"))
	require.ErrorIs(t, err, os.ErrNotExist, "nothing made in it")
}
