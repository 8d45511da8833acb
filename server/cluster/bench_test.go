package cluster_test

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ferry-id/ferry/server/cluster"
)

// BenchmarkApply measures committed writes per second (1 KiB commands) on
// one- and three-node clusters over real mutual TLS on loopback, for both log
// stores, at concurrency 1, 16 and 64, with production timing defaults.
// "leader" submits on the leader; "follower" submits on a follower, which
// forwards over the shared gRPC connection.
//
//	go test -run '^$' -bench BenchmarkApply -benchtime 2s ./server/cluster/
func BenchmarkApply(b *testing.B) {
	for _, store := range []string{cluster.LogStoreWAL, cluster.LogStoreBoltDB} {
		for _, size := range []int{1, 3} {
			b.Run(fmt.Sprintf("store=%s/nodes=%d", store, size), func(b *testing.B) {
				nodes, _ := startCluster(b, size, func(c *cluster.Config) {
					c.LogStore = store
					c.WALSegmentSize = 0
					c.HeartbeatTimeout, c.ElectionTimeout, c.LeaderLeaseTimeout, c.CommitTimeout = 0, 0, 0, 0
					c.Logger = newTestLogger(b, slog.LevelError)
				})
				leader := waitLeader(b, nodes)
				targets := []struct {
					name string
					node *testNode
				}{{"leader", leader}}
				if size > 1 {
					targets = append(targets, struct {
						name string
						node *testNode
					}{"follower", followers(nodes, leader)[0]})
				}
				for _, tg := range targets {
					for _, conc := range []int{1, 16, 64} {
						if tg.name == "follower" && conc != 64 {
							continue
						}
						b.Run(fmt.Sprintf("via=%s/c=%d", tg.name, conc), func(b *testing.B) {
							benchApply(b, tg.node, conc)
						})
					}
				}
			})
		}
	}
}

func benchApply(b *testing.B, node *testNode, conc int) {
	lat := make([]time.Duration, b.N)
	var next atomic.Int64
	var wg sync.WaitGroup
	ctx := context.Background()
	b.ResetTimer()
	start := time.Now()
	for w := 0; w < conc; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= b.N {
					return
				}
				t0 := time.Now()
				if _, err := node.Apply(ctx, entryCommand(fmt.Sprintf("b%d", i), 1024)); err != nil {
					b.Error(err)
					return
				}
				lat[i] = time.Since(t0)
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	slices.Sort(lat)
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "writes/s")
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-ms")
}
