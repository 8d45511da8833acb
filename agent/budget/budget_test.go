package budget_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/net/http2"

	"github.com/ferry-id/ferry/agent/budget"
	"github.com/ferry-id/ferry/internal/roottest"
)

// server is a budgeted listener on a real unix socket whose accepted
// connections are kept until the test closes them.
type server struct {
	b        *budget.Budget
	path     string
	accepted chan *budget.Conn

	mu       sync.Mutex
	refusals []budget.Refusal
}

func newServer(t *testing.T, lim budget.Limits) *server {
	t.Helper()
	// Other uids connect to it: a directory they may traverse.
	dir, err := os.MkdirTemp("", "ferry-budget-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	require.NoError(t, os.Chmod(dir, 0o755))
	s := &server{path: filepath.Join(dir, "s.sock"), accepted: make(chan *budget.Conn, 100)}
	s.b, err = budget.New(lim, func(r *budget.Refusal) {
		s.mu.Lock()
		s.refusals = append(s.refusals, *r)
		s.mu.Unlock()
	})
	require.NoError(t, err)
	l, err := net.Listen("unix", s.path)
	require.NoError(t, err)
	require.NoError(t, os.Chmod(s.path, 0o777))
	bl := s.b.Listener(l)
	t.Cleanup(func() { bl.Close() })
	go func() {
		for {
			c, err := bl.Accept()
			if err != nil {
				return
			}
			s.accepted <- c.(*budget.Conn)
		}
	}()
	return s
}

// dial connects as this process and returns the server's side of the
// connection, or the GOAWAY debug data it was refused with.
func (s *server) dial(t *testing.T) (*budget.Conn, string) {
	t.Helper()
	nc, err := net.Dial("unix", s.path)
	require.NoError(t, err)
	t.Cleanup(func() { nc.Close() })
	return s.settle(t, nc)
}

func (s *server) settle(t *testing.T, nc net.Conn) (*budget.Conn, string) {
	t.Helper()
	refused := make(chan string, 1)
	go func() {
		fr := http2.NewFramer(io.Discard, nc)
		for {
			f, err := fr.ReadFrame()
			if err != nil {
				return
			}
			if g, ok := f.(*http2.GoAwayFrame); ok {
				refused <- g.ErrCode.String() + ": " + string(g.DebugData())
				return
			}
		}
	}()
	select {
	case c := <-s.accepted:
		return c, ""
	case why := <-refused:
		return nil, why
	case <-time.After(10 * time.Second):
		t.Fatal("connection neither accepted nor refused")
		return nil, ""
	}
}

func TestLimitsValidated(t *testing.T) {
	for _, lim := range []budget.Limits{
		{},
		{Conns: 1, ConnsPerUID: 2, Calls: 1, CallsPerUID: 1},
		{Conns: 1, ConnsPerUID: 1, Calls: 1, CallsPerUID: 2},
		{Conns: -1, ConnsPerUID: 1, Calls: 1, CallsPerUID: 1},
	} {
		_, err := budget.New(lim, nil)
		require.Error(t, err, "%+v", lim)
	}
}

func TestConnectionsPerUID(t *testing.T) {
	s := newServer(t, budget.Limits{Conns: 10, ConnsPerUID: 2, Calls: 10, CallsPerUID: 10})
	uid := uint32(os.Getuid())
	c1, why := s.dial(t)
	require.Empty(t, why)
	require.Equal(t, uid, c1.Cred().Uid)
	require.EqualValues(t, os.Getpid(), c1.Cred().Pid)
	_, why = s.dial(t)
	require.Empty(t, why)

	// The third is refused in HTTP/2's terms, saying why.
	_, why = s.dial(t)
	require.Equal(t, "ENHANCE_YOUR_CALM: workload API: connection refused: uid "+strconv.Itoa(int(uid))+" holds 2 connections, its limit (max_connections_per_uid)", why)
	conns, _ := s.b.Usage(uid)
	require.Equal(t, 2, conns)

	// Closing one makes room.
	require.NoError(t, c1.Close())
	_ = c1.Close() // a second Close uncharges nothing more
	conns, _ = s.b.Usage(uid)
	require.Equal(t, 1, conns)
	_, why = s.dial(t)
	require.Empty(t, why)
}

func TestCallsPerUID(t *testing.T) {
	s := newServer(t, budget.Limits{Conns: 10, ConnsPerUID: 10, Calls: 10, CallsPerUID: 2})
	c, _ := s.dial(t)
	ctx1, err := c.StartCall(context.Background())
	require.NoError(t, err)
	parent, cancel := context.WithCancel(context.Background())
	_, err = c.StartCall(parent)
	require.NoError(t, err)
	_, err = c.StartCall(context.Background())
	var ref *budget.Refusal
	require.ErrorAs(t, err, &ref)
	require.Equal(t, "call", ref.Kind)
	require.Contains(t, ref.Reason, "max_calls_per_uid")

	// A call ends with its context; its charge goes with it.
	cancel()
	waitUsage(t, s.b, uint32(os.Getuid()), 1, 1)
	_, err = c.StartCall(context.Background())
	require.NoError(t, err)

	// Closing the connection uncharges its calls.
	require.NoError(t, c.Close())
	waitUsage(t, s.b, uint32(os.Getuid()), 0, 0)
	require.NoError(t, ctx1.Err(), "the call's context is the server's to end")
	_, err = c.StartCall(context.Background())
	require.Error(t, err)
}

func waitUsage(t *testing.T, b *budget.Budget, uid uint32, conns, calls int) {
	t.Helper()
	require.Eventually(t, func() bool {
		gotConns, gotCalls := b.Usage(uid)
		return gotConns == conns && gotCalls == calls
	}, 10*time.Second, time.Millisecond)
}

// TestTotalShedsHeaviestUID: with the total reached, a connection of a uid
// holding fewer is admitted and the uid holding the most loses its idle
// connection; a call likewise sheds one of the heaviest uid's calls.
func TestTotalShedsHeaviestUID(t *testing.T) {
	roottest.Require(t)
	s := newServer(t, budget.Limits{Conns: 4, ConnsPerUID: 4, Calls: 2, CallsPerUID: 2})
	const heavy, light = 65534, 65533
	h0, _ := s.dialAs(t, heavy)
	h1, _ := s.dialAs(t, heavy)
	h2, _ := s.dialAs(t, heavy)
	l1, _ := s.dialAs(t, light)
	require.NotNil(t, h1)
	require.NotNil(t, h2)
	require.NotNil(t, l1)
	// h0 and h2 have calls in flight; h1 is idle.
	_, err := h0.StartCall(context.Background())
	require.NoError(t, err)
	callCtx, err := h2.StartCall(context.Background())
	require.NoError(t, err)

	// The total is reached: another connection of the heaviest uid is refused ...
	_, why := s.dialAs(t, heavy)
	require.Contains(t, why, "max_connections")
	// ... and one of the light uid (holding 1 to its 3) is admitted; the
	// heavy uid's idle connection is closed to make room.
	l2, why := s.dialAs(t, light)
	require.Empty(t, why)
	require.NotNil(t, l2)
	conns, calls := s.b.Usage(heavy)
	require.Equal(t, 2, conns)
	require.Equal(t, 2, calls)
	_, err = h1.Write([]byte{0})
	require.Error(t, err, "the idle connection was closed")
	require.NoError(t, callCtx.Err(), "the busy one was not")
	// Now both hold 2: a newcomer of either is refused, nobody loses one.
	_, why = s.dialAs(t, light)
	require.Contains(t, why, "max_connections")

	// Calls: the heavy uid holds both slots; the light uid, holding none,
	// takes one of them (a call of the heavy uid is shed).
	_, err = l1.StartCall(context.Background())
	require.NoError(t, err)
	_, err = h2.StartCall(context.Background())
	require.ErrorContains(t, err, "max_calls")
	// Equal holdings: the newcomer is refused, nobody is shed.
	_, err = l2.StartCall(context.Background())
	require.ErrorContains(t, err, "max_calls")

	s.mu.Lock()
	var shed []budget.Refusal
	for _, r := range s.refusals {
		if r.Shed {
			shed = append(shed, r)
		}
	}
	s.mu.Unlock()
	require.Len(t, shed, 2)
	require.EqualValues(t, heavy, shed[0].UID)
	require.Equal(t, "connection", shed[0].Kind)
	require.EqualValues(t, heavy, shed[1].UID)
	require.Equal(t, "call", shed[1].Kind)
}

// TestCallShedFromHeaviestUID: a uid holding fewer calls takes a call slot
// from the uid holding the most, whose call's context ends with ErrShed.
func TestCallShedFromHeaviestUID(t *testing.T) {
	roottest.Require(t)
	s := newServer(t, budget.Limits{Conns: 10, ConnsPerUID: 10, Calls: 3, CallsPerUID: 3})
	heavy, _ := s.dialAs(t, 65534)
	light, _ := s.dialAs(t, 65533)
	var held []context.Context
	for range 3 {
		ctx, err := heavy.StartCall(context.Background())
		require.NoError(t, err)
		held = append(held, ctx)
	}
	ctx, err := light.StartCall(context.Background())
	require.NoError(t, err)
	require.NoError(t, ctx.Err())
	shed := 0
	for _, h := range held {
		if h.Err() != nil {
			require.True(t, errors.Is(context.Cause(h), budget.ErrShed))
			shed++
		}
	}
	require.Equal(t, 1, shed)
	_, calls := s.b.Usage(65534)
	require.Equal(t, 2, calls)
	total, totalCalls := s.b.Totals()
	require.Equal(t, 2, total)
	require.Equal(t, 3, totalCalls)
}

// childSocketEnv makes the test binary a child that drops to the uid in
// childUIDEnv, connects to the socket and holds the connection until killed.
const (
	childSocketEnv = "FERRY_BUDGET_CHILD_SOCKET"
	childUIDEnv    = "FERRY_BUDGET_CHILD_UID"
)

func TestMain(m *testing.M) {
	path := os.Getenv(childSocketEnv)
	if path == "" {
		os.Exit(m.Run())
	}
	uid, err := strconv.Atoi(os.Getenv(childUIDEnv))
	if err == nil {
		err = syscall.Setgid(uid)
	}
	if err == nil {
		err = syscall.Setuid(uid)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		os.Exit(1)
	}
	c, err := net.Dial("unix", path)
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		os.Exit(1)
	}
	_, _ = io.Copy(c, os.Stdin) // holds until the parent goes
	os.Exit(0)
}

// dialAs connects from a child process running as uid, which holds the
// connection until the test ends, and returns the server's side of it, or
// why it was refused.
func (s *server) dialAs(t *testing.T, uid uint32) (*budget.Conn, string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childSocketEnv+"="+s.path, childUIDEnv+"="+strconv.Itoa(int(uid)))
	stdin, err := cmd.StdinPipe()
	require.NoError(t, err)
	cmd.Stderr = os.Stderr
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { stdin.Close(); _ = cmd.Process.Kill(); _ = cmd.Wait() })
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); {
		select {
		case c := <-s.accepted:
			require.Equal(t, uid, c.Cred().Uid)
			return c, ""
		case <-time.After(5 * time.Millisecond):
		}
		if why := s.refusedPID(int32(cmd.Process.Pid)); why != "" {
			return nil, why
		}
	}
	t.Fatalf("connection of uid %d neither accepted nor refused", uid)
	return nil, ""
}

// refusedPID returns why pid's connection was refused, if it was.
func (s *server) refusedPID(pid int32) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, r := range s.refusals {
		if r.PID == pid && !r.Shed {
			return r.Reason
		}
	}
	return ""
}
