// Package wlload drives a SPIFFE Workload API endpoint, so that a benchmark
// can measure calls/s, latency and the clients' CPU: FetchX509SVID or
// FetchJWTSVID calls from conc goroutines, each with one client for all its
// calls (mode "reused") or a new client per call (mode "new").
//
// Two clients: "go-spiffe" is go-spiffe's workloadapi.Client, what workloads
// run, which parses every certificate and key it receives; "grpc" is a bare
// gRPC client of go-spiffe's generated SpiffeWorkloadAPI stubs, which checks
// that a response came and parses nothing, so the figures tell more of the
// endpoint and less of its clients. Command cmd/wlload runs it in a process of
// its own, so that the agent's cost can be told from its clients', and can be
// pointed at any Workload API endpoint.
package wlload

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	workloadpb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
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

// Clients are the clients Run can drive.
var Clients = []string{"go-spiffe", "grpc"}

// client makes calls over one connection.
type client interface {
	call(ctx context.Context) error
	Close() error
}

// Run makes calls for d and returns what they measured. call is "x509" or
// "jwt"; audience is the JWT-SVIDs' audience; kind is one of Clients.
func Run(addr, kind, call, mode string, conc int, d time.Duration, audience string) Result {
	dial := func(ctx context.Context) (client, error) {
		if kind == "grpc" {
			return dialGRPC(addr, call, audience)
		}
		return dialGoSPIFFE(ctx, addr, call, audience)
	}
	if !slices.Contains(Clients, kind) {
		return Result{Error: fmt.Sprintf("unknown client %q", kind)}
	}
	once := func(ctx context.Context, c client) error {
		if c != nil {
			return c.call(ctx)
		}
		c, err := dial(ctx)
		if err != nil {
			return err
		}
		defer c.Close()
		return c.call(ctx)
	}

	ctx := context.Background()
	clients := make([]client, conc)
	if mode == "reused" {
		for i := range clients {
			c, err := dial(ctx)
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

// goSPIFFE is go-spiffe's client.
type goSPIFFE struct {
	*workloadapi.Client
	x509   bool
	params jwtsvid.Params
}

func dialGoSPIFFE(ctx context.Context, addr, call, audience string) (client, error) {
	c, err := workloadapi.New(ctx, workloadapi.WithAddr(addr))
	if err != nil {
		return nil, err
	}
	return &goSPIFFE{Client: c, x509: call == "x509", params: jwtsvid.Params{Audience: audience}}, nil
}

func (c *goSPIFFE) call(ctx context.Context) error {
	var err error
	if c.x509 {
		_, err = c.FetchX509SVID(ctx)
	} else {
		_, err = c.FetchJWTSVID(ctx, c.params)
	}
	return err
}

// bareGRPC is a gRPC client of the generated stubs. Like go-spiffe's client,
// it reads the first message of a FetchX509SVID stream and then cancels it.
type bareGRPC struct {
	cc   *grpc.ClientConn
	api  workloadpb.SpiffeWorkloadAPIClient
	x509 bool
	aud  []string
}

func dialGRPC(addr, call, audience string) (client, error) {
	if !strings.HasPrefix(addr, "unix://") {
		return nil, fmt.Errorf("address %q: want unix:///path", addr)
	}
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	return &bareGRPC{cc: cc, api: workloadpb.NewSpiffeWorkloadAPIClient(cc), x509: call == "x509", aud: []string{audience}}, nil
}

func (c *bareGRPC) call(ctx context.Context) error {
	ctx, cancel := context.WithCancel(metadata.AppendToOutgoingContext(ctx, "workload.spiffe.io", "true"))
	defer cancel()
	if !c.x509 {
		resp, err := c.api.FetchJWTSVID(ctx, &workloadpb.JWTSVIDRequest{Audience: c.aud})
		if err == nil && len(resp.GetSvids()) == 0 {
			err = errors.New("FetchJWTSVID: no SVID in response")
		}
		return err
	}
	stream, err := c.api.FetchX509SVID(ctx, &workloadpb.X509SVIDRequest{})
	if err != nil {
		return err
	}
	resp, err := stream.Recv()
	if err == nil && len(resp.GetSvids()) == 0 {
		err = errors.New("FetchX509SVID: no SVID in response")
	}
	return err
}

func (c *bareGRPC) Close() error { return c.cc.Close() }
