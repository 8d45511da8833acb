// Package peer finds the local process at the other end of an accepted
// loopback TCP connection.
//
// A TCP connection carries no credentials, but when both ends live on this
// host the kernel knows the client's socket: its owner uid, its inode and
// its state. Finder looks the client's socket up by the exact 4-tuple through
// netlink sock_diag (inet_diag), falling back to /proc/net/tcp and
// /proc/net/tcp6 when sock_diag is unavailable. Either way only an
// ESTABLISHED socket with an inode is a caller: once a client closes its end,
// its socket lingers in FIN_WAIT1, FIN_WAIT2 or TIME_WAIT, orphaned (inode 0)
// and, as a TIME_WAIT entry, reported as owned by uid 0; such a socket
// belongs to nobody and is never taken for root. Turning the socket into a
// process scans /proc/*/fd for the socket inode, so a socket no live process
// holds is refused too.
//
// PID reuse is guarded by the process start time (field 22 of
// /proc/PID/stat): FindProcess reads it before and after matching the inode
// and reading the credentials, Verify checks it again with the credentials,
// and Attest pins the process (workload.Process) for the attestation and
// applies the agent's credential rule (workload.AttestCaller).
package peer

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/ferry-id/ferry/attestors/workload"
	"github.com/ferry-id/ferry/proto/ferrypb"
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
	// Creds are all its ids and its supplementary groups, as found.
	Creds workload.Creds
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
// process. It fails with ErrNotFound when the client is not a local socket,
// or its socket is no longer connected (see Lookup).
func (f *Finder) LookupConn(c net.Conn) (Socket, error) {
	local, err1 := addrPort(c.LocalAddr())
	remote, err2 := addrPort(c.RemoteAddr())
	if err := errors.Join(err1, err2); err != nil {
		return Socket{}, err
	}
	return f.Lookup(local, remote)
}

// Lookup returns the socket whose local address is remote and whose peer is
// local: the client end of the server-side connection (local, remote). Only
// an ESTABLISHED socket with an inode is returned; any other fails with an
// error wrapping ErrNotFound.
func (f *Finder) Lookup(local, remote netip.AddrPort) (Socket, error) {
	local = unmapAddrPort(local)
	remote = unmapAddrPort(remote)
	if !local.IsValid() || !remote.IsValid() {
		return Socket{}, fmt.Errorf("peer: invalid address %v -> %v", remote, local)
	}
	if f.netlink {
		s, err := lookupNetlink(local, remote)
		if err == nil || errors.Is(err, errNotConnected) {
			return s, err
		}
		// ENOENT also means "no diag handler"; the /proc tables are the
		// authority either way, and this path only runs on a miss.
	}
	return lookupProcNet(f.proc, local, remote)
}

// errNotConnected wraps ErrNotFound: the client socket exists but is no
// caller's (see connected).
var errNotConnected = fmt.Errorf("%w: client socket not connected", ErrNotFound)

// tcpEstablished is TCP_ESTABLISHED in the kernel's numbering
// (include/net/tcp_states.h), which sock_diag and /proc/net/tcp report.
const tcpEstablished = 1

var tcpStates = [...]string{"", "ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2",
	"TIME_WAIT", "CLOSE", "CLOSE_WAIT", "LAST_ACK", "LISTEN", "CLOSING", "NEW_SYN_RECV"}

func stateName(state uint8) string {
	if int(state) < len(tcpStates) && tcpStates[state] != "" {
		return tcpStates[state]
	}
	return fmt.Sprintf("state %d", state)
}

// connected returns s, found in state, if it can be a caller's socket: it is
// ESTABLISHED and has an inode. A client that closed its end leaves its
// socket in FIN_WAIT1, FIN_WAIT2 or TIME_WAIT, orphaned (inode 0), and the
// kernel reports a TIME_WAIT entry as owned by uid 0: its owner is unknown,
// and it must never be taken for root's.
func connected(s Socket, state uint8, local, remote netip.AddrPort) (Socket, error) {
	if state != tcpEstablished {
		return Socket{}, fmt.Errorf("%w: %v -> %v is %s: the client has closed it", errNotConnected, remote, local, stateName(state))
	}
	if s.Inode == 0 {
		return Socket{}, fmt.Errorf("%w: %v -> %v has no inode: no process holds it", errNotConnected, remote, local)
	}
	return s, nil
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
		creds, err := f.creds(pid)
		if err != nil {
			continue
		}
		after, err := f.startTime(pid)
		if err != nil || after != before {
			// The PID was recycled while we looked at it.
			continue
		}
		return Process{PID: pid, UID: creds.UID.Effective, GID: creds.GID.Effective, StartTime: before, Creds: creds}, nil
	}
	return Process{}, fmt.Errorf("%w: no process holds socket inode %d", ErrNotFound, inode)
}

// Verify returns nil if p is still running as the same process (same PID and
// start time) with the ids it had when it was found: every uid and gid, and
// its supplementary groups (workload.Peer.Check, the agent's credential rule,
// with p's ids as found as the reference). It returns an error wrapping
// ErrNotFound if the process is gone or replaced, and one wrapping
// workload.ErrCredentialsChanged if its ids changed.
func (f *Finder) Verify(p Process) error {
	before, err := f.startTime(p.PID)
	if err != nil {
		return fmt.Errorf("%w: process %d: %v", ErrNotFound, p.PID, err)
	}
	creds, err := f.creds(p.PID)
	if err != nil {
		return fmt.Errorf("%w: process %d: %v", ErrNotFound, p.PID, err)
	}
	after, err := f.startTime(p.PID)
	if err != nil {
		return fmt.Errorf("%w: process %d: %v", ErrNotFound, p.PID, err)
	}
	if before != p.StartTime || after != p.StartTime {
		return fmt.Errorf("%w: process %d was replaced", ErrNotFound, p.PID)
	}
	return asFound(p).Check(creds, true)
}

// asFound is the reference the credentials of p are checked against: the
// ids it had when found.
func asFound(p Process) workload.Peer {
	groups := p.Creds.Groups
	return workload.Peer{UID: p.Creds.UID.Real, GID: p.Creds.GID.Real, HasGID: true,
		Groups: func() ([]uint32, error) { return groups, nil }}
}

// Attest attests the process p (found by FindProcess, or known by its PID and
// start time) for a caller whose kernel-recorded credentials are want,
// through workload.AttestCaller: the process is pinned (its /proc directory
// held open) and must have p's start time, attest runs against the pin, its
// credentials are read once and must pass want.Check, and the pinned process
// must still be alive afterwards. Errors wrap workload.ErrProcessChanged or
// workload.ErrCredentialsChanged when the caller is refused.
func (f *Finder) Attest(ctx context.Context, p Process, want workload.Peer, attest workload.AttestFunc) ([]*ferrypb.Selector, error) {
	proc, err := workload.OpenProcessIn(f.proc, p.PID)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", workload.ErrProcessChanged, err)
	}
	defer proc.Close()
	if proc.StartTime() != p.StartTime {
		return nil, fmt.Errorf("%w: pid %d: start time %d, not %d: another process", workload.ErrProcessChanged, p.PID, proc.StartTime(), p.StartTime)
	}
	return workload.AttestCaller(ctx, proc, want, attest)
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

// creds reads the ids and groups of pid from /proc/PID/status.
func (f *Finder) creds(pid int32) (workload.Creds, error) {
	file, err := os.Open(filepath.Join(f.proc, strconv.Itoa(int(pid)), "status"))
	if err != nil {
		return workload.Creds{}, err
	}
	defer file.Close()
	c, err := workload.ParseCreds(file)
	if err != nil {
		return workload.Creds{}, fmt.Errorf("peer: process %d: %w", pid, err)
	}
	return c, nil
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
