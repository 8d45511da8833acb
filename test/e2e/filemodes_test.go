package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/internal/roottest"
	"github.com/ferry-id/ferry/test/testcluster"
)

// requireOwned checks a file's (or directory's) permission bits and owner.
func requireOwned(t *testing.T, path string, mode os.FileMode, uid uint32) {
	t.Helper()
	fi, err := os.Lstat(path)
	require.NoError(t, err)
	require.Equal(t, mode, fi.Mode().Perm(), "mode of %s", path)
	require.Equal(t, uid, fi.Sys().(*syscall.Stat_t).Uid, "owner of %s", path)
}

// TestTrustBoundaryFiles reads, through real server and agent processes,
// what guards the local trust boundary on disk: the admin socket (full
// control of the trust domain) is the server user's alone, and another user's
// call to it is refused by the kernel; the server's CA and JWT signing keys
// and the agent's saved key, SVID and bundle are 0600 files of the service's
// user in 0700 directories.
func TestTrustBoundaryFiles(t *testing.T) {
	roottest.Require(t)
	// The admin socket sits in a directory every user may traverse: only its
	// own mode keeps other users out.
	c := testcluster.New(t, testcluster.Options{Nodes: 1, PublicAdminSocket: true})
	n := c.Nodes[0]
	const serverUID = 0 // the server runs as the test: root

	t.Run("admin socket", func(t *testing.T) {
		fi, err := os.Lstat(n.Socket)
		require.NoError(t, err)
		require.Equal(t, os.ModeSocket, fi.Mode().Type())
		requireOwned(t, n.Socket, 0o600, serverUID)
		requireOwned(t, filepath.Dir(n.Socket), 0o755, 0)

		// The server's user is served ...
		out, err := n.CLI("entry", "list")
		require.NoError(t, err, "%s", out)
		// ... another user's call is refused by the kernel at connect.
		for _, uid := range []uint32{nobodyUID, 1000} {
			cmd := asUser(uid, c.Bin, "entry", "list", "--socket", n.Socket, "--timeout", "10s")
			b, err := cmd.CombinedOutput()
			require.Error(t, err, "uid %d commands the trust domain: %s", uid, b)
			require.Contains(t, string(b), "connect: permission denied", "uid %d", uid)
		}
	})

	t.Run("server keys", func(t *testing.T) {
		data := filepath.Join(n.Dir, "data")
		caDir := filepath.Join(data, "ca")
		requireOwned(t, data, 0o700, serverUID)
		requireOwned(t, caDir, 0o700, serverUID)
		var x509Keys, jwtKeys int
		require.Eventually(t, func() bool {
			x509Keys, jwtKeys = 0, 0
			entries, err := os.ReadDir(caDir)
			require.NoError(t, err)
			for _, e := range entries {
				switch {
				case strings.HasPrefix(e.Name(), "x509-") && strings.HasSuffix(e.Name(), ".key"):
					x509Keys++
				case strings.HasPrefix(e.Name(), "jwt-") && strings.HasSuffix(e.Name(), ".key"):
					jwtKeys++
				}
			}
			return x509Keys > 0 && jwtKeys > 0
		}, 30*time.Second, 50*time.Millisecond, "the node's CA and JWT keys are on disk")
		entries, err := os.ReadDir(caDir)
		require.NoError(t, err)
		for _, e := range entries {
			requireOwned(t, filepath.Join(caDir, e.Name()), 0o600, serverUID)
		}
	})

	t.Run("agent keys", func(t *testing.T) {
		// The agent runs as a service user of its own.
		const agentUID = nobodyUID
		a := c.StartAgentOpts("svc", testcluster.AgentOptions{UID: agentUID})
		data := filepath.Join(a.Dir, "data")
		session := filepath.Join(data, "session")
		files := []string{"agent-key.pem", "agent-svid.pem", "bundle.pem"}
		require.Eventually(t, func() bool {
			for _, f := range files {
				if _, err := os.Lstat(filepath.Join(session, f)); err != nil {
					return false
				}
			}
			return true
		}, 30*time.Second, 50*time.Millisecond, "the agent saves its key, SVID and bundle")
		requireOwned(t, data, 0o700, agentUID)
		requireOwned(t, session, 0o700, agentUID)
		for _, f := range files {
			requireOwned(t, filepath.Join(session, f), 0o600, agentUID)
		}
		// Another user cannot read the key.
		out, err := asUser(1000, "cat", filepath.Join(session, "agent-key.pem")).CombinedOutput()
		require.Error(t, err)
		require.Contains(t, string(out), "Permission denied")
		require.NotContains(t, string(out), "PRIVATE KEY")
		// The Workload API socket is the agent user's, for every user to
		// reach (attestation decides what they get).
		requireOwned(t, a.Socket, 0o777, agentUID)
		requireOwned(t, filepath.Dir(a.Socket), 0o755, agentUID)
	})
}
