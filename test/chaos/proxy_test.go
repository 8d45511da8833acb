package chaos_test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/test/chaos"
)

// echoServer answers every line with "<name>:<line>".
func echoServer(t *testing.T, name string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				sc := bufio.NewScanner(c)
				for sc.Scan() {
					if _, err := fmt.Fprintf(c, "%s:%s\n", name, sc.Text()); err != nil {
						return
					}
				}
			}()
		}
	}()
	return ln.Addr().String()
}

// byLoopbackIP names a dialer by its source address: 127.0.0.2 is "a",
// 127.0.0.3 is "b".
func byLoopbackIP(remote, _ *net.TCPAddr) string {
	switch remote.IP.String() {
	case "127.0.0.2":
		return "a"
	case "127.0.0.3":
		return "b"
	}
	return ""
}

func dialFrom(t *testing.T, src, addr string) *bufio.ReadWriter {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 2 * time.Second}
	c, err := d.Dial("tcp", addr)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	return bufio.NewReadWriter(bufio.NewReader(c), bufio.NewWriter(c))
}

func roundTrip(rw *bufio.ReadWriter, msg string) (string, error) {
	if _, err := rw.WriteString(msg + "\n"); err != nil {
		return "", err
	}
	if err := rw.Flush(); err != nil {
		return "", err
	}
	line, err := rw.ReadString('\n')
	return strings.TrimSuffix(line, "\n"), err
}

func TestNetBlackholeHoldsThenDelivers(t *testing.T) {
	n := chaos.NewNet(chaos.Config{Identify: byLoopbackIP})
	defer n.Close()
	cAddr, err := n.Add("c", echoServer(t, "c"))
	require.NoError(t, err)

	fromA := dialFrom(t, "127.0.0.2", cAddr)
	fromB := dialFrom(t, "127.0.0.3", cAddr)
	got, err := roundTrip(fromA, "hello")
	require.NoError(t, err)
	require.Equal(t, "c:hello", got)

	n.Cut(chaos.Blackhole, "a", "c")
	// a's request goes out but nothing comes back while the link is cut...
	_, err = fromA.WriteString("during\n")
	require.NoError(t, err)
	require.NoError(t, fromA.Flush())
	replied := make(chan string, 1)
	go func() {
		line, _ := fromA.ReadString('\n')
		replied <- strings.TrimSuffix(line, "\n")
	}()
	select {
	case line := <-replied:
		t.Fatalf("reply crossed a blackhole: %q", line)
	case <-time.After(300 * time.Millisecond):
	}
	// ...while b, whose links are intact, is served.
	got, err = roundTrip(fromB, "other")
	require.NoError(t, err)
	require.Equal(t, "c:other", got)

	// A new connection from a is held, not refused.
	late := dialFrom(t, "127.0.0.2", cAddr)
	lateReply := make(chan string, 1)
	go func() {
		line, _ := roundTrip(late, "late")
		lateReply <- line
	}()
	require.Eventually(t, func() bool { _, held, _ := n.Counts(); return held == 1 }, 5*time.Second, 10*time.Millisecond)
	select {
	case line := <-lateReply:
		t.Fatalf("held connection answered: %q", line)
	default:
	}

	n.Heal()
	select {
	case line := <-replied:
		require.Equal(t, "c:during", line, "the held request is delivered after the heal")
	case <-time.After(5 * time.Second):
		t.Fatal("held bytes not delivered after heal")
	}
	select {
	case line := <-lateReply:
		require.Equal(t, "c:late", line)
	case <-time.After(5 * time.Second):
		t.Fatal("held connection not connected after heal")
	}
	heals, midFlight, released := n.HealCounts()
	require.EqualValues(t, 1, heals)
	require.EqualValues(t, 1, midFlight, "the heal released a held request")
	require.EqualValues(t, 1, released)
}

func TestNetResetClosesAndRefuses(t *testing.T) {
	n := chaos.NewNet(chaos.Config{Identify: byLoopbackIP})
	defer n.Close()
	cAddr, err := n.Add("c", echoServer(t, "c"))
	require.NoError(t, err)
	fromA := dialFrom(t, "127.0.0.2", cAddr)
	_, err = roundTrip(fromA, "x")
	require.NoError(t, err)

	n.Partition(chaos.Reset, []string{"a"}, []string{"b", "c"})
	_, err = roundTrip(fromA, "after")
	require.Error(t, err, "the open connection is closed")
	_, err = roundTrip(dialFrom(t, "127.0.0.2", cAddr), "new")
	require.Error(t, err, "a new connection is refused")
	got, err := roundTrip(dialFrom(t, "127.0.0.3", cAddr), "b")
	require.NoError(t, err, "b is on c's side")
	require.Equal(t, "c:b", got)
	// A dialer the net cannot name could be on either side: refused while
	// anything is cut.
	_, err = roundTrip(dialFrom(t, "127.0.0.1", cAddr), "anon")
	require.Error(t, err, "an unnamed dialer is refused during a cut")

	n.Heal()
	got, err = roundTrip(dialFrom(t, "127.0.0.2", cAddr), "healed")
	require.NoError(t, err)
	require.Equal(t, "c:healed", got)
	got, err = roundTrip(dialFrom(t, "127.0.0.1", cAddr), "anon")
	require.NoError(t, err, "and served once healed")
	require.Equal(t, "c:anon", got)
	_, _, refused := n.Counts()
	require.EqualValues(t, 2, refused)
}

// TestSocketOwner finds which process dialed a listener: this test process, or
// a child that opens its own connection.
func TestSocketOwner(t *testing.T) {
	bash, err := exec.LookPath("bash")
	if err != nil {
		t.Skip("bash not installed")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	port := ln.Addr().(*net.TCPAddr).Port

	own, err := net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	defer own.Close()
	ownSide, err := ln.Accept()
	require.NoError(t, err)
	defer ownSide.Close()

	child := exec.Command(bash, "-c", fmt.Sprintf("exec 3<>/dev/tcp/127.0.0.1/%d; read -r _ <&3", port))
	stdin, err := child.StdinPipe()
	require.NoError(t, err)
	require.NoError(t, child.Start())
	defer func() { stdin.Close(); _ = child.Process.Kill(); _ = child.Wait() }()
	childSide, err := ln.Accept()
	require.NoError(t, err)
	defer childSide.Close()

	pids := map[int]string{os.Getpid(): "self", child.Process.Pid: "child"}
	for conn, want := range map[net.Conn]string{ownSide: "self", childSide: "child"} {
		got, err := chaos.SocketOwner(conn.RemoteAddr().(*net.TCPAddr), conn.LocalAddr().(*net.TCPAddr), pids)
		require.NoError(t, err)
		require.Equal(t, want, got)
	}
	// Nobody among pids holds a socket that is not there.
	got, err := chaos.SocketOwner(&net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1}, ln.Addr().(*net.TCPAddr), pids)
	require.NoError(t, err)
	require.Empty(t, got)
	_, _ = io.WriteString(stdin, "\n")
}
