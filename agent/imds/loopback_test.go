package imds_test

import (
	"encoding/json"
	"errors"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"

	"github.com/ferry-id/ferry/agent/imds"
	"github.com/ferry-id/ferry/internal/roottest"
	"github.com/stretchr/testify/require"
)

func addAddrChild(t *testing.T, bin string, attr *syscall.SysProcAttr, addr string) childResult {
	t.Helper()
	cmd := exec.Command(bin)
	cmd.Env = append(os.Environ(), "IMDS_TEST_CHILD=addaddr", "CHILD_ADDR="+addr)
	cmd.SysProcAttr = attr
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) && attr.Cloneflags != 0 {
		// The child never ran: this kernel or sandbox refuses new network
		// namespaces. A child that ran and failed (a panic included) fails
		// the test below.
		roottest.Skipf(t, "cannot start a child in a new network namespace: %v", err)
	}
	require.NoError(t, err, "child failed; output: %s", out)
	var r childResult
	require.NoError(t, json.Unmarshal(out, &r), string(out))
	return r
}

func TestAddLoopbackAddress(t *testing.T) {
	requireRoot(t)
	bin := childBinary(t)

	// In a private network namespace, so the host is left alone.
	r := addAddrChild(t, bin, &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET}, "169.254.169.254")
	require.Empty(t, r.Error)
	require.Equal(t, 2, r.Attempts, "adding an address already present succeeds")
	require.Contains(t, strings.Split(r.AddrsLo, ","), "169.254.169.254/32")

	// Without CAP_NET_ADMIN the error says what is missing.
	r = addAddrChild(t, bin, &syscall.SysProcAttr{Credential: asNobody()}, "169.254.169.254")
	require.Contains(t, r.Error, "169.254.169.254/32")
	require.Contains(t, r.Error, "requires CAP_NET_ADMIN")
}

func TestAddLoopbackAddressInvalid(t *testing.T) {
	require.Error(t, imds.AddLoopbackAddress(netip.Addr{}))
}
