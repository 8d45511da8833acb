package e2e

import (
	"bufio"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/internal/hostilecaller"
	"github.com/ferry-id/ferry/internal/roottest"
	"github.com/ferry-id/ferry/test/testcluster"
)

// The tests here play another local user against real ferry processes: a
// user who creates the directories a role is pointed at before the role
// does, moves its socket aside and answers in its place, or offers its own
// socket to the CLI and the bridge.

// TestMain lets the test binary serve as the attacker's own program, run as
// another uid (see startListener).
func TestMain(m *testing.M) {
	if path := os.Getenv("FERRY_E2E_LISTEN"); path != "" {
		listenAndRelay(path, os.Getenv("FERRY_E2E_RELAY_TO"))
		return
	}
	os.Exit(m.Run())
}

// listenAndRelay listens on path, says "listening", and for each connection
// says "connection" and relays it to target (or closes it when target is
// empty), until killed.
func listenAndRelay(path, target string) {
	l, err := net.Listen("unix", path)
	if err != nil {
		fmt.Println("error:", err)
		os.Exit(1)
	}
	_ = os.Chmod(path, 0o777)
	fmt.Println("listening")
	for {
		c, err := l.Accept()
		if err != nil {
			os.Exit(1)
		}
		fmt.Println("connection")
		if target == "" {
			c.Close()
			continue
		}
		go func() {
			defer c.Close()
			up, err := net.Dial("unix", target)
			if err != nil {
				return
			}
			defer up.Close()
			go func() { _, _ = io.Copy(up, c) }()
			_, _ = io.Copy(c, up)
		}()
	}
}

// listener is an attacker's process listening on a unix socket; it counts
// the connections it accepts.
type listener struct {
	path    string
	mu      sync.Mutex
	n, own  int
	changed chan struct{}
}

// startListener runs the test binary as the attacker, listening on path and
// relaying to target (closing connections when target is empty).
func startListener(t *testing.T, path, target string) *listener {
	t.Helper()
	// The test binary sits in a directory only root may enter.
	bin, err := hostilecaller.Binary(testcluster.PublicDir(t, "ferry-e2e-"))
	require.NoError(t, err)
	cmd := asUser(attackerUID, bin)
	cmd.Env = append(cmd.Env, "FERRY_E2E_LISTEN="+path, "FERRY_E2E_RELAY_TO="+target)
	out, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	l := &listener{path: path, changed: make(chan struct{}, 1)}
	first := make(chan string, 1)
	go func() {
		s := bufio.NewScanner(out)
		if s.Scan() {
			first <- s.Text()
		}
		close(first)
		for s.Scan() {
			if s.Text() == "connection" {
				l.mu.Lock()
				l.n++
				l.mu.Unlock()
				select {
				case l.changed <- struct{}{}:
				default:
				}
			}
		}
	}()
	select {
	case line := <-first:
		require.Equal(t, "listening", line)
	case <-time.After(30 * time.Second):
		t.Fatal("the attacker's listener did not start")
	}
	return l
}

// others is how many connections the listener accepted besides settle's.
func (l *listener) others() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.n - l.own
}

// settle connects once itself and waits until the listener has counted it:
// connections are accepted in order, so every one made before is counted by
// then. It returns others().
func (l *listener) settle(t *testing.T) int {
	t.Helper()
	l.mu.Lock()
	want := l.n + 1
	l.own++
	l.mu.Unlock()
	c, err := net.Dial("unix", l.path)
	require.NoError(t, err)
	c.Close()
	deadline := time.After(30 * time.Second)
	for {
		l.mu.Lock()
		n := l.n
		l.mu.Unlock()
		if n >= want {
			return l.others()
		}
		select {
		case <-l.changed:
		case <-deadline:
			t.Fatal("the attacker's listener did not see the test's own connection")
		}
	}
}

// attackerDir is a directory the attacker made in the system temp dir
// (world-writable, sticky), before any ferry process did: the attack on a
// default under /tmp. Its path is returned with its mode.
func attackerDir(t *testing.T) (string, os.FileMode) {
	t.Helper()
	b := make([]byte, 6)
	_, err := rand.Read(b)
	require.NoError(t, err)
	dir := filepath.Join(os.TempDir(), "ferry-"+hex.EncodeToString(b))
	out, err := asUser(attackerUID, "mkdir", dir).CombinedOutput()
	require.NoError(t, err, "%s", out)
	t.Cleanup(func() { os.RemoveAll(dir) })
	fi, err := os.Lstat(dir)
	require.NoError(t, err)
	require.Equal(t, uint32(attackerUID), fi.Sys().(*syscall.Stat_t).Uid)
	return dir, fi.Mode().Perm()
}

// requireNamed checks that a refusal names the directory, its owner and its
// mode.
func requireNamed(t *testing.T, out, path string, uid uint32, mode os.FileMode) {
	t.Helper()
	require.Contains(t, out, fmt.Sprintf("%s (owner uid %d", path, uid), "the refusal names the directory and its owner:\n%s", out)
	require.Contains(t, out, fmt.Sprintf("mode %04o)", uint32(mode)), "the refusal names the mode:\n%s", out)
}

// runUntil starts cmd and waits until it exits (exited) or ready() holds
// (then it is left running until the test ends). It returns the process's
// output so far.
func runUntil(t *testing.T, cmd *exec.Cmd, ready func() bool) (out string, exited bool) {
	t.Helper()
	logf, err := os.CreateTemp(t.TempDir(), "out-")
	require.NoError(t, err)
	defer logf.Close()
	cmd.Stdout, cmd.Stderr = logf, logf
	require.NoError(t, cmd.Start())
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	read := func() string {
		b, _ := os.ReadFile(logf.Name())
		return string(b)
	}
	deadline := time.After(2 * time.Minute)
	for {
		select {
		case err := <-done:
			require.Error(t, err, "the process ended without an error:\n%s", read())
			return read(), true
		case <-time.After(50 * time.Millisecond):
		case <-deadline:
			_ = cmd.Process.Kill()
			<-done
			t.Fatalf("the process neither ended nor got ready:\n%s", read())
		}
		if ready() {
			t.Cleanup(func() { _ = cmd.Process.Kill(); <-done })
			return read(), false
		}
	}
}

// runUntilServing is runUntil until socket answers; it reports whether the
// process serves there.
func runUntilServing(t *testing.T, cmd *exec.Cmd, socket string) (string, bool) {
	t.Helper()
	out, exited := runUntil(t, cmd, func() bool {
		c, err := net.Dial("unix", socket)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
	return out, !exited
}

// TestAgentRefusesHostileSocketDir points real agents at socket and data
// directories another user controls: each refuses to start, before it
// attests, and names the directory, its owner and its mode.
func TestAgentRefusesHostileSocketDir(t *testing.T) {
	roottest.Require(t)
	c := testcluster.New(t, testcluster.Options{Nodes: 1})

	evil, evilMode := attackerDir(t)
	// A directory of root's below the attacker's: they can rename it away.
	below, err := os.MkdirTemp("", "ferry-below-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(below) })
	require.NoError(t, os.Chmod(below, 0o755))
	require.NoError(t, os.Chown(below, attackerUID, attackerUID))
	require.NoError(t, os.Mkdir(filepath.Join(below, "public"), 0o755))
	// A directory of root's that a group may write.
	group := testcluster.PublicDir(t, "ferry-e2e-")
	require.NoError(t, os.Chmod(group, 0o775))

	cases := []struct {
		name string
		opts testcluster.AgentOptions
		// dir is the directory the refusal must name, with its owner and
		// mode; when the attacker owns it, relay says so.
		dir   string
		uid   uint32
		mode  os.FileMode
		relay bool
	}{
		{"socket below a directory the attacker made first", testcluster.AgentOptions{SocketPath: filepath.Join(evil, "agent", "public", "api.sock")}, evil, attackerUID, evilMode, true},
		{"socket directory in the attacker's directory", testcluster.AgentOptions{SocketPath: filepath.Join(below, "public", "api.sock")}, below, attackerUID, 0o755, true},
		{"group-writable socket directory", testcluster.AgentOptions{SocketPath: filepath.Join(group, "api.sock")}, group, 0, 0o775, false},
		{"data dir in the attacker's directory", testcluster.AgentOptions{DataDir: filepath.Join(evil, "data")}, evil, attackerUID, evilMode, false},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			a := c.PrepareAgent(fmt.Sprintf("hostile%d", i), tc.opts)
			out, serving := runUntilServing(t, a.Command(), a.Socket)
			if serving && tc.relay {
				relayAttack(t, c, tc.dir, a.Socket)
			}
			require.False(t, serving, "the agent serves at %s:\n%s", a.Socket, out)
			requireNamed(t, out, tc.dir, tc.uid, tc.mode)
			require.NotContains(t, out, "agent attested", "refused before it attests")
			_, err := os.Lstat(a.Socket)
			require.ErrorIs(t, err, os.ErrNotExist, "no socket left behind")
			if tc.opts.DataDir != "" {
				_, err := os.Lstat(tc.opts.DataDir)
				require.ErrorIs(t, err, os.ErrNotExist, "nothing made in the attacker's directory")
			}
		})
	}
}

// relayAttack is what an attacker who owns the directory owned, above the
// agent's socket, does once the agent serves there: move the socket's
// directory aside and answer in its place, relaying every caller through
// their own process. It fails the test, saying what the relay got.
func relayAttack(t *testing.T, c *testcluster.Cluster, owned, socket string) {
	t.Helper()
	rel, err := filepath.Rel(owned, socket)
	require.NoError(t, err)
	first, rest, _ := strings.Cut(rel, "/")
	aside := filepath.Join(owned, first+".real")
	out, err := asUser(attackerUID, "mv", filepath.Join(owned, first), aside).CombinedOutput()
	require.NoError(t, err, "the agent serves below %s, and its owner moves the socket aside: %s", owned, out)
	out, err = asUser(attackerUID, "mkdir", "-p", filepath.Dir(socket)).CombinedOutput()
	require.NoError(t, err, "%s", out)
	l := startListener(t, socket, filepath.Join(aside, rest))
	victim, _ := exec.Command(c.Bin, "api", "fetch", "bundles", "--socket", "unix://"+socket, "--timeout", "10s").CombinedOutput()
	t.Fatalf("the agent serves below %s, a directory of uid %d: they moved its socket aside and relayed a caller through their own process (connections relayed: %d; the caller got: %s)", owned, attackerUID, l.settle(t), victim)
}

// TestServerRefusesHostileDirs starts real servers with their admin socket or
// data dir in directories another user controls: each refuses to start and
// names the directory, its owner and its mode.
func TestServerRefusesHostileDirs(t *testing.T) {
	roottest.Require(t)
	c := testcluster.New(t, testcluster.Options{Nodes: 1})
	evil, evilMode := attackerDir(t)

	t.Run("admin socket", func(t *testing.T) {
		n := c.AddNode("hostile-socket", false)
		socket := filepath.Join(evil, "server", "admin.sock")
		cmd := exec.Command(c.Bin, "server", "run", "--config", n.Config, "--socket", socket)
		out, serving := runUntilServing(t, cmd, socket)
		require.False(t, serving, "the server serves its admin API at %s:\n%s", socket, out)
		requireNamed(t, out, evil, attackerUID, evilMode)
		require.Contains(t, out, "admin socket directory")
		_, err := os.Lstat(filepath.Join(evil, "server"))
		require.ErrorIs(t, err, os.ErrNotExist, "nothing made in the attacker's directory")
	})
	t.Run("data dir", func(t *testing.T) {
		n := c.AddNode("hostile-data", false)
		conf, err := os.ReadFile(n.Config)
		require.NoError(t, err)
		patched := strings.Replace(string(conf), `data_dir     = "data"`, fmt.Sprintf("data_dir     = %q", filepath.Join(evil, "data")), 1)
		require.NotEqual(t, string(conf), patched)
		require.NoError(t, os.WriteFile(n.Config, []byte(patched), 0o600))
		out, serving := runUntilServing(t, exec.Command(c.Bin, "server", "run", "--config", n.Config), n.Socket)
		require.False(t, serving, "the server runs with its keys in %s:\n%s", evil, out)
		requireNamed(t, out, evil, attackerUID, evilMode)
		require.Contains(t, out, "data dir")
		_, err = os.Lstat(filepath.Join(evil, "data"))
		require.ErrorIs(t, err, os.ErrNotExist, "no key written in the attacker's directory")
	})
}

// TestClientsRefuseAttackersAdminSocket offers the CLI and the bridge an
// admin socket the attacker listens on, in the attacker's directory: neither
// connects, and each says why. With the escape hatch (--insecure-socket,
// insecure_socket = true) they do connect: the check is what kept them out.
func TestClientsRefuseAttackersAdminSocket(t *testing.T) {
	roottest.Require(t)
	bin := testcluster.Binary(t)
	evil, evilMode := attackerDir(t)
	socket := filepath.Join(evil, "admin.sock")
	l := startListener(t, socket, "")
	fi, err := os.Lstat(socket)
	require.NoError(t, err)
	require.Equal(t, uint32(attackerUID), fi.Sys().(*syscall.Stat_t).Uid)

	t.Run("CLI", func(t *testing.T) {
		out, err := exec.Command(bin, "entry", "list", "--socket", socket, "--timeout", "10s").CombinedOutput()
		require.Error(t, err)
		require.Equal(t, 0, l.settle(t), "the CLI connected to the attacker's socket: %s", out)
		require.Contains(t, string(out), "refused")
		requireNamed(t, string(out), evil, attackerUID, evilMode)

		out, err = exec.Command(bin, "entry", "list", "--socket", socket, "--timeout", "10s", "--insecure-socket").CombinedOutput()
		require.Error(t, err, "the attacker's listener answers nothing: %s", out)
		require.Positive(t, l.settle(t), "--insecure-socket connects: %s", out)
	})

	t.Run("bridge", func(t *testing.T) {
		before := l.settle(t)
		refused, out := runBridgeAgainst(t, bin, socket, false, func() bool { return l.others() > before })
		require.True(t, refused, "the bridge connected to the attacker's socket:\n%s", out)
		require.Equal(t, before, l.settle(t), "the bridge connected to the attacker's socket:\n%s", out)
		require.Contains(t, out, "server socket "+socket)
		requireNamed(t, out, evil, attackerUID, evilMode)

		refused, out = runBridgeAgainst(t, bin, socket, true, func() bool { return l.others() > before })
		require.False(t, refused, "insecure_socket = true connects:\n%s", out)
	})
}

// runBridgeAgainst starts `ferry bridge run` following the admin socket at
// socket and waits until it exits (refused: true) or connected() (then it
// runs on until the test ends). It returns the bridge's output.
func runBridgeAgainst(t *testing.T, bin, socket string, insecure bool, connected func() bool) (bool, string) {
	t.Helper()
	conf := filepath.Join(t.TempDir(), "bridge.conf")
	require.NoError(t, os.WriteFile(conf, []byte(fmt.Sprintf("bridge {\n  listen_addr = %q\n  data_dir = \"data\"\n  server_socket = %q\n  insecure_socket = %t\n}\n",
		testcluster.FreeAddr(t), socket, insecure)), 0o600))
	out, refused := runUntil(t, exec.Command(bin, "bridge", "run", "--config", conf), connected)
	return refused, out
}
