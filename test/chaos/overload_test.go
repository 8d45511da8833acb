package chaos_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/test/testcluster"
)

// rssKiB reads VmRSS of a process, in KiB.
func rssKiB(pid int) (int64, error) {
	b, err := testcluster.ProcRSS(pid)
	return b >> 10, err
}

// samplePeakRSS samples the RSS of the given processes (name -> PID) every
// 50 ms until stop is called; peak returns the highest seen, in KiB.
func samplePeakRSS(pids map[string]int) (peak func() map[string]int64, stop func()) {
	var mu sync.Mutex
	peaks := map[string]int64{}
	done := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			for id, pid := range pids {
				if rss, err := rssKiB(pid); err == nil {
					mu.Lock()
					peaks[id] = max(peaks[id], rss)
					mu.Unlock()
				}
			}
			select {
			case <-done:
				return
			case <-time.After(50 * time.Millisecond):
			}
		}
	}()
	peak = func() map[string]int64 {
		mu.Lock()
		defer mu.Unlock()
		out := make(map[string]int64, len(peaks))
		for k, v := range peaks {
			out[k] = v
		}
		return out
	}
	var once sync.Once
	stop = func() { once.Do(func() { close(done); <-sampled }) }
	return peak, stop
}

// TestOverloadSheds sends 10,000 writes at once to one follower (as agents
// and operators reconnecting after a partition heals would). The node must
// refuse what it cannot take with ResourceExhausted and a clear message, keep
// serving, keep its memory bounded, and every write a client retries after
// being shed must land, once.
func TestOverloadSheds(t *testing.T) {
	if testing.Short() {
		t.Skip("starts real server processes")
	}
	const storm, conns = 10000, 20
	c := testcluster.New(t, testcluster.Options{Nodes: 3, LogLevel: "warn"})
	leader := c.WaitLeader(30*time.Second, nil)
	var target *testcluster.Node
	for _, n := range c.Nodes {
		if n != leader {
			target = n
			break
		}
	}
	pids := map[string]int{}
	before := map[string]int64{}
	for _, n := range c.Nodes {
		pids[n.ID] = n.PID()
		rss, err := rssKiB(n.PID())
		require.NoError(t, err)
		before[n.ID] = rss
	}

	peak, stopSampling := samplePeakRSS(pids)

	// Many client connections, as many clients would open.
	clients := make([]ferrypb.AdminClient, conns)
	for i := range clients {
		// A call waits for its connection rather than failing at once when
		// the first connect is slow (a loaded machine can take longer than
		// gRPC's 20 s connect timeout to finish a handshake): the test is
		// about the calls the server sheds, not about connects.
		cc, err := grpc.NewClient("unix://"+target.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithDefaultCallOptions(grpc.WaitForReady(true)))
		require.NoError(t, err)
		defer cc.Close()
		clients[i] = ferrypb.NewAdminClient(cc)
	}

	var (
		firstOK, firstShed, retries atomic.Int64
		otherMu                     sync.Mutex
		other                       = map[string]int{}
		shedMessage                 atomic.Value
	)
	indexes := make([]uint64, storm)
	release := make(chan struct{})
	var wg sync.WaitGroup
	began := time.Now()
	for i := range storm {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id := fmt.Sprintf("storm-%05d", i)
			req := &ferrypb.BatchCreateEntryRequest{Entries: []*ferrypb.Entry{entryFor(id)}, RequestId: requestID(id)}
			cl := clients[i%conns]
			<-release
			for attempt := 0; ; attempt++ {
				ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
				resp, err := cl.BatchCreateEntry(ctx, req)
				cancel()
				code := status.Code(err)
				if err == nil && codes.Code(resp.Results[0].GetCode()) != codes.OK {
					code = codes.Code(resp.Results[0].GetCode())
				}
				switch {
				case code == codes.OK:
					if attempt == 0 {
						firstOK.Add(1)
					}
					indexes[i] = resp.Index
					return
				case code == codes.ResourceExhausted:
					if attempt == 0 {
						firstShed.Add(1)
						shedMessage.Store(status.Convert(err).Message())
					}
					retries.Add(1)
					// Back off with jitter, as a well-behaved client does.
					time.Sleep(time.Duration(100+rand.IntN(400)) * time.Millisecond)
				default:
					otherMu.Lock()
					other[fmt.Sprintf("%s: %v", code, err)]++
					otherMu.Unlock()
					return
				}
			}
		}()
	}
	close(release)
	wg.Wait()
	drained := time.Since(began)
	stopSampling()

	t.Logf("storm of %d writes on %s: %d taken at once, %d shed on first try (%d retries in all), all acknowledged after %s", storm, target.ID, firstOK.Load(), firstShed.Load(), retries.Load(), drained.Round(time.Millisecond))
	require.Empty(t, other, "the only refusal is ResourceExhausted")
	require.Positive(t, firstShed.Load(), "a storm of %d must be shed in part", storm)
	require.Positive(t, firstOK.Load())
	msg, _ := shedMessage.Load().(string)
	require.Contains(t, msg, "overloaded", "the refusal says why")

	// Still the same processes, still serving.
	for _, n := range c.Nodes {
		require.Equal(t, pids[n.ID], n.PID())
		require.NoError(t, syscall.Kill(n.PID(), 0), "node %s died", n.ID)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cnt, err := target.Admin().CountEntries(ctx, &ferrypb.CountEntriesRequest{Consistency: ferrypb.ReadConsistency_READ_LINEARIZABLE})
	require.NoError(t, err)
	require.EqualValues(t, storm, cnt.Count, "every write landed once")
	var maxIndex uint64
	for _, idx := range indexes {
		maxIndex = max(maxIndex, idx)
	}
	c.WaitApplied(maxIndex, 30*time.Second)
	for _, n := range c.Nodes {
		entries, err := listEntries(n)
		require.NoError(t, err)
		require.Len(t, entries, storm, "node %s", n.ID)
		for i, idx := range indexes {
			e := entries[fmt.Sprintf("storm-%05d", i)]
			require.NotNil(t, e, "node %s misses storm-%05d", n.ID, i)
			require.Equal(t, idx, e.CreatedIndex)
		}
	}

	// Memory stays bounded: no server's RSS passes 512 MiB under the storm
	// (the heap may grow to twice what is live before a collection).
	const boundKiB = 512 << 10
	for _, n := range c.Nodes {
		after, err := rssKiB(n.PID())
		require.NoError(t, err)
		t.Logf("node %s RSS: %d MiB before, %d MiB peak, %d MiB after", n.ID, before[n.ID]>>10, peak()[n.ID]>>10, after>>10)
		fmt.Printf("overload: node %s RSS %d MiB before, %d MiB peak, %d MiB after\n", n.ID, before[n.ID]>>10, peak()[n.ID]>>10, after>>10)
		require.Less(t, peak()[n.ID], int64(boundKiB), "node %s RSS in KiB", n.ID)
	}
	fmt.Printf("overload: %d writes at once on one follower: %d taken, %d shed with ResourceExhausted (%q), %d retries, all %d acknowledged once after %s\n",
		storm, firstOK.Load(), firstShed.Load(), msg, retries.Load(), storm, drained.Round(time.Millisecond))
}
