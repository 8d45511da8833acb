// Package peer finds the local process at the other end of an accepted
// loopback TCP connection.
//
// A TCP connection carries no credentials, but when both ends live on this
// host the kernel knows the client's socket: its owner uid and its inode.
// Finder looks the client's socket up by the exact 4-tuple through netlink
// sock_diag (inet_diag), falling back to /proc/net/tcp and /proc/net/tcp6 when
// sock_diag is unavailable. Turning the socket into a process (for selectors
// that need a PID) scans /proc/*/fd for the socket inode and is done only when
// asked, because it costs a walk over every process.
//
// PID reuse is guarded by the process start time (field 22 of
// /proc/PID/stat): FindProcess reads it before and after matching the inode,
// and Process.Alive lets the caller re-check it after acting on the PID.
package peer

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// ErrNotFound is returned when no local socket or process matches: the peer is
// not on this host, or it has gone away.
var ErrNotFound = errors.New("peer: not found")

// Socket is the client-side socket of a local TCP connection.
type Socket struct {
	// UID is the uid that owns the socket (the creator's fsuid).
	UID uint32
	// Inode is the socket inode, as in /proc/PID/fd links "socket:[inode]".
	Inode uint64
}

// Process is a process holding a socket.
type Process struct {
	PID int32
	// UID and GID are the effective ids of the process.
	UID, GID uint32
	// StartTime is the process start time in clock ticks after boot; with PID
	// it names the process uniquely.
	StartTime uint64
}

// Config configures a Finder. The zero value is ready to use.
type Config struct {
	// ProcRoot is the proc file system; default "/proc".
	ProcRoot string
	// DisableNetlink makes the Finder read /proc/net/tcp{,6} only.
	DisableNetlink bool
}

// Finder looks up local peers. It is safe for concurrent use.
type Finder struct {
	proc    string
	netlink bool
}

// New returns a Finder.
func New(c Config) *Finder {
	if c.ProcRoot == "" {
		c.ProcRoot = "/proc"
	}
	return &Finder{proc: c.ProcRoot, netlink: !c.DisableNetlink}
}

// LookupConn returns the client socket of a connection accepted by this
// process. It fails with ErrNotFound when the client is not a local socket.
func (f *Finder) LookupConn(c net.Conn) (Socket, error) {
	local, err1 := addrPort(c.LocalAddr())
	remote, err2 := addrPort(c.RemoteAddr())
	if err := errors.Join(err1, err2); err != nil {
		return Socket{}, err
	}
	return f.Lookup(local, remote)
}

// Lookup returns the socket whose local address is remote and whose peer is
// local: the client end of the server-side connection (local, remote).
func (f *Finder) Lookup(local, remote netip.AddrPort) (Socket, error) {
	local = unmapAddrPort(local)
	remote = unmapAddrPort(remote)
	if !local.IsValid() || !remote.IsValid() {
		return Socket{}, fmt.Errorf("peer: invalid address %v -> %v", remote, local)
	}
	if f.netlink {
		s, err := lookupNetlink(local, remote)
		if err == nil {
			return s, nil
		}
		// ENOENT also means "no diag handler"; the /proc tables are the
		// authority either way, and this path only runs on a miss.
	}
	return lookupProcNet(f.proc, local, remote)
}

// FindProcess returns a process holding the socket inode. When several
// processes share the socket (inherited across fork), the lowest PID whose
// identity stays stable during the scan is returned.
func (f *Finder) FindProcess(inode uint64) (Process, error) {
	entries, err := os.ReadDir(f.proc)
	if err != nil {
		return Process{}, fmt.Errorf("peer: %w", err)
	}
	pids := make([]int32, 0, len(entries))
	for _, e := range entries {
		n, err := strconv.ParseInt(e.Name(), 10, 32)
		if err == nil && n > 0 {
			pids = append(pids, int32(n))
		}
	}
	slices.Sort(pids)
	target := "socket:[" + strconv.FormatUint(inode, 10) + "]"
	for _, pid := range pids {
		before, err := f.startTime(pid)
		if err != nil {
			continue
		}
		if !f.holds(pid, target) {
			continue
		}
		uid, gid, err := f.ids(pid)
		if err != nil {
			continue
		}
		after, err := f.startTime(pid)
		if err != nil || after != before {
			// The PID was recycled while we looked at it.
			continue
		}
		return Process{PID: pid, UID: uid, GID: gid, StartTime: before}, nil
	}
	return Process{}, fmt.Errorf("%w: no process holds socket inode %d", ErrNotFound, inode)
}

// Alive reports whether p is still running as the same process (same PID and
// start time). It returns ErrNotFound otherwise.
func (f *Finder) Alive(p Process) error {
	st, err := f.startTime(p.PID)
	if err != nil {
		return fmt.Errorf("%w: process %d: %v", ErrNotFound, p.PID, err)
	}
	if st != p.StartTime {
		return fmt.Errorf("%w: process %d was replaced", ErrNotFound, p.PID)
	}
	return nil
}

func (f *Finder) holds(pid int32, target string) bool {
	dir := filepath.Join(f.proc, strconv.Itoa(int(pid)), "fd")
	d, err := os.Open(dir)
	if err != nil {
		return false
	}
	defer d.Close()
	for {
		names, err := d.Readdirnames(256)
		for _, n := range names {
			link, lerr := os.Readlink(dir + "/" + n)
			if lerr == nil && link == target {
				return true
			}
		}
		if err != nil {
			return false
		}
	}
}

// startTime reads field 22 of /proc/PID/stat.
func (f *Finder) startTime(pid int32) (uint64, error) {
	b, err := os.ReadFile(filepath.Join(f.proc, strconv.Itoa(int(pid)), "stat"))
	if err != nil {
		return 0, err
	}
	return parseStartTime(string(b))
}

func parseStartTime(stat string) (uint64, error) {
	// The command name (field 2) is in parentheses and may hold spaces or
	// parentheses itself, so split after the last ')'.
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, errors.New("peer: malformed stat")
	}
	fields := strings.Fields(stat[i+1:])
	// fields[0] is field 3 (state); field 22 is fields[19].
	if len(fields) < 20 {
		return 0, errors.New("peer: short stat")
	}
	return strconv.ParseUint(fields[19], 10, 64)
}

// ids reads the effective uid and gid from /proc/PID/status.
func (f *Finder) ids(pid int32) (uid, gid uint32, err error) {
	b, err := os.ReadFile(filepath.Join(f.proc, strconv.Itoa(int(pid)), "status"))
	if err != nil {
		return 0, 0, err
	}
	var haveU, haveG bool
	for line := range strings.Lines(string(b)) {
		var dst *uint32
		var have *bool
		switch {
		case strings.HasPrefix(line, "Uid:"):
			dst, have = &uid, &haveU
		case strings.HasPrefix(line, "Gid:"):
			dst, have = &gid, &haveG
		default:
			continue
		}
		f := strings.Fields(line)
		if len(f) < 3 {
			return 0, 0, errors.New("peer: malformed status")
		}
		v, err := strconv.ParseUint(f[2], 10, 32) // real, effective, saved, fs
		if err != nil {
			return 0, 0, fmt.Errorf("peer: malformed status: %w", err)
		}
		*dst, *have = uint32(v), true
	}
	if !haveU || !haveG {
		return 0, 0, errors.New("peer: status without Uid/Gid")
	}
	return uid, gid, nil
}

func addrPort(a net.Addr) (netip.AddrPort, error) {
	t, ok := a.(*net.TCPAddr)
	if !ok {
		return netip.AddrPort{}, fmt.Errorf("peer: not a TCP address: %v", a)
	}
	return t.AddrPort(), nil
}

func unmapAddrPort(a netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(a.Addr().Unmap().WithZone(""), a.Port())
}

// Groups returns the effective gid and the supplementary groups of a
// process (the Gid and Groups lines of /proc/PID/status). Pair it with
// Alive to make sure the PID still names the process meant.
func (f *Finder) Groups(pid int32) (gid uint32, groups []uint32, err error) {
	b, err := os.ReadFile(filepath.Join(f.proc, strconv.Itoa(int(pid)), "status"))
	if err != nil {
		return 0, nil, fmt.Errorf("%w: process %d: %v", ErrNotFound, pid, err)
	}
	return parseGroups(string(b))
}

func parseGroups(status string) (gid uint32, groups []uint32, err error) {
	var haveG, haveGroups bool
	for line := range strings.Lines(status) {
		switch {
		case strings.HasPrefix(line, "Gid:"):
			f := strings.Fields(line)
			if len(f) < 3 {
				return 0, nil, errors.New("peer: malformed status Gid")
			}
			v, err := strconv.ParseUint(f[2], 10, 32) // real, effective, saved, fs
			if err != nil {
				return 0, nil, fmt.Errorf("peer: malformed status Gid: %w", err)
			}
			gid, haveG = uint32(v), true
		case strings.HasPrefix(line, "Groups:"):
			for _, s := range strings.Fields(line)[1:] {
				v, err := strconv.ParseUint(s, 10, 32)
				if err != nil {
					return 0, nil, fmt.Errorf("peer: malformed status Groups: %w", err)
				}
				groups = append(groups, uint32(v))
			}
			haveGroups = true
		}
	}
	if !haveG || !haveGroups {
		return 0, nil, errors.New("peer: status without Gid/Groups")
	}
	return gid, groups, nil
}
