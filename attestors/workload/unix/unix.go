// Package unix is the "unix" workload attestor: it reports the user, groups
// and executable of a process, read from procfs.
//
// Selectors, as SPIRE's unix attestor names them:
//
//	unix:uid:<effective uid>                unix:user:<name of that uid>
//	unix:gid:<effective gid>                unix:group:<name of that gid>
//	unix:supplementary_gid:<gid>            unix:supplementary_group:<name>
//	unix:path:<absolute executable path>    unix:sha256:<hex SHA-256 of the executable>
//
// Names are emitted only when the uid or gid resolves. The path comes from the
// /proc/PID/exe link (as the kernel reports it, so a replaced binary shows a
// " (deleted)" suffix); the hash is computed over the file that link opens, so
// it covers the binary the process actually runs, even across mount
// namespaces. Hashing is capped by Config.WorkloadSizeLimit: hashing large
// binaries on every attestation is a denial-of-service vector, and results are
// cached per file identity (device, inode, size, mtime, ctime).
//
// Only kinds some entry uses are computed (see workload.Kinds); a node with no
// sha256 selectors never hashes anything.
package unix

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/ferry-id/ferry/attestors/workload"
	"github.com/ferry-id/ferry/internal/selector"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

// Name is the selector type of this attestor.
const Name = "unix"

// DefaultWorkloadSizeLimit is the largest binary hashed when
// Config.WorkloadSizeLimit is zero.
const DefaultWorkloadSizeLimit = 64 << 20

// hashCacheSize bounds the digest cache; it is cleared when full.
const hashCacheSize = 256

// Config configures the attestor. The zero Config is usable.
type Config struct {
	// Log receives debug lines about skipped selectors. Defaults to slog.Default().
	Log *slog.Logger
	// WorkloadSizeLimit is the largest executable, in bytes, that is hashed for
	// unix:sha256. Zero means DefaultWorkloadSizeLimit; negative means never
	// hash. A process whose binary is larger fails attestation when some entry
	// uses sha256, so that an entry keyed on a hash is never silently
	// unmatchable.
	WorkloadSizeLimit int64
	// DisableWorkloadPath turns off unix:path and unix:sha256 (they need the
	// agent to be able to read other users' /proc/PID/exe).
	DisableWorkloadPath bool
	// Hooks replaces OS access; zero fields use the real thing.
	Hooks Hooks
}

// Hooks are the operating-system calls the attestor makes.
type Hooks struct {
	// ProcRoot is the procfs mount. Defaults to workload.DefaultProcRoot.
	ProcRoot string
	// LookupUser resolves a uid to a user. Defaults to os/user.LookupId.
	LookupUser func(uid string) (*user.User, error)
	// LookupGroup resolves a gid to a group. Defaults to os/user.LookupGroupId.
	LookupGroup func(gid string) (*user.Group, error)
}

// Attestor is the unix workload attestor. It is safe for concurrent use.
type Attestor struct {
	log       *slog.Logger
	sizeLimit int64
	noPath    bool
	hooks     Hooks

	mu     sync.Mutex
	hashes map[fileKey]string
}

var _ workload.Attestor = (*Attestor)(nil)

// New returns an attestor configured by c.
func New(c Config) (*Attestor, error) {
	a := &Attestor{
		log:       c.Log,
		sizeLimit: c.WorkloadSizeLimit,
		noPath:    c.DisableWorkloadPath,
		hooks:     c.Hooks,
		hashes:    make(map[fileKey]string),
	}
	if a.log == nil {
		a.log = slog.Default()
	}
	if a.sizeLimit == 0 {
		a.sizeLimit = DefaultWorkloadSizeLimit
	}
	if a.hooks.ProcRoot == "" {
		a.hooks.ProcRoot = workload.DefaultProcRoot
	}
	if a.hooks.LookupUser == nil {
		a.hooks.LookupUser = user.LookupId
	}
	if a.hooks.LookupGroup == nil {
		a.hooks.LookupGroup = user.LookupGroupId
	}
	return a, nil
}

// Name returns "unix".
func (a *Attestor) Name() string { return Name }

// Attest returns the unix selectors of pid that kinds asks for.
func (a *Attestor) Attest(ctx context.Context, pid int32, kinds workload.Kinds) ([]*ferrypb.Selector, error) {
	has := func(kind string) bool { return kinds.Has(Name, kind) }
	var out []*ferrypb.Selector
	add := func(kind, value string) {
		s := &ferrypb.Selector{Type: Name, Value: kind + ":" + value}
		if err := selector.Validate(s); err != nil {
			// Cannot match any entry, because entries are validated the same way.
			a.log.Debug("unix: skipping unrepresentable selector", "pid", pid, "kind", kind, "error", err)
			return
		}
		out = append(out, s)
	}

	if has("uid") || has("user") || has("gid") || has("group") || has("supplementary_gid") || has("supplementary_group") {
		st, err := a.readStatus(ctx, pid)
		if err != nil {
			return nil, err
		}
		if has("uid") {
			add("uid", st.uid)
		}
		if has("user") {
			if u, err := a.hooks.LookupUser(st.uid); err == nil {
				add("user", u.Username)
			}
		}
		if has("gid") {
			add("gid", st.gid)
		}
		if has("group") {
			if g, err := a.hooks.LookupGroup(st.gid); err == nil {
				add("group", g.Name)
			}
		}
		for _, sg := range st.groups {
			if has("supplementary_gid") {
				add("supplementary_gid", sg)
			}
			if has("supplementary_group") {
				if g, err := a.hooks.LookupGroup(sg); err == nil {
					add("supplementary_group", g.Name)
				}
			}
		}
	}

	if a.noPath {
		return out, nil
	}
	exe := a.procPath(pid, "exe")
	if has("path") {
		var p string
		var err error
		if proc := workload.ProcessFrom(ctx, a.hooks.ProcRoot, pid); proc != nil {
			p, err = proc.Readlink("exe")
		} else {
			p, err = os.Readlink(exe)
		}
		if err != nil {
			return nil, fmt.Errorf("unix: pid %d: executable path: %w", pid, err)
		}
		add("path", p)
	}
	if has("sha256") && a.sizeLimit > 0 {
		sum, err := a.hashExecutable(ctx, exe)
		if err != nil {
			return nil, fmt.Errorf("unix: pid %d: %w", pid, err)
		}
		add("sha256", sum)
	}
	return out, nil
}

func (a *Attestor) procPath(pid int32, name string) string {
	return filepath.Join(a.hooks.ProcRoot, strconv.FormatInt(int64(pid), 10), name)
}

type status struct {
	uid, gid string
	groups   []string
}

// readStatus reads the effective uid and gid and the supplementary groups from
// /proc/PID/status. Lines are "Uid:\treal\teffective\tsaved\tfs", likewise Gid,
// and "Groups:\tg1 g2 …". It stops reading once it has all three (they come
// early in the file), and splits only those lines.
//
// When ctx carries the pinned process (workload.ProcessFrom), the file is read
// through it: the descriptor it keeps is bound to that process, so the
// content cannot come from another process that reused the PID, and it saves
// an open and a close per attestation. The content is read afresh each time.
func (a *Attestor) readStatus(ctx context.Context, pid int32) (status, error) {
	if p := workload.ProcessFrom(ctx, a.hooks.ProcRoot, pid); p != nil {
		var st status
		var perr error
		err := p.ReadFile("status", func(r io.Reader) error {
			st, perr = parseStatus(pid, r)
			return nil
		})
		if err != nil {
			return status{}, fmt.Errorf("unix: pid %d: %w", pid, err)
		}
		return st, perr
	}
	f, err := openProcFile(a.procPath(pid, "status"))
	if err != nil {
		return status{}, fmt.Errorf("unix: pid %d: %w", pid, err)
	}
	defer f.Close()
	return parseStatus(pid, f)
}

// parseStatus reads the ids from a /proc/PID/status reader (see readStatus).
// A read of 0 bytes, with or without io.EOF, is the end of the file.
func parseStatus(pid int32, f io.Reader) (status, error) {
	bp := statusBufs.Get().(*[]byte)
	defer statusBufs.Put(bp)
	data := (*bp)[:0]
	var st status
	var haveUID, haveGID, haveGroups bool
	parse := func(line []byte) error {
		key, value, ok := bytes.Cut(line, []byte{':'})
		if !ok {
			return nil
		}
		switch string(key) {
		case "Uid":
			st.uid, haveUID = effectiveID(strings.Fields(string(value)))
		case "Gid":
			st.gid, haveGID = effectiveID(strings.Fields(string(value)))
		case "Groups":
			fields := strings.Fields(string(value))
			for _, g := range fields {
				if _, err := strconv.ParseUint(g, 10, 32); err != nil {
					return fmt.Errorf("unix: pid %d: malformed supplementary gid %q", pid, g)
				}
			}
			st.groups, haveGroups = fields, true
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
		n, err := f.Read(data[len(data):min(cap(data), maxStatusSize)])
		if err == io.EOF {
			n, err = 0, nil
		}
		if err != nil {
			return status{}, fmt.Errorf("unix: pid %d: read status: %w", pid, err)
		}
		data = data[:len(data)+n]
		for {
			i := bytes.IndexByte(data[off:], '\n')
			if i < 0 {
				break
			}
			if err := parse(data[off : off+i]); err != nil {
				return status{}, err
			}
			off += i + 1
		}
		if n == 0 { // end of file: a last line without a newline
			if err := parse(data[off:]); err != nil {
				return status{}, err
			}
			break
		}
	}
	if cap(data) <= maxStatusSize {
		*bp = data[:0]
	}
	if !haveUID || !haveGID {
		return status{}, fmt.Errorf("unix: pid %d: status has no valid Uid/Gid lines", pid)
	}
	return st, nil
}

// maxStatusSize bounds how much of /proc/PID/status is read.
const maxStatusSize = 64 << 10

// statusBufs recycles the buffers /proc/PID/status is read into.
var statusBufs = sync.Pool{New: func() any { b := make([]byte, 0, 4096); return &b }}

// effectiveID picks the effective id: the second of real, effective, saved, fs.
func effectiveID(fields []string) (string, bool) {
	if len(fields) < 2 {
		return "", false
	}
	if _, err := strconv.ParseUint(fields[1], 10, 32); err != nil {
		return "", false
	}
	return fields[1], true
}

// fileKey identifies one version of a file: a rewrite changes mtime and ctime,
// and ctime cannot be set by the file's owner.
type fileKey struct {
	dev, ino     uint64
	size         int64
	mtime, ctime int64 // nanoseconds
}

func (a *Attestor) hashExecutable(ctx context.Context, exe string) (string, error) {
	f, err := os.Open(exe)
	if err != nil {
		return "", fmt.Errorf("open executable: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return "", fmt.Errorf("stat executable: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return "", fmt.Errorf("executable is not a regular file")
	}
	if fi.Size() > a.sizeLimit {
		return "", fmt.Errorf("executable is %d bytes, over the hashing limit of %d bytes (workload size limit)", fi.Size(), a.sizeLimit)
	}
	key, cacheable := fileKeyOf(fi)
	if cacheable {
		a.mu.Lock()
		sum, ok := a.hashes[key]
		a.mu.Unlock()
		if ok {
			return sum, nil
		}
	}

	h := sha256.New()
	n, err := io.Copy(h, &ctxReader{ctx: ctx, r: io.LimitReader(f, a.sizeLimit+1)})
	if err != nil {
		return "", fmt.Errorf("hash executable: %w", err)
	}
	if n > a.sizeLimit {
		return "", fmt.Errorf("executable grew past the hashing limit of %d bytes while being hashed", a.sizeLimit)
	}
	sum := hex.EncodeToString(h.Sum(nil))
	if cacheable {
		a.mu.Lock()
		if len(a.hashes) >= hashCacheSize {
			clear(a.hashes)
		}
		a.hashes[key] = sum
		a.mu.Unlock()
	}
	return sum, nil
}

// ctxReader stops a long read when ctx is done.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c *ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}
