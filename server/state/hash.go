package state

import (
	"crypto/sha256"
	"fmt"
	"hash"
)

// StateHash returns the applied index of the current state and the SHA-256 of
// its snapshot encoding with that index left out: the header's index and the
// trailing checksum (which covers the header) are skipped, every row is
// included. Rows are written in table and key order with deterministic
// encoding, and each row carries the Raft indexes that wrote it, so two nodes
// that applied the same log to the same point hash equal, and any difference in
// a row, a missing row or an extra one changes the hash. It takes the same
// immutable read transaction as Snapshot and may run concurrently with Apply.
func (s *Store) StateHash() (uint64, [sha256.Size]byte, error) {
	snap, err := s.Snapshot()
	if err != nil {
		return 0, [sha256.Size]byte{}, fmt.Errorf("state: hash: %w", err)
	}
	fs := snap.(*fsmSnapshot)
	hw := &bodyHasher{h: sha256.New()}
	if err := writeSnapshot(hw, fs.txn, fs.index); err != nil {
		return 0, [sha256.Size]byte{}, fmt.Errorf("state: hash: %w", err)
	}
	var sum [sha256.Size]byte
	copy(sum[:], hw.sum())
	return fs.index, sum, nil
}

// bodyHasher hashes a snapshot's bytes between the header and the trailing
// checksum: it drops the first snapshotHeaderLen bytes and holds back the last
// sha256.Size bytes seen until more arrive.
type bodyHasher struct {
	h    hash.Hash
	seen int
	tail []byte
}

const snapshotHeaderLen = len(snapshotMagic) + 1 + 8

func (b *bodyHasher) Write(p []byte) (int, error) {
	n := len(p)
	if skip := snapshotHeaderLen - b.seen; skip > 0 {
		skip = min(skip, len(p))
		b.seen += skip
		p = p[skip:]
	}
	b.seen += len(p)
	b.tail = append(b.tail, p...)
	if over := len(b.tail) - sha256.Size; over > 0 {
		b.h.Write(b.tail[:over])
		b.tail = append(b.tail[:0], b.tail[over:]...)
	}
	return n, nil
}

func (b *bodyHasher) sum() []byte { return b.h.Sum(nil) }
