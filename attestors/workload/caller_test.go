package workload_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/attestors/workload"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

func TestParseCreds(t *testing.T) {
	for _, tc := range []struct {
		name, status string
		want         workload.Creds
		err          string
	}{
		{
			name:   "all lines",
			status: "Name:\tx\nUid:\t1000\t0\t0\t0\nGid:\t1000\t1000\t1000\t1000\nFDSize:\t64\nGroups:\t4 24 4294967295 \n",
			want: workload.Creds{UID: workload.IDs{Real: 1000}, GID: workload.IDs{Real: 1000, Effective: 1000, Saved: 1000, FS: 1000},
				Groups: []uint32{4, 24, 4294967295}},
		},
		{name: "no groups", status: "Uid:\t7\t7\t7\t7\nGid:\t8\t8\t8\t8\nGroups:\t\n",
			want: workload.Creds{UID: workload.IDs{Real: 7, Effective: 7, Saved: 7, FS: 7}, GID: workload.IDs{Real: 8, Effective: 8, Saved: 8, FS: 8}}},
		{name: "three ids", status: "Uid:\t7\t7\t7\nGid:\t8\t8\t8\t8\n", err: "no valid Uid/Gid"},
		{name: "five ids", status: "Uid:\t7\t7\t7\t7\t7\nGid:\t8\t8\t8\t8\n", err: "no valid Uid/Gid"},
		{name: "id too large", status: "Uid:\t4294967296\t7\t7\t7\nGid:\t8\t8\t8\t8\n", err: "no valid Uid/Gid"},
		{name: "negative id", status: "Uid:\t-1\t7\t7\t7\nGid:\t8\t8\t8\t8\n", err: "no valid Uid/Gid"},
		{name: "bad group", status: "Uid:\t7\t7\t7\t7\nGid:\t8\t8\t8\t8\nGroups:\t1 x\n", err: `malformed supplementary gid "x"`},
		{name: "no gid", status: "Uid:\t7\t7\t7\t7\n", err: "no valid Uid/Gid"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := workload.ParseCreds(strings.NewReader(tc.status))
			if tc.err != "" {
				require.ErrorContains(t, err, tc.err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
		})
	}
}

func ids(id uint32) workload.IDs { return workload.IDs{Real: id, Effective: id, Saved: id, FS: id} }

func TestPeerCheck(t *testing.T) {
	groups := func(g ...uint32) func() ([]uint32, error) { return func() ([]uint32, error) { return g, nil } }
	unixPeer := workload.Peer{UID: 1000, GID: 100, HasGID: true, Groups: groups(4, 24)}
	tcpPeer := workload.Peer{UID: 1000}
	creds := workload.Creds{UID: ids(1000), GID: ids(100), Groups: []uint32{24, 4}}
	with := func(f func(c *workload.Creds)) workload.Creds {
		c := creds
		f(&c)
		return c
	}
	for _, tc := range []struct {
		name   string
		peer   workload.Peer
		creds  workload.Creds
		groups bool
		err    string
	}{
		{name: "unchanged", peer: unixPeer, creds: creds, groups: true},
		{name: "setuid program", peer: unixPeer, creds: with(func(c *workload.Creds) { c.UID.Effective, c.UID.Saved, c.UID.FS = 0, 0, 0 }),
			err: "uids (real/effective/saved/fs) 1000/0/0/0, connected as uid 1000"},
		{name: "saved uid kept", peer: unixPeer, creds: with(func(c *workload.Creds) { c.UID.Saved = 0 }), err: "1000/1000/0/1000"},
		{name: "fs uid", peer: unixPeer, creds: with(func(c *workload.Creds) { c.UID.FS = 0 }), err: "1000/1000/1000/0"},
		{name: "dropped to another uid", peer: unixPeer, creds: with(func(c *workload.Creds) { c.UID = ids(65534) }), err: "connected as uid 1000"},
		{name: "setgid program", peer: unixPeer, creds: with(func(c *workload.Creds) { c.GID.Effective = 0 }),
			err: "gids (real/effective/saved/fs) 100/0/100/100, connected as gid 100"},
		{name: "another gid", peer: unixPeer, creds: with(func(c *workload.Creds) { c.GID = ids(5) }), err: "connected as gid 100"},
		{name: "groups changed", peer: unixPeer, creds: with(func(c *workload.Creds) { c.Groups = []uint32{4, 24, 0} }), groups: true,
			err: "supplementary groups [4 24 0], connected with [4 24]"},
		{name: "groups changed, unused", peer: unixPeer, creds: with(func(c *workload.Creds) { c.Groups = []uint32{0} })},
		{name: "groups unknown", peer: workload.Peer{UID: 1000, GID: 100, HasGID: true}, creds: with(func(c *workload.Creds) { c.Groups = nil }), groups: true},
		{name: "tcp: any uniform gid", peer: tcpPeer, creds: with(func(c *workload.Creds) { c.GID = ids(7) }), groups: true},
		{name: "tcp: setgid program", peer: tcpPeer, creds: with(func(c *workload.Creds) { c.GID.Saved = 0 }), err: "gids (real/effective/saved/fs) 100/100/0/100 differ"},
		{name: "tcp: other uid", peer: tcpPeer, creds: with(func(c *workload.Creds) { c.UID = ids(0) }), err: "connected as uid 1000"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.peer.Check(tc.creds, tc.groups)
			if tc.err == "" {
				require.NoError(t, err)
				return
			}
			require.ErrorIs(t, err, workload.ErrCredentialsChanged)
			require.ErrorContains(t, err, tc.err)
		})
	}

	boom := errors.New("boom")
	err := workload.Peer{UID: 1000, GID: 100, HasGID: true, Groups: func() ([]uint32, error) { return nil, boom }}.Check(creds, true)
	require.ErrorIs(t, err, boom)
}

// fakeCaller lays out a fake procfs entry for pid with a stat and a status.
func fakeCaller(t *testing.T, root string, pid int, status string) string {
	t.Helper()
	writeStat(t, root, pid, "caller", "S", 1000)
	path := filepath.Join(root, strconv.Itoa(pid), "status")
	require.NoError(t, os.WriteFile(path, []byte(status), 0o644))
	return path
}

// TestAttestCallerReadsCredentialsOnce: the ids the attestors describe are
// the ids checked. The status file changes after the attestor has read it;
// the check judges what the attestor saw (here: a setuid program), not what
// the file says afterwards, and the attestor's own second read within the
// call sees the same.
func TestAttestCallerReadsCredentialsOnce(t *testing.T) {
	root := t.TempDir()
	path := fakeCaller(t, root, 42, "Uid:\t1000\t0\t0\t0\nGid:\t1000\t1000\t1000\t1000\n")
	p, err := workload.OpenProcessIn(root, 42)
	require.NoError(t, err)
	defer p.Close()

	peer := workload.Peer{UID: 1000, GID: 1000, HasGID: true}
	var seen []workload.Creds
	attest := func(ctx context.Context, pid int32) ([]*ferrypb.Selector, error) {
		c, ok, err := workload.CredsFrom(ctx, root, pid, false)
		require.True(t, ok)
		require.NoError(t, err)
		seen = append(seen, c)
		require.NoError(t, os.WriteFile(path, []byte("Uid:\t1000\t1000\t1000\t1000\nGid:\t1000\t1000\t1000\t1000\n"), 0o644))
		c, _, _ = workload.CredsFrom(ctx, root, pid, false)
		seen = append(seen, c)
		return []*ferrypb.Selector{sel("unix", "uid:0")}, nil
	}
	got, err := workload.AttestCaller(context.Background(), p, peer, attest)
	require.ErrorIs(t, err, workload.ErrCredentialsChanged)
	require.ErrorContains(t, err, "1000/0/0/0")
	assert.Nil(t, got)
	require.Len(t, seen, 2)
	assert.Equal(t, seen[0], seen[1], "one read per call")

	// The next call reads the file again.
	got, err = workload.AttestCaller(context.Background(), p, peer, func(context.Context, int32) ([]*ferrypb.Selector, error) {
		return []*ferrypb.Selector{sel("unix", "uid:1000")}, nil
	})
	require.NoError(t, err)
	assert.Len(t, got, 1)
}

// TestAttestCallerOrder: a process that changed is reported as changed
// (ErrProcessChanged) before its credentials are judged, and an attestor
// error is returned only for a caller that passes both checks.
func TestAttestCallerOrder(t *testing.T) {
	root := t.TempDir()
	fakeCaller(t, root, 42, "Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\n")
	p, err := workload.OpenProcessIn(root, 42)
	require.NoError(t, err)
	defer p.Close()
	boom := errors.New("boom")
	failing := func(context.Context, int32) ([]*ferrypb.Selector, error) { return nil, boom }

	_, err = workload.AttestCaller(context.Background(), p, workload.Peer{UID: 1000}, failing)
	require.ErrorIs(t, err, workload.ErrCredentialsChanged, "the credentials first")
	_, err = workload.AttestCaller(context.Background(), p, workload.Peer{UID: 0}, failing)
	require.ErrorIs(t, err, boom)

	// Groups are compared only when an attestor used them.
	peer := workload.Peer{UID: 0, Groups: func() ([]uint32, error) { return []uint32{5}, nil }}
	_, err = workload.AttestCaller(context.Background(), p, peer, func(context.Context, int32) ([]*ferrypb.Selector, error) { return nil, nil })
	require.NoError(t, err)
	_, err = workload.AttestCaller(context.Background(), p, peer, func(ctx context.Context, pid int32) ([]*ferrypb.Selector, error) {
		_, _, err := workload.CredsFrom(ctx, root, pid, true)
		return nil, err
	})
	require.ErrorContains(t, err, "supplementary groups [], connected with [5]")

	writeStat(t, root, 42, "other", "S", 2000)
	_, err = workload.AttestCaller(context.Background(), p, workload.Peer{UID: 1000}, failing)
	require.ErrorIs(t, err, workload.ErrProcessChanged)

	// CredsFrom answers only for the process being attested.
	_, ok, _ := workload.CredsFrom(context.Background(), root, 42, false)
	assert.False(t, ok)
}

// FuzzParseCreds: any status content parses without panicking, and what it
// accepts reads back the same once written as the kernel writes it.
func FuzzParseCreds(f *testing.F) {
	f.Add("Name:\tx\nUid:\t1000\t0\t0\t0\nGid:\t1\t1\t1\t1\nGroups:\t4 24\n")
	f.Add("Uid:\t4294967295\t7\t7\t7\nGid:\t8\t8\t8\t8")
	f.Add("Uid:\t-1\t7\t7\t7\nGid:\t8\t8\t8\t8\nGroups:\t1 x\n")
	f.Fuzz(func(t *testing.T, status string) {
		c, err := workload.ParseCreds(strings.NewReader(status))
		if err != nil {
			return
		}
		line := func(ids workload.IDs) string {
			return fmt.Sprintf("%d\t%d\t%d\t%d", ids.Real, ids.Effective, ids.Saved, ids.FS)
		}
		var groups []string
		for _, g := range c.Groups {
			groups = append(groups, strconv.FormatUint(uint64(g), 10))
		}
		again, err := workload.ParseCreds(strings.NewReader(fmt.Sprintf("Uid:\t%s\nGid:\t%s\nGroups:\t%s \n", line(c.UID), line(c.GID), strings.Join(groups, " "))))
		require.NoError(t, err)
		assert.Equal(t, c, again)
	})
}
