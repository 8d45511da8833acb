// Package systemd is the "systemd" workload attestor: it reports the systemd
// unit a process runs in.
//
// Selectors, as SPIRE's systemd attestor names them:
//
//	systemd:id:<unit name>                  e.g. systemd:id:nginx.service
//	systemd:fragment_path:<unit file path>  e.g. systemd:fragment_path:/usr/lib/systemd/system/nginx.service
//
// SPIRE asks systemd over D-Bus (GetUnitByPID, then the unit's Id and
// FragmentPath properties). ferry does not talk D-Bus; it derives the unit
// from /proc/PID/cgroup instead, the way systemd itself does (cg_pid_get_unit):
// in the cgroup path, leading "*.slice" components are skipped and the next
// component, if it is a valid unit name, is the unit. The unified (cgroup v2,
// "0::") line is used, falling back to the v1 "name=systemd" line.
//
// Limits of this approach:
//   - The cgroup path is relative to the agent's cgroup namespace. The agent
//     must run in the host cgroup namespace (as it must for SO_PEERCRED PIDs
//     to mean anything); in a private namespace no unit is found.
//   - Processes of a user session (systemd --user) report the system
//     manager's unit, user@UID.service, as GetUnitByPID does; user units
//     inside it are not reported.
//   - Processes outside any unit (the root cgroup, or a cgroup tree not
//     managed by systemd, such as a container runtime's own) yield no selectors
//     and no error, so other attestors can still identify them.
//   - fragment_path is found by searching the unit search path (Config.UnitPaths)
//     in systemd's order for the unit, then for its template (foo@.service), and
//     resolving symlinks. It reflects the files on disk, so it can differ from
//     what systemd has loaded until `systemctl daemon-reload`; masked units
//     (linked to /dev/null) have none. It is computed only when an entry uses it.
package systemd

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/ferry-id/ferry/attestors/workload"
	"github.com/ferry-id/ferry/internal/selector"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

// Name is the selector type of this attestor.
const Name = "systemd"

// DefaultUnitPaths is systemd's system unit search path, highest priority
// first (systemd.unit(5)), plus /lib/systemd/system for split-/usr systems.
var DefaultUnitPaths = []string{
	"/etc/systemd/system.control",
	"/run/systemd/system.control",
	"/run/systemd/transient",
	"/run/systemd/generator.early",
	"/etc/systemd/system",
	"/etc/systemd/system.attached",
	"/run/systemd/system",
	"/run/systemd/system.attached",
	"/run/systemd/generator",
	"/usr/local/lib/systemd/system",
	"/usr/lib/systemd/system",
	"/lib/systemd/system",
	"/run/systemd/generator.late",
}

// Config configures the attestor. The zero Config is usable.
type Config struct {
	// Log receives debug lines. Defaults to slog.Default().
	Log *slog.Logger
	// ProcRoot is the procfs mount. Defaults to workload.DefaultProcRoot.
	ProcRoot string
	// UnitPaths is the unit file search path for fragment_path, highest
	// priority first. Defaults to DefaultUnitPaths.
	UnitPaths []string
}

// Attestor is the systemd workload attestor. It is safe for concurrent use.
type Attestor struct {
	log       *slog.Logger
	procRoot  string
	unitPaths []string
}

var _ workload.Attestor = (*Attestor)(nil)

// New returns an attestor configured by c.
func New(c Config) (*Attestor, error) {
	a := &Attestor{log: c.Log, procRoot: c.ProcRoot, unitPaths: c.UnitPaths}
	if a.log == nil {
		a.log = slog.Default()
	}
	if a.procRoot == "" {
		a.procRoot = workload.DefaultProcRoot
	}
	if a.unitPaths == nil {
		a.unitPaths = DefaultUnitPaths
	}
	for _, p := range a.unitPaths {
		if !filepath.IsAbs(p) {
			return nil, fmt.Errorf("systemd: unit path %q is not absolute", p)
		}
	}
	return a, nil
}

// Name returns "systemd".
func (a *Attestor) Name() string { return Name }

// Attest returns the systemd selectors of pid that kinds asks for.
func (a *Attestor) Attest(ctx context.Context, pid int32, kinds workload.Kinds) ([]*ferrypb.Selector, error) {
	wantID, wantFragment := kinds.Has(Name, "id"), kinds.Has(Name, "fragment_path")
	if !wantID && !wantFragment {
		return nil, nil
	}
	unit, err := a.unitOf(ctx, pid)
	if err != nil {
		return nil, err
	}
	if unit == "" {
		return nil, nil
	}
	var out []*ferrypb.Selector
	add := func(kind, value string) {
		s := &ferrypb.Selector{Type: Name, Value: kind + ":" + value}
		if err := selector.Validate(s); err != nil {
			a.log.Debug("systemd: skipping unrepresentable selector", "pid", pid, "kind", kind, "error", err)
			return
		}
		out = append(out, s)
	}
	if wantID {
		add("id", unit)
	}
	if wantFragment {
		if p := a.fragmentPath(unit); p != "" {
			add("fragment_path", p)
		} else {
			a.log.Debug("systemd: no unit file found", "pid", pid, "unit", unit)
		}
	}
	return out, nil
}

// unitOf returns the unit pid runs in, or "" when it is in none.
func (a *Attestor) unitOf(ctx context.Context, pid int32) (string, error) {
	// Through the pinned process when there is one: its descriptor is bound
	// to the process that connected (see workload.Process.ReadFile).
	if p := workload.ProcessFrom(ctx, a.procRoot, pid); p != nil {
		var unit string
		var perr error
		err := p.ReadFile("cgroup", func(r io.Reader) error {
			unit, perr = unitFromCgroupFile(pid, r)
			return nil
		})
		if err != nil {
			return "", fmt.Errorf("systemd: pid %d: %w", pid, err)
		}
		return unit, perr
	}
	f, err := os.Open(filepath.Join(a.procRoot, strconv.FormatInt(int64(pid), 10), "cgroup"))
	if err != nil {
		return "", fmt.Errorf("systemd: pid %d: %w", pid, err)
	}
	defer f.Close()
	return unitFromCgroupFile(pid, f)
}

// unitFromCgroupFile returns the unit named by the content of /proc/PID/cgroup.
func unitFromCgroupFile(pid int32, f io.Reader) (string, error) {
	var v2, v1 string
	var haveV2, haveV1 bool
	sc := bufio.NewScanner(io.LimitReader(f, 64<<10))
	for sc.Scan() {
		// hierarchy-ID:controller-list:cgroup-path; the path may contain ':'.
		parts := strings.SplitN(sc.Text(), ":", 3)
		if len(parts) != 3 {
			continue
		}
		switch {
		case parts[0] == "0" && parts[1] == "":
			v2, haveV2 = parts[2], true
		case parts[1] == "name=systemd":
			v1, haveV1 = parts[2], true
		}
	}
	if err := sc.Err(); err != nil {
		return "", fmt.Errorf("systemd: pid %d: read cgroup: %w", pid, err)
	}
	if haveV2 {
		if u := UnitFromCgroupPath(v2); u != "" {
			return u, nil
		}
	}
	if haveV1 {
		return UnitFromCgroupPath(v1), nil
	}
	return "", nil
}

// UnitFromCgroupPath returns the unit a cgroup path belongs to, as systemd's
// cg_path_get_unit does: skip leading slice components, then the next
// component must be a valid unit name. It returns "" when there is none.
// Components are unescaped (systemd prefixes '_' to names that would clash
// with kernel attribute files).
func UnitFromCgroupPath(p string) string {
	for _, c := range strings.Split(p, "/") {
		if c == "" {
			continue
		}
		c = unescape(c)
		if !ValidUnitName(c) {
			return ""
		}
		if strings.HasSuffix(c, ".slice") {
			continue
		}
		return c
	}
	return ""
}

func unescape(c string) string {
	if strings.HasPrefix(c, "_") {
		return c[1:]
	}
	return c
}

var unitSuffixes = []string{
	".service", ".socket", ".device", ".mount", ".automount", ".swap",
	".target", ".path", ".timer", ".slice", ".scope",
}

// maxUnitNameLen is systemd's UNIT_NAME_MAX minus the terminating NUL.
const maxUnitNameLen = 255

// ValidUnitName reports whether name is a valid systemd unit name: a
// non-empty prefix of [A-Za-z0-9:_.\-] with at most one '@' (a template or
// instance), followed by a known unit type suffix, at most 255 bytes.
func ValidUnitName(name string) bool {
	if len(name) == 0 || len(name) > maxUnitNameLen {
		return false
	}
	var suffix string
	for _, s := range unitSuffixes {
		if strings.HasSuffix(name, s) {
			suffix = s
			break
		}
	}
	prefix := strings.TrimSuffix(name, suffix)
	if suffix == "" || prefix == "" || prefix[0] == '@' {
		return false
	}
	ats := 0
	for i := 0; i < len(prefix); i++ {
		c := prefix[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9',
			c == ':', c == '_', c == '.', c == '-', c == '\\':
		case c == '@':
			ats++
		default:
			return false
		}
	}
	return ats <= 1
}

// fragmentPath finds the unit file of unit, or its template's, in the search
// path; "" if none.
func (a *Attestor) fragmentPath(unit string) string {
	if p := a.findUnitFile(unit); p != "" {
		return p
	}
	// foo@bar.service -> foo@.service
	if at := strings.IndexByte(unit, '@'); at >= 0 {
		dot := strings.LastIndexByte(unit, '.')
		if dot > at+1 {
			return a.findUnitFile(unit[:at+1] + unit[dot:])
		}
	}
	return ""
}

func (a *Attestor) findUnitFile(name string) string {
	for _, dir := range a.unitPaths {
		p := filepath.Join(dir, name)
		if _, err := os.Lstat(p); err != nil {
			continue
		}
		// The first directory holding the name decides, even if the entry
		// there is a mask (a link to /dev/null): lower-priority files are
		// shadowed by it.
		real, err := filepath.EvalSymlinks(p)
		if err != nil {
			return ""
		}
		fi, err := os.Stat(real)
		if err != nil || !fi.Mode().IsRegular() || fi.Size() == 0 {
			return ""
		}
		return real
	}
	return ""
}
