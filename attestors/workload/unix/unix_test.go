package unix_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/attestors/workload"
	"github.com/ferry-id/ferry/attestors/workload/unix"
	"github.com/ferry-id/ferry/internal/roottest"
	"github.com/ferry-id/ferry/internal/selector"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

func testLog(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) { w.t.Log(string(p)); return len(p), nil }

func newAttestor(t *testing.T, c unix.Config) *unix.Attestor {
	t.Helper()
	c.Log = testLog(t)
	a, err := unix.New(c)
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

func fileSHA256(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// expectedIdentity computes the selectors for uid/gid/groups independently of
// the attestor, from os/user.
func expectedIdentity(t *testing.T, uid, gid int, groups []int) []string {
	t.Helper()
	var want []string
	want = append(want, fmt.Sprintf("unix:uid:%d", uid))
	if u, err := user.LookupId(strconv.Itoa(uid)); err == nil {
		want = append(want, "unix:user:"+u.Username)
	}
	want = append(want, fmt.Sprintf("unix:gid:%d", gid))
	if g, err := user.LookupGroupId(strconv.Itoa(gid)); err == nil {
		want = append(want, "unix:group:"+g.Name)
	}
	for _, sg := range groups {
		want = append(want, fmt.Sprintf("unix:supplementary_gid:%d", sg))
		if g, err := user.LookupGroupId(strconv.Itoa(sg)); err == nil {
			want = append(want, "unix:supplementary_group:"+g.Name)
		}
	}
	return want
}

func TestAttestSelf(t *testing.T) {
	a := newAttestor(t, unix.Config{})
	assert.Equal(t, "unix", a.Name())
	got, err := a.Attest(context.Background(), int32(os.Getpid()), nil)
	require.NoError(t, err)

	groups, err := os.Getgroups()
	require.NoError(t, err)
	want := expectedIdentity(t, os.Geteuid(), os.Getegid(), groups)
	exe, err := os.Executable()
	require.NoError(t, err)
	exe, err = filepath.EvalSymlinks(exe)
	require.NoError(t, err)
	want = append(want, "unix:path:"+exe, "unix:sha256:"+fileSHA256(t, exe))
	assert.ElementsMatch(t, want, values(got))
	assertDeclared(t, got)
}

// assertDeclared checks that what the attestor produced is what its schema
// declares, so entries checked against the schema can match it.
func assertDeclared(t *testing.T, sels []*ferrypb.Selector) {
	t.Helper()
	reg := selector.MustRegistry(unix.Selectors())
	kinds := map[string]bool{}
	for _, s := range sels {
		assert.NoError(t, reg.Check(selector.Workload, s))
		kinds[workload.Kind(s)] = true
	}
	for _, k := range unix.Selectors().Kinds {
		if k.Name != "user" && k.Name != "group" && k.Name != "supplementary_group" && k.Name != "supplementary_gid" {
			assert.True(t, kinds[k.Name], "declared kind %s was produced", k.Name)
		}
	}
}

// TestAttestOtherUser attests a real child running under another uid, gid and
// supplementary groups.
func TestAttestOtherUser(t *testing.T) {
	roottest.Require(t)
	sleep, err := exec.LookPath("sleep")
	require.NoError(t, err)
	sleep, err = filepath.EvalSymlinks(sleep)
	require.NoError(t, err)

	const uid, gid = 65534, 65534
	groups := []int{100, 4242}
	cmd := exec.Command(sleep, "60")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{
		Uid: uid, Gid: gid, Groups: []uint32{100, 4242},
	}}
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	waitExec(t, cmd.Process.Pid, sleep)

	a := newAttestor(t, unix.Config{})
	got, err := a.Attest(context.Background(), int32(cmd.Process.Pid), nil)
	require.NoError(t, err)
	want := expectedIdentity(t, uid, gid, groups)
	want = append(want, "unix:path:"+sleep, "unix:sha256:"+fileSHA256(t, sleep))
	assert.ElementsMatch(t, want, values(got))
	assert.Contains(t, values(got), "unix:supplementary_gid:4242")
	assert.NotContains(t, values(got), "unix:uid:0")
}

// waitExec waits until pid has exec'd path (right after Start the child may
// still be the forked test binary).
func waitExec(t *testing.T, pid int, path string) {
	t.Helper()
	for i := 0; i < 500; i++ {
		if p, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid)); err == nil && p == path {
			return
		}
		time.Sleep(2 * time.Millisecond)
	}
	t.Fatalf("pid %d never exec'd %s", pid, path)
}

func TestAttestOnlyRequestedKinds(t *testing.T) {
	var userLookups, groupLookups atomic.Int32
	a := newAttestor(t, unix.Config{Hooks: unix.Hooks{
		LookupUser:  func(uid string) (*user.User, error) { userLookups.Add(1); return user.LookupId(uid) },
		LookupGroup: func(gid string) (*user.Group, error) { groupLookups.Add(1); return user.LookupGroupId(gid) },
	}})
	kinds := workload.KindsOf([]*ferrypb.Selector{{Type: "unix", Value: "uid:0"}, {Type: "other", Value: "sha256:x"}})
	got, err := a.Attest(context.Background(), int32(os.Getpid()), kinds)
	require.NoError(t, err)
	assert.Equal(t, []string{fmt.Sprintf("unix:uid:%d", os.Geteuid())}, values(got))
	assert.Zero(t, userLookups.Load())
	assert.Zero(t, groupLookups.Load())

	got, err = a.Attest(context.Background(), int32(os.Getpid()), workload.Kinds{})
	require.NoError(t, err)
	assert.Empty(t, got)
}

func TestHashSizeLimit(t *testing.T) {
	exe, err := os.Executable()
	require.NoError(t, err)
	fi, err := os.Stat(exe)
	require.NoError(t, err)

	kinds := workload.KindsOf([]*ferrypb.Selector{{Type: "unix", Value: "sha256:x"}})
	a := newAttestor(t, unix.Config{WorkloadSizeLimit: fi.Size() - 1})
	_, err = a.Attest(context.Background(), int32(os.Getpid()), kinds)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "over the hashing limit")
	assert.Contains(t, err.Error(), strconv.FormatInt(fi.Size(), 10))

	a = newAttestor(t, unix.Config{WorkloadSizeLimit: fi.Size()})
	got, err := a.Attest(context.Background(), int32(os.Getpid()), kinds)
	require.NoError(t, err)
	assert.Equal(t, []string{"unix:sha256:" + fileSHA256(t, exe)}, values(got))

	// Negative: never hash, even when asked.
	a = newAttestor(t, unix.Config{WorkloadSizeLimit: -1})
	got, err = a.Attest(context.Background(), int32(os.Getpid()), nil)
	require.NoError(t, err)
	for _, v := range values(got) {
		assert.NotContains(t, v, "unix:sha256:")
	}
}

func TestDisableWorkloadPath(t *testing.T) {
	a := newAttestor(t, unix.Config{DisableWorkloadPath: true})
	got, err := a.Attest(context.Background(), int32(os.Getpid()), nil)
	require.NoError(t, err)
	for _, v := range values(got) {
		assert.NotContains(t, v, "unix:path:")
		assert.NotContains(t, v, "unix:sha256:")
	}
	assert.Contains(t, values(got), fmt.Sprintf("unix:uid:%d", os.Geteuid()))
}

func TestHashCacheSeesRewrittenFile(t *testing.T) {
	// A fake procfs whose exe link points at a file we control.
	root := t.TempDir()
	bin := filepath.Join(t.TempDir(), "bin")
	require.NoError(t, os.WriteFile(bin, []byte("version one"), 0o755))
	require.NoError(t, os.MkdirAll(filepath.Join(root, "7"), 0o755))
	require.NoError(t, os.Symlink(bin, filepath.Join(root, "7", "exe")))

	a := newAttestor(t, unix.Config{Hooks: unix.Hooks{ProcRoot: root}})
	kinds := workload.KindsOf([]*ferrypb.Selector{{Type: "unix", Value: "sha256:x"}, {Type: "unix", Value: "path:x"}})
	got, err := a.Attest(context.Background(), 7, kinds)
	require.NoError(t, err)
	assert.ElementsMatch(t, []string{"unix:path:" + bin, "unix:sha256:" + fileSHA256(t, bin)}, values(got))

	require.NoError(t, os.WriteFile(bin, []byte("version two, longer"), 0o755))
	got, err = a.Attest(context.Background(), 7, kinds)
	require.NoError(t, err)
	assert.Contains(t, values(got), "unix:sha256:"+fileSHA256(t, bin))
}

func TestHashCancelled(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	a := newAttestor(t, unix.Config{})
	_, err := a.Attest(ctx, int32(os.Getpid()), workload.KindsOf([]*ferrypb.Selector{{Type: "unix", Value: "sha256:x"}}))
	require.ErrorIs(t, err, context.Canceled)
}

func writeStatus(t *testing.T, root string, pid int, content string) {
	t.Helper()
	dir := filepath.Join(root, strconv.Itoa(pid))
	require.NoError(t, os.MkdirAll(dir, 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "status"), []byte(content), 0o644))
}

func TestStatusEdgeCases(t *testing.T) {
	idKinds := workload.KindsOf([]*ferrypb.Selector{
		{Type: "unix", Value: "uid:x"}, {Type: "unix", Value: "user:x"},
		{Type: "unix", Value: "gid:x"}, {Type: "unix", Value: "group:x"},
		{Type: "unix", Value: "supplementary_gid:x"}, {Type: "unix", Value: "supplementary_group:x"},
	})
	users := map[string]string{"1000": "alice", "0": "root"}
	groups := map[string]string{"2000": "staff", "3": "sys", "5": "bad\nname"}
	hooks := unix.Hooks{
		LookupUser: func(uid string) (*user.User, error) {
			if n, ok := users[uid]; ok {
				return &user.User{Uid: uid, Username: n}, nil
			}
			return nil, user.UnknownUserIdError(0)
		},
		LookupGroup: func(gid string) (*user.Group, error) {
			if n, ok := groups[gid]; ok {
				return &user.Group{Gid: gid, Name: n}, nil
			}
			return nil, errors.New("unknown group")
		},
	}

	tests := []struct {
		name    string
		status  string
		want    []string
		wantErr string
	}{
		{
			name:   "ids and groups",
			status: "Name:\tx\nUid:\t1000\t1000\t1000\t1000\nGid:\t2000\t2000\t2000\t2000\nGroups:\t3 4 5\n",
			// gid 4 has no name; gid 5's name cannot be a selector value.
			want: []string{"unix:uid:1000", "unix:user:alice", "unix:gid:2000", "unix:group:staff",
				"unix:supplementary_gid:3", "unix:supplementary_group:sys", "unix:supplementary_gid:4", "unix:supplementary_gid:5"},
		},
		// A setuid program (real uid 1000, effective and saved 0) is not
		// attested as root, nor as 1000; likewise any one id that differs,
		// and a setgid program.
		{name: "setuid program", status: "Uid:\t1000\t0\t0\t0\nGid:\t1000\t1000\t1000\t1000\n", wantErr: "user ids (real/effective/saved/fs) 1000/0/0/0 differ"},
		{name: "root real uid", status: "Uid:\t0\t1000\t1000\t1000\nGid:\t7\t7\t7\t7\n", wantErr: "user ids (real/effective/saved/fs) 0/1000/1000/1000 differ"},
		{name: "saved uid", status: "Uid:\t1000\t1000\t0\t1000\nGid:\t7\t7\t7\t7\n", wantErr: "user ids (real/effective/saved/fs) 1000/1000/0/1000 differ"},
		{name: "fs uid", status: "Uid:\t1000\t1000\t1000\t0\nGid:\t7\t7\t7\t7\n", wantErr: "differ"},
		{name: "setgid program", status: "Uid:\t7\t7\t7\t7\nGid:\t7\t0\t0\t0\n", wantErr: "group ids (real/effective/saved/fs) 7/0/0/0 differ"},
		{
			name:   "unknown user, no groups",
			status: "Uid:\t7\t7\t7\t7\nGid:\t7\t7\t7\t7\nGroups:\t\n",
			want:   []string{"unix:uid:7", "unix:gid:7"},
		},
		{name: "no uid", status: "Gid:\t7\t7\t7\t7\n", wantErr: "no valid Uid/Gid"},
		{name: "short uid", status: "Uid:\t7\nGid:\t7\t7\t7\t7\n", wantErr: "no valid Uid/Gid"},
		{name: "non-numeric uid", status: "Uid:\t7\tx\t7\t7\nGid:\t7\t7\t7\t7\n", wantErr: "no valid Uid/Gid"},
		{name: "bad group", status: "Uid:\t7\t7\t7\t7\nGid:\t7\t7\t7\t7\nGroups:\t1 ../x\n", wantErr: "malformed supplementary gid"},
		{
			name:   "ids past the first read, last line without newline",
			status: strings.Repeat("Pad:\t"+strings.Repeat("x", 100)+"\n", 100) + "Uid:\t7\t7\t7\t7\nGid:\t8\t8\t8\t8\nGroups:\t9",
			want:   []string{"unix:uid:7", "unix:gid:8", "unix:supplementary_gid:9"},
		},
		{
			name:   "no Groups line",
			status: "Uid:\t7\t7\t7\t7\nGid:\t7\t7\t7\t7\nFDSize:\t64\n",
			want:   []string{"unix:uid:7", "unix:gid:7"},
		},
		{
			name:    "ids beyond the size cap are not read",
			status:  strings.Repeat("Pad:\t"+strings.Repeat("x", 1000)+"\n", 70) + "Uid:\t7\t7\t7\t7\nGid:\t7\t7\t7\t7\n",
			wantErr: "no valid Uid/Gid",
		},
	}
	for i, tt := range tests {
		for _, pinned := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/pinned=%v", tt.name, pinned), func(t *testing.T) {
				root := t.TempDir()
				writeStatus(t, root, 100+i, tt.status)
				h := hooks
				h.ProcRoot = root
				a := newAttestor(t, unix.Config{Hooks: h})
				ctx := context.Background()
				if pinned {
					ctx = pin(t, ctx, root, 100+i)
				}
				got, err := a.Attest(ctx, int32(100+i), idKinds)
				if tt.wantErr != "" {
					require.Error(t, err)
					assert.Contains(t, err.Error(), tt.wantErr)
					assert.Contains(t, err.Error(), "unix: ")
					return
				}
				require.NoError(t, err)
				assert.ElementsMatch(t, tt.want, values(got))
			})
		}
	}
}

// pin opens the fake process pid under root (writing it a stat file) and
// returns ctx carrying it, as the Workload API passes its callers.
func pin(t *testing.T, ctx context.Context, root string, pid int) context.Context {
	t.Helper()
	stat := fmt.Sprintf("%d (x) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 4242 0 0\n", pid)
	require.NoError(t, os.WriteFile(filepath.Join(root, fmt.Sprint(pid), "stat"), []byte(stat), 0o644))
	p, err := workload.OpenProcessIn(root, int32(pid))
	require.NoError(t, err)
	t.Cleanup(func() { p.Close() })
	return workload.WithProcess(ctx, p)
}

// TestReadsThroughPinnedProcess: with the caller's pin in the context, the
// attestor reads the pinned process's files, not whatever now sits at
// /proc/PID.
func TestReadsThroughPinnedProcess(t *testing.T) {
	root := t.TempDir()
	writeStatus(t, root, 77, "Uid:\t5\t5\t5\t5\nGid:\t6\t6\t6\t6\n")
	ctx := pin(t, context.Background(), root, 77)
	// The pinned directory moves away and another "process" takes its PID.
	require.NoError(t, os.Rename(filepath.Join(root, "77"), filepath.Join(root, "old-77")))
	writeStatus(t, root, 77, "Uid:\t9\t9\t9\t9\nGid:\t9\t9\t9\t9\n")

	a := newAttestor(t, unix.Config{DisableWorkloadPath: true, Hooks: unix.Hooks{ProcRoot: root}})
	kinds := workload.KindsOf([]*ferrypb.Selector{{Type: "unix", Value: "uid:0"}, {Type: "unix", Value: "gid:0"}})
	got, err := a.Attest(ctx, 77, kinds)
	require.NoError(t, err)
	assert.Equal(t, []string{"unix:uid:5", "unix:gid:6"}, values(got))
	got, err = a.Attest(context.Background(), 77, kinds)
	require.NoError(t, err)
	assert.Equal(t, []string{"unix:uid:9", "unix:gid:9"}, values(got), "without a pin, by PID")
}

func TestMissingProcess(t *testing.T) {
	a := newAttestor(t, unix.Config{Hooks: unix.Hooks{ProcRoot: t.TempDir()}})
	_, err := a.Attest(context.Background(), 12345, nil)
	require.ErrorIs(t, err, os.ErrNotExist)
}

// TestWithProcessPinning runs the attestor the way the agent does.
func TestWithProcessPinning(t *testing.T) {
	a := newAttestor(t, unix.Config{})
	got, err := workload.Attest(context.Background(), int32(os.Getpid()), []workload.Attestor{a},
		workload.KindsOf([]*ferrypb.Selector{{Type: "unix", Value: "uid:0"}}))
	require.NoError(t, err)
	assert.Equal(t, []string{fmt.Sprintf("unix:uid:%d", os.Geteuid())}, values(got))
}

func BenchmarkAttestSelf(b *testing.B) {
	for _, bc := range []struct {
		name  string
		kinds workload.Kinds
	}{
		{"ids", workload.KindsOf([]*ferrypb.Selector{{Type: "unix", Value: "uid:0"}, {Type: "unix", Value: "gid:0"}})},
		{"all-cached-hash", nil},
	} {
		b.Run(bc.name, func(b *testing.B) {
			a, err := unix.New(unix.Config{Log: slog.New(slog.DiscardHandler)})
			require.NoError(b, err)
			pid := int32(os.Getpid())
			for b.Loop() {
				if _, err := a.Attest(context.Background(), pid, bc.kinds); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkAttestCaller is the per-call attestation of a Workload API
// caller, uid and gid selectors: the unix attestor through the caller's pin,
// its ids read once and checked against those it connected with
// (workload.AttestCaller), and the pin checked afterwards.
func BenchmarkAttestCaller(b *testing.B) {
	a, err := unix.New(unix.Config{Log: slog.New(slog.DiscardHandler)})
	require.NoError(b, err)
	p, err := workload.OpenProcess(int32(os.Getpid()))
	require.NoError(b, err)
	defer p.Close()
	kinds := workload.KindsOf([]*ferrypb.Selector{{Type: "unix", Value: "uid:0"}, {Type: "unix", Value: "gid:0"}})
	peer := workload.Peer{UID: uint32(os.Geteuid()), GID: uint32(os.Getegid()), HasGID: true}
	attest := func(ctx context.Context, pid int32) ([]*ferrypb.Selector, error) { return a.Attest(ctx, pid, kinds) }
	b.ReportAllocs()
	for b.Loop() {
		if _, err := workload.AttestCaller(context.Background(), p, peer, attest); err != nil {
			b.Fatal(err)
		}
	}
}
