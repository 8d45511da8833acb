package state_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"io"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/state"
)

func TestStateHash(t *testing.T) {
	a := newHarness(t, state.Config{})
	b := newHarness(t, state.Config{})
	for _, h := range []*harness{a, b} {
		h.apply(create("r1", entry("e1", "spiffe://example.org/w/1", "uid:1")))
		h.apply(create("r2", entry("e2", "spiffe://example.org/w/2", "uid:2")))
	}
	ia, ha, err := a.s.StateHash()
	require.NoError(t, err)
	ib, hb, err := b.s.StateHash()
	require.NoError(t, err)
	require.Equal(t, uint64(2), ia)
	require.Equal(t, ia, ib)
	require.Equal(t, ha, hb, "same log, same state, same hash")

	// The hash is the SHA-256 of the snapshot between its header and checksum.
	var snap bytes.Buffer
	require.NoError(t, a.s.WriteSnapshot(&snap))
	raw := snap.Bytes()
	const hdr = len("FERRYFSM") + 1 + 8
	require.Equal(t, sha256.Sum256(raw[hdr:len(raw)-sha256.Size]), ha)

	// The same rows at another applied index hash the same.
	moved := bytes.Clone(raw)
	binary.BigEndian.PutUint64(moved[hdr-8:hdr], 99)
	sum := sha256.Sum256(moved[:len(moved)-sha256.Size])
	copy(moved[len(moved)-sha256.Size:], sum[:])
	c := newHarness(t, state.Config{})
	require.NoError(t, c.s.Restore(io.NopCloser(bytes.NewReader(moved))))
	ic, hc, err := c.s.StateHash()
	require.NoError(t, err)
	require.Equal(t, uint64(99), ic)
	require.Equal(t, ha, hc)

	// One more row, or one row applied at another index, changes the hash.
	b.apply(create("r3", entry("e3", "spiffe://example.org/w/3", "uid:3")))
	_, hb3, err := b.s.StateHash()
	require.NoError(t, err)
	require.NotEqual(t, ha, hb3)

	d := newHarness(t, state.Config{})
	d.apply(create("r0", entry("e0", "spiffe://example.org/w/0", "uid:0")))
	d.apply(&ferrypb.Command{RequestId: "del", Op: &ferrypb.Command_EntriesDelete{EntriesDelete: &ferrypb.EntriesDelete{Ids: []string{"e0"}}}})
	d.apply(create("r1", entry("e1", "spiffe://example.org/w/1", "uid:1")))
	d.apply(create("r2", entry("e2", "spiffe://example.org/w/2", "uid:2")))
	_, hd, err := d.s.StateHash()
	require.NoError(t, err)
	require.NotEqual(t, ha, hd, "same entries reached through another history")
}
