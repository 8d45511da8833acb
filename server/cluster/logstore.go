package cluster

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	raftwal "github.com/hashicorp/raft-wal"
	"github.com/hashicorp/raft-wal/metadb"
	"go.etcd.io/bbolt"
)

// Log store kinds for Config.LogStore.
const (
	LogStoreWAL    = "wal"    // hashicorp/raft-wal: segment files, one fsync per append
	LogStoreBoltDB = "boltdb" // hashicorp/raft-boltdb/v2: one bbolt file
)

// logCacheSize and logCacheBytes bound the recent entries kept in memory in
// front of the store, so replication to followers rarely reads the disk
// (Consul keeps 512 entries). 1 MiB holds the last 512 small commands, or the
// last five batches of 1,000 entries: what a follower a moment behind needs;
// one further behind reads the log store, which holds the rest in the page
// cache.
const (
	logCacheSize  = 512
	logCacheBytes = 1 << 20
)

// logStore is the opened log and stable store.
type logStore struct {
	logs   raft.LogStore // raw behind the cache
	raw    raft.LogStore
	stable raft.StableStore
	closer io.Closer
}

// openLogStore opens the chosen store under dir (DataDir/raft). It refuses to
// open one kind when the directory holds the other, because switching would
// silently start from an empty log. stored, when not nil, is told of every
// entry stored (see logCache).
func openLogStore(kind, dir string, segmentSize int, log hclog.Logger, stored func([]*raft.Log)) (*logStore, error) {
	walDir := filepath.Join(dir, "wal")
	boltPath := filepath.Join(dir, "raft.db")
	switch kind {
	case LogStoreWAL:
		if exists(boltPath) {
			return nil, fmt.Errorf("cluster: log store is %q but %s holds a boltdb log; migrate or keep log_store = %q", kind, boltPath, LogStoreBoltDB)
		}
		if err := os.MkdirAll(walDir, 0o700); err != nil {
			return nil, fmt.Errorf("cluster: %w", err)
		}
		if segmentSize <= 0 {
			segmentSize = raftwal.DefaultSegmentSize
		}
		// raft-wal v0.4.0's Close leaves its meta database open (and its file
		// lock held), so the node owns the meta store and closes it itself.
		meta := &metadb.BoltMetaDB{}
		w, err := raftwal.Open(walDir, raftwal.WithLogger(log.Named("wal")), raftwal.WithSegmentSize(segmentSize), raftwal.WithMetaStore(meta))
		if err != nil {
			meta.Close()
			return nil, fmt.Errorf("cluster: open wal: %w", err)
		}
		closer := closeFunc(func() error { return errors.Join(w.Close(), meta.Close()) })
		return &logStore{logs: newLogCache(w, logCacheSize, logCacheBytes, stored), raw: w, stable: w, closer: closer}, nil
	case LogStoreBoltDB:
		if exists(walDir) {
			return nil, fmt.Errorf("cluster: log store is %q but %s holds a wal log; migrate or keep log_store = %q", kind, walDir, LogStoreWAL)
		}
		b, err := raftboltdb.New(raftboltdb.Options{Path: boltPath, BoltOptions: &bbolt.Options{Timeout: time.Second}})
		if err != nil {
			return nil, fmt.Errorf("cluster: open boltdb: %w", err)
		}
		if err := os.Chmod(boltPath, 0o600); err != nil {
			b.Close()
			return nil, fmt.Errorf("cluster: %w", err)
		}
		return &logStore{logs: newLogCache(b, logCacheSize, logCacheBytes, stored), raw: b, stable: b, closer: b}, nil
	default:
		return nil, fmt.Errorf("cluster: unknown log store %q (want %q or %q)", kind, LogStoreWAL, LogStoreBoltDB)
	}
}

type closeFunc func() error

func (f closeFunc) Close() error { return f() }

func exists(path string) bool {
	_, err := os.Stat(path)
	return !errors.Is(err, os.ErrNotExist)
}
