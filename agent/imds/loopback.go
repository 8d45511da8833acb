package imds

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"

	"golang.org/x/sys/unix"
)

// AddLoopbackAddress adds addr as a host-scoped /32 (or /128) on the "lo"
// interface, as `ip addr add 169.254.169.254/32 dev lo scope host` would, so
// the VM-style endpoint can bind it. An address already present is not an
// error. Without CAP_NET_ADMIN it fails with a message saying so.
func AddLoopbackAddress(addr netip.Addr) error {
	addr = addr.Unmap()
	if !addr.IsValid() {
		return errors.New("imds: invalid loopback address")
	}
	lo, err := net.InterfaceByName("lo")
	if err != nil {
		return fmt.Errorf("imds: loopback interface: %w", err)
	}
	family, bits := uint8(unix.AF_INET), uint8(32)
	if addr.Is6() {
		family, bits = unix.AF_INET6, 128
	}
	raw := addr.AsSlice()

	attrLen := unix.SizeofRtAttr + len(raw) // already 4-byte aligned
	msg := make([]byte, unix.SizeofNlMsghdr+unix.SizeofIfAddrmsg+2*attrLen)
	ne := binary.NativeEndian
	ne.PutUint32(msg[0:], uint32(len(msg)))
	ne.PutUint16(msg[4:], unix.RTM_NEWADDR)
	ne.PutUint16(msg[6:], unix.NLM_F_REQUEST|unix.NLM_F_ACK|unix.NLM_F_CREATE|unix.NLM_F_EXCL)
	ne.PutUint32(msg[8:], 1)
	ifa := msg[unix.SizeofNlMsghdr:]
	ifa[0] = family
	ifa[1] = bits
	ifa[2] = unix.IFA_F_PERMANENT
	ifa[3] = unix.RT_SCOPE_HOST
	ne.PutUint32(ifa[4:], uint32(lo.Index))
	at := ifa[unix.SizeofIfAddrmsg:]
	for _, typ := range []uint16{unix.IFA_LOCAL, unix.IFA_ADDRESS} {
		ne.PutUint16(at[0:], uint16(attrLen))
		ne.PutUint16(at[2:], typ)
		copy(at[unix.SizeofRtAttr:], raw)
		at = at[attrLen:]
	}

	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("imds: netlink: %w", err)
	}
	defer unix.Close(fd)
	if err := unix.Sendto(fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return addrError(addr, bits, err)
	}
	buf := make([]byte, 4096)
	n, _, err := unix.Recvfrom(fd, buf, 0)
	if err != nil {
		return addrError(addr, bits, err)
	}
	msgs, err := syscall.ParseNetlinkMessage(buf[:n])
	if err != nil {
		return fmt.Errorf("imds: netlink: %w", err)
	}
	for _, m := range msgs {
		if m.Header.Type != unix.NLMSG_ERROR || len(m.Data) < 4 {
			continue
		}
		if code := int32(ne.Uint32(m.Data)); code != 0 {
			return addrError(addr, bits, unix.Errno(-code))
		}
		return nil
	}
	return errors.New("imds: netlink: no acknowledgement")
}

func addrError(addr netip.Addr, bits uint8, err error) error {
	switch {
	case errors.Is(err, unix.EEXIST):
		return nil
	case errors.Is(err, unix.EPERM), errors.Is(err, unix.EACCES):
		return fmt.Errorf("imds: adding %s/%d to lo requires CAP_NET_ADMIN (run the agent as root, grant the capability, or add the address beforehand): %w", addr, bits, err)
	}
	return fmt.Errorf("imds: adding %s/%d to lo: %w", addr, bits, err)
}
