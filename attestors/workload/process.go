package workload

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"syscall"
)

// DefaultProcRoot is where procfs is mounted.
const DefaultProcRoot = "/proc"

// Process pins a PID for the duration of an attestation.
//
// OpenProcess holds the process's /proc/PID directory open and records its start
// time (field 22 of /proc/PID/stat, in clock ticks since boot). While the
// original process lives, its PID cannot be given to another process; once it
// has exited, reads through the held directory fail even if the PID has been
// reused, because procfs ties the directory to the process, not the number.
// CheckAlive re-reads the start time through that directory and compares it, so
// a caller that exits and whose PID is recycled mid-attestation is caught
// either way. An exited but unreaped process (zombie) counts as gone.
//
// Files read through a Process (its stat for CheckAlive, and whatever
// attestors read with ReadFile) are opened once, relative to the held
// directory, and kept open: every later read starts again at offset 0, where
// procfs generates the file's content afresh from the live process. A
// descriptor of a procfs file is bound to the process it was opened for, just
// as the directory is: once that process has been reaped, reads fail (ESRCH)
// instead of describing whichever process now has the PID. Nothing read is
// cached; only the descriptors are, so a process that changes its
// credentials or executes another program is seen as it is at every read.
//
// A Process is safe for concurrent use. Close releases the directory and the
// files.
type Process struct {
	pid   int32
	start uint64
	root  string // the procfs mount, as given to OpenProcessIn

	mu    sync.Mutex
	dir   *os.Root
	files map[string]*os.File // opened through dir, read at offset 0
	buf   []byte              // stat is read into it; guarded by mu
}

// OpenProcess pins pid under DefaultProcRoot.
func OpenProcess(pid int32) (*Process, error) {
	return OpenProcessIn(DefaultProcRoot, pid)
}

// OpenProcessIn pins pid under procRoot, a procfs mount (or, in tests, a
// directory laid out like one).
func OpenProcessIn(procRoot string, pid int32) (*Process, error) {
	if pid <= 0 {
		return nil, fmt.Errorf("workload: invalid pid %d", pid)
	}
	dir, err := os.OpenRoot(filepath.Join(procRoot, strconv.FormatInt(int64(pid), 10)))
	if err != nil {
		return nil, fmt.Errorf("workload: open process %d: %w", pid, err)
	}
	p := &Process{pid: pid, root: procRoot, dir: dir}
	p.mu.Lock()
	st, err := p.readStatLocked()
	p.mu.Unlock()
	if err != nil {
		p.Close()
		return nil, fmt.Errorf("workload: process %d: %w", pid, err)
	}
	if st.gone() {
		p.Close()
		return nil, fmt.Errorf("%w: pid %d is in state %q", ErrProcessChanged, pid, st.state)
	}
	p.start = st.start
	return p, nil
}

// PID returns the pinned PID.
func (p *Process) PID() int32 { return p.pid }

// StartTime returns the process start time recorded when it was opened, in
// clock ticks since boot.
func (p *Process) StartTime() uint64 { return p.start }

// CheckAlive returns nil if the pinned process is still running and is the
// same process that was opened; otherwise an error wrapping ErrProcessChanged.
func (p *Process) CheckAlive() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.dir == nil {
		return fmt.Errorf("%w: pid %d: process handle closed", ErrProcessChanged, p.pid)
	}
	st, err := p.readStatLocked()
	if err != nil {
		return fmt.Errorf("%w: pid %d: %v", ErrProcessChanged, p.pid, err)
	}
	if st.start != p.start {
		return fmt.Errorf("%w: pid %d: start time changed from %d to %d", ErrProcessChanged, p.pid, p.start, st.start)
	}
	if st.gone() {
		return fmt.Errorf("%w: pid %d is in state %q", ErrProcessChanged, p.pid, st.state)
	}
	return nil
}

// ReadFile calls read with a reader of the pinned process's file name (a
// file of its /proc/PID directory, such as "status"), positioned at the
// start. The file is opened through the pinned directory on first use and
// kept open; each call reads the current content. Calls are serialized per
// Process; read must not retain the reader. A process that has exited fails
// the open or the read.
func (p *Process) ReadFile(name string, read func(io.Reader) error) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	f, err := p.fileLocked(name)
	if err != nil {
		return err
	}
	return read(&atReader{f: f})
}

// Readlink returns the target of the symbolic link name in the pinned
// process's directory, such as "exe".
func (p *Process) Readlink(name string) (string, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.dir == nil {
		return "", fmt.Errorf("%w: pid %d: process handle closed", ErrProcessChanged, p.pid)
	}
	return p.dir.Readlink(name)
}

func (p *Process) fileLocked(name string) (*os.File, error) {
	if p.dir == nil {
		return nil, fmt.Errorf("%w: pid %d: process handle closed", ErrProcessChanged, p.pid)
	}
	if f := p.files[name]; f != nil {
		return f, nil
	}
	f, err := p.dir.Open(name)
	if err != nil {
		return nil, err
	}
	if p.files == nil {
		p.files = make(map[string]*os.File, 2)
	}
	p.files[name] = f
	return f, nil
}

// atReader reads f from offset 0 with pread, leaving f's own offset alone.
type atReader struct {
	f   *os.File
	off int64
}

func (r *atReader) Read(b []byte) (int, error) {
	n, err := preadOnce(r.f, b, r.off)
	r.off += int64(n)
	return n, err
}

// preadOnce makes one pread call: unlike os.File.ReadAt, which reads again
// after a short read to find the end of file, it returns what one read gave,
// and 0, io.EOF at the end.
func preadOnce(f *os.File, b []byte, off int64) (int, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return 0, err
	}
	var (
		n    int
		rerr error
	)
	if err := rc.Read(func(fd uintptr) bool {
		for {
			n, rerr = syscall.Pread(int(fd), b, off)
			if rerr != syscall.EINTR {
				return true
			}
		}
	}); err != nil {
		return 0, err
	}
	if rerr != nil {
		return 0, &os.PathError{Op: "read", Path: f.Name(), Err: rerr}
	}
	if n == 0 && len(b) > 0 {
		return 0, io.EOF
	}
	return n, nil
}

// Close releases the process handle. It is safe to call more than once.
func (p *Process) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.dir == nil {
		return nil
	}
	for _, f := range p.files {
		f.Close()
	}
	p.files = nil
	err := p.dir.Close()
	p.dir = nil
	return err
}

type procStat struct {
	state string
	start uint64
}

// gone reports a zombie or dead process: it exited and cannot use an identity.
func (s procStat) gone() bool { return s.state == "Z" || s.state == "X" || s.state == "x" }

// maxStatSize bounds the read of /proc/PID/stat (a few hundred bytes in practice).
const maxStatSize = 4096

// readStatLocked reads and parses the pinned process's stat file.
func (p *Process) readStatLocked() (procStat, error) {
	f, err := p.fileLocked("stat")
	if err != nil {
		return procStat{}, err
	}
	if p.buf == nil {
		p.buf = make([]byte, 0, 512)
	}
	r := &atReader{f: f}
	buf := p.buf[:0]
	for len(buf) < maxStatSize {
		if len(buf) == cap(buf) {
			buf = slices.Grow(buf, cap(buf))
		}
		n, err := r.Read(buf[len(buf):min(cap(buf), maxStatSize)])
		buf = buf[:len(buf)+n]
		if err == io.EOF {
			break
		}
		if err != nil {
			return procStat{}, fmt.Errorf("read stat: %w", err)
		}
	}
	p.buf = buf[:0]
	return parseStat(buf)
}

// parseStat extracts the state and start time from the content of
// /proc/PID/stat. The command name (field 2) is in parentheses and may itself
// contain spaces and parentheses, so fields are counted from the last ')'.
func parseStat(b []byte) (procStat, error) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return procStat{}, fmt.Errorf("malformed stat: no command name")
	}
	// After ") ": field 3 (state) is the first; field 22 (starttime) the 20th.
	rest := b[i+1:]
	var state, start []byte
	n := 0
	for len(rest) > 0 && n < 20 {
		j := 0
		for j < len(rest) && isSpace(rest[j]) {
			j++
		}
		rest = rest[j:]
		if len(rest) == 0 {
			break
		}
		j = 0
		for j < len(rest) && !isSpace(rest[j]) {
			j++
		}
		n++
		switch n {
		case 1:
			state = rest[:j]
		case 20:
			start = rest[:j]
		}
		rest = rest[j:]
	}
	if n < 20 {
		return procStat{}, fmt.Errorf("malformed stat: %d fields after command name", n)
	}
	v, err := strconv.ParseUint(string(start), 10, 64)
	if err != nil {
		return procStat{}, fmt.Errorf("malformed stat start time: %w", err)
	}
	return procStat{state: stateString(state), start: v}, nil
}

func isSpace(c byte) bool {
	return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'
}

// stateString returns the state field as a string without allocating for the
// one-letter states procfs reports.
func stateString(b []byte) string {
	if len(b) == 1 {
		switch b[0] {
		case 'R':
			return "R"
		case 'S':
			return "S"
		case 'D':
			return "D"
		case 'I':
			return "I"
		case 'T':
			return "T"
		case 't':
			return "t"
		case 'Z':
			return "Z"
		case 'X':
			return "X"
		case 'x':
			return "x"
		}
	}
	return string(b)
}

type processKey struct{}

// WithProcess returns a context carrying p, the pinned process being
// attested, so attestors read its files through p (ProcessFrom) rather than
// by PID.
func WithProcess(ctx context.Context, p *Process) context.Context {
	return context.WithValue(ctx, processKey{}, p)
}

// ProcessFrom returns the pinned process carried by ctx if it is pid's and
// was opened under procRoot, else nil (the attestor then reads
// procRoot/PID by number, and the caller must check the process afterwards,
// as Attest does).
func ProcessFrom(ctx context.Context, procRoot string, pid int32) *Process {
	p, _ := ctx.Value(processKey{}).(*Process)
	if p == nil || p.pid != pid || filepath.Clean(p.root) != filepath.Clean(procRoot) {
		return nil
	}
	return p
}
