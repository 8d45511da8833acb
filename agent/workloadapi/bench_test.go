package workloadapi_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"

	ferrywl "github.com/ferry-id/ferry/agent/workloadapi"
)

// The benchmarks drive the real server over its unix socket with the
// unmodified go-spiffe client, the real unix attestor and the in-test cache,
// logging every call (JSON, discarded). Each reports calls/s and the p99
// latency of one call. "reused" gives every concurrent caller one client for
// all its calls; "new" dials, calls and closes a client per call.
//
//	go test -run '^$' -bench . -benchtime 3s ./agent/workloadapi/

func BenchmarkFetchX509SVID(b *testing.B) {
	benchCalls(b, func(ctx context.Context, c *workloadapi.Client) error {
		_, err := c.FetchX509SVID(ctx)
		return err
	})
}

func BenchmarkFetchJWTSVID(b *testing.B) {
	benchCalls(b, func(ctx context.Context, c *workloadapi.Client) error {
		_, err := c.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "api://AzureADTokenExchange"})
		return err
	})
}

func benchCalls(b *testing.B, call func(context.Context, *workloadapi.Client) error) {
	for _, mode := range []string{"reused", "new"} {
		for _, conc := range []int{1, 16} {
			b.Run(fmt.Sprintf("%s/c=%d", mode, conc), func(b *testing.B) {
				f := startServer(b, func(c *ferrywl.Config) {
					c.Log = slog.New(slog.NewJSONHandler(io.Discard, nil))
				})
				ctx := context.Background()
				clients := make([]*workloadapi.Client, conc)
				if mode == "reused" {
					for i := range clients {
						c, err := workloadapi.New(ctx, clientOpt(f))
						if err != nil {
							b.Fatal(err)
						}
						defer c.Close()
						// Warm the connection so dialing is not measured.
						if err := call(ctx, c); err != nil {
							b.Fatal(err)
						}
						clients[i] = c
					}
				}
				measure(b, conc, func(w int) error {
					if mode == "reused" {
						return call(ctx, clients[w])
					}
					c, err := workloadapi.New(ctx, clientOpt(f))
					if err != nil {
						return err
					}
					defer c.Close()
					return call(ctx, c)
				})
			})
		}
	}
}

// measure runs b.N calls over conc workers and reports throughput and p99.
func measure(b *testing.B, conc int, call func(worker int) error) {
	lat := make([][]time.Duration, conc)
	var next atomic.Int64
	var wg sync.WaitGroup
	b.ResetTimer()
	start := time.Now()
	for w := range conc {
		wg.Go(func() {
			for next.Add(1) <= int64(b.N) {
				t0 := time.Now()
				if err := call(w); err != nil {
					b.Error(err)
					return
				}
				lat[w] = append(lat[w], time.Since(t0))
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	all := slices.Concat(lat...)
	if len(all) == 0 {
		return
	}
	slices.Sort(all)
	p99 := all[min(len(all)-1, len(all)*99/100)]
	b.ReportMetric(float64(len(all))/elapsed.Seconds(), "calls/s")
	b.ReportMetric(float64(p99.Microseconds()), "p99-µs")
}
