package peer

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"
)

// Layout of the sock_diag structures (linux/inet_diag.h). x/sys/unix does not
// define them.
const (
	sizeofSockID     = 48 // struct inet_diag_sockid
	sizeofDiagReqV2  = 8 + sizeofSockID
	sizeofDiagMsg    = 4 + sizeofSockID + 20
	offsetMsgUID     = 4 + sizeofSockID + 12
	offsetMsgInode   = offsetMsgUID + 4
	inetDiagNoCookie = ^uint32(0)
)

var nlSeq atomic.Uint32

// lookupNetlink asks inet_diag for the single socket whose local end is remote
// and whose peer is local.
func lookupNetlink(local, remote netip.AddrPort) (Socket, error) {
	family := uint8(unix.AF_INET6)
	if remote.Addr().Is4() && local.Addr().Is4() {
		family = unix.AF_INET
	}
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return Socket{}, fmt.Errorf("peer: sock_diag socket: %w", err)
	}
	defer unix.Close(fd)
	// A reply to an exact lookup is queued during sendmsg; the timeout only
	// guards against a kernel that never answers.
	tv := unix.Timeval{Sec: 2}
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)

	seq := nlSeq.Add(1)
	req := make([]byte, unix.SizeofNlMsghdr+sizeofDiagReqV2)
	ne := binary.NativeEndian
	ne.PutUint32(req[0:], uint32(len(req)))
	ne.PutUint16(req[4:], unix.SOCK_DIAG_BY_FAMILY)
	ne.PutUint16(req[6:], unix.NLM_F_REQUEST)
	ne.PutUint32(req[8:], seq)
	b := req[unix.SizeofNlMsghdr:]
	b[0] = family
	b[1] = unix.IPPROTO_TCP
	ne.PutUint32(b[4:], ^uint32(0)) // all states
	putSockID(b[8:], family, remote, local)
	if err := unix.Sendto(fd, req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return Socket{}, fmt.Errorf("peer: sock_diag send: %w", err)
	}
	buf := make([]byte, 4096)
	for {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			return Socket{}, fmt.Errorf("peer: sock_diag recv: %w", err)
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			return Socket{}, fmt.Errorf("peer: sock_diag parse: %w", err)
		}
		for _, m := range msgs {
			if m.Header.Seq != seq {
				continue
			}
			switch m.Header.Type {
			case unix.NLMSG_ERROR:
				if len(m.Data) < 4 {
					return Socket{}, errors.New("peer: sock_diag: short error")
				}
				errno := unix.Errno(-int32(ne.Uint32(m.Data)))
				if errno == unix.ENOENT {
					return Socket{}, fmt.Errorf("%w: no local socket %v -> %v", ErrNotFound, remote, local)
				}
				return Socket{}, fmt.Errorf("peer: sock_diag: %w", errno)
			case unix.SOCK_DIAG_BY_FAMILY:
				return parseDiagMsg(m.Data, family, remote, local)
			}
		}
	}
}

// putSockID writes struct inet_diag_sockid: ports big-endian, addresses in
// network order, no interface, no cookie.
func putSockID(b []byte, family uint8, src, dst netip.AddrPort) {
	binary.BigEndian.PutUint16(b[0:], src.Port())
	binary.BigEndian.PutUint16(b[2:], dst.Port())
	putAddr(b[4:20], family, src.Addr())
	putAddr(b[20:36], family, dst.Addr())
	binary.NativeEndian.PutUint32(b[36:], 0)
	binary.NativeEndian.PutUint32(b[40:], inetDiagNoCookie)
	binary.NativeEndian.PutUint32(b[44:], inetDiagNoCookie)
}

func putAddr(b []byte, family uint8, a netip.Addr) {
	clear(b)
	if family == unix.AF_INET {
		v := a.As4()
		copy(b, v[:])
		return
	}
	v := a.As16()
	copy(b, v[:])
}

func parseDiagMsg(d []byte, family uint8, src, dst netip.AddrPort) (Socket, error) {
	if len(d) < sizeofDiagMsg {
		return Socket{}, errors.New("peer: sock_diag: short message")
	}
	// Check the kernel answered for the socket we asked about.
	want := make([]byte, sizeofSockID)
	putSockID(want, family, src, dst)
	if d[0] != family || string(d[4:4+36]) != string(want[:36]) {
		return Socket{}, errors.New("peer: sock_diag: reply for another socket")
	}
	ne := binary.NativeEndian
	s := Socket{UID: ne.Uint32(d[offsetMsgUID:]), Inode: uint64(ne.Uint32(d[offsetMsgInode:]))}
	return connected(s, d[1], dst, src) // idiag_state
}
