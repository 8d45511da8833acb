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
	"strings"
	"sync"

	"golang.org/x/sys/unix"
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
// Descriptors are plain file descriptors, not os.Files: procfs files cannot
// be polled, and an os.File would try to register each with the runtime's
// poller (and fail) and make extra fcntl calls, several system calls per
// connection on a path every Workload API caller takes.
//
// A Process is safe for concurrent use. Close releases the directory and the
// files.
type Process struct {
	pid   int32
	start uint64
	root  string // the procfs mount, as given to OpenProcessIn

	mu    sync.Mutex
	dir   int            // the /proc/PID directory; -1 once closed
	files map[string]int // opened relative to dir, read at offset 0
	buf   []byte         // stat is read into it; guarded by mu
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
	path := filepath.Join(procRoot, strconv.FormatInt(int64(pid), 10))
	dir, err := openRetry(func() (int, error) {
		return unix.Open(path, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	})
	if err != nil {
		return nil, fmt.Errorf("workload: open process %d: %w", pid, &os.PathError{Op: "open", Path: path, Err: err})
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

// openRetry calls open until it does not fail with EINTR.
func openRetry(open func() (int, error)) (int, error) {
	for {
		fd, err := open()
		if err != unix.EINTR {
			return fd, err
		}
	}
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
	if p.dir < 0 {
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
	fd, err := p.fileLocked(name)
	if err != nil {
		return err
	}
	return read(&atReader{fd: fd, name: name})
}

// Readlink returns the target of the symbolic link name in the pinned
// process's directory, such as "exe".
func (p *Process) Readlink(name string) (string, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.dir < 0 {
		return "", fmt.Errorf("%w: pid %d: process handle closed", ErrProcessChanged, p.pid)
	}
	if err := checkName(name); err != nil {
		return "", err
	}
	for size := 256; ; size *= 2 {
		b := make([]byte, size)
		n, err := unix.Readlinkat(p.dir, name, b)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return "", &os.PathError{Op: "readlink", Path: name, Err: err}
		}
		if n < size {
			return string(b[:n]), nil
		}
		if size >= 1<<16 {
			return "", &os.PathError{Op: "readlink", Path: name, Err: unix.ENAMETOOLONG}
		}
	}
}

// checkName refuses anything but a plain name in the process directory.
func checkName(name string) error {
	if name == "" || name == "." || name == ".." || strings.ContainsRune(name, '/') {
		return fmt.Errorf("workload: %q is not a file of a process directory", name)
	}
	return nil
}

func (p *Process) fileLocked(name string) (int, error) {
	if p.dir < 0 {
		return -1, fmt.Errorf("%w: pid %d: process handle closed", ErrProcessChanged, p.pid)
	}
	if fd, ok := p.files[name]; ok {
		return fd, nil
	}
	if err := checkName(name); err != nil {
		return -1, err
	}
	fd, err := openRetry(func() (int, error) {
		return unix.Openat(p.dir, name, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
	})
	if err != nil {
		return -1, &os.PathError{Op: "open", Path: name, Err: err}
	}
	if p.files == nil {
		p.files = make(map[string]int, 2)
	}
	p.files[name] = fd
	return fd, nil
}

// atReader reads fd from offset 0 with pread. procfs generates a file such
// as stat or status whole on each read from offset 0, so a read that returns
// less than asked for has reached the end: the reader then reports io.EOF
// without another system call (as for a regular file, where a short read at
// a fixed size also means the end).
type atReader struct {
	fd   int
	name string
	off  int64
	eof  bool
}

func (r *atReader) Read(b []byte) (int, error) {
	if r.eof {
		return 0, io.EOF
	}
	if len(b) == 0 {
		return 0, nil
	}
	n, err := preadOnce(r.fd, b, r.off)
	if err != nil {
		return 0, &os.PathError{Op: "read", Path: r.name, Err: err}
	}
	r.off += int64(n)
	if n < len(b) {
		r.eof = true
		if n == 0 {
			return 0, io.EOF
		}
	}
	return n, nil
}

// preadOnce makes one pread call, retried only on EINTR.
func preadOnce(fd int, b []byte, off int64) (int, error) {
	for {
		n, err := unix.Pread(fd, b, off)
		if err != unix.EINTR {
			return n, err
		}
	}
}

// Close releases the process handle. It is safe to call more than once.
func (p *Process) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.dir < 0 {
		return nil
	}
	for _, fd := range p.files {
		unix.Close(fd)
	}
	p.files = nil
	err := unix.Close(p.dir)
	p.dir = -1
	return err
}

type procStat struct {
	state   string
	start   uint64
	threads int64 // num_threads; read only for a zombie ("Z")
}

// gone reports a zombie or dead process: it exited and cannot use an identity.
//
// A zombie thread-group leader with other threads is not gone: that is what a
// process looks like while a thread other than its first executes a program
// (execve makes the old leader a zombie, then hands its PID and start time to
// the executing thread), or when its first thread ended and others run on.
// A process that exited has no thread left but its leader.
func (s procStat) gone() bool {
	switch s.state {
	case "X", "x":
		return true
	case "Z":
		return s.threads <= 1
	}
	return false
}

// maxStatSize bounds the read of /proc/PID/stat (a few hundred bytes in practice).
const maxStatSize = 4096

// readStatLocked reads and parses the pinned process's stat file.
func (p *Process) readStatLocked() (procStat, error) {
	fd, err := p.fileLocked("stat")
	if err != nil {
		return procStat{}, err
	}
	if p.buf == nil {
		p.buf = make([]byte, 0, 512)
	}
	r := &atReader{fd: fd, name: "stat"}
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
	var state, start, threads []byte
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
		case 18: // field 20, num_threads
			threads = rest[:j]
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
	st := procStat{state: stateString(state), start: v}
	if st.state == "Z" { // only gone needs it, and only for a zombie
		if st.threads, err = strconv.ParseInt(string(threads), 10, 64); err != nil {
			return procStat{}, fmt.Errorf("malformed stat thread count: %w", err)
		}
	}
	return st, nil
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
