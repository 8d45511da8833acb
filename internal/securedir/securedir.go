// Package securedir makes sure that the directories ferry trusts can be
// changed only by root and by the user ferry runs as.
//
// A role that listens on a unix socket, keeps keys on disk, or talks to a
// server's admin socket trusts every directory on the way there: whoever can
// write one of them can move the socket aside and put a relay of their own in
// its place, or swap a key directory for theirs. Check and MkdirAll walk a
// path from / down, one name at a time, and accept it only when every
// directory on it is
//
//   - owned by root or by this process's effective uid, and
//   - not writable by group or others; a directory above the last may be
//     world-writable only if it is sticky (as /tmp is), because there only
//     an entry's owner may rename or remove it, and then the entry below it
//     must be owned by root or this uid.
//
// A symbolic link on the way is followed only after the directory holding it
// has passed, and, in a sticky world-writable directory, only if root or this
// uid owns the link. Once a path has passed, no other user can change any
// directory on it, so a check made at start holds for as long as the owners
// themselves leave it alone.
//
// Every refusal is an *Error naming the offending path, its owner and its mode.
package securedir

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// maxLinks bounds the symbolic links followed in one walk, as the kernel's
// ELOOP limit does.
const maxLinks = 40

// Error is a path that fails the check: who owns it, its mode, and why it
// cannot be trusted.
type Error struct {
	// Path is the offending directory, link or socket.
	Path string
	// UID owns Path.
	UID uint32
	// Mode holds Path's permission bits, with setuid, setgid and sticky.
	Mode uint32
	// Reason says which rule Path breaks.
	Reason string
}

func (e *Error) Error() string {
	return fmt.Sprintf("securedir: %s (owner %s, mode %04o) %s", e.Path, describeUID(e.UID), e.Mode, e.Reason)
}

// Check verifies that dir and every directory above it pass, and that dir is
// a directory. A missing directory is reported as fs.ErrNotExist.
func Check(dir string) error {
	_, err := walk(dir, false, 0)
	return err
}

// MkdirAll is Check that first creates what is missing: every missing
// directory above dir with mode 0755, and dir itself with perm. Each is made
// with mkdir (which never follows a link) and then looked at again, so a
// directory or link another user raced in first is refused, never used.
// Directories this call creates get their mode whatever the umask; existing
// ones are checked, not changed.
func MkdirAll(dir string, perm fs.FileMode) error {
	_, err := walk(dir, true, perm.Perm())
	return err
}

// CheckSocket verifies that the unix socket at path sits in a directory that
// passes Check and is owned by root or by this process's effective uid: a
// server's socket a client may talk to, rather than a relay another user put
// there.
func CheckSocket(path string) error {
	abs, err := filepath.Abs(path)
	if err != nil {
		return fmt.Errorf("securedir: %w", err)
	}
	for links := 0; ; links++ {
		dir, err := walk(filepath.Dir(abs), false, 0)
		if err != nil {
			return err
		}
		p := filepath.Join(dir, filepath.Base(abs))
		fi, st, err := lstat(p)
		if err != nil {
			return err
		}
		switch {
		case fi.Mode()&fs.ModeSymlink != 0:
			// The link sits in a directory that passed: only root or
			// this uid could have put it there.
			if links >= maxLinks {
				return fmt.Errorf("securedir: %s: %w", path, syscall.ELOOP)
			}
			target, err := os.Readlink(p)
			if err != nil {
				return fmt.Errorf("securedir: %w", err)
			}
			if !filepath.IsAbs(target) {
				target = filepath.Join(dir, target)
			}
			abs = filepath.Clean(target)
			continue
		case fi.Mode().Type() != fs.ModeSocket:
			return newError(p, st, "is not a socket")
		case !trusted(st.Uid):
			return newError(p, st, "is not owned by "+trustedOwners())
		}
		return nil
	}
}

// walk checks path from / down, creating missing directories when create is
// set, and returns the physical path (no links) of the directory it names.
func walk(path string, create bool, perm fs.FileMode) (string, error) {
	if path == "" {
		return "", errors.New("securedir: empty path")
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return "", fmt.Errorf("securedir: %w", err)
	}
	cur := "/"
	loose, err := enter(cur)
	if err != nil {
		return "", err
	}
	todo := names(abs)
	links := 0
	for len(todo) > 0 {
		name := todo[0]
		todo = todo[1:]
		switch name {
		case ".":
			continue
		case "..":
			// Every directory above cur passed on the way down.
			cur = filepath.Dir(cur)
			if loose, err = enter(cur); err != nil {
				return "", err
			}
			continue
		}
		next := filepath.Join(cur, name)
		fi, st, err := lstat(next)
		if create && errors.Is(err, fs.ErrNotExist) {
			mode := fs.FileMode(0o755)
			if len(todo) == 0 {
				mode = perm
			}
			fi, st, err = mkdir(next, mode)
		}
		if err != nil {
			return "", err
		}
		if fi.Mode()&fs.ModeSymlink != 0 {
			if loose && !trusted(st.Uid) {
				return "", newError(next, st, "is a symbolic link in a directory others may write, and not owned by "+trustedOwners())
			}
			if links++; links > maxLinks {
				return "", fmt.Errorf("securedir: %s: %w", path, syscall.ELOOP)
			}
			target, err := os.Readlink(next)
			if err != nil {
				return "", fmt.Errorf("securedir: %w", err)
			}
			if filepath.IsAbs(target) {
				cur = "/"
				if loose, err = enter(cur); err != nil {
					return "", err
				}
			}
			todo = append(names(target), todo...)
			continue
		}
		if !fi.IsDir() {
			return "", newError(next, st, "is not a directory")
		}
		if err := judge(next, st); err != nil {
			return "", err
		}
		cur, loose = next, st.Mode&0o022 != 0
	}
	// The directory itself holds what is trusted: no one else may add to it,
	// sticky or not (a name not yet taken could be taken by anyone).
	_, st, err := lstat(cur)
	if err != nil {
		return "", err
	}
	if st.Mode&0o022 != 0 {
		return "", newError(cur, st, "is writable by group or others")
	}
	return cur, nil
}

// enter checks the directory dir on the way down and reports whether others
// may write it (then it is sticky, or judge refused it).
func enter(dir string) (bool, error) {
	_, st, err := lstat(dir)
	if err != nil {
		return false, err
	}
	if err := judge(dir, st); err != nil {
		return false, err
	}
	return st.Mode&0o022 != 0, nil
}

// judge applies the rules every directory on the way must meet.
func judge(dir string, st *syscall.Stat_t) error {
	if !trusted(st.Uid) {
		return newError(dir, st, "is not owned by "+trustedOwners())
	}
	if st.Mode&0o022 != 0 && st.Mode&syscall.S_ISVTX == 0 {
		return newError(dir, st, "is writable by group or others and not sticky")
	}
	return nil
}

// mkdir creates dir with mode (whatever the umask) and returns what is there
// now: the new directory, or whatever another user created first.
func mkdir(dir string, mode fs.FileMode) (fs.FileInfo, *syscall.Stat_t, error) {
	err := os.Mkdir(dir, mode)
	if err != nil && !errors.Is(err, fs.ErrExist) {
		return nil, nil, fmt.Errorf("securedir: %w", err)
	}
	fi, st, lerr := lstat(dir)
	if lerr != nil || err != nil {
		return fi, st, lerr
	}
	// Ours, just made, in a directory only trusted users (or, sticky, only
	// its entries' owners) may change: safe to set the mode the umask cut.
	if fi.IsDir() && st.Uid == uint32(os.Geteuid()) && fi.Mode().Perm() != mode {
		if err := os.Chmod(dir, mode); err != nil {
			return nil, nil, fmt.Errorf("securedir: %w", err)
		}
		return lstat(dir)
	}
	return fi, st, nil
}

func lstat(path string) (fs.FileInfo, *syscall.Stat_t, error) {
	fi, err := os.Lstat(path)
	if err != nil {
		return nil, nil, fmt.Errorf("securedir: %w", err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return nil, nil, fmt.Errorf("securedir: %s: no owner information", path)
	}
	return fi, st, nil
}

// names splits a path into its names, dropping empty ones.
func names(path string) []string {
	var out []string
	for _, n := range strings.Split(path, "/") {
		if n != "" {
			out = append(out, n)
		}
	}
	return out
}

func trusted(uid uint32) bool { return uid == 0 || uid == uint32(os.Geteuid()) }

// trustedOwners names who may own what is trusted.
func trustedOwners() string {
	uid := uint32(os.Geteuid())
	if uid == 0 {
		return "root"
	}
	return "root or " + describeUID(uid) + ", the user this process runs as"
}

func newError(path string, st *syscall.Stat_t, reason string) *Error {
	return &Error{Path: path, UID: st.Uid, Mode: st.Mode & 0o7777, Reason: reason}
}

// describeUID is "uid N (name)", or "uid N" for a uid with no name.
func describeUID(uid uint32) string {
	s := "uid " + strconv.FormatUint(uint64(uid), 10)
	if u, err := user.LookupId(strconv.FormatUint(uint64(uid), 10)); err == nil && u.Username != "" {
		s += " (" + u.Username + ")"
	}
	return s
}
