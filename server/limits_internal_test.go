package server

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestLimiterShedsOverCapacity(t *testing.T) {
	l := newLimiter(2, 50*time.Millisecond)
	info := &grpc.UnaryServerInfo{FullMethod: "/ferry.v1.Admin/BatchCreateEntry"}
	release := make(chan struct{})
	entered := make(chan struct{}, 2)
	blocked := func(context.Context, any) (any, error) {
		entered <- struct{}{}
		<-release
		return "done", nil
	}
	results := make(chan error, 2)
	for range 2 {
		go func() {
			_, err := l.unary(context.Background(), nil, info, blocked)
			results <- err
		}()
	}
	<-entered
	<-entered

	// Both slots are taken: the third call waits its turn, then is refused.
	start := time.Now()
	_, err := l.unary(context.Background(), nil, info, func(context.Context, any) (any, error) {
		t.Error("handler ran over the limit")
		return nil, nil
	})
	require.Equal(t, codes.ResourceExhausted, status.Code(err), "%v", err)
	require.Contains(t, status.Convert(err).Message(), "overloaded")
	require.GreaterOrEqual(t, time.Since(start), 50*time.Millisecond)

	// A caller that gives up while waiting gets its own context's error.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err = l.unary(ctx, nil, info, nil)
	require.Equal(t, codes.Canceled, status.Code(err))

	// A slot freed while a caller waits is handed to it.
	l.wait = time.Minute
	got := make(chan any, 1)
	go func() {
		resp, err := l.unary(context.Background(), nil, info, func(context.Context, any) (any, error) { return "admitted", nil })
		require.NoError(t, err)
		got <- resp
	}()
	time.Sleep(10 * time.Millisecond)
	release <- struct{}{}
	require.Equal(t, "admitted", <-got)
	close(release)
	require.NoError(t, <-results)
	require.NoError(t, <-results)
	require.Len(t, l.slots, 0, "every slot returned")
}
