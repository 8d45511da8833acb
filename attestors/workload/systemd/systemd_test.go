package systemd_test

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/attestors/workload"
	"github.com/ferry-id/ferry/attestors/workload/systemd"
	"github.com/ferry-id/ferry/internal/roottest"
	"github.com/ferry-id/ferry/internal/selector"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) { w.t.Log(string(p)); return len(p), nil }

func newAttestor(t *testing.T, c systemd.Config) *systemd.Attestor {
	t.Helper()
	c.Log = slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	a, err := systemd.New(c)
	require.NoError(t, err)
	return a
}

func values(sels []*ferrypb.Selector) []string {
	out := make([]string, 0, len(sels))
	for _, s := range sels {
		out = append(out, s.GetType()+":"+s.GetValue())
	}
	return out
}

func writeCgroup(t *testing.T, root string, pid int, content string) {
	t.Helper()
	dir := filepath.Join(root, strconv.Itoa(pid))
	require.NoError(t, os.MkdirAll(dir, 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "cgroup"), []byte(content), 0o644))
}

func TestUnitFromCgroupFixtures(t *testing.T) {
	tests := []struct {
		name, cgroup, want string
	}{
		{"v2 service", "0::/system.slice/nginx.service\n", "nginx.service"},
		{"v2 nested slices", "0::/system.slice/system-getty.slice/getty@tty1.service\n", "getty@tty1.service"},
		{"v2 delegated subtree", "0::/system.slice/containerd.service/sub/group\n", "containerd.service"},
		{"v2 user session", "0::/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service\n", "user@1000.service"},
		{"v2 scope", "0::/system.slice/docker-0123abcd.scope\n", "docker-0123abcd.scope"},
		{"v2 init scope", "0::/init.scope\n", "init.scope"},
		{"v2 escaped", "0::/system.slice/_cgroup.service\n", "cgroup.service"},
		{"v2 root", "0::/\n", ""},
		{"v2 slice only", "0::/system.slice\n", ""},
		{"v2 not systemd", "0::/docker/0123abcd\n", ""},
		{"v2 invalid unit", "0::/system.slice/bad name.service\n", ""},
		{
			"hybrid: v2 root, v1 systemd",
			"12:memory:/x\n1:name=systemd:/system.slice/sshd.service\n0::/\n",
			"sshd.service",
		},
		{
			"hybrid: v2 wins",
			"1:name=systemd:/system.slice/old.service\n0::/system.slice/new.service\n",
			"new.service",
		},
		{"v1 only", "4:cpu,cpuacct:/\n1:name=systemd:/system.slice/cron.service\n", "cron.service"},
		{"path with colon", "0::/system.slice/a:b.service\n", "a:b.service"},
		{"garbage", "nonsense\n\n::\n", ""},
		{"empty", "", ""},
	}
	root := t.TempDir()
	a := newAttestor(t, systemd.Config{ProcRoot: root, UnitPaths: []string{}})
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			writeCgroup(t, root, 10+i, tt.cgroup)
			got, err := a.Attest(context.Background(), int32(10+i), nil)
			require.NoError(t, err)
			if tt.want == "" {
				assert.Empty(t, got)
				return
			}
			assert.Equal(t, []string{"systemd:id:" + tt.want}, values(got))
		})
	}
}

func TestValidUnitName(t *testing.T) {
	for name, want := range map[string]bool{
		"a.service": true, "getty@tty1.service": true, "getty@.service": true, "-.slice": true,
		"dev-sda1.device": true, `x\x2d.mount`: true,
		"": false, ".service": false, "a": false, "a.unknown": false, "@x.service": false,
		"a@b@c.service": false, "a b.service": false, "a/b.service": false,
		strings.Repeat("a", 250) + ".service": false,
	} {
		assert.Equal(t, want, systemd.ValidUnitName(name), name)
	}
}

func TestFragmentPath(t *testing.T) {
	high, low := t.TempDir(), t.TempDir()
	write := func(dir, name, content string) string {
		p := filepath.Join(dir, name)
		require.NoError(t, os.WriteFile(p, []byte(content), 0o644))
		return p
	}
	write(low, "web.service", "[Service]\n")
	override := write(high, "web.service", "[Service]\n")
	onlyLow := write(low, "db.service", "[Service]\n")
	tmpl := write(low, "getty@.service", "[Service]\n")
	write(low, "masked.service", "[Service]\n")
	require.NoError(t, os.Symlink("/dev/null", filepath.Join(high, "masked.service")))
	write(low, "empty.service", "")
	target := write(t.TempDir(), "real.service", "[Service]\n")
	require.NoError(t, os.Symlink(target, filepath.Join(high, "linked.service")))

	root := t.TempDir()
	a := newAttestor(t, systemd.Config{ProcRoot: root, UnitPaths: []string{high, low}})
	tests := []struct{ unit, want string }{
		{"web.service", override},
		{"db.service", onlyLow},
		{"getty@tty1.service", tmpl},
		{"masked.service", ""},
		{"empty.service", ""},
		{"linked.service", target},
		{"missing.service", ""},
	}
	for i, tt := range tests {
		t.Run(tt.unit, func(t *testing.T) {
			writeCgroup(t, root, 100+i, "0::/system.slice/"+tt.unit+"\n")
			got, err := a.Attest(context.Background(), int32(100+i), nil)
			require.NoError(t, err)
			want := []string{"systemd:id:" + tt.unit}
			if tt.want != "" {
				want = append(want, "systemd:fragment_path:"+tt.want)
			}
			assert.Equal(t, want, values(got))
		})
	}
}

func TestKinds(t *testing.T) {
	root := t.TempDir()
	units := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(units, "web.service"), []byte("x"), 0o644))
	writeCgroup(t, root, 5, "0::/system.slice/web.service\n")
	a := newAttestor(t, systemd.Config{ProcRoot: root, UnitPaths: []string{units}})

	only := func(kind string) workload.Kinds {
		return workload.KindsOf([]*ferrypb.Selector{{Type: "systemd", Value: kind + ":x"}})
	}
	got, err := a.Attest(context.Background(), 5, only("id"))
	require.NoError(t, err)
	assert.Equal(t, []string{"systemd:id:web.service"}, values(got))

	got, err = a.Attest(context.Background(), 5, only("fragment_path"))
	require.NoError(t, err)
	assert.Equal(t, []string{"systemd:fragment_path:" + filepath.Join(units, "web.service")}, values(got))

	// Both kinds, as declared: entries checked against the schema match them.
	got, err = a.Attest(context.Background(), 5, nil)
	require.NoError(t, err)
	require.Len(t, got, len(systemd.Selectors().Kinds))
	reg := selector.MustRegistry(systemd.Selectors())
	for _, s := range got {
		assert.NoError(t, reg.Check(selector.Workload, s))
	}

	// Nothing requested: the cgroup file is not even read.
	got, err = a.Attest(context.Background(), 999, workload.Kinds{})
	require.NoError(t, err)
	assert.Empty(t, got)
}

// TestReadsThroughPinnedProcess: with the caller's pin in the context, the
// cgroup file read is the pinned process's, not whatever now sits at
// /proc/PID.
func TestReadsThroughPinnedProcess(t *testing.T) {
	root := t.TempDir()
	writeCgroup(t, root, 5, "0::/system.slice/web.service\n")
	stat := "5 (x) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 4242 0 0\n"
	require.NoError(t, os.WriteFile(filepath.Join(root, "5", "stat"), []byte(stat), 0o644))
	p, err := workload.OpenProcessIn(root, 5)
	require.NoError(t, err)
	defer p.Close()
	require.NoError(t, os.Rename(filepath.Join(root, "5"), filepath.Join(root, "old-5")))
	writeCgroup(t, root, 5, "0::/system.slice/other.service\n")

	a := newAttestor(t, systemd.Config{ProcRoot: root})
	kinds := workload.KindsOf([]*ferrypb.Selector{{Type: "systemd", Value: "id:x"}})
	got, err := a.Attest(workload.WithProcess(context.Background(), p), 5, kinds)
	require.NoError(t, err)
	assert.Equal(t, []string{"systemd:id:web.service"}, values(got))
	got, err = a.Attest(context.Background(), 5, kinds)
	require.NoError(t, err)
	assert.Equal(t, []string{"systemd:id:other.service"}, values(got), "without a pin, by PID")
}

func TestMissingProcess(t *testing.T) {
	a := newAttestor(t, systemd.Config{ProcRoot: t.TempDir()})
	_, err := a.Attest(context.Background(), 4242, nil)
	require.ErrorIs(t, err, os.ErrNotExist)
	assert.True(t, strings.HasPrefix(err.Error(), "systemd: "))
}

func TestNewRejectsRelativeUnitPath(t *testing.T) {
	_, err := systemd.New(systemd.Config{UnitPaths: []string{"etc/systemd"}})
	require.Error(t, err)
}

// TestAttestSelf attests the test process through the real /proc: whatever
// unit it reports must be a component of the process's own cgroup path.
func TestAttestSelf(t *testing.T) {
	a := newAttestor(t, systemd.Config{})
	got, err := a.Attest(context.Background(), int32(os.Getpid()), nil)
	require.NoError(t, err)
	cg, err := os.ReadFile("/proc/self/cgroup")
	require.NoError(t, err)
	// Whichever machine this runs on, the answer must agree with the
	// cgroup the kernel reports: a unit's id when the test runs inside a
	// systemd unit, nothing at all otherwise.
	var ids []string
	for _, s := range got {
		if id, ok := strings.CutPrefix(s.GetValue(), "id:"); ok {
			ids = append(ids, id)
		}
	}
	if !strings.Contains(string(cg), ".service") && !strings.Contains(string(cg), ".scope") {
		t.Logf("not inside a systemd unit (cgroup %q): expecting no selectors", strings.TrimSpace(string(cg)))
		require.Empty(t, got)
		return
	}
	require.NotEmpty(t, ids, "inside a systemd unit (cgroup %q) but no systemd:id selector", cg)
	for _, id := range ids {
		assert.Contains(t, string(cg), "/"+id)
	}
}

// TestAttestRealCgroup moves a real child into a fresh cgroup v2 named like a
// systemd service inside a slice, and attests it through the real /proc.
func TestAttestRealCgroup(t *testing.T) {
	mnt := cgroup2Mount(t)
	var b [4]byte
	_, _ = rand.Read(b[:])
	suffix := hex.EncodeToString(b[:])
	slice := filepath.Join(mnt, "ferrytest"+suffix+".slice")
	svc := filepath.Join(slice, "app-"+suffix+".service")
	if err := os.Mkdir(slice, 0o755); err != nil {
		roottest.Skipf(t, "cannot create a cgroup: %v", err)
	}
	t.Cleanup(func() { removeCgroup(slice) })
	if err := os.Mkdir(svc, 0o755); err != nil {
		roottest.Skipf(t, "cannot create a nested cgroup: %v", err)
	}
	t.Cleanup(func() { removeCgroup(svc) })

	cmd := exec.Command("sleep", "60")
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	if err := os.WriteFile(filepath.Join(svc, "cgroup.procs"), []byte(strconv.Itoa(cmd.Process.Pid)), 0o644); err != nil {
		roottest.Skipf(t, "cannot move a process into a cgroup: %v", err)
	}

	a := newAttestor(t, systemd.Config{})
	got, err := workload.Attest(context.Background(), int32(cmd.Process.Pid), []workload.Attestor{a}, nil)
	require.NoError(t, err)
	assert.Equal(t, []string{"systemd:id:app-" + suffix + ".service"}, values(got))
}

func cgroup2Mount(t *testing.T) string {
	t.Helper()
	f, err := os.Open("/proc/self/mounts")
	require.NoError(t, err)
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) >= 3 && fields[2] == "cgroup2" {
			return fields[1]
		}
	}
	roottest.Skipf(t, "no cgroup2 mount")
	return ""
}

func removeCgroup(dir string) {
	for i := 0; i < 100; i++ {
		if err := os.Remove(dir); err == nil || os.IsNotExist(err) {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	fmt.Fprintf(os.Stderr, "could not remove test cgroup %s\n", dir)
}
