package e2e

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/internal/hostilecaller"
	"github.com/ferry-id/ferry/internal/roottest"
	"github.com/ferry-id/ferry/test/testcluster"
)

// The test binary also plays the hostile callers (internal/hostilecaller):
// run with $FERRY_HOSTILE_CALLER set, it plays that caller and exits before
// any test runs.
func init() { hostilecaller.Main() }

const (
	hostileRootID   = "spiffe://example.org/hostile/root"
	hostileNobodyID = "spiffe://example.org/hostile/nobody"
	// hostileGroup is the only group allowed on the managed-identity
	// endpoint; uid 65534 is not in it.
	hostileGroup = 4747
	// The endpoint's challenge quota per uid (imds.Config.MaxChallengesPerUID).
	challengeQuota = 32
)

// hostileStack is a server and an agent serving the Workload API and the
// Arc-style managed-identity endpoint with allowed_groups, and an entry for
// root and one for uid 65534.
type hostileStack struct {
	agent    *testcluster.Agent
	arcAddr  string
	endpoint string
	tokenDir string
	bin      string // the test binary, executable by every uid
}

func newHostileStack(t *testing.T) *hostileStack {
	t.Helper()
	c := testcluster.New(t, testcluster.Options{Nodes: 1})
	dir, err := os.MkdirTemp("", "ferry-hostile-")
	require.NoError(t, err)
	require.NoError(t, os.Chmod(dir, 0o755))
	t.Cleanup(func() { os.RemoveAll(dir) })
	s := &hostileStack{arcAddr: testcluster.FreeAddr(t), tokenDir: filepath.Join(dir, "tokens")}
	s.endpoint = "http://" + s.arcAddr + "/metadata/identity/oauth2/token"
	s.agent = c.StartAgentWith("hostile", fmt.Sprintf(`  imds {
    arc_addr       = %q
    token_dir      = %q
    authority      = "https://127.0.0.1:9"
    allowed_groups = ["%d"]
  }`, s.arcAddr, s.tokenDir, hostileGroup))
	for id, uid := range map[string]int{hostileRootID: 0, hostileNobodyID: 65534} {
		out, err := c.Nodes[0].CLI("entry", "create", "--spiffe-id", id, "--parent-id", s.agent.ID, "--selector", "unix:uid:"+strconv.Itoa(uid))
		require.NoError(t, err, out)
	}
	// The agent serves the entries once this process (root) gets its SVID.
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for {
		svid, err := workloadapi.FetchX509SVID(ctx, workloadapi.WithAddr(s.agent.SocketAddr()))
		if err == nil && svid.ID.String() == hostileRootID {
			break
		}
		require.NoError(t, ctx.Err(), "the agent never served root's entry: %v", err)
		time.Sleep(100 * time.Millisecond)
	}
	require.Eventually(t, func() bool {
		conn, err := net.Dial("tcp", s.arcAddr)
		if err == nil {
			conn.Close()
		}
		return err == nil
	}, 60*time.Second, 50*time.Millisecond, "the managed-identity endpoint listens")
	s.bin, err = hostilecaller.Binary(dir)
	require.NoError(t, err)
	return s
}

// play runs a hostile caller against the stack as cred (nil: as root) and
// returns its output.
func (s *hostileStack) play(t *testing.T, mode string, cred *syscall.Credential, env ...string) *hostilecaller.Output {
	t.Helper()
	cmd := hostilecaller.Command(s.bin, mode, append([]string{
		hostilecaller.EnvSocket + "=" + s.agent.Socket,
		hostilecaller.EnvAddr + "=" + s.arcAddr,
		hostilecaller.EnvQuery + "=api-version=2020-06-01&resource=https%3A%2F%2Fmanagement.azure.com",
	}, env...)...)
	if cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	}
	out := &hostilecaller.Output{}
	cmd.Stdout, cmd.Stderr = out, out
	require.NoError(t, cmd.Run(), "%s", out)
	return out
}

func result(t *testing.T, out *hostilecaller.Output, name string) string {
	t.Helper()
	r, ok := out.Result(name)
	require.True(t, ok, "no %s= in: %s", name, out)
	return r
}

const refusedIDs = "PermissionDenied ids= workload: caller's ids are not the ids it connected with: "

var nobodyCred = &syscall.Credential{Uid: 65534, Gid: 65534}

// TestHostileLocalCallers plays other local users against a real agent:
// processes that change who they are after connecting to the Workload API,
// and clients that close their socket before the managed-identity endpoint
// looks at it. None of them gets an identity that is not theirs.
func TestHostileLocalCallers(t *testing.T) {
	if testing.Short() {
		t.Skip("starts real server and agent processes")
	}
	roottest.Require(t)
	s := newHostileStack(t)

	// As uid 65534: connect to the Workload API, hand the connection to a
	// child, execute /usr/bin/passwd (setuid root; its stdin an open pipe,
	// so it waits). The child's FetchX509SVID on the inherited connection
	// is refused, while an entry selects unix:uid:0.
	t.Run("setuid exec after connect", func(t *testing.T) {
		if fi, err := os.Stat("/usr/bin/passwd"); err != nil || fi.Mode()&os.ModeSetuid == 0 {
			roottest.Skipf(t, "/usr/bin/passwd is not a setuid program here (%v)", err)
		}
		cmd := hostilecaller.Command(s.bin, hostilecaller.ModeSetuidExec, hostilecaller.EnvSocket+"="+s.agent.Socket)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: nobodyCred}
		out, stop, err := hostilecaller.Start(cmd) // passwd waits on its stdin, an open pipe
		require.NoError(t, err)
		defer stop()
		got, err := out.Await("inherited", 60*time.Second)
		require.NoError(t, err)
		require.Equal(t, refusedIDs+"uids (real/effective/saved/fs) 65534/0/0/0, connected as uid 65534", got, out.String())
		require.Eventually(t, func() bool {
			return strings.Contains(s.agent.LogTail(200), "uids (real/effective/saved/fs) 65534/0/0/0, connected as uid 65534")
		}, 10*time.Second, 20*time.Millisecond, "the agent logs the refusal")
	})

	// A root process connects, then drops to uid 65534 (setresuid), whose
	// entry exists: its calls on that connection are refused. The reverse:
	// a process of uid 65534 that kept root as its saved uid connects, and
	// becomes root again: refused before and after.
	t.Run("ids changed after connect", func(t *testing.T) {
		out := s.play(t, hostilecaller.ModeDrop, nil)
		require.Equal(t, "OK ids="+hostileRootID, result(t, out, "before"))
		require.Equal(t, refusedIDs+"uids (real/effective/saved/fs) 65534/65534/65534/65534, connected as uid 0", result(t, out, "after"))

		out = s.play(t, hostilecaller.ModeRaise, nil)
		require.Equal(t, refusedIDs+"uids (real/effective/saved/fs) 65534/65534/0/65534, connected as uid 65534", result(t, out, "saved"))
		require.Equal(t, refusedIDs+"uids (real/effective/saved/fs) 0/0/0/0, connected as uid 65534", result(t, out, "raised"))
	})

	// A client of uid 65534 sends token requests to the managed-identity
	// endpoint and closes each socket before the agent reads it (the agent is
	// stopped meanwhile, so the order is certain): the kernel lists each
	// client socket in FIN_WAIT2 owned by uid 0 with inode 0. None is taken
	// for root: no challenge file is written, root's quota of challenges is
	// untouched, and allowed_groups (which admits root) is not bypassed.
	t.Run("closed socket on the managed-identity endpoint", func(t *testing.T) {
		server := netip.MustParseAddrPort(s.arcAddr)
		const batch = 8 // within the endpoint's concurrency limit
		for range (challengeQuota + batch) / batch {
			pid := s.agent.PID()
			require.NoError(t, syscall.Kill(pid, syscall.SIGSTOP))
			stopped := true
			defer func() {
				if stopped {
					_ = syscall.Kill(pid, syscall.SIGCONT)
				}
			}()
			out := s.play(t, hostilecaller.ModeSendClose, nobodyCred, hostilecaller.EnvN+"="+strconv.Itoa(batch))
			var clients []netip.AddrPort
			for line := range strings.Lines(out.String()) {
				if v, ok := strings.CutPrefix(strings.TrimSpace(line), "client="); ok {
					clients = append(clients, netip.MustParseAddrPort(v))
				}
			}
			require.Len(t, clients, batch, "%s", out)
			require.NoError(t, hostilecaller.WaitSockets(30*time.Second, func(socks []hostilecaller.Socket) bool {
				n := 0
				for _, so := range socks {
					for _, c := range clients {
						if so.Local == c && so.Remote == server && so.ClosedClient() {
							n++
						}
					}
				}
				return n == len(clients)
			}), "the closed client sockets become uid 0, inode 0")
			require.NoError(t, syscall.Kill(pid, syscall.SIGCONT))
			stopped = false
			require.NoError(t, hostilecaller.WaitSockets(30*time.Second, func(socks []hostilecaller.Socket) bool {
				for _, so := range socks {
					for _, c := range clients {
						if so.Local == server && so.Remote == c {
							return false
						}
					}
				}
				return true
			}), "the agent handles every closed connection")
		}
		files, err := os.ReadDir(s.tokenDir)
		require.NoError(t, err)
		require.Empty(t, files, "no challenge file for a closed socket")

		// Root's quota is whole: its request gets a challenge file of its own.
		resp, body := arcGet(t, s.endpoint, "https://management.azure.com", "")
		require.Equal(t, http.StatusUnauthorized, resp.StatusCode, "%v", body)
		path := strings.TrimPrefix(resp.Header.Get("WWW-Authenticate"), "Basic realm=")
		fi, err := os.Stat(path)
		require.NoError(t, err)
		require.Equal(t, uint32(0), fi.Sys().(*syscall.Stat_t).Uid)
		// allowed_groups holds for uid 65534 when its socket is open.
		out, err := asUser(65534, "curl", "-s", "-H", "Metadata: true", s.endpoint+"?api-version=2020-06-01&resource=https%3A%2F%2Fmanagement.azure.com").CombinedOutput()
		require.NoError(t, err, "%s", out)
		require.JSONEq(t, `{"error":"access_denied","error_description":"The caller is not a member of a group allowed to request tokens"}`, string(out))
		require.Contains(t, s.agent.LogTail(400), "the client has closed it", "the closed sockets were refused as such")
	})
}
