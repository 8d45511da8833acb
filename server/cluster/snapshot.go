package cluster

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/hashicorp/raft"
)

// Snapshot archive layout (all integers big-endian):
//
//	magic   8 bytes  "FERRYSNP"
//	hlen    4 bytes  length of the header
//	header  hlen     JSON SnapshotHeader
//	dlen    8 bytes  length of the FSM data
//	data    dlen     the FSM snapshot as Raft stores it
//	sum     32 bytes SHA-256 of everything before it
const (
	snapshotMagic     = "FERRYSNP"
	snapshotFormat    = 1
	maxSnapshotHeader = 1 << 20
)

// ErrSnapshotCorrupt is returned by SnapshotRestore (and ReadSnapshotHeader)
// for an archive that is truncated, tampered with or not a ferry snapshot.
var ErrSnapshotCorrupt = errors.New("cluster: snapshot archive is corrupt")

// SnapshotServer is one server of the configuration recorded in a snapshot.
type SnapshotServer struct {
	ID       string `json:"id"`
	Address  string `json:"address"`
	Suffrage string `json:"suffrage"`
}

// SnapshotHeader describes an archive's snapshot.
type SnapshotHeader struct {
	Format             int              `json:"format"`
	Node               string           `json:"node"`
	Index              uint64           `json:"index"`
	Term               uint64           `json:"term"`
	Configuration      []SnapshotServer `json:"configuration"`
	ConfigurationIndex uint64           `json:"configuration_index"`
	Size               int64            `json:"size"`
	Created            time.Time        `json:"created"`
}

// SnapshotSave takes a Raft snapshot of this node's FSM (or reuses the latest
// one when nothing was applied since) and writes it to w as an archive with a
// header and a SHA-256 checksum. Any node may save; the header names the node
// and index, so an operator can tell a lagging follower's snapshot apart.
func (n *Node) SnapshotSave(ctx context.Context, w io.Writer) error {
	meta, rc, err := n.openSnapshot(ctx)
	if err != nil {
		return err
	}
	defer rc.Close()
	hdr := SnapshotHeader{
		Format:             snapshotFormat,
		Node:               n.cfg.NodeID,
		Index:              meta.Index,
		Term:               meta.Term,
		ConfigurationIndex: meta.ConfigurationIndex,
		Size:               meta.Size,
		Created:            time.Now().UTC(),
	}
	for _, s := range meta.Configuration.Servers {
		hdr.Configuration = append(hdr.Configuration, SnapshotServer{ID: string(s.ID), Address: string(s.Address), Suffrage: s.Suffrage.String()})
	}
	hb, err := json.Marshal(hdr)
	if err != nil {
		return fmt.Errorf("cluster: snapshot header: %w", err)
	}
	sum := sha256.New()
	bw := bufio.NewWriterSize(w, 64*1024)
	out := io.MultiWriter(bw, sum)
	var hlen [4]byte
	binary.BigEndian.PutUint32(hlen[:], uint32(len(hb)))
	var dlen [8]byte
	binary.BigEndian.PutUint64(dlen[:], uint64(meta.Size))
	for _, b := range [][]byte{[]byte(snapshotMagic), hlen[:], hb, dlen[:]} {
		if _, err := out.Write(b); err != nil {
			return fmt.Errorf("cluster: write snapshot: %w", err)
		}
	}
	copied, err := io.Copy(out, &ctxReader{ctx: ctx, r: rc})
	if err != nil {
		return fmt.Errorf("cluster: write snapshot: %w", err)
	}
	if copied != meta.Size {
		return fmt.Errorf("cluster: snapshot %s is %d bytes, metadata says %d", meta.ID, copied, meta.Size)
	}
	if _, err := bw.Write(sum.Sum(nil)); err != nil {
		return fmt.Errorf("cluster: write snapshot: %w", err)
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("cluster: write snapshot: %w", err)
	}
	n.log.Info("cluster: snapshot saved", "index", meta.Index, "term", meta.Term, "bytes", meta.Size)
	return nil
}

func (n *Node) openSnapshot(ctx context.Context) (*raft.SnapshotMeta, io.ReadCloser, error) {
	fut := n.raft.Snapshot()
	err := waitFuture(ctx, fut)
	switch {
	case err == nil:
		meta, rc, err := fut.Open()
		if err != nil {
			return nil, nil, fmt.Errorf("cluster: open snapshot: %w", err)
		}
		return meta, rc, nil
	case errors.Is(err, raft.ErrNothingNewToSnapshot):
		list, err := n.snaps.List()
		if err != nil {
			return nil, nil, fmt.Errorf("cluster: list snapshots: %w", err)
		}
		if len(list) == 0 {
			return nil, nil, errors.New("cluster: nothing to snapshot yet")
		}
		meta, rc, err := n.snaps.Open(list[0].ID)
		if err != nil {
			return nil, nil, fmt.Errorf("cluster: open snapshot: %w", err)
		}
		return meta, rc, nil
	default:
		return nil, nil, fmt.Errorf("cluster: snapshot: %w", err)
	}
}

// SnapshotRestore replaces the cluster's state with an archive written by
// SnapshotSave. The whole archive is read into a temporary file under DataDir
// and its checksum verified before Raft is touched: a truncated, tampered or
// foreign archive returns ErrSnapshotCorrupt and leaves state unchanged. It is
// for disaster recovery and runs on the leader only; a follower refuses with
// an error naming the leader. The current Raft configuration is kept.
func (n *Node) SnapshotRestore(ctx context.Context, r io.Reader) error {
	if !n.IsLeader() {
		return n.notLeaderError("snapshot restore")
	}
	tmp, err := os.CreateTemp(n.cfg.DataDir, ".restore-*")
	if err != nil {
		return fmt.Errorf("cluster: snapshot restore: %w", err)
	}
	defer os.Remove(tmp.Name())
	defer tmp.Close()

	hdr, err := readArchive(&ctxReader{ctx: ctx, r: r}, tmp)
	if err != nil {
		return err
	}
	if !n.IsLeader() {
		return n.notLeaderError("snapshot restore")
	}
	if _, err := tmp.Seek(0, io.SeekStart); err != nil {
		return fmt.Errorf("cluster: snapshot restore: %w", err)
	}
	meta := &raft.SnapshotMeta{
		Version:            raft.SnapshotVersionMax,
		Index:              hdr.Index,
		Term:               hdr.Term,
		ConfigurationIndex: hdr.ConfigurationIndex,
		Size:               hdr.Size,
	}
	timeout := time.Duration(0)
	if dl, ok := ctx.Deadline(); ok {
		timeout = max(time.Until(dl), time.Millisecond)
	}
	data := &ctxReader{ctx: ctx, r: bufio.NewReaderSize(io.LimitReader(tmp, hdr.Size), 64*1024)}
	if err := n.raft.Restore(meta, data, timeout); err != nil {
		return fmt.Errorf("cluster: snapshot restore: %w", err)
	}
	n.log.Warn("cluster: state restored from snapshot", "from_node", hdr.Node, "from_index", hdr.Index, "bytes", hdr.Size)
	return nil
}

// ReadSnapshotHeader verifies a whole archive and returns its header, for
// tools that inspect backups.
func ReadSnapshotHeader(r io.Reader) (SnapshotHeader, error) {
	return readArchive(r, io.Discard)
}

// readArchive verifies the archive's structure and checksum while copying the
// FSM data (only) to w, and returns the header.
func readArchive(r io.Reader, w io.Writer) (SnapshotHeader, error) {
	var hdr SnapshotHeader
	br := bufio.NewReaderSize(r, 64*1024)
	sum := sha256.New()
	fail := func(format string, args ...any) (SnapshotHeader, error) {
		return SnapshotHeader{}, fmt.Errorf("%w: "+format, append([]any{ErrSnapshotCorrupt}, args...)...)
	}
	read := func(p []byte) error {
		_, err := io.ReadFull(br, p)
		sum.Write(p)
		return err
	}
	var prefix [len(snapshotMagic) + 4]byte
	if err := read(prefix[:]); err != nil {
		return fail("reading header: %v", err)
	}
	if string(prefix[:len(snapshotMagic)]) != snapshotMagic {
		return fail("not a ferry snapshot archive")
	}
	hlen := binary.BigEndian.Uint32(prefix[len(snapshotMagic):])
	if hlen == 0 || hlen > maxSnapshotHeader {
		return fail("header length %d", hlen)
	}
	hb := make([]byte, hlen)
	if err := read(hb); err != nil {
		return fail("reading header: %v", err)
	}
	var dlen [8]byte
	if err := read(dlen[:]); err != nil {
		return fail("reading data length: %v", err)
	}
	size := binary.BigEndian.Uint64(dlen[:])
	if size > 1<<62 {
		return fail("data length %d", size)
	}
	copied, err := io.CopyN(io.MultiWriter(w, sum), br, int64(size))
	if err != nil {
		if errors.Is(err, io.EOF) {
			return fail("data truncated at %d of %d bytes", copied, size)
		}
		return SnapshotHeader{}, fmt.Errorf("cluster: read snapshot: %w", err)
	}
	var trailer [sha256.Size]byte
	if _, err := io.ReadFull(br, trailer[:]); err != nil {
		return fail("checksum missing: %v", err)
	}
	if _, err := br.ReadByte(); !errors.Is(err, io.EOF) {
		if err != nil {
			return SnapshotHeader{}, fmt.Errorf("cluster: read snapshot: %w", err)
		}
		return fail("trailing bytes after checksum")
	}
	if subtle.ConstantTimeCompare(trailer[:], sum.Sum(nil)) != 1 {
		return fail("checksum mismatch")
	}
	if err := json.Unmarshal(hb, &hdr); err != nil {
		return fail("header: %v", err)
	}
	if hdr.Format != snapshotFormat {
		return fail("unknown format %d", hdr.Format)
	}
	if hdr.Size != int64(size) {
		return fail("header size %d, data %d", hdr.Size, size)
	}
	return hdr, nil
}

// ctxReader stops a long copy when ctx ends.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c *ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}

func (n *Node) notLeaderError(op string) error {
	id, addr := n.Leader()
	if id == "" {
		return fmt.Errorf("cluster: %s: %w (no leader known)", op, raft.ErrNotLeader)
	}
	return fmt.Errorf("cluster: %s: %w; run it on the leader %s (%s)", op, raft.ErrNotLeader, id, addr)
}
