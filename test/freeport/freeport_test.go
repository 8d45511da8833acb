package freeport

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
)

func TestPortsAreReservedBelowTheEphemeralRange(t *testing.T) {
	seen := map[int]bool{}
	for range 50 {
		p := Port(t)
		if seen[p] {
			t.Fatalf("port %d handed out twice", p)
		}
		seen[p] = true
		if p < lowest || p >= first+count {
			t.Fatalf("port %d outside %d-%d", p, first, first+count-1)
		}
		// Another binary opening the port's lock file cannot take it.
		f, err := os.OpenFile(filepath.Join(dir, strconv.Itoa(p)), os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		f.Close()
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			t.Fatalf("port %d: lock taken by a second opener: %v", p, err)
		}
		// And the port is free to bind.
		l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p))
		if err != nil {
			t.Fatalf("port %d: %v", p, err)
		}
		l.Close()
	}
}

func TestBusyPortIsSkipped(t *testing.T) {
	// Every port but one is taken; pick must find that one (here: by
	// narrowing the range to two ports, one with a listener on it).
	once.Do(func() { setup = initRange() })
	if setup != nil {
		t.Fatal(setup)
	}
	busy := Port(t)
	l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(busy))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	// Release busy's lock so only the listener keeps pick off it.
	mu.Lock()
	f := held[len(held)-1]
	held = held[:len(held)-1]
	mu.Unlock()
	f.Close()
	savedFirst, savedCount := first, count
	defer func() { first, count = savedFirst, savedCount }()
	first, count = busy, 2
	if busy+1 >= savedFirst+savedCount {
		first = busy - 1
	}
	for range 2 {
		p, err := pick()
		if err == nil && p == busy {
			t.Fatalf("handed out port %d, which has a listener", busy)
		}
	}
}

func TestAddrIsLoopback(t *testing.T) {
	host, port, err := net.SplitHostPort(Addr(t))
	if err != nil || host != "127.0.0.1" || port == "" {
		t.Fatalf("Addr: %q %q %v", host, port, err)
	}
}
