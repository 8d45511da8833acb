// Package unix is the "unix" workload attestor: it reports the user, groups
// and executable of a process, read from procfs.
//
// Selectors, as SPIRE's unix attestor names them:
//
//	unix:uid:<uid>                          unix:user:<name of that uid>
//	unix:gid:<gid>                          unix:group:<name of that gid>
//	unix:supplementary_gid:<gid>            unix:supplementary_group:<name>
//	unix:path:<absolute executable path>    unix:sha256:<hex SHA-256 of the executable>
//
// A process is attested by its ids only when its real, effective, saved and
// filesystem uids are one uid, and likewise its gids: a process running a
// setuid or setgid program (or one that changed some of its ids) fails
// attestation rather than being attested as its effective ids. Within the
// agent's attestation of a caller (workload.AttestCaller) the ids come from
// the one read of /proc/PID/status made for the call, which is also checked
// against the ids the caller connected with.
//
// Names are emitted only when the uid or gid resolves. The path comes from the
// /proc/PID/exe link (as the kernel reports it, so a replaced binary shows a
// " (deleted)" suffix); the hash is computed over the file that link opens, so
// it covers the binary the process actually runs, even across mount
// namespaces. Both describe the program the process runs when it is
// attested: a caller that executed another program since it connected is
// attested as that program. The executable is read before the ids. Hashing
// is capped by Config.WorkloadSizeLimit: hashing large
// binaries on every attestation is a denial-of-service vector, and results are
// cached per file identity (device, inode, size, mtime, ctime).
//
// Only kinds some entry uses are computed (see workload.Kinds); a node with no
// sha256 selectors never hashes anything.
package unix

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
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
//
// The executable is read before the ids: a process that executes a setuid
// or setgid program while it is being attested then shows its new ids, and
// is refused, rather than being attested as the new program with the old
// ids.
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

	if !a.noPath {
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
	}

	groups := has("supplementary_gid") || has("supplementary_group")
	if !has("uid") && !has("user") && !has("gid") && !has("group") && !groups {
		return out, nil
	}
	c, err := a.creds(ctx, pid, groups)
	if err != nil {
		return nil, err
	}
	// A process whose ids disagree runs a setuid or setgid program, or
	// changed its ids: it is not attested as any of them.
	uid, ok := c.UID.Uniform()
	if !ok {
		return nil, fmt.Errorf("unix: pid %d: user ids (real/effective/saved/fs) %v differ: not attested", pid, c.UID)
	}
	gid, ok := c.GID.Uniform()
	if !ok {
		return nil, fmt.Errorf("unix: pid %d: group ids (real/effective/saved/fs) %v differ: not attested", pid, c.GID)
	}
	uidStr, gidStr := strconv.FormatUint(uint64(uid), 10), strconv.FormatUint(uint64(gid), 10)
	if has("uid") {
		add("uid", uidStr)
	}
	if has("user") {
		if u, err := a.hooks.LookupUser(uidStr); err == nil {
			add("user", u.Username)
		}
	}
	if has("gid") {
		add("gid", gidStr)
	}
	if has("group") {
		if g, err := a.hooks.LookupGroup(gidStr); err == nil {
			add("group", g.Name)
		}
	}
	if groups {
		for _, g := range c.Groups {
			sg := strconv.FormatUint(uint64(g), 10)
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
	return out, nil
}

func (a *Attestor) procPath(pid int32, name string) string {
	return filepath.Join(a.hooks.ProcRoot, strconv.FormatInt(int64(pid), 10), name)
}

// creds returns the ids and groups of pid from /proc/PID/status.
//
// Within an attestation of a pinned caller (workload.CredsFrom), they are
// the ones read once for the whole call and checked against the ids the
// caller connected with. Otherwise, with only the pin in ctx
// (workload.ProcessFrom), the file is read through it: the descriptor it
// keeps is bound to that process, so the content cannot come from another
// process that reused the PID. Without either, /proc/PID/status is read by
// path. The content is read afresh each time.
func (a *Attestor) creds(ctx context.Context, pid int32, groups bool) (workload.Creds, error) {
	if c, ok, err := workload.CredsFrom(ctx, a.hooks.ProcRoot, pid, groups); ok {
		if err != nil {
			return workload.Creds{}, fmt.Errorf("unix: pid %d: %w", pid, err)
		}
		return c, nil
	}
	if p := workload.ProcessFrom(ctx, a.hooks.ProcRoot, pid); p != nil {
		c, err := p.ReadCreds()
		if err != nil {
			return workload.Creds{}, fmt.Errorf("unix: pid %d: %w", pid, err)
		}
		return c, nil
	}
	f, err := openProcFile(a.procPath(pid, "status"))
	if err != nil {
		return workload.Creds{}, fmt.Errorf("unix: pid %d: %w", pid, err)
	}
	defer f.Close()
	c, err := workload.ParseCreds(f)
	if err != nil {
		return workload.Creds{}, fmt.Errorf("unix: pid %d: %w", pid, err)
	}
	return c, nil
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
