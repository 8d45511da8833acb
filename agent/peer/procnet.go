package peer

import (
	"bufio"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// lookupProcNet scans /proc/net/tcp and /proc/net/tcp6 for the socket whose
// local end is remote and whose peer is local.
func lookupProcNet(proc string, local, remote netip.AddrPort) (Socket, error) {
	var errs []error
	for _, name := range []string{"tcp", "tcp6"} {
		s, err := scanProcNet(filepath.Join(proc, "net", name), local, remote)
		if err == nil || errors.Is(err, errNotConnected) {
			return s, err
		}
		if !errors.Is(err, ErrNotFound) {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return Socket{}, err
	}
	return Socket{}, fmt.Errorf("%w: no local socket %v -> %v", ErrNotFound, remote, local)
}

func scanProcNet(path string, local, remote netip.AddrPort) (Socket, error) {
	f, err := os.Open(path)
	if err != nil {
		return Socket{}, fmt.Errorf("peer: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Scan() // header
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 10 {
			continue
		}
		src, err1 := parseProcAddr(fields[1])
		dst, err2 := parseProcAddr(fields[2])
		if err1 != nil || err2 != nil || src != remote || dst != local {
			continue
		}
		state, err := strconv.ParseUint(fields[3], 16, 8)
		if err != nil {
			return Socket{}, fmt.Errorf("peer: %s: bad state %q", path, fields[3])
		}
		uid, err := strconv.ParseUint(fields[7], 10, 32)
		if err != nil {
			return Socket{}, fmt.Errorf("peer: %s: bad uid %q", path, fields[7])
		}
		inode, err := strconv.ParseUint(fields[9], 10, 64)
		if err != nil {
			return Socket{}, fmt.Errorf("peer: %s: bad inode %q", path, fields[9])
		}
		return connected(Socket{UID: uint32(uid), Inode: inode}, uint8(state), local, remote)
	}
	if err := sc.Err(); err != nil {
		return Socket{}, fmt.Errorf("peer: %s: %w", path, err)
	}
	return Socket{}, ErrNotFound
}

// parseProcAddr decodes "0100007F:1F90" (IPv4) or 32 hex digits (IPv6): each
// 32-bit word of the address is printed in host byte order, the port plainly.
func parseProcAddr(s string) (netip.AddrPort, error) {
	h, p, ok := strings.Cut(s, ":")
	if !ok {
		return netip.AddrPort{}, errors.New("peer: bad address")
	}
	port, err := strconv.ParseUint(p, 16, 16)
	if err != nil {
		return netip.AddrPort{}, err
	}
	raw, err := hex.DecodeString(h)
	if err != nil || (len(raw) != 4 && len(raw) != 16) {
		return netip.AddrPort{}, errors.New("peer: bad address")
	}
	for i := 0; i < len(raw); i += 4 {
		binary.NativeEndian.PutUint32(raw[i:], binary.BigEndian.Uint32(raw[i:]))
	}
	a, _ := netip.AddrFromSlice(raw)
	return netip.AddrPortFrom(a.Unmap(), uint16(port)), nil
}
