package workload_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/attestors/workload"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

// fakeAttestor returns fixed selectors, or runs a hook first.
type fakeAttestor struct {
	name   string
	sels   []*ferrypb.Selector
	err    error
	before func()
	kinds  workload.Kinds
}

func (f *fakeAttestor) Name() string { return f.name }

func (f *fakeAttestor) Attest(_ context.Context, _ int32, kinds workload.Kinds) ([]*ferrypb.Selector, error) {
	f.kinds = kinds
	if f.before != nil {
		f.before()
	}
	return f.sels, f.err
}

func sel(t, v string) *ferrypb.Selector { return &ferrypb.Selector{Type: t, Value: v} }

func startSleeper(t *testing.T) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("sleep", "60")
	require.NoError(t, cmd.Start())
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	return cmd
}

func TestOpenProcessSelf(t *testing.T) {
	p, err := workload.OpenProcess(int32(os.Getpid()))
	require.NoError(t, err)
	defer p.Close()
	assert.Equal(t, int32(os.Getpid()), p.PID())
	assert.NotZero(t, p.StartTime())
	require.NoError(t, p.CheckAlive())
	require.NoError(t, p.Close())
	require.NoError(t, p.Close())
	require.ErrorIs(t, p.CheckAlive(), workload.ErrProcessChanged)
}

func TestOpenProcessInvalid(t *testing.T) {
	_, err := workload.OpenProcess(0)
	require.Error(t, err)
	_, err = workload.OpenProcess(-5)
	require.Error(t, err)
	// PID far above pid_max never exists.
	_, err = workload.OpenProcess(1 << 30)
	require.Error(t, err)
	assert.True(t, strings.HasPrefix(err.Error(), "workload: "))
}

func TestCheckAliveAfterExitAndReap(t *testing.T) {
	cmd := startSleeper(t)
	p, err := workload.OpenProcess(int32(cmd.Process.Pid))
	require.NoError(t, err)
	defer p.Close()
	require.NoError(t, p.CheckAlive())

	require.NoError(t, cmd.Process.Kill())
	_ = cmd.Wait()
	err = p.CheckAlive()
	require.ErrorIs(t, err, workload.ErrProcessChanged)
}

func TestCheckAliveZombie(t *testing.T) {
	cmd := exec.Command("true")
	require.NoError(t, cmd.Start())
	pid := cmd.Process.Pid
	t.Cleanup(func() { _ = cmd.Wait() })

	// Opening may race with the exit; once the child is a zombie, both Open
	// and CheckAlive must refuse it.
	p, openErr := workload.OpenProcess(int32(pid))
	waitForState(t, pid, "Z")
	if openErr == nil {
		defer p.Close()
		require.ErrorIs(t, p.CheckAlive(), workload.ErrProcessChanged)
	}
	_, err := workload.OpenProcess(int32(pid))
	require.ErrorIs(t, err, workload.ErrProcessChanged)
}

// A zombie leader with other threads is a process in the middle of execve
// from a thread other than its first (the kernel makes the old leader a
// zombie, then gives the executing thread its PID and start time), or one
// whose first thread ended while others run: it is alive. A zombie with no
// other thread exited.
func TestZombieLeaderWithThreads(t *testing.T) {
	root := t.TempDir()
	writeStatThreads(t, root, 42, "exec", "Z", 1000, 2)
	p, err := workload.OpenProcessIn(root, 42)
	require.NoError(t, err, "a leader that is a zombie while another thread executes a program")
	defer p.Close()
	require.NoError(t, p.CheckAlive())

	writeStatThreads(t, root, 42, "exec", "S", 1000, 1) // the exec done
	require.NoError(t, p.CheckAlive())

	writeStatThreads(t, root, 42, "exec", "Z", 1000, 1) // exited
	require.ErrorIs(t, p.CheckAlive(), workload.ErrProcessChanged)
	_, err = workload.OpenProcessIn(root, 42)
	require.ErrorIs(t, err, workload.ErrProcessChanged)

	writeStatThreads(t, root, 42, "exec", "X", 1000, 2) // dead is dead
	require.ErrorIs(t, p.CheckAlive(), workload.ErrProcessChanged)
}

func waitForState(t *testing.T, pid int, state string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		require.NoError(t, err)
		s := string(b)
		fields := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
		if fields[0] == state {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("pid %d never reached state %s", pid, state)
}

// writeStat lays out a fake procfs entry for pid with the given command name,
// state and start time.
func writeStat(t *testing.T, root string, pid int, comm, state string, start uint64) {
	t.Helper()
	writeStatThreads(t, root, pid, comm, state, start, 1)
}

// writeStatThreads is writeStat with a thread count (num_threads, field 20).
func writeStatThreads(t *testing.T, root string, pid int, comm, state string, start uint64, threads int) {
	t.Helper()
	dir := filepath.Join(root, fmt.Sprint(pid))
	require.NoError(t, os.MkdirAll(dir, 0o755))
	rest := []string{state}
	for i := 4; i <= 52; i++ {
		if i == 22 {
			rest = append(rest, fmt.Sprint(start))
			continue
		}
		if i == 20 {
			rest = append(rest, fmt.Sprint(threads))
			continue
		}
		rest = append(rest, fmt.Sprint(i))
	}
	line := fmt.Sprintf("%d (%s) %s\n", pid, comm, strings.Join(rest, " "))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "stat"), []byte(line), 0o644))
}

func TestCheckAliveDetectsStartTimeChange(t *testing.T) {
	root := t.TempDir()
	// A command name with spaces and parentheses must not shift the fields.
	writeStat(t, root, 42, "evil) R 1 2 (x", "S", 1000)
	p, err := workload.OpenProcessIn(root, 42)
	require.NoError(t, err)
	defer p.Close()
	assert.Equal(t, uint64(1000), p.StartTime())
	require.NoError(t, p.CheckAlive())

	writeStat(t, root, 42, "other", "S", 2000)
	err = p.CheckAlive()
	require.ErrorIs(t, err, workload.ErrProcessChanged)
	assert.Contains(t, err.Error(), "start time changed")
}

func TestOpenProcessMalformedStat(t *testing.T) {
	root := t.TempDir()
	for name, content := range map[string]string{
		"no paren":   "42 sleep S 1 2 3",
		"too short":  "42 (sleep) S 1 2 3",
		"bad number": "42 (sleep) S" + strings.Repeat(" x", 30),
		"empty":      "",
	} {
		t.Run(name, func(t *testing.T) {
			dir := filepath.Join(root, "42")
			require.NoError(t, os.MkdirAll(dir, 0o755))
			require.NoError(t, os.WriteFile(filepath.Join(dir, "stat"), []byte(content), 0o644))
			_, err := workload.OpenProcessIn(root, 42)
			require.Error(t, err)
			assert.Contains(t, err.Error(), "malformed stat")
		})
	}
}

func TestAttestUnionsSelectors(t *testing.T) {
	a := &fakeAttestor{name: "unix", sels: []*ferrypb.Selector{sel("unix", "uid:0"), sel("unix", "gid:0"), sel("unix", "uid:0")}}
	b := &fakeAttestor{name: "systemd", sels: []*ferrypb.Selector{sel("systemd", "id:x.service")}}
	kinds := workload.KindsOf([]*ferrypb.Selector{sel("unix", "uid:0")})
	got, err := workload.Attest(context.Background(), int32(os.Getpid()), []workload.Attestor{a, b}, kinds)
	require.NoError(t, err)
	var s []string
	for _, g := range got {
		s = append(s, g.GetType()+":"+g.GetValue())
	}
	assert.Equal(t, []string{"systemd:id:x.service", "unix:gid:0", "unix:uid:0"}, s)
	assert.Equal(t, kinds, a.kinds, "kinds passed through to attestors")
}

func TestAttestRejectsForeignSelectorType(t *testing.T) {
	a := &fakeAttestor{name: "unix", sels: []*ferrypb.Selector{sel("k8s", "ns:default")}}
	_, err := workload.Attest(context.Background(), int32(os.Getpid()), []workload.Attestor{a}, nil)
	require.Error(t, err)
	assert.Contains(t, err.Error(), `returned selector of type "k8s"`)
}

func TestAttestPropagatesAttestorError(t *testing.T) {
	boom := errors.New("boom")
	a := &fakeAttestor{name: "unix", err: boom}
	_, err := workload.Attest(context.Background(), int32(os.Getpid()), []workload.Attestor{a}, nil)
	require.ErrorIs(t, err, boom)
	assert.Contains(t, err.Error(), `workload: attestor "unix"`)
}

func TestAttestCancelled(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	a := &fakeAttestor{name: "unix"}
	_, err := workload.Attest(ctx, int32(os.Getpid()), []workload.Attestor{a}, nil)
	require.ErrorIs(t, err, context.Canceled)
}

// TestAttestDiscardsResultWhenProcessExits is the PID-reuse guard: the caller
// exits while the attestors run, so whatever they found must not be used.
func TestAttestDiscardsResultWhenProcessExits(t *testing.T) {
	for _, failing := range []bool{false, true} {
		t.Run(fmt.Sprintf("attestor fails=%v", failing), func(t *testing.T) {
			cmd := startSleeper(t)
			a := &fakeAttestor{
				name: "unix",
				sels: []*ferrypb.Selector{sel("unix", "uid:0")},
				before: func() {
					_ = cmd.Process.Kill()
					_ = cmd.Wait()
				},
			}
			if failing {
				a.err = errors.New("no such process")
			}
			got, err := workload.Attest(context.Background(), int32(cmd.Process.Pid), []workload.Attestor{a}, nil)
			require.ErrorIs(t, err, workload.ErrProcessChanged)
			assert.Nil(t, got)
		})
	}
}

func TestKinds(t *testing.T) {
	var all workload.Kinds
	assert.True(t, all.Has("unix", "sha256"))

	k := workload.KindsOf(
		[]*ferrypb.Selector{sel("unix", "uid:1000"), sel("unix", "sha256:ab")},
		[]*ferrypb.Selector{sel("systemd", "id:a.service"), sel("docker", "label")},
	)
	assert.True(t, k.Has("unix", "uid"))
	assert.True(t, k.Has("unix", "sha256"))
	assert.True(t, k.Has("systemd", "id"))
	assert.True(t, k.Has("docker", "label"))
	assert.False(t, k.Has("unix", "gid"))
	assert.False(t, k.Has("systemd", "uid"))
	assert.False(t, workload.Kinds{}.Has("unix", "uid"))
	assert.Equal(t, "path", workload.Kind(sel("unix", "path:/a:b")))
}

// TestReadFileReadsCurrentContent: the descriptor is kept, the content is
// not: every ReadFile sees the file as it is now.
func TestReadFileReadsCurrentContent(t *testing.T) {
	root := t.TempDir()
	writeStat(t, root, 42, "x", "S", 1000)
	statusPath := filepath.Join(root, "42", "status")
	require.NoError(t, os.WriteFile(statusPath, []byte("Uid:\t0\t0\t0\t0\n"), 0o644))
	p, err := workload.OpenProcessIn(root, 42)
	require.NoError(t, err)
	defer p.Close()
	read := func() string {
		var got []byte
		require.NoError(t, p.ReadFile("status", func(r io.Reader) error {
			var err error
			got, err = io.ReadAll(r)
			return err
		}))
		return string(got)
	}
	require.Equal(t, "Uid:\t0\t0\t0\t0\n", read())
	require.NoError(t, os.WriteFile(statusPath, []byte("Uid:\t1000\t1000\t1000\t1000\n"), 0o644))
	require.Equal(t, "Uid:\t1000\t1000\t1000\t1000\n", read())
	require.Equal(t, "Uid:\t1000\t1000\t1000\t1000\n", read(), "a second read starts at the beginning again")

	require.NoError(t, p.Close())
	require.ErrorIs(t, p.ReadFile("status", func(io.Reader) error { return nil }), workload.ErrProcessChanged)
}

// TestReadFileFailsOnceProcessIsReaped: files read through the pin belong to
// the process that was pinned; once it is gone they cannot be read, even
// through a descriptor opened while it lived.
func TestReadFileFailsOnceProcessIsReaped(t *testing.T) {
	cmd := startSleeper(t)
	p, err := workload.OpenProcess(int32(cmd.Process.Pid))
	require.NoError(t, err)
	defer p.Close()
	readStatus := func() error {
		return p.ReadFile("status", func(r io.Reader) error {
			_, err := io.ReadAll(r)
			return err
		})
	}
	require.NoError(t, readStatus())
	link, err := p.Readlink("exe")
	require.NoError(t, err)
	assert.True(t, filepath.IsAbs(link))

	require.NoError(t, cmd.Process.Kill())
	_ = cmd.Wait()
	require.Error(t, readStatus(), "read of a reaped process's status through a kept descriptor")
	require.ErrorIs(t, p.CheckAlive(), workload.ErrProcessChanged)
	_, err = p.Readlink("exe")
	require.Error(t, err)
}

func TestProcessFromContext(t *testing.T) {
	root := t.TempDir()
	writeStat(t, root, 42, "x", "S", 1000)
	p, err := workload.OpenProcessIn(root, 42)
	require.NoError(t, err)
	defer p.Close()
	ctx := workload.WithProcess(context.Background(), p)
	assert.Same(t, p, workload.ProcessFrom(ctx, root+"/", 42))
	assert.Nil(t, workload.ProcessFrom(ctx, root, 43), "another pid")
	assert.Nil(t, workload.ProcessFrom(ctx, "/proc", 42), "another procfs")
	assert.Nil(t, workload.ProcessFrom(context.Background(), root, 42))
}
