package workload

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"sync"
)

// IDs are the four user (or group) ids of a process, in the order
// /proc/PID/status lists them.
type IDs struct {
	Real, Effective, Saved, FS uint32
}

// Same reports whether all four ids are id.
func (i IDs) Same(id uint32) bool {
	return i.Real == id && i.Effective == id && i.Saved == id && i.FS == id
}

// Uniform returns the id when all four are the same.
func (i IDs) Uniform() (uint32, bool) { return i.Real, i.Same(i.Real) }

func (i IDs) String() string {
	return fmt.Sprintf("%d/%d/%d/%d", i.Real, i.Effective, i.Saved, i.FS)
}

// Creds are the credentials of a process as the kernel reports them in
// /proc/PID/status.
type Creds struct {
	UID, GID IDs
	// Groups are the supplementary groups, as listed (the kernel keeps them
	// sorted).
	Groups []uint32
}

// ErrCredentialsChanged is wrapped by the errors of Peer.Check: the caller's
// credentials now are not those the kernel recorded when it connected, or
// its ids disagree with each other (a setuid or setgid program).
var ErrCredentialsChanged = errors.New("workload: caller's ids are not the ids it connected with")

// Peer is what the kernel recorded about a caller when it connected: for a
// unix socket, SO_PEERCRED (the effective uid and gid at connect) and
// SO_PEERGROUPS (the supplementary groups at connect); for a loopback TCP
// connection, only the uid owning the client socket.
type Peer struct {
	UID uint32
	// GID is checked when HasGID is set.
	GID    uint32
	HasGID bool
	// Groups returns the supplementary groups the caller had when it
	// connected. It is called only when an attestor used the caller's
	// groups (see CredsFrom), at most once per attestation. Nil when the
	// kernel recorded none; groups are then not compared.
	Groups func() ([]uint32, error)
}

// Check applies the credential rule to c, the caller's credentials now.
// Every uid (real, effective, saved, filesystem) must be p.UID, and every
// gid p.GID, or, when the kernel reported no gid, the same as each other.
// So a caller that changed its ids after connecting is refused, and so is a
// process running a setuid or setgid program: it is never attested as its
// effective id. When groups is set (an attestor used them) and p.Groups is
// known, the supplementary groups must also be those it connected with.
// Failures wrap ErrCredentialsChanged.
func (p Peer) Check(c Creds, groups bool) error {
	if !c.UID.Same(p.UID) {
		return fmt.Errorf("%w: uids (real/effective/saved/fs) %v, connected as uid %d", ErrCredentialsChanged, c.UID, p.UID)
	}
	if p.HasGID {
		if !c.GID.Same(p.GID) {
			return fmt.Errorf("%w: gids (real/effective/saved/fs) %v, connected as gid %d", ErrCredentialsChanged, c.GID, p.GID)
		}
	} else if _, ok := c.GID.Uniform(); !ok {
		return fmt.Errorf("%w: gids (real/effective/saved/fs) %v differ (a setgid program)", ErrCredentialsChanged, c.GID)
	}
	if !groups || p.Groups == nil {
		return nil
	}
	want, err := p.Groups()
	if err != nil {
		return fmt.Errorf("workload: supplementary groups the caller connected with: %w", err)
	}
	if !sameSet(want, c.Groups) {
		return fmt.Errorf("%w: supplementary groups %v, connected with %v", ErrCredentialsChanged, c.Groups, want)
	}
	return nil
}

// sameSet reports whether a and b hold the same gids, in any order.
func sameSet(a, b []uint32) bool {
	if len(a) != len(b) {
		return false
	}
	if slices.IsSorted(a) && slices.IsSorted(b) {
		return slices.Equal(a, b)
	}
	a, b = slices.Clone(a), slices.Clone(b)
	slices.Sort(a)
	slices.Sort(b)
	return slices.Equal(a, b)
}

// maxStatusSize bounds how much of /proc/PID/status is read.
const maxStatusSize = 64 << 10

// statusBufs recycles the buffers /proc/PID/status is read into.
var statusBufs = sync.Pool{New: func() any { b := make([]byte, 0, 4096); return &b }}

// ParseCreds reads the Uid, Gid and Groups lines of /proc/PID/status from r
// ("Uid:\treal\teffective\tsaved\tfs", likewise Gid, "Groups:\tg1 g2 …").
// It stops reading once it has all three (they come early in the file) and
// splits only those lines. A read of 0 bytes, with or without io.EOF, is the
// end of the file. A missing Groups line means no supplementary groups.
func ParseCreds(r io.Reader) (Creds, error) {
	bp := statusBufs.Get().(*[]byte)
	defer statusBufs.Put(bp)
	data := (*bp)[:0]
	var c Creds
	var haveUID, haveGID, haveGroups bool
	parse := func(line []byte) error {
		key, value, ok := bytes.Cut(line, []byte{':'})
		if !ok {
			return nil
		}
		switch string(key) {
		case "Uid":
			c.UID, haveUID = parseIDs(value)
		case "Gid":
			c.GID, haveGID = parseIDs(value)
		case "Groups":
			groups, err := parseGroups(value)
			if err != nil {
				return err
			}
			c.Groups, haveGroups = groups, true
		}
		return nil
	}
	off := 0 // start of the first line not parsed yet
	for !haveUID || !haveGID || !haveGroups {
		if len(data) >= maxStatusSize {
			break
		}
		if len(data) == cap(data) {
			data = slices.Grow(data, cap(data))
		}
		n, err := r.Read(data[len(data):min(cap(data), maxStatusSize)])
		if err == io.EOF {
			n, err = 0, nil
		}
		if err != nil {
			return Creds{}, fmt.Errorf("read status: %w", err)
		}
		data = data[:len(data)+n]
		for {
			i := bytes.IndexByte(data[off:], '\n')
			if i < 0 {
				break
			}
			if err := parse(data[off : off+i]); err != nil {
				return Creds{}, err
			}
			off += i + 1
		}
		if n == 0 { // end of file: a last line without a newline
			if err := parse(data[off:]); err != nil {
				return Creds{}, err
			}
			break
		}
	}
	if cap(data) <= maxStatusSize {
		*bp = data[:0]
	}
	if !haveUID || !haveGID {
		return Creds{}, errors.New("status has no valid Uid/Gid lines")
	}
	return c, nil
}

// parseIDs parses the four ids of a Uid or Gid line.
func parseIDs(value []byte) (IDs, bool) {
	var ids [4]uint32
	n := 0
	for f := range bytes.FieldsSeq(value) {
		if n == 4 {
			return IDs{}, false
		}
		v, ok := parseID(f)
		if !ok {
			return IDs{}, false
		}
		ids[n] = v
		n++
	}
	if n != 4 {
		return IDs{}, false
	}
	return IDs{Real: ids[0], Effective: ids[1], Saved: ids[2], FS: ids[3]}, true
}

// parseGroups parses the gids of a Groups line.
func parseGroups(value []byte) ([]uint32, error) {
	var out []uint32
	for f := range bytes.FieldsSeq(value) {
		v, ok := parseID(f)
		if !ok {
			return nil, fmt.Errorf("malformed supplementary gid %q", f)
		}
		out = append(out, v)
	}
	return out, nil
}

// parseID parses a decimal uid or gid without allocating (this runs on
// every Workload API call).
func parseID(b []byte) (uint32, bool) {
	if len(b) == 0 || len(b) > 10 {
		return 0, false
	}
	var v uint64
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, false
		}
		v = v*10 + uint64(c-'0')
	}
	if v > math.MaxUint32 {
		return 0, false
	}
	return uint32(v), true
}
