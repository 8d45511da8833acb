package chaos

import (
	"bufio"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// SocketOwner returns which of pids (process ID -> name) holds the IPv4 TCP
// socket whose local address is local and whose peer is remote, "" when none
// does. It reads /proc/net/tcp for the socket's inode and each process's
// /proc/PID/fd for a descriptor on that inode, so it sees every process of the
// caller's network namespace that the caller may inspect (all of them as root).
//
// A proxy calls it with its accepted connection's remote address as local and
// its own address as remote, to learn which node dialed it.
func SocketOwner(local, remote *net.TCPAddr, pids map[int]string) (string, error) {
	inode, err := socketInode("/proc/net/tcp", local, remote)
	if err != nil || inode == "" {
		return "", err
	}
	want := "socket:[" + inode + "]"
	for pid, name := range pids {
		fds, err := os.ReadDir(filepath.Join("/proc", strconv.Itoa(pid), "fd"))
		if err != nil {
			continue // exited meanwhile
		}
		for _, fd := range fds {
			target, err := os.Readlink(filepath.Join("/proc", strconv.Itoa(pid), "fd", fd.Name()))
			if err == nil && target == want {
				return name, nil
			}
		}
	}
	return "", nil
}

// socketInode finds the inode of the socket local<->remote in a /proc/net/tcp
// table, "" when it is not there.
func socketInode(table string, local, remote *net.TCPAddr) (string, error) {
	f, err := os.Open(table)
	if err != nil {
		return "", fmt.Errorf("chaos: %w", err)
	}
	defer f.Close()
	l, r := procAddr(local), procAddr(remote)
	if l == "" || r == "" {
		return "", nil
	}
	sc := bufio.NewScanner(f)
	sc.Scan() // header
	for sc.Scan() {
		// sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
		fields := strings.Fields(sc.Text())
		if len(fields) < 10 {
			continue
		}
		if fields[1] == l && fields[2] == r {
			return fields[9], nil
		}
	}
	if err := sc.Err(); err != nil {
		return "", fmt.Errorf("chaos: read %s: %w", table, err)
	}
	return "", nil
}

// procAddr formats an IPv4 address as /proc/net/tcp does: the address as a
// host-order 32-bit word in hex, a colon, the port in hex.
func procAddr(a *net.TCPAddr) string {
	ip := a.IP.To4()
	if ip == nil {
		return ""
	}
	word := binary.NativeEndian.Uint32(ip)
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], word)
	return strings.ToUpper(hex.EncodeToString(b[:])) + fmt.Sprintf(":%04X", a.Port)
}
