package chaos_test

import (
	"os"
	"os/exec"
	"testing"

	"github.com/hashicorp/raft"
	wal "github.com/hashicorp/raft-wal"
	"github.com/stretchr/testify/require"
)

// TestWALCrashAfterTailTruncate is the campaign's first finding, kept as a
// fast regression test: a follower truncates a conflicting log suffix (raft's
// "clearing log suffix"), appends the leader's entry, and is SIGKILLed. With
// raft-wal v0.4.0 the truncation sealed the segment without an index block,
// so on restart no entry of it could be read and raft panicked at start
// ("sealed segment has no index block", hashicorp/raft-wal#31, fixed in
// v0.4.1). The writing half runs in a child process that exits without
// closing the log, as a killed server would.
func TestWALCrashAfterTailTruncate(t *testing.T) {
	if dir := os.Getenv("CHAOS_WAL_CHILD_DIR"); dir != "" {
		w, err := wal.Open(dir)
		require.NoError(t, err)
		var logs []*raft.Log
		for i := uint64(1); i <= 10; i++ {
			logs = append(logs, &raft.Log{Index: i, Term: 1, Type: raft.LogCommand, Data: []byte("term 1")})
		}
		require.NoError(t, w.StoreLogs(logs))
		require.NoError(t, w.DeleteRange(9, 10))
		require.NoError(t, w.StoreLogs([]*raft.Log{{Index: 9, Term: 2, Type: raft.LogCommand, Data: []byte("term 2")}}))
		os.Exit(0) // no Close: a crash
	}
	dir := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run=^TestWALCrashAfterTailTruncate$")
	cmd.Env = append(os.Environ(), "CHAOS_WAL_CHILD_DIR="+dir)
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)

	w, err := wal.Open(dir)
	require.NoError(t, err)
	defer w.Close()
	last, err := w.LastIndex()
	require.NoError(t, err)
	require.EqualValues(t, 9, last)
	for i := uint64(1); i <= 9; i++ {
		var l raft.Log
		require.NoError(t, w.GetLog(i, &l), "index %d after the restart", i)
		want := "term 1"
		if i == 9 {
			want = "term 2"
		}
		require.Equal(t, want, string(l.Data), "index %d", i)
	}
}
