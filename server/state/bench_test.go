package state_test

import (
	"bytes"
	"fmt"
	"io"
	"runtime"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/state"
)

// benchLogs returns n entries as Raft log entries of batch creates, size
// entries each: Kubernetes-style workloads under 100 agents, three selectors.
func benchLogs(b *testing.B, n, size int) []*raft.Log {
	b.Helper()
	var logs []*raft.Log
	now := time.Unix(1_700_000_000, 0).UnixNano()
	for first := 0; first < n; first += size {
		var es []*ferrypb.Entry
		for i := first; i < min(n, first+size); i++ {
			es = append(es, &ferrypb.Entry{
				Id:       fmt.Sprintf("bench-%07d", i),
				SpiffeId: fmt.Sprintf("spiffe://example.org/ns/bench/sa/workload-%07d", i),
				ParentId: fmt.Sprintf("spiffe://example.org/spire/agent/k8s/node-%03d", i%100),
				Selectors: []*ferrypb.Selector{
					{Type: "k8s", Value: "ns:bench"},
					{Type: "k8s", Value: fmt.Sprintf("sa:workload-%07d", i)},
					{Type: "unix", Value: "uid:1000"},
				},
				X509SvidTtl: 3600,
			})
		}
		data, err := state.EncodeCommand(&ferrypb.Command{
			RequestId: fmt.Sprintf("req-%d", first), TimeUnixNano: now,
			Op: &ferrypb.Command_EntriesCreate{EntriesCreate: &ferrypb.EntriesCreate{Entries: es}},
		})
		if err != nil {
			b.Fatal(err)
		}
		logs = append(logs, &raft.Log{Index: uint64(len(logs) + 1), Term: 1, Type: raft.LogCommand, Data: data})
	}
	return logs
}

// BenchmarkStateLoad compares the two ways a restarted server gets its state
// back, for 100,000 entries: replaying the log (batch creates of 1,000
// entries) and restoring a snapshot; and what writing that snapshot costs.
//
//	go test -run '^$' -bench StateLoad -benchtime 3x ./server/state/
func BenchmarkStateLoad(b *testing.B) {
	const n = 100000
	logs := benchLogs(b, n, 1000)
	var logBytes int
	for _, l := range logs {
		logBytes += len(l.Data)
	}
	src, err := state.New(state.Config{})
	if err != nil {
		b.Fatal(err)
	}
	src.ApplyBatch(logs)
	var snap bytes.Buffer
	if err := src.WriteSnapshot(&snap); err != nil {
		b.Fatal(err)
	}
	b.Run("replay", func(b *testing.B) {
		for b.Loop() {
			s, err := state.New(state.Config{})
			if err != nil {
				b.Fatal(err)
			}
			for _, l := range logs {
				s.Apply(l)
			}
			if got := s.View().CountEntries(); got != n {
				b.Fatalf("%d entries", got)
			}
		}
		b.ReportMetric(float64(logBytes)/(1<<20), "log-MiB")
	})
	b.Run("restore", func(b *testing.B) {
		for b.Loop() {
			s, err := state.New(state.Config{})
			if err != nil {
				b.Fatal(err)
			}
			if err := s.Restore(io.NopCloser(bytes.NewReader(snap.Bytes()))); err != nil {
				b.Fatal(err)
			}
			if got := s.View().CountEntries(); got != n {
				b.Fatalf("%d entries", got)
			}
		}
		b.ReportMetric(float64(snap.Len())/(1<<20), "snapshot-MiB")
	})
	b.Run("write", func(b *testing.B) {
		for b.Loop() {
			if err := src.WriteSnapshot(io.Discard); err != nil {
				b.Fatal(err)
			}
		}
	})
	runtime.KeepAlive(src)
}

// BenchmarkStateHeap reports the live heap a store holds per entry, for
// 100,000 entries restored from a snapshot (what a restarted server holds)
// and applied from the log (plus the change feed's window and the requests
// table of the last 15 minutes).
//
//	go test -run '^$' -bench StateHeap -benchtime 1x ./server/state/
func BenchmarkStateHeap(b *testing.B) {
	const n = 100000
	logs := benchLogs(b, n, 1000)
	src, err := state.New(state.Config{})
	if err != nil {
		b.Fatal(err)
	}
	src.ApplyBatch(logs)
	var snap bytes.Buffer
	if err := src.WriteSnapshot(&snap); err != nil {
		b.Fatal(err)
	}
	src = nil
	logs = logs[:0:0]
	heap := func() int64 {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return int64(m.HeapAlloc)
	}
	for b.Loop() {
		base := heap()
		s, err := state.New(state.Config{})
		if err != nil {
			b.Fatal(err)
		}
		if err := s.Restore(io.NopCloser(bytes.NewReader(snap.Bytes()))); err != nil {
			b.Fatal(err)
		}
		restored := heap() - base
		runtime.KeepAlive(s)
		s = nil
		base = heap()
		s, err = state.New(state.Config{})
		if err != nil {
			b.Fatal(err)
		}
		for _, l := range benchLogs(b, n, 1000) {
			s.Apply(l)
		}
		applied := heap() - base
		runtime.KeepAlive(s)
		b.ReportMetric(float64(restored)/n, "restored-B/entry")
		b.ReportMetric(float64(applied)/n, "applied-B/entry")
	}
}
