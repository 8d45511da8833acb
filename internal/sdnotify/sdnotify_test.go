package sdnotify_test

import (
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/internal/sdnotify"
)

// listen makes a notify socket as systemd does (a unixgram socket) and
// returns the name to put in NOTIFY_SOCKET.
func listen(t *testing.T, abstract bool) (*net.UnixConn, string) {
	t.Helper()
	name := filepath.Join(t.TempDir(), "notify")
	env := name
	if abstract {
		env = "@ferry-sdnotify-test-" + strconv.Itoa(os.Getpid())
		name = "\x00" + env[1:]
	}
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return c, env
}

func read(t *testing.T, c *net.UnixConn) string {
	t.Helper()
	buf := make([]byte, 4096)
	n, err := c.Read(buf)
	require.NoError(t, err)
	return string(buf[:n])
}

func TestNotifySendsEachState(t *testing.T) {
	for _, abstract := range []bool{false, true} {
		t.Run("abstract="+strconv.FormatBool(abstract), func(t *testing.T) {
			c, env := listen(t, abstract)
			t.Setenv("NOTIFY_SOCKET", env)

			require.NoError(t, sdnotify.Ready("serving\non two lines"))
			require.Equal(t, "READY=1\nSTATUS=serving on two lines", read(t, c))

			require.NoError(t, sdnotify.Reloading(""))
			got := read(t, c)
			require.True(t, strings.HasPrefix(got, "RELOADING=1\nMONOTONIC_USEC="), got)
			usec, err := strconv.ParseInt(strings.TrimPrefix(got, "RELOADING=1\nMONOTONIC_USEC="), 10, 64)
			require.NoError(t, err)
			require.Positive(t, usec)

			require.NoError(t, sdnotify.Stopping("stopping"))
			require.Equal(t, "STOPPING=1\nSTATUS=stopping", read(t, c))

			require.NoError(t, sdnotify.Status("waiting"))
			require.Equal(t, "STATUS=waiting", read(t, c))
		})
	}
}

func TestNotifyWithoutServiceManager(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	sent, err := sdnotify.Notify("READY=1")
	require.NoError(t, err)
	require.False(t, sent)
	require.NoError(t, sdnotify.Ready("x"))
}

func TestNotifyBadSocket(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "relative/path")
	_, err := sdnotify.Notify("READY=1")
	require.ErrorContains(t, err, "neither a path nor an abstract name")

	t.Setenv("NOTIFY_SOCKET", filepath.Join(t.TempDir(), "nobody-listens"))
	_, err = sdnotify.Notify("READY=1")
	require.Error(t, err)
}
