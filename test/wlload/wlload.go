// Package wlload drives a SPIFFE Workload API endpoint with go-spiffe's
// client, so that a benchmark can measure calls/s, latency and the clients'
// CPU: FetchX509SVID or FetchJWTSVID calls from conc goroutines, each with one
// client for all its calls (mode "reused") or a new client per call (mode
// "new"). Command cmd/wlload runs it in a process of its own, so that the
// agent's cost can be told from its clients'.
package wlload

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// Result is what a run measured; cmd/wlload prints it as JSON.
type Result struct {
	Calls   int     `json:"calls"`
	Seconds float64 `json:"seconds"`
	P50us   int64   `json:"p50_us"`
	P99us   int64   `json:"p99_us"`
	CPUus   int64   `json:"cpu_us"`
	Error   string  `json:"error,omitempty"`
}

// Run makes calls for d and returns what they measured. call is "x509" or
// "jwt"; audience is the JWT-SVIDs' audience.
func Run(addr, call, mode string, conc int, d time.Duration, audience string) Result {
	opt := workloadapi.WithAddr(addr)
	params := jwtsvid.Params{Audience: audience}
	once := func(ctx context.Context, c *workloadapi.Client) error {
		var err error
		switch {
		case c != nil && call == "x509":
			_, err = c.FetchX509SVID(ctx)
		case c != nil:
			_, err = c.FetchJWTSVID(ctx, params)
		case call == "x509":
			_, err = workloadapi.FetchX509SVID(ctx, opt)
		default:
			_, err = workloadapi.FetchJWTSVID(ctx, params, opt)
		}
		return err
	}

	ctx := context.Background()
	clients := make([]*workloadapi.Client, conc)
	if mode == "reused" {
		for i := range clients {
			c, err := workloadapi.New(ctx, opt)
			if err != nil {
				return Result{Error: err.Error()}
			}
			defer c.Close()
			// Connect before measuring.
			if err := once(ctx, c); err != nil {
				return Result{Error: err.Error()}
			}
			clients[i] = c
		}
	}
	lats := make([][]time.Duration, conc)
	var (
		wg       sync.WaitGroup
		errMu    sync.Mutex
		firstErr error
	)
	cpu0 := cpuTime()
	start := time.Now()
	stop := start.Add(d)
	for g := range conc {
		wg.Go(func() {
			for time.Now().Before(stop) {
				cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
				t0 := time.Now()
				err := once(cctx, clients[g])
				lat := time.Since(t0)
				cancel()
				if err != nil {
					errMu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					errMu.Unlock()
					return
				}
				lats[g] = append(lats[g], lat)
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	res := Result{Seconds: elapsed.Seconds(), CPUus: (cpuTime() - cpu0).Microseconds()}
	if firstErr != nil {
		res.Error = fmt.Sprint(firstErr)
	}
	all := slices.Concat(lats...)
	slices.Sort(all)
	res.Calls = len(all)
	if len(all) > 0 {
		res.P50us = all[len(all)*50/100].Microseconds()
		res.P99us = all[min(len(all)-1, len(all)*99/100)].Microseconds()
	}
	return res
}

// cpuTime is the user and system CPU time this process has used.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
