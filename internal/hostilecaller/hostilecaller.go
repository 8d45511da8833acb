// Package hostilecaller plays a hostile local caller of the agent, for the
// tests that hold the agent's trust boundary: a process of another uid that
// changes who it is after connecting (executes a setuid program, changes its
// ids or groups, executes another program) or closes its socket before the
// agent looks at it.
//
// A test runs its own binary as the caller: TestMain (or an init function)
// calls Main first, which plays the caller named by $FERRY_HOSTILE_CALLER and
// exits, or returns at once when it is unset. Callers report on stdout, one
// "name=result" line per call: for the Workload API "name=<gRPC code> ids=<SPIFFE
// IDs> <status message>", for the managed-identity endpoint "name=<HTTP
// status> <body>"; a line starting "hostile caller error" means the caller
// itself failed.
package hostilecaller

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	workloadpb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// The callers' environment.
const (
	// EnvMode names the caller to play (the Mode* constants).
	EnvMode = "FERRY_HOSTILE_CALLER"
	// EnvSocket is the Workload API socket path.
	EnvSocket = "FERRY_HOSTILE_SOCKET"
	// EnvAddr is the managed-identity endpoint's host:port, EnvQuery the
	// query of its token requests.
	EnvAddr  = "FERRY_HOSTILE_ADDR"
	EnvQuery = "FERRY_HOSTILE_QUERY"
	// EnvN is how many connections ModeSendClose makes.
	EnvN = "FERRY_HOSTILE_N"
	// EnvExec is the program ModeExec executes.
	EnvExec = "FERRY_HOSTILE_EXEC"

	envFD   = "FERRY_HOSTILE_FD"   // the inherited connection's descriptor
	envWait = "FERRY_HOSTILE_WAIT" // "setuid": wait for the parent to run a setuid program
)

// The callers Main plays.
const (
	// ModeSetuidExec connects to the Workload API, hands the connection to
	// a child and executes /usr/bin/passwd (setuid root), which waits on its
	// stdin (keep it an open pipe); the child calls FetchX509SVID on the
	// inherited connection once passwd runs: "inherited=...".
	ModeSetuidExec = "setuid-exec"
	// ModeDrop, run as root, calls, drops every uid and gid to 65534, and
	// calls again on the same connection: "before=...", "after=...".
	ModeDrop = "drop"
	// ModeRaise, run as root, takes uid 65534 as real and effective uid
	// keeping root as saved uid, connects (the kernel records uid 65534) and
	// calls ("saved=..."), becomes root again and calls on the same
	// connection ("raised=...").
	ModeRaise = "raise"
	// ModeGroups, run as root, connects, joins group 4242 and calls
	// ("changed=..."), then connects again and calls ("fresh=...").
	ModeGroups = "groups"
	// ModeExec calls as this program ("before=..."), then executes
	// $FERRY_HOSTILE_EXEC, which calls on a connection made before the exec
	// ("inherited=...").
	ModeExec = "exec"
	// ModeSendClose sends a token request to the managed-identity endpoint
	// on each of $FERRY_HOSTILE_N connections and closes each at once
	// ("client=<local address>" per connection).
	ModeSendClose = "sendclose"
	// ModeIMDSSetuidExec gets an answer on a keep-alive connection to the
	// managed-identity endpoint ("first=..."), hands the connection to a
	// child and executes /usr/bin/passwd; the child asks again on it
	// ("second=...").
	ModeIMDSSetuidExec = "imds-setuid-exec"

	modeInherited     = "inherited"
	modeIMDSInherited = "imds-inherited"
)

// Main plays the caller $FERRY_HOSTILE_CALLER names and exits, or returns
// when it is unset.
func Main() {
	mode := os.Getenv(EnvMode)
	if mode == "" {
		return
	}
	if err := play(mode); err != nil {
		fmt.Printf("hostile caller error: %s: %v\n", mode, err)
		os.Exit(1)
	}
	os.Exit(0)
}

func play(mode string) error {
	socket := os.Getenv(EnvSocket)
	switch mode {
	case ModeSetuidExec:
		conn, err := net.Dial("unix", socket)
		if err != nil {
			return err
		}
		return passConnAndExecPasswd(conn, modeInherited)
	case modeInherited:
		if os.Getenv(envWait) == "setuid" {
			if err := waitSetuidParent(); err != nil {
				return err
			}
		}
		conn, err := inheritedConn()
		if err != nil {
			return err
		}
		c, err := clientOn(conn)
		if err != nil {
			return err
		}
		fmt.Println("inherited=" + c.fetch())
		return nil
	case ModeDrop:
		c, err := dial(socket)
		if err != nil {
			return err
		}
		fmt.Println("before=" + c.fetch())
		if err := syscall.Setgroups(nil); err != nil {
			return err
		}
		if err := syscall.Setresgid(65534, 65534, 65534); err != nil {
			return err
		}
		if err := syscall.Setresuid(65534, 65534, 65534); err != nil {
			return err
		}
		fmt.Println("after=" + c.fetch())
		return nil
	case ModeRaise:
		if err := syscall.Setresgid(65534, 65534, 65534); err != nil {
			return err
		}
		if err := syscall.Setresuid(65534, 65534, 0); err != nil {
			return err
		}
		c, err := dial(socket)
		if err != nil {
			return err
		}
		fmt.Println("saved=" + c.fetch())
		if err := syscall.Setresuid(0, 0, 0); err != nil {
			return err
		}
		fmt.Println("raised=" + c.fetch())
		return nil
	case ModeGroups:
		c, err := dial(socket)
		if err != nil {
			return err
		}
		if err := syscall.Setgroups([]int{4242}); err != nil {
			return err
		}
		fmt.Println("changed=" + c.fetch())
		fresh, err := dial(socket)
		if err != nil {
			return err
		}
		fmt.Println("fresh=" + fresh.fetch())
		return nil
	case ModeExec:
		c, err := dial(socket)
		if err != nil {
			return err
		}
		fmt.Println("before=" + c.fetch())
		conn, err := net.Dial("unix", socket)
		if err != nil {
			return err
		}
		fd, err := inheritableFD(conn)
		if err != nil {
			return err
		}
		prog := os.Getenv(EnvExec)
		return syscall.Exec(prog, []string{prog}, []string{EnvMode + "=" + modeInherited, envFD + "=" + strconv.Itoa(fd), "HOME=/"})
	case ModeSendClose:
		n, err := strconv.Atoi(os.Getenv(EnvN))
		if err != nil {
			return err
		}
		for range n {
			c, err := net.Dial("tcp", os.Getenv(EnvAddr))
			if err != nil {
				return err
			}
			if _, err := io.WriteString(c, imdsRequest()+"Connection: close\r\n\r\n"); err != nil {
				return err
			}
			fmt.Printf("client=%s\n", c.LocalAddr())
			c.Close()
		}
		return nil
	case ModeIMDSSetuidExec:
		c, err := net.Dial("tcp", os.Getenv(EnvAddr))
		if err != nil {
			return err
		}
		answer, err := roundTrip(c)
		if err != nil {
			return err
		}
		fmt.Println("first=" + answer)
		return passConnAndExecPasswd(c, modeIMDSInherited)
	case modeIMDSInherited:
		if err := waitSetuidParent(); err != nil {
			return err
		}
		c, err := inheritedConn()
		if err != nil {
			return err
		}
		answer, err := roundTrip(c)
		if err != nil {
			return err
		}
		fmt.Println("second=" + answer)
		return nil
	}
	return errors.New("unknown caller")
}

// passConnAndExecPasswd starts a child playing childMode with conn as its
// descriptor 3, told to wait until this process runs its setuid program, and
// executes /usr/bin/passwd.
func passConnAndExecPasswd(conn net.Conn, childMode string) error {
	f, err := conn.(interface{ File() (*os.File, error) }).File()
	if err != nil {
		return err
	}
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	child := exec.Command(exe)
	child.Env = []string{EnvMode + "=" + childMode, envFD + "=3", envWait + "=setuid",
		EnvAddr + "=" + os.Getenv(EnvAddr), EnvQuery + "=" + os.Getenv(EnvQuery), "HOME=/"}
	child.ExtraFiles = []*os.File{f}
	child.Stdout, child.Stderr = os.Stdout, os.Stderr
	if err := child.Start(); err != nil {
		return err
	}
	return syscall.Exec("/usr/bin/passwd", []string{"passwd"}, []string{"PATH=/usr/bin:/bin"})
}

// inheritableFD returns a descriptor of conn that survives exec (dup clears
// close-on-exec).
func inheritableFD(conn net.Conn) (int, error) {
	f, err := conn.(interface{ File() (*os.File, error) }).File()
	if err != nil {
		return -1, err
	}
	defer f.Close()
	return syscall.Dup(int(f.Fd()))
}

func inheritedConn() (net.Conn, error) {
	fd := 3
	if v := os.Getenv(envFD); v != "" {
		var err error
		if fd, err = strconv.Atoi(v); err != nil {
			return nil, err
		}
	}
	return net.FileConn(os.NewFile(uintptr(fd), "inherited"))
}

// waitSetuidParent waits until the parent process runs with an effective
// uid other than its real uid: it has executed its setuid program.
func waitSetuidParent() error {
	path := fmt.Sprintf("/proc/%d/status", os.Getppid())
	deadline := time.Now().Add(30 * time.Second)
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
	return errors.New("the parent never ran its setuid program")
}

// client is a raw Workload API client on one connection, never redialed.
type client struct{ cc *grpc.ClientConn }

func dial(socket string) (*client, error) {
	conn, err := net.Dial("unix", socket)
	if err != nil {
		return nil, err
	}
	return clientOn(conn)
}

func clientOn(conn net.Conn) (*client, error) {
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
	return &client{cc: cc}, nil
}

// fetch calls FetchX509SVID and describes the first answer.
func (c *client) fetch() string {
	ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(context.Background(), "workload.spiffe.io", "true"), 30*time.Second)
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

// imdsRequest is a token request, headers unfinished.
func imdsRequest() string {
	return "GET /metadata/identity/oauth2/token?" + os.Getenv(EnvQuery) + " HTTP/1.1\r\nHost: " + os.Getenv(EnvAddr) + "\r\nMetadata: true\r\n"
}

// roundTrip sends one keep-alive token request on c and describes its
// answer.
func roundTrip(c net.Conn) (string, error) {
	if _, err := io.WriteString(c, imdsRequest()+"\r\n"); err != nil {
		return "", err
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return fmt.Sprintf("%d %s", resp.StatusCode, b), err
}

// Command returns the command playing mode with bin (a copy of the test
// binary, see Binary), run from /, with env added to its environment.
func Command(bin, mode string, env ...string) *exec.Cmd {
	cmd := exec.Command(bin)
	cmd.Env = append([]string{EnvMode + "=" + mode, "HOME=/", "PATH=/usr/bin:/bin"}, env...)
	cmd.Dir = "/"
	return cmd
}

// Binary copies the running test binary into dir, which every uid must be
// able to traverse, so that other uids may run it; it returns the copy's
// path.
func Binary(dir string) (string, error) {
	exe, err := os.Executable()
	if err != nil {
		return "", err
	}
	in, err := os.Open(exe)
	if err != nil {
		return "", err
	}
	defer in.Close()
	path := filepath.Join(dir, "hostile-caller")
	out, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o755)
	if err != nil {
		return "", err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return "", err
	}
	return path, out.Close()
}

// Start starts cmd with its output collected and its stdin an open pipe (a
// passwd the caller becomes waits on it); stop closes the pipe, kills the
// caller and reaps it.
func Start(cmd *exec.Cmd) (out *Output, stop func(), err error) {
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, nil, err
	}
	out = &Output{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		return nil, nil, err
	}
	return out, func() {
		stdin.Close()
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	}, nil
}

// Output collects a caller's output; safe for concurrent use.
type Output struct {
	mu  sync.Mutex
	buf strings.Builder
}

func (o *Output) Write(p []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.buf.Write(p)
}

func (o *Output) String() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.buf.String()
}

// Result returns the result reported as "name=result", if there is one. The
// report may follow other output on its line (passwd prompts without a
// newline).
func (o *Output) Result(name string) (string, bool) {
	for line := range strings.Lines(o.String()) {
		i := strings.Index(line, name+"=")
		if i == 0 || i > 0 && line[i-1] == ' ' {
			return strings.TrimSuffix(line[i+len(name)+1:], "\n"), true
		}
	}
	return "", false
}

// Await waits up to timeout until the caller reports name, and returns the
// result. It fails at once if the caller reports an error of its own.
func (o *Output) Await(name string, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	for {
		if r, ok := o.Result(name); ok {
			return r, nil
		}
		if strings.Contains(o.String(), "hostile caller error") {
			return "", fmt.Errorf("the caller failed: %s", o)
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("no %s= after %v: %s", name, timeout, o)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Socket is an IPv4 TCP socket as /proc/net/tcp lists it.
type Socket struct {
	Local, Remote netip.AddrPort
	// State is the kernel's state number, in hex ("01" ESTABLISHED, "05"
	// FIN_WAIT2, "06" TIME_WAIT).
	State      string
	UID, Inode string
}

// ClosedClient reports whether s is what the kernel keeps of a client
// socket closed by its owner: a FIN_WAIT2 or TIME_WAIT entry listed as owned
// by uid 0, with inode 0.
func (s Socket) ClosedClient() bool {
	return (s.State == "05" || s.State == "06") && s.UID == "0" && s.Inode == "0"
}

// Sockets lists /proc/net/tcp.
func Sockets() ([]Socket, error) {
	b, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		return nil, err
	}
	var out []Socket
	for line := range strings.Lines(string(b)) {
		f := strings.Fields(line)
		if len(f) < 10 || f[0] == "sl" {
			continue
		}
		local, err1 := procNetAddr(f[1])
		remote, err2 := procNetAddr(f[2])
		if err := errors.Join(err1, err2); err != nil {
			return nil, err
		}
		out = append(out, Socket{Local: local, Remote: remote, State: f[3], UID: f[7], Inode: f[9]})
	}
	return out, nil
}

// WaitSockets waits, up to timeout, until ok holds for the sockets of
// /proc/net/tcp.
func WaitSockets(timeout time.Duration, ok func([]Socket) bool) error {
	deadline := time.Now().Add(timeout)
	for {
		socks, err := Sockets()
		if err != nil {
			return err
		}
		if ok(socks) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not so after %v: %v", timeout, socks)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// procNetAddr decodes an IPv4 address of /proc/net/tcp ("0100007F:1F90":
// the address in host byte order, the port plainly, both in hex).
func procNetAddr(s string) (netip.AddrPort, error) {
	h, p, _ := strings.Cut(s, ":")
	v, err := strconv.ParseUint(h, 16, 32)
	if err != nil {
		return netip.AddrPort{}, err
	}
	port, err := strconv.ParseUint(p, 16, 16)
	if err != nil {
		return netip.AddrPort{}, err
	}
	var a [4]byte
	binary.NativeEndian.PutUint32(a[:], uint32(v))
	return netip.AddrPortFrom(netip.AddrFrom4(a), uint16(port)), nil
}
