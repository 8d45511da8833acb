package server

import (
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestAdminSocketPrivateFromBirth: the admin socket is 0600 from the moment
// it exists, even under umask 0, so no other user can connect in the moment
// between bind and chmod. The listen runs in a child process, where changing
// the umask affects no other test.
func TestAdminSocketPrivateFromBirth(t *testing.T) {
	if path := os.Getenv("FERRY_TEST_PRIVATE_SOCKET"); path != "" {
		syscall.Umask(0)
		l, err := listenPrivate(path)
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		// Read before anything else touches the file.
		fi, err := os.Lstat(path)
		if err != nil {
			t.Fatal(err)
		}
		if got := fi.Mode().Perm(); got != 0o600 {
			t.Fatalf("socket born with mode %#o under umask 0", got)
		}
		return
	}
	path := filepath.Join(t.TempDir(), "admin.sock")
	cmd := exec.Command(os.Args[0], "-test.run", "^TestAdminSocketPrivateFromBirth$", "-test.count=1")
	cmd.Env = append(os.Environ(), "FERRY_TEST_PRIVATE_SOCKET="+path)
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)
	require.Contains(t, string(out), "PASS")
}
