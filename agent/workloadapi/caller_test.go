package workloadapi_test

import (
	"crypto/sha256"
	"encoding/hex"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	ferrywl "github.com/ferry-id/ferry/agent/workloadapi"
	"github.com/ferry-id/ferry/attestors/workload/unix"
	"github.com/ferry-id/ferry/internal/hostilecaller"
	"github.com/ferry-id/ferry/internal/roottest"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

// uidEntry is an entry for a unix uid.
func uidEntry(id, spiffeID string, uid int) *ferrypb.Entry {
	return selEntry(id, spiffeID, "uid:"+strconv.Itoa(uid))
}

// selEntry is an entry with unix selectors (values after "unix:").
func selEntry(id, spiffeID string, values ...string) *ferrypb.Entry {
	e := &ferrypb.Entry{Id: id, SpiffeId: spiffeID}
	for _, v := range values {
		e.Selectors = append(e.Selectors, &ferrypb.Selector{Type: "unix", Value: v})
	}
	return e
}

// callerBinary copies the test binary where every uid may execute it, to
// play hostile callers (internal/hostilecaller).
func callerBinary(t *testing.T) string {
	t.Helper()
	bin, err := hostilecaller.Binary(publicDir(t))
	require.NoError(t, err)
	return bin
}

// runCaller plays the hostile caller mode against f's socket, as cred (nil:
// as this process), and returns its output.
func runCaller(t *testing.T, bin string, f *fixture, mode string, cred *syscall.Credential, env ...string) string {
	t.Helper()
	cmd := hostilecaller.Command(bin, mode, append([]string{hostilecaller.EnvSocket + "=" + f.socket}, env...)...)
	if cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	}
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "caller output: %s", out)
	return string(out)
}

// TestSetuidExecAfterConnect is the attack that gave an unprivileged user
// root's X509-SVID: as uid 65534, connect, hand the connection to a child,
// and execute /usr/bin/passwd (setuid root, waiting on its stdin); the
// child then calls on the inherited connection. The process the agent
// pinned now has effective uid 0, and an entry selects unix:uid:0: the call
// is refused, and nothing is looked up for it.
func TestSetuidExecAfterConnect(t *testing.T) {
	roottest.Require(t)
	if fi, err := os.Stat("/usr/bin/passwd"); err != nil || fi.Mode()&os.ModeSetuid == 0 {
		roottest.Skipf(t, "/usr/bin/passwd is not a setuid program here (%v)", err)
	}
	f := startServer(t) // its entries select unix:uid:0, this test's uid
	cmd := hostilecaller.Command(callerBinary(t), hostilecaller.ModeSetuidExec, hostilecaller.EnvSocket+"="+f.socket)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, stop, err := hostilecaller.Start(cmd)
	require.NoError(t, err)
	t.Cleanup(stop)
	got, err := out.Await("inherited", 60*time.Second)
	require.NoError(t, err)
	require.Equal(t, "PermissionDenied ids= workload: caller's ids are not the ids it connected with: uids (real/effective/saved/fs) 65534/0/0/0, connected as uid 65534", got, out.String())

	line := f.log.waitCall(t, "FetchX509SVID", cmd.Process.Pid)
	require.Equal(t, "PermissionDenied", line["code"])
	require.Equal(t, float64(65534), line["uid"])
	require.Zero(t, f.mgr.subscribes.Load(), "nothing looked up for the refused call")
}

// TestCredentialsRaisedAfterConnect is the reverse of
// TestCallerChangesCredentials: a process that keeps root as its saved uid
// connects as uid 65534, and becomes root again. It is refused before (its
// saved uid is not the uid it connected as) and after; without the check it
// would be attested as root, whose entry exists.
func TestCredentialsRaisedAfterConnect(t *testing.T) {
	roottest.Require(t)
	f := startServer(t)
	f.mgr.setEntries(
		uidEntry("e-root", "spiffe://example.org/root", 0),
		uidEntry("e-nobody", "spiffe://example.org/nobody", 65534),
	)
	out := runCaller(t, callerBinary(t), f, hostilecaller.ModeRaise, nil)
	require.Contains(t, out, "saved=PermissionDenied ids= workload: caller's ids are not the ids it connected with: uids (real/effective/saved/fs) 65534/65534/0/65534, connected as uid 65534")
	require.Contains(t, out, "raised=PermissionDenied ids= workload: caller's ids are not the ids it connected with: uids (real/effective/saved/fs) 0/0/0/0, connected as uid 65534")
	require.Zero(t, f.mgr.subscribes.Load())
}

// TestGroupsChangedAfterConnect: when entries select supplementary groups,
// a caller's groups must be those it had when it connected (SO_PEERGROUPS);
// when no entry uses them, they are not compared.
func TestGroupsChangedAfterConnect(t *testing.T) {
	roottest.Require(t)
	bin := callerBinary(t)
	noGroups := &syscall.Credential{Uid: 0, Gid: 0, Groups: []uint32{}}

	t.Run("groups selected", func(t *testing.T) {
		f := startServer(t)
		f.mgr.setEntries(selEntry("e-group", "spiffe://example.org/group", "supplementary_gid:4242"))
		out := runCaller(t, bin, f, hostilecaller.ModeGroups, noGroups)
		require.Contains(t, out, "changed=PermissionDenied ids= workload: caller's ids are not the ids it connected with: supplementary groups [4242], connected with []")
		require.Contains(t, out, "fresh=OK ids=spiffe://example.org/group", "a connection made with the group is served")
	})
	t.Run("many groups", func(t *testing.T) {
		// More groups than the first SO_PEERGROUPS buffer holds.
		many := &syscall.Credential{Uid: 0, Gid: 0}
		var want []string
		for g := uint32(5000); g < 5040; g++ {
			many.Groups = append(many.Groups, g)
			want = append(want, strconv.Itoa(int(g)))
		}
		f := startServer(t)
		f.mgr.setEntries(selEntry("e-group", "spiffe://example.org/group", "supplementary_gid:4242"))
		out := runCaller(t, bin, f, hostilecaller.ModeGroups, many)
		require.Contains(t, out, "changed=PermissionDenied ids= workload: caller's ids are not the ids it connected with: supplementary groups [4242], connected with ["+strings.Join(want, " ")+"]")
		require.Contains(t, out, "fresh=OK ids=spiffe://example.org/group")
	})
	t.Run("groups unused", func(t *testing.T) {
		f := startServer(t)
		f.mgr.setEntries(uidEntry("e-root", "spiffe://example.org/root", 0))
		out := runCaller(t, bin, f, hostilecaller.ModeGroups, noGroups)
		require.Contains(t, out, "changed=OK ids=spiffe://example.org/root")
	})
}

// TestExecAfterConnect: a caller that executes another program after
// connecting is attested as the program it runs when it calls. unix:path
// and unix:sha256 describe the program that asks, not the one that
// connected.
func TestExecAfterConnect(t *testing.T) {
	roottest.Require(t) // the copies must be executable from a directory other uids may reach
	before := callerBinary(t)
	data, err := os.ReadFile(before)
	require.NoError(t, err)
	// Another program: the same code with bytes appended, at another path.
	after := filepath.Join(filepath.Dir(before), "other.test")
	data = append(data, []byte("another program")...)
	require.NoError(t, os.WriteFile(after, data, 0o755))
	sum := sha256.Sum256(data)
	beforeData, err := os.ReadFile(before)
	require.NoError(t, err)
	beforeSum := sha256.Sum256(beforeData)

	f := startServer(t, func(c *ferrywl.Config) {
		ua, err := unix.New(unix.Config{Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
		require.NoError(t, err)
		c.Attestor = ferrywl.WorkloadAttestors(c.Manager.(ferrywl.KindsSource), ua)
		// The connection is opened before the exec and used after it:
		// starting the second program may take long on a loaded machine,
		// and the agent must not close the silent connection meanwhile.
		c.Limits.HandshakeTimeout = time.Hour
	})
	f.mgr.setEntries(
		selEntry("e-before", "spiffe://example.org/before", "path:"+before, "sha256:"+hex.EncodeToString(beforeSum[:])),
		selEntry("e-after", "spiffe://example.org/after", "path:"+after, "sha256:"+hex.EncodeToString(sum[:])),
		selEntry("e-after-path", "spiffe://example.org/after-path", "path:"+after),
	)
	out := runCaller(t, before, f, hostilecaller.ModeExec, nil, hostilecaller.EnvExec+"="+after)
	require.Contains(t, out, "before=OK ids=spiffe://example.org/before\n")
	require.Contains(t, out, "inherited=OK ids=spiffe://example.org/after,spiffe://example.org/after-path\n", "agent log:\n%s", f.log.String())
}
