package workload

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
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
// A Process is safe for concurrent use. Close releases the directory.
type Process struct {
	pid   int32
	start uint64

	mu  sync.Mutex
	dir *os.Root
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
	st, err := readStat(dir)
	if err != nil {
		dir.Close()
		return nil, fmt.Errorf("workload: process %d: %w", pid, err)
	}
	if st.gone() {
		dir.Close()
		return nil, fmt.Errorf("%w: pid %d is in state %q", ErrProcessChanged, pid, st.state)
	}
	return &Process{pid: pid, start: st.start, dir: dir}, nil
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
	st, err := readStat(p.dir)
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

// Close releases the process handle. It is safe to call more than once.
func (p *Process) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.dir == nil {
		return nil
	}
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

func readStat(dir *os.Root) (procStat, error) {
	f, err := dir.Open("stat")
	if err != nil {
		return procStat{}, err
	}
	defer f.Close()
	buf, err := io.ReadAll(io.LimitReader(f, maxStatSize))
	if err != nil {
		return procStat{}, fmt.Errorf("read stat: %w", err)
	}
	return parseStat(string(buf))
}

// parseStat extracts the state and start time from the content of
// /proc/PID/stat. The command name (field 2) is in parentheses and may itself
// contain spaces and parentheses, so fields are counted from the last ')'.
func parseStat(s string) (procStat, error) {
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return procStat{}, fmt.Errorf("malformed stat: no command name")
	}
	// After ") ": field 3 (state) is fields[0]; field 22 (starttime) is fields[19].
	fields := strings.Fields(s[i+1:])
	if len(fields) < 20 {
		return procStat{}, fmt.Errorf("malformed stat: %d fields after command name", len(fields))
	}
	start, err := strconv.ParseUint(fields[19], 10, 64)
	if err != nil {
		return procStat{}, fmt.Errorf("malformed stat start time: %w", err)
	}
	return procStat{state: fields[0], start: start}, nil
}
