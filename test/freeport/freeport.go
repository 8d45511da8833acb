// Package freeport hands out loopback TCP ports for tests that write them
// into the configs of processes they start, so the port must stay free from
// the moment it is picked until the process binds it (and again while a
// stopped process is down, to be restarted on the same port).
//
// Listening on port 0 and closing is not enough on a busy machine: the
// kernel gives that port to the next connect() that needs a source port, or
// to another test binary doing the same, and the process then fails with
// "address already in use". So ports are picked below the kernel's
// ephemeral range (ip_local_port_range), where no connect() takes one, and
// each is reserved for the life of the test binary by an flock on a file
// named for it, so no other test binary of this user picks it.
package freeport

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/ferry-id/ferry/internal/securedir"
)

// lowest is the first port handed out: well above the ports services
// commonly use (8080, 8443, ...).
const lowest = 20000

var (
	mu    sync.Mutex
	held  []*os.File // the lock files, open for the life of the binary
	dir   string
	first int
	count int
	setup error
	once  sync.Once
)

// Addr returns "127.0.0.1:port" for a port reserved for this test binary.
func Addr(tb testing.TB) string {
	tb.Helper()
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(Port(tb)))
}

// Port returns a loopback TCP port that nothing listens on now and that no
// other test binary of this user will be given while this one runs.
func Port(tb testing.TB) int {
	tb.Helper()
	p, err := pick()
	if err != nil {
		tb.Fatalf("freeport: %v", err)
	}
	return p
}

func pick() (int, error) {
	once.Do(func() { setup = initRange() })
	if setup != nil {
		return 0, setup
	}
	mu.Lock()
	defer mu.Unlock()
	start := rand.IntN(count)
	for i := range count {
		p := first + (start+i)%count
		f, err := os.OpenFile(filepath.Join(dir, strconv.Itoa(p)), os.O_CREATE|os.O_RDWR, 0o600)
		if err != nil {
			return 0, err
		}
		if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
			f.Close()
			if errors.Is(err, syscall.EWOULDBLOCK) {
				continue // another test binary (or this one) holds it
			}
			return 0, fmt.Errorf("lock %s: %w", f.Name(), err)
		}
		l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(p)))
		if err != nil {
			f.Close() // something else listens there
			continue
		}
		l.Close()
		held = append(held, f)
		return p, nil
	}
	return 0, fmt.Errorf("no free port in %d-%d", first, first+count-1)
}

// initRange finds the ports below the ephemeral range and the directory of
// lock files (in the user's cache directory, which is not cleaned while
// tests run, as a temp directory may be; securedir refuses one another user
// could change).
func initRange() error {
	low := 32768 // Linux's default start of the ephemeral range
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			if n, err := strconv.Atoi(f[0]); err == nil {
				low = n
			}
		}
	}
	if low-lowest < 1000 {
		return fmt.Errorf("the ephemeral port range starts at %d: below it are too few ports to hand out from %d", low, lowest)
	}
	first, count = lowest, low-lowest
	base, err := os.UserCacheDir()
	if err != nil {
		return err
	}
	dir = filepath.Join(base, "ferry-test-ports")
	return securedir.MkdirAll(dir, 0o700)
}
