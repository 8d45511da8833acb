package state

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"

	"github.com/hashicorp/go-memdb"
	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/proto"

	"github.com/ferry-id/ferry/proto/ferrypb"
)

// The FSM snapshot format:
//
//	"FERRYFSM" | version (1 byte) | applied index (8 bytes, big endian)
//	records: table tag (1 byte) | length (uvarint) | protobuf row
//	end: tag 0 | SHA-256 of every byte before it (32 bytes)
//
// Tags are append-only like command numbers.
const (
	snapshotMagic   = "FERRYFSM"
	snapshotVersion = 1

	tagEnd     byte = 0
	tagEntry   byte = 1
	tagRequest byte = 2
	tagToken   byte = 3
	tagNode    byte = 4
	tagBundle  byte = 5

	// Directory tables (directory.go): 10-19.
	tagTenant              byte = 10
	tagIdentity            byte = 11
	tagFederatedCredential byte = 12
	tagResource            byte = 13
	tagRoleAssignment      byte = 14
	tagSigningKey          byte = 15

	// Federation (federation.go): 20-29.
	tagFederation byte = 20

	// Authority rotation (reports.go): 30-39.
	tagAgentReport byte = 30
)

// maxSnapshotRecord bounds one row, so a corrupt length cannot make Restore
// allocate without limit.
const maxSnapshotRecord = 16 << 20

// snapshotTables lists what a snapshot holds, in order: every table, once.
var snapshotTables = []struct {
	tag   byte
	table string
	new   func() proto.Message
}{
	{tagEntry, TableEntries, func() proto.Message { return new(ferrypb.Entry) }},
	{tagRequest, TableRequests, func() proto.Message { return new(ferrypb.AppliedRequest) }},
	{tagToken, TableJoinTokens, func() proto.Message { return new(ferrypb.JoinToken) }},
	{tagNode, TableNodes, func() proto.Message { return new(ferrypb.AttestedNode) }},
	{tagBundle, TableBundles, func() proto.Message { return new(ferrypb.Bundle) }},
	{tagTenant, TableTenants, func() proto.Message { return new(ferrypb.Tenant) }},
	{tagIdentity, TableIdentities, func() proto.Message { return new(ferrypb.Identity) }},
	{tagFederatedCredential, TableFederatedCredentials, func() proto.Message { return new(ferrypb.FederatedCredential) }},
	{tagResource, TableResources, func() proto.Message { return new(ferrypb.Resource) }},
	{tagRoleAssignment, TableRoleAssignments, func() proto.Message { return new(ferrypb.RoleAssignment) }},
	{tagSigningKey, TableSigningKeys, func() proto.Message { return new(ferrypb.SigningKey) }},
	{tagFederation, TableFederation, func() proto.Message { return new(ferrypb.FederationRelationship) }},
	{tagAgentReport, TableAgentReports, func() proto.Message { return new(ferrypb.AgentReport) }},
}

// Snapshot captures the current state. It runs concurrently with later Apply calls
// (raft's contract): it only takes an immutable read transaction.
func (s *Store) Snapshot() (raft.FSMSnapshot, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return &fsmSnapshot{txn: s.db.Txn(false), index: s.applied.Load()}, nil
}

type fsmSnapshot struct {
	txn   *memdb.Txn
	index uint64
}

func (f *fsmSnapshot) Persist(sink raft.SnapshotSink) error {
	if err := writeSnapshot(sink, f.txn, f.index); err != nil {
		_ = sink.Cancel()
		return err
	}
	return sink.Close()
}

func (f *fsmSnapshot) Release() {}

// WriteSnapshot writes a snapshot of the current state to w (used by tests and tools
// that want the FSM's bytes without raft).
func (s *Store) WriteSnapshot(w io.Writer) error {
	snap, _ := s.Snapshot()
	fs := snap.(*fsmSnapshot)
	return writeSnapshot(w, fs.txn, fs.index)
}

func writeSnapshot(w io.Writer, txn *memdb.Txn, index uint64) error {
	h := sha256.New()
	bw := bufio.NewWriterSize(io.MultiWriter(w, h), 64<<10)
	hdr := make([]byte, 0, len(snapshotMagic)+9)
	hdr = append(hdr, snapshotMagic...)
	hdr = append(hdr, snapshotVersion)
	hdr = binary.BigEndian.AppendUint64(hdr, index)
	if _, err := bw.Write(hdr); err != nil {
		return fmt.Errorf("state: write snapshot: %w", err)
	}
	var buf []byte
	for _, t := range snapshotTables {
		it, err := txn.Get(t.table, "id")
		if err != nil {
			return fmt.Errorf("state: snapshot %s: %w", t.table, err)
		}
		for raw := it.Next(); raw != nil; raw = it.Next() {
			body, err := proto.MarshalOptions{Deterministic: true}.Marshal(raw.(proto.Message))
			if err != nil {
				return fmt.Errorf("state: snapshot %s: %w", t.table, err)
			}
			buf = append(buf[:0], t.tag)
			buf = binary.AppendUvarint(buf, uint64(len(body)))
			if _, err := bw.Write(buf); err != nil {
				return fmt.Errorf("state: write snapshot: %w", err)
			}
			if _, err := bw.Write(body); err != nil {
				return fmt.Errorf("state: write snapshot: %w", err)
			}
		}
	}
	if err := bw.WriteByte(tagEnd); err != nil {
		return fmt.Errorf("state: write snapshot: %w", err)
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("state: write snapshot: %w", err)
	}
	if _, err := w.Write(h.Sum(nil)); err != nil {
		return fmt.Errorf("state: write snapshot: %w", err)
	}
	return nil
}

// ErrBadSnapshot is returned by Restore for a snapshot that is truncated, corrupt or
// of an unknown format. The store is left as it was.
var ErrBadSnapshot = errors.New("state: bad snapshot")

// Restore replaces the whole state with the snapshot read from r. The snapshot is
// loaded into a fresh database and verified before it is swapped in, so a bad
// snapshot changes nothing.
func (s *Store) Restore(r io.ReadCloser) error {
	defer r.Close()
	db, index, rowBytes, err := readSnapshot(r)
	if err != nil {
		return err
	}
	s.mu.Lock()
	s.db = db
	s.rowBytes.Store(rowBytes)
	s.feed.reset(index)
	s.applied.Store(index)
	close(s.appliedCh)
	s.appliedCh = make(chan struct{})
	s.mu.Unlock()
	s.log.Info("state restored from snapshot", "index", index)
	return nil
}

// hashingReader hashes what has been read through it.
type hashingReader struct {
	r *bufio.Reader
	h hash.Hash
}

func (hr *hashingReader) Read(p []byte) (int, error) {
	n, err := hr.r.Read(p)
	hr.h.Write(p[:n])
	return n, err
}

func (hr *hashingReader) ReadByte() (byte, error) {
	b, err := hr.r.ReadByte()
	if err == nil {
		hr.h.Write([]byte{b})
	}
	return b, err
}

// readSnapshot returns the database a snapshot holds, its applied index and
// the encoded size of its rows. Rows are decoded on one goroutine and
// inserted on another: on a restart the two halves of the work overlap.
func readSnapshot(r io.Reader) (*memdb.MemDB, uint64, int64, error) {
	hr := &hashingReader{r: bufio.NewReaderSize(r, 64<<10), h: sha256.New()}
	hdr := make([]byte, len(snapshotMagic)+9)
	if _, err := io.ReadFull(hr, hdr); err != nil {
		return nil, 0, 0, fmt.Errorf("%w: header: %v", ErrBadSnapshot, err)
	}
	if !bytes.Equal(hdr[:len(snapshotMagic)], []byte(snapshotMagic)) {
		return nil, 0, 0, fmt.Errorf("%w: not a ferry state snapshot", ErrBadSnapshot)
	}
	if v := hdr[len(snapshotMagic)]; v != snapshotVersion {
		return nil, 0, 0, fmt.Errorf("%w: unknown version %d", ErrBadSnapshot, v)
	}
	index := binary.BigEndian.Uint64(hdr[len(snapshotMagic)+1:])

	db, err := memdb.NewMemDB(schema())
	if err != nil {
		return nil, 0, 0, fmt.Errorf("state: schema: %w", err)
	}
	txn := db.Txn(true)
	defer txn.Abort()
	batches := make(chan []snapshotRow, 4)
	stop := make(chan struct{})
	decoded := make(chan error, 1)
	var rowBytes int64
	go func() {
		defer close(batches)
		var err error
		rowBytes, err = decodeRows(hr, batches, stop)
		decoded <- err
	}()
	var insertErr error
	for batch := range batches {
		for _, r := range batch {
			if insertErr == nil {
				if err := txn.Insert(r.table, r.row); err != nil {
					insertErr = fmt.Errorf("%w: %s row: %v", ErrBadSnapshot, r.table, err)
					close(stop)
				}
			}
		}
	}
	if err := <-decoded; err != nil && insertErr == nil {
		return nil, 0, 0, err
	}
	if insertErr != nil {
		return nil, 0, 0, insertErr
	}
	txn.Commit()
	return db, index, rowBytes, nil
}

// snapshotRow is a decoded row and its table.
type snapshotRow struct {
	table string
	row   proto.Message
}

// decodeRows decodes the records of a snapshot after its header, sends them
// in batches, and checks the trailing checksum. It returns the encoded size
// of the rows, and stops early when stop is closed.
func decodeRows(hr *hashingReader, batches chan<- []snapshotRow, stop <-chan struct{}) (int64, error) {
	const batchRows = 512
	var body []byte
	var rowBytes int64
	batch := make([]snapshotRow, 0, batchRows)
	send := func() bool {
		if len(batch) == 0 {
			return true
		}
		select {
		case batches <- batch:
			batch = make([]snapshotRow, 0, batchRows)
			return true
		case <-stop:
			return false
		}
	}
	for {
		tag, err := hr.ReadByte()
		if err != nil {
			return 0, fmt.Errorf("%w: truncated: %v", ErrBadSnapshot, err)
		}
		if tag == tagEnd {
			break
		}
		var t *struct {
			tag   byte
			table string
			new   func() proto.Message
		}
		for i := range snapshotTables {
			if snapshotTables[i].tag == tag {
				t = &snapshotTables[i]
			}
		}
		if t == nil {
			return 0, fmt.Errorf("%w: unknown record tag %d", ErrBadSnapshot, tag)
		}
		n, err := binary.ReadUvarint(hr)
		if err != nil || n > maxSnapshotRecord {
			return 0, fmt.Errorf("%w: bad record length", ErrBadSnapshot)
		}
		if uint64(cap(body)) < n {
			body = make([]byte, n)
		}
		body = body[:n]
		if _, err := io.ReadFull(hr, body); err != nil {
			return 0, fmt.Errorf("%w: truncated record: %v", ErrBadSnapshot, err)
		}
		row := t.new()
		if err := proto.Unmarshal(body, row); err != nil {
			return 0, fmt.Errorf("%w: %s row: %v", ErrBadSnapshot, t.table, err)
		}
		if ar, ok := row.(*ferrypb.AppliedRequest); ok && ar.Result != nil {
			if len(ar.Result.Entries) > 0 {
				// Written by a release that kept the rows in the result:
				// stored as this release stores it when it applies the
				// command, so that every node holds the same state
				// whichever snapshot it started from.
				row = appliedRequest(ar.RequestId, ar.Index, ar.TimeUnixNano, ar.Result)
			} else {
				ar.Result.Items = shareOK(ar.Result.Items)
			}
		}
		rowBytes += int64(n)
		batch = append(batch, snapshotRow{t.table, row})
		if len(batch) == batchRows && !send() {
			return 0, nil // the inserter failed and says why
		}
	}
	want := hr.h.Sum(nil)
	got := make([]byte, sha256.Size)
	if _, err := io.ReadFull(hr.r, got); err != nil {
		return 0, fmt.Errorf("%w: missing checksum: %v", ErrBadSnapshot, err)
	}
	if !bytes.Equal(got, want) {
		return 0, fmt.Errorf("%w: checksum mismatch", ErrBadSnapshot)
	}
	if _, err := hr.r.ReadByte(); err != io.EOF {
		return 0, fmt.Errorf("%w: trailing data after checksum", ErrBadSnapshot)
	}
	send()
	return rowBytes, nil
}
