package workloadapi_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	workloadpb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	ferrywl "github.com/ferry-id/ferry/agent/workloadapi"
	"github.com/ferry-id/ferry/attestors/workload/unix"
	"github.com/ferry-id/ferry/internal/roottest"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

// Environment of the caller children (see callerChild).
const (
	childFDEnv   = "FERRY_WLAPI_FD"   // the inherited connection's descriptor
	childWaitEnv = "FERRY_WLAPI_WAIT" // "setuid": wait for the parent to run a setuid program
	childExecEnv = "FERRY_WLAPI_EXEC" // the program to execute with the connection
)

// callerChild runs the test binary as one of the hostile callers below and
// returns its exit code. Results go to stdout as "name=code ids=a,b msg".
func callerChild(mode string) int {
	socket := os.Getenv(childSocketEnv)
	fail := func(format string, args ...any) int {
		fmt.Printf("child error: "+format+"\n", args...)
		return 1
	}
	switch mode {
	case "passwd":
		// Connect, hand the connection to a child, and become
		// /usr/bin/passwd (setuid root), which waits on stdin.
		conn, err := net.Dial("unix", socket)
		if err != nil {
			return fail("dial: %v", err)
		}
		f, err := conn.(*net.UnixConn).File()
		if err != nil {
			return fail("file: %v", err)
		}
		exe, err := os.Executable()
		if err != nil {
			return fail("executable: %v", err)
		}
		child := exec.Command(exe)
		child.Env = []string{childModeEnv + "=inherited", childFDEnv + "=3", childWaitEnv + "=setuid", "HOME=/"}
		child.ExtraFiles = []*os.File{f}
		child.Stdout, child.Stderr = os.Stdout, os.Stderr
		if err := child.Start(); err != nil {
			return fail("start: %v", err)
		}
		err = syscall.Exec("/usr/bin/passwd", []string{"passwd"}, []string{"PATH=/usr/bin:/bin"})
		return fail("exec passwd: %v", err)
	case "inherited":
		if os.Getenv(childWaitEnv) == "setuid" {
			if err := waitSetuidParent(); err != nil {
				return fail("%v", err)
			}
		}
		fd, err := strconv.Atoi(os.Getenv(childFDEnv))
		if err != nil {
			return fail("fd: %v", err)
		}
		conn, err := net.FileConn(os.NewFile(uintptr(fd), "conn"))
		if err != nil {
			return fail("conn: %v", err)
		}
		fmt.Println("inherited=" + fetchOn(conn))
		return 0
	case "raise":
		// Started as root with uid 65534 as real and effective uid and root
		// kept as the saved uid: connect (the kernel records uid 65534),
		// call, become root again, call again on the same connection.
		if err := syscall.Setresgid(65534, 65534, 65534); err != nil {
			return fail("setresgid: %v", err)
		}
		if err := syscall.Setresuid(65534, 65534, 0); err != nil {
			return fail("setresuid: %v", err)
		}
		c, err := dialOnce(socket)
		if err != nil {
			return fail("%v", err)
		}
		fmt.Println("saved=" + c.fetch())
		if err := syscall.Setresuid(0, 0, 0); err != nil {
			return fail("setresuid: %v", err)
		}
		fmt.Println("raised=" + c.fetch())
		return 0
	case "groups":
		// Root with no supplementary groups connects, then joins group
		// 4242 and calls on that connection; a connection made after
		// joining is compared with the groups it connected with.
		c, err := dialOnce(socket)
		if err != nil {
			return fail("%v", err)
		}
		if err := syscall.Setgroups([]int{4242}); err != nil {
			return fail("setgroups: %v", err)
		}
		fmt.Println("changed=" + c.fetch())
		fresh, err := dialOnce(socket)
		if err != nil {
			return fail("%v", err)
		}
		fmt.Println("fresh=" + fresh.fetch())
		return 0
	case "exec":
		// Call on one connection as this program, then execute another
		// program that calls on a second connection made before the exec.
		c, err := dialOnce(socket)
		if err != nil {
			return fail("%v", err)
		}
		fmt.Println("before=" + c.fetch())
		conn, err := net.Dial("unix", socket)
		if err != nil {
			return fail("dial: %v", err)
		}
		f, err := conn.(*net.UnixConn).File()
		if err != nil {
			return fail("file: %v", err)
		}
		// dup clears close-on-exec.
		fd, err := syscall.Dup(int(f.Fd()))
		if err != nil {
			return fail("dup: %v", err)
		}
		prog := os.Getenv(childExecEnv)
		err = syscall.Exec(prog, []string{prog}, []string{childModeEnv + "=inherited", childFDEnv + "=" + strconv.Itoa(fd), "HOME=/"})
		return fail("exec: %v", err)
	}
	return fail("unknown mode %q", mode)
}

// waitSetuidParent waits until the parent process runs with an effective
// uid other than its real uid: it has executed its setuid program.
func waitSetuidParent() error {
	path := fmt.Sprintf("/proc/%d/status", os.Getppid())
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		for line := range strings.Lines(string(b)) {
			if f := strings.Fields(line); len(f) == 5 && f[0] == "Uid:" && f[1] != f[2] {
				return nil
			}
		}
		time.Sleep(5 * time.Millisecond)
	}
	return errors.New("parent never ran its setuid program")
}

// onceClient is a raw Workload API client on one connection, never redialed.
type onceClient struct {
	cc *grpc.ClientConn
}

func dialOnce(socket string) (*onceClient, error) {
	conn, err := net.Dial("unix", socket)
	if err != nil {
		return nil, fmt.Errorf("dial: %w", err)
	}
	return clientOn(conn)
}

func clientOn(conn net.Conn) (*onceClient, error) {
	var once sync.Once
	cc, err := grpc.NewClient("passthrough:///workload-api",
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(context.Context, string) (net.Conn, error) {
			var c net.Conn
			once.Do(func() { c = conn })
			if c == nil {
				return nil, errors.New("the one connection is gone")
			}
			return c, nil
		}))
	if err != nil {
		return nil, err
	}
	return &onceClient{cc: cc}, nil
}

// fetch calls FetchX509SVID and describes the first answer.
func (c *onceClient) fetch() string {
	ctx, cancel := context.WithTimeout(withHeader(context.Background()), 20*time.Second)
	defer cancel()
	stream, err := workloadpb.NewSpiffeWorkloadAPIClient(c.cc).FetchX509SVID(ctx, &workloadpb.X509SVIDRequest{}, grpc.WaitForReady(true))
	var resp *workloadpb.X509SVIDResponse
	if err == nil {
		resp, err = stream.Recv()
	}
	if err != nil {
		st := status.Convert(err)
		return fmt.Sprintf("%s ids= %s", st.Code(), st.Message())
	}
	var ids []string
	for _, s := range resp.GetSvids() {
		ids = append(ids, s.GetSpiffeId())
	}
	return "OK ids=" + strings.Join(ids, ",")
}

func fetchOn(conn net.Conn) string {
	c, err := clientOn(conn)
	if err != nil {
		return "client error: " + err.Error()
	}
	return c.fetch()
}

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

// childBinary copies the test binary where every uid may execute it.
func childBinary(t *testing.T) string {
	t.Helper()
	exe, err := os.Executable()
	require.NoError(t, err)
	data, err := os.ReadFile(exe)
	require.NoError(t, err)
	bin := filepath.Join(publicDir(t), "child.test")
	require.NoError(t, os.WriteFile(bin, data, 0o755))
	return bin
}

// syncBuffer collects a child's output; safe for concurrent use.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// runCaller runs the test binary as a caller child in mode with cred (nil:
// as this process) and returns its output.
func runCaller(t *testing.T, bin string, f *fixture, mode string, cred *syscall.Credential, env ...string) string {
	t.Helper()
	cmd := exec.Command(bin)
	cmd.Env = append([]string{childModeEnv + "=" + mode, childSocketEnv + "=" + f.socket, "HOME=/"}, env...)
	cmd.Dir = "/"
	if cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	}
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "child output: %s", out)
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
	bin := childBinary(t)

	cmd := exec.Command(bin)
	cmd.Env = []string{childModeEnv + "=passwd", childSocketEnv + "=" + f.socket, "HOME=/"}
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	stdin, err := cmd.StdinPipe() // kept open: passwd waits for a password
	require.NoError(t, err)
	out := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	require.NoError(t, cmd.Start())
	t.Cleanup(func() {
		stdin.Close()
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	require.Eventually(t, func() bool { return strings.Contains(out.String(), "inherited=") }, 30*time.Second, 10*time.Millisecond,
		"the child never called: %s", out)
	require.NotContains(t, out.String(), "child error")
	require.Contains(t, out.String(), "inherited=PermissionDenied ids= workload: caller's ids are not the ids it connected with: uids (real/effective/saved/fs) 65534/0/0/0, connected as uid 65534")

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
	out := runCaller(t, childBinary(t), f, "raise", nil)
	require.NotContains(t, out, "child error")
	require.Contains(t, out, "saved=PermissionDenied ids= workload: caller's ids are not the ids it connected with: uids (real/effective/saved/fs) 65534/65534/0/65534, connected as uid 65534")
	require.Contains(t, out, "raised=PermissionDenied ids= workload: caller's ids are not the ids it connected with: uids (real/effective/saved/fs) 0/0/0/0, connected as uid 65534")
	require.Zero(t, f.mgr.subscribes.Load())
}

// TestGroupsChangedAfterConnect: when entries select supplementary groups,
// a caller's groups must be those it had when it connected (SO_PEERGROUPS);
// when no entry uses them, they are not compared.
func TestGroupsChangedAfterConnect(t *testing.T) {
	roottest.Require(t)
	bin := childBinary(t)
	noGroups := &syscall.Credential{Uid: 0, Gid: 0, Groups: []uint32{}}

	t.Run("groups selected", func(t *testing.T) {
		f := startServer(t)
		f.mgr.setEntries(selEntry("e-group", "spiffe://example.org/group", "supplementary_gid:4242"))
		out := runCaller(t, bin, f, "groups", noGroups)
		require.NotContains(t, out, "child error")
		require.Contains(t, out, "changed=PermissionDenied ids= workload: caller's ids are not the ids it connected with: supplementary groups [4242], connected with []")
		require.Contains(t, out, "fresh=OK ids=spiffe://example.org/group", "a connection made with the group is served")
	})
	t.Run("groups unused", func(t *testing.T) {
		f := startServer(t)
		f.mgr.setEntries(uidEntry("e-root", "spiffe://example.org/root", 0))
		out := runCaller(t, bin, f, "groups", noGroups)
		require.NotContains(t, out, "child error")
		require.Contains(t, out, "changed=OK ids=spiffe://example.org/root")
	})
}

// TestExecAfterConnect: a caller that executes another program after
// connecting is attested as the program it runs when it calls. unix:path
// and unix:sha256 describe the program that asks, not the one that
// connected.
func TestExecAfterConnect(t *testing.T) {
	roottest.Require(t) // the copies must be executable from a directory other uids may reach
	before := childBinary(t)
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
	})
	f.mgr.setEntries(
		selEntry("e-before", "spiffe://example.org/before", "path:"+before, "sha256:"+hex.EncodeToString(beforeSum[:])),
		selEntry("e-after", "spiffe://example.org/after", "path:"+after, "sha256:"+hex.EncodeToString(sum[:])),
		selEntry("e-after-path", "spiffe://example.org/after-path", "path:"+after),
	)
	out := runCaller(t, before, f, "exec", nil, childExecEnv+"="+after)
	require.NotContains(t, out, "child error")
	require.Contains(t, out, "before=OK ids=spiffe://example.org/before\n")
	require.Contains(t, out, "inherited=OK ids=spiffe://example.org/after,spiffe://example.org/after-path\n")
}
