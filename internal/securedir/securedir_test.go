package securedir_test

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/internal/roottest"
	"github.com/ferry-id/ferry/internal/securedir"
)

// Other users the tests hand files to. Neither needs an account: the kernel
// takes any uid.
const (
	nobody = 65534
	other  = 1000
)

// TestMain runs the test binary as a child when asked: the checker run by
// another uid, which then trusts that uid instead of root's. Each line of
// SECUREDIR_CHILD is "op path"; the child answers each with a line, "ok" or
// "error: ...", under a umask of 077.
func TestMain(m *testing.M) {
	ops := os.Getenv("SECUREDIR_CHILD")
	if ops == "" {
		os.Exit(m.Run())
	}
	syscall.Umask(0o077)
	for _, line := range strings.Split(ops, "\n") {
		op, path, _ := strings.Cut(line, " ")
		var err error
		switch op {
		case "check":
			err = securedir.Check(path)
		case "mkdirall":
			err = securedir.MkdirAll(path, 0o755)
		case "socket":
			err = securedir.CheckSocket(path)
		default:
			err = fmt.Errorf("unknown op %q", op)
		}
		if err != nil {
			fmt.Println("error:", err)
		} else {
			fmt.Println("ok")
		}
	}
	os.Exit(0)
}

// tree builds a directory tree with exact owners and modes under a base
// directory every user may traverse.
type tree struct {
	t    *testing.T
	base string
}

func newTree(t *testing.T) *tree {
	t.Helper()
	base, err := os.MkdirTemp("", "securedir-test-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(base) })
	require.NoError(t, os.Chmod(base, 0o755))
	return &tree{t: t, base: base}
}

func (tr *tree) path(rel string) string { return filepath.Join(tr.base, rel) }

// dir makes rel with exactly mode, owned by uid.
func (tr *tree) dir(rel string, mode fs.FileMode, uid int) string {
	tr.t.Helper()
	p := tr.path(rel)
	require.NoError(tr.t, os.Mkdir(p, 0o700))
	require.NoError(tr.t, os.Chmod(p, mode))
	require.NoError(tr.t, os.Lchown(p, uid, uid))
	return p
}

func (tr *tree) link(rel, target string, uid int) string {
	tr.t.Helper()
	p := tr.path(rel)
	require.NoError(tr.t, os.Symlink(target, p))
	require.NoError(tr.t, os.Lchown(p, uid, uid))
	return p
}

func (tr *tree) file(rel string) string {
	tr.t.Helper()
	p := tr.path(rel)
	require.NoError(tr.t, os.WriteFile(p, nil, 0o600))
	return p
}

// socket binds a unix socket at rel (left on disk) owned by uid.
func (tr *tree) socket(rel string, uid int) string {
	tr.t.Helper()
	p := tr.path(rel)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: p, Net: "unix"})
	require.NoError(tr.t, err)
	l.SetUnlinkOnClose(false)
	tr.t.Cleanup(func() { l.Close() })
	require.NoError(tr.t, os.Lchown(p, uid, uid))
	return p
}

const (
	sticky = fs.ModeSticky
	me     = 0 // the tests that build trees run as root
)

// refusal is what a case expects: the path named, its owner and mode, and a
// word of the reason. A zero refusal means the path must pass.
type refusal struct {
	path   string
	uid    uint32
	mode   uint32
	reason string
}

func requireRefused(t *testing.T, err error, want refusal) {
	t.Helper()
	var e *securedir.Error
	require.ErrorAs(t, err, &e)
	require.Equal(t, want.path, e.Path, "%v", err)
	require.Equal(t, want.uid, e.UID, "%v", err)
	require.Equal(t, want.mode, e.Mode, "%v", err)
	require.Contains(t, e.Reason, want.reason)
	// The message names all three, for the operator who reads it.
	msg := err.Error()
	require.Contains(t, msg, want.path)
	require.Contains(t, msg, fmt.Sprintf("uid %d", want.uid))
	require.Contains(t, msg, fmt.Sprintf("mode %04o", want.mode))
}

func TestCheck(t *testing.T) {
	roottest.Require(t)
	cases := []struct {
		name string
		// build makes the tree and returns the path to check and the
		// refusal expected.
		build func(tr *tree) (string, refusal)
	}{
		{"root's 0755", func(tr *tree) (string, refusal) {
			return tr.dir("d", 0o755, me), refusal{}
		}},
		{"root's 0700 below root's 0711", func(tr *tree) (string, refusal) {
			tr.dir("p", 0o711, me)
			return tr.dir("p/d", 0o700, me), refusal{}
		}},
		{"owned by another user", func(tr *tree) (string, refusal) {
			d := tr.dir("d", 0o755, nobody)
			return d, refusal{d, nobody, 0o755, "not owned by root"}
		}},
		{"parent owned by another user", func(tr *tree) (string, refusal) {
			p := tr.dir("p", 0o755, other)
			tr.dir("p/d", 0o755, me)
			return tr.path("p/d"), refusal{p, other, 0o755, "not owned by root"}
		}},
		{"group-writable", func(tr *tree) (string, refusal) {
			d := tr.dir("d", 0o775, me)
			return d, refusal{d, 0, 0o775, "writable by group or others"}
		}},
		{"world-writable", func(tr *tree) (string, refusal) {
			d := tr.dir("d", 0o777, me)
			return d, refusal{d, 0, 0o777, "writable by group or others"}
		}},
		{"sticky world-writable is no place for a socket", func(tr *tree) (string, refusal) {
			d := tr.dir("d", 0o777|sticky, me)
			return d, refusal{d, 0, 0o1777, "writable by group or others"}
		}},
		{"world-writable parent, not sticky", func(tr *tree) (string, refusal) {
			p := tr.dir("p", 0o777, me)
			tr.dir("p/d", 0o755, me)
			return tr.path("p/d"), refusal{p, 0, 0o777, "not sticky"}
		}},
		{"group-writable setgid parent", func(tr *tree) (string, refusal) {
			p := tr.dir("p", 0o775|fs.ModeSetgid, me)
			tr.dir("p/d", 0o755, me)
			return tr.path("p/d"), refusal{p, 0, 0o2775, "not sticky"}
		}},
		{"sticky parent, root's child", func(tr *tree) (string, refusal) {
			tr.dir("tmp", 0o777|sticky, me)
			return tr.dir("tmp/d", 0o700, me), refusal{}
		}},
		{"sticky parent, another user's child", func(tr *tree) (string, refusal) {
			tr.dir("tmp", 0o777|sticky, me)
			d := tr.dir("tmp/d", 0o755, nobody)
			return d, refusal{d, nobody, 0o755, "not owned by root"}
		}},
		{"sticky parent, another user's grandchild", func(tr *tree) (string, refusal) {
			tr.dir("tmp", 0o777|sticky, me)
			tr.dir("tmp/d", 0o755, me)
			e := tr.dir("tmp/d/e", 0o700, nobody)
			return e, refusal{e, nobody, 0o700, "not owned by root"}
		}},
		{"link to a good directory", func(tr *tree) (string, refusal) {
			tr.dir("real", 0o755, me)
			tr.link("l", "real", me)
			return tr.path("l"), refusal{}
		}},
		{"absolute link to a good directory, then down", func(tr *tree) (string, refusal) {
			tr.dir("real", 0o755, me)
			tr.dir("real/d", 0o700, me)
			tr.link("l", tr.path("real"), me)
			return tr.path("l/d"), refusal{}
		}},
		{"link into another user's directory", func(tr *tree) (string, refusal) {
			evil := tr.dir("evil", 0o755, nobody)
			tr.dir("evil/d", 0o755, me)
			tr.link("l", "evil/d", me)
			return tr.path("l"), refusal{evil, nobody, 0o755, "not owned by root"}
		}},
		{"another user's link in a sticky directory", func(tr *tree) (string, refusal) {
			tr.dir("tmp", 0o777|sticky, me)
			tr.dir("good", 0o755, me)
			l := tr.link("tmp/d", "../good", nobody)
			return l, refusal{l, nobody, 0o777, "symbolic link"}
		}},
		{"root's link in a sticky directory", func(tr *tree) (string, refusal) {
			tr.dir("tmp", 0o777|sticky, me)
			tr.dir("good", 0o755, me)
			tr.link("tmp/d", "../good", me)
			return tr.path("tmp/d"), refusal{}
		}},
		{"link through .. to a bad parent", func(tr *tree) (string, refusal) {
			w := tr.dir("w", 0o777, me)
			tr.dir("w/d", 0o755, me)
			tr.dir("ok", 0o755, me)
			tr.link("ok/l", "../w/d", me)
			return tr.path("ok/l"), refusal{w, 0, 0o777, "not sticky"}
		}},
		{"a file on the way", func(tr *tree) (string, refusal) {
			f := tr.file("f")
			return filepath.Join(f, "d"), refusal{f, 0, 0o600, "not a directory"}
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tr := newTree(t)
			path, want := c.build(tr)
			err := securedir.Check(path)
			if want.path == "" {
				require.NoError(t, err)
				return
			}
			requireRefused(t, err, want)
		})
	}
}

func TestCheckErrors(t *testing.T) {
	dir := t.TempDir()
	require.ErrorIs(t, securedir.Check(filepath.Join(dir, "missing")), fs.ErrNotExist)
	require.NoError(t, os.Symlink("b", filepath.Join(dir, "a")))
	require.NoError(t, os.Symlink("a", filepath.Join(dir, "b")))
	require.ErrorIs(t, securedir.Check(filepath.Join(dir, "a")), syscall.ELOOP)
	require.Error(t, securedir.Check(""))
	require.NoError(t, securedir.Check(dir))
	// Relative paths are taken from the working directory.
	t.Chdir(dir)
	require.NoError(t, securedir.Check("."))
	require.NoError(t, os.Chmod(dir, 0o770))
	var e *securedir.Error
	require.ErrorAs(t, securedir.Check("."), &e)
	require.Equal(t, dir, e.Path)
}

func TestMkdirAll(t *testing.T) {
	roottest.Require(t)
	t.Run("creates what is missing", func(t *testing.T) {
		tr := newTree(t)
		d := tr.path("a/b/c")
		require.NoError(t, securedir.MkdirAll(d, 0o700))
		for p, mode := range map[string]fs.FileMode{tr.path("a"): 0o755, tr.path("a/b"): 0o755, d: 0o700} {
			fi, err := os.Lstat(p)
			require.NoError(t, err)
			require.Equal(t, mode, fi.Mode().Perm(), p)
		}
		// Again: nothing to do, nothing changed.
		require.NoError(t, securedir.MkdirAll(d, 0o711))
		fi, err := os.Lstat(d)
		require.NoError(t, err)
		require.Equal(t, fs.FileMode(0o700), fi.Mode().Perm())
	})
	t.Run("refuses an existing directory it would not trust", func(t *testing.T) {
		tr := newTree(t)
		d := tr.dir("d", 0o777, me)
		requireRefused(t, securedir.MkdirAll(d, 0o700), refusal{d, 0, 0o777, "writable"})
	})
	t.Run("another user took the name first", func(t *testing.T) {
		// What a user racing the creation in a sticky directory ends with.
		tr := newTree(t)
		tr.dir("tmp", 0o777|sticky, me)
		d := tr.dir("tmp/ferry", 0o755, nobody)
		requireRefused(t, securedir.MkdirAll(filepath.Join(d, "agent"), 0o700), refusal{d, nobody, 0o755, "not owned by root"})
		_, err := os.Lstat(filepath.Join(d, "agent"))
		require.ErrorIs(t, err, fs.ErrNotExist, "nothing created in it")
	})
	t.Run("another user planted a link", func(t *testing.T) {
		tr := newTree(t)
		tr.dir("tmp", 0o777|sticky, me)
		target := tr.dir("target", 0o755, me)
		l := tr.link("tmp/ferry", target, nobody)
		requireRefused(t, securedir.MkdirAll(filepath.Join(l, "agent"), 0o700), refusal{l, nobody, 0o777, "symbolic link"})
		_, err := os.Lstat(filepath.Join(target, "agent"))
		require.ErrorIs(t, err, fs.ErrNotExist, "the link was not followed")
	})
	t.Run("below another user's directory", func(t *testing.T) {
		tr := newTree(t)
		p := tr.dir("p", 0o755, nobody)
		requireRefused(t, securedir.MkdirAll(tr.path("p/d"), 0o700), refusal{p, nobody, 0o755, "not owned by root"})
		_, err := os.Lstat(tr.path("p/d"))
		require.ErrorIs(t, err, fs.ErrNotExist, "nothing created in it")
	})
}

func TestCheckSocket(t *testing.T) {
	roottest.Require(t)
	t.Run("root's socket", func(t *testing.T) {
		tr := newTree(t)
		tr.dir("run", 0o700, me)
		require.NoError(t, securedir.CheckSocket(tr.socket("run/admin.sock", me)))
	})
	t.Run("link to root's socket", func(t *testing.T) {
		tr := newTree(t)
		tr.dir("run", 0o700, me)
		tr.socket("run/admin.sock", me)
		require.NoError(t, securedir.CheckSocket(tr.link("l.sock", "run/admin.sock", me)))
	})
	t.Run("another user's socket", func(t *testing.T) {
		tr := newTree(t)
		tr.dir("run", 0o755, me)
		s := tr.socket("run/admin.sock", nobody)
		fi, err := os.Lstat(s)
		require.NoError(t, err)
		requireRefused(t, securedir.CheckSocket(s), refusal{s, nobody, uint32(fi.Mode().Perm()), "not owned by root"})
	})
	t.Run("root's socket in another user's directory", func(t *testing.T) {
		tr := newTree(t)
		d := tr.dir("run", 0o755, nobody)
		s := tr.socket("run/admin.sock", me)
		requireRefused(t, securedir.CheckSocket(s), refusal{d, nobody, 0o755, "not owned by root"})
	})
	t.Run("not a socket", func(t *testing.T) {
		tr := newTree(t)
		f := tr.file("admin.sock")
		requireRefused(t, securedir.CheckSocket(f), refusal{f, 0, 0o600, "not a socket"})
	})
	t.Run("missing", func(t *testing.T) {
		tr := newTree(t)
		require.ErrorIs(t, securedir.CheckSocket(tr.path("admin.sock")), fs.ErrNotExist)
	})
}

// TestAsAnotherUser runs the checker in a process of another uid, which then
// trusts root and itself, and no one else.
func TestAsAnotherUser(t *testing.T) {
	roottest.Require(t)
	tr := newTree(t)
	exe, err := os.Executable()
	require.NoError(t, err)
	data, err := os.ReadFile(exe)
	require.NoError(t, err)
	bin := tr.path("child.test")
	require.NoError(t, os.WriteFile(bin, data, 0o755))

	tr.dir("mine", 0o700, nobody)
	tr.dir("rootdir", 0o755, me)
	tr.dir("theirs", 0o755, other)
	tr.dir("tmp", 0o777|sticky, me)
	tr.dir("tmp/mine", 0o755, nobody)
	tr.dir("tmp/theirs", 0o755, other)
	tr.dir("made", 0o755, nobody)
	tr.socket("mine/own.sock", nobody)
	tr.socket("mine/root.sock", me)
	tr.dir("mine/run", 0o755, nobody)
	tr.socket("mine/run/their.sock", other)
	cases := []struct {
		op, path string
		want     string // "ok" or a piece of the error
	}{
		{"check", "mine", "ok"},
		{"check", "rootdir", "ok"},
		{"check", "theirs", fmt.Sprintf("theirs (owner uid %d", other)},
		{"check", "tmp/mine", "ok"},
		{"check", "tmp/theirs", fmt.Sprintf("theirs (owner uid %d", other)},
		{"mkdirall", "tmp/mine/new/deeper", "ok"},
		{"mkdirall", "tmp/theirs/new", fmt.Sprintf("theirs (owner uid %d", other)},
		{"socket", "mine/own.sock", "ok"},
		{"socket", "mine/root.sock", "ok"},
		{"socket", "mine/run/their.sock", fmt.Sprintf("their.sock (owner uid %d", other)},
	}
	// One child answers every case, in order.
	var ops []string
	for _, c := range cases {
		ops = append(ops, c.op+" "+tr.path(c.path))
	}
	cmd := exec.Command(bin)
	cmd.Dir = "/"
	cmd.Env = []string{"SECUREDIR_CHILD=" + strings.Join(ops, "\n")}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}}
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)
	answers := strings.Split(strings.TrimSpace(string(out)), "\n")
	require.Len(t, answers, len(cases), "%s", out)
	for i, c := range cases {
		got := answers[i]
		if c.want == "ok" {
			require.Equal(t, "ok", got, "%s %s", c.op, c.path)
		} else {
			require.True(t, strings.HasPrefix(got, "error:"), "%s %s: %s", c.op, c.path, got)
			require.Contains(t, got, c.want, "%s %s", c.op, c.path)
		}
	}
	// What the child made under a umask of 077 has the modes asked for,
	// and is its own.
	for p, mode := range map[string]fs.FileMode{"tmp/mine/new": 0o755, "tmp/mine/new/deeper": 0o755} {
		fi, err := os.Lstat(tr.path(p))
		require.NoError(t, err)
		require.Equal(t, mode, fi.Mode().Perm(), p)
		require.Equal(t, uint32(nobody), fi.Sys().(*syscall.Stat_t).Uid, p)
	}
	_, err = os.Lstat(tr.path("tmp/theirs/new"))
	require.True(t, errors.Is(err, fs.ErrNotExist), "nothing made under another user's directory")
}
