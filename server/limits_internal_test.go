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
	l := newLimiter(2, time.Hour)
	// The test owns the clock: a waiting call is refused only when the
	// test says its wait has expired.
	expire := make(chan time.Time)
	l.after = func(d time.Duration) <-chan time.Time {
		require.Equal(t, time.Hour, d)
		return expire
	}
	waiting := make(chan struct{}, 1)
	l.waiting = func() { waiting <- struct{}{} }

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

	// Both slots are taken: the third call waits its turn (it has not
	// returned when its wait starts), then is refused once the wait expires.
	third := make(chan error, 1)
	go func() {
		_, err := l.unary(context.Background(), nil, info, func(context.Context, any) (any, error) {
			t.Error("handler ran over the limit")
			return nil, nil
		})
		third <- err
	}()
	<-waiting
	select {
	case err := <-third:
		t.Fatalf("refused before its wait expired: %v", err)
	default:
	}
	expire <- time.Time{}
	err := <-third
	require.Equal(t, codes.ResourceExhausted, status.Code(err), "%v", err)
	require.Contains(t, status.Convert(err).Message(), "overloaded")

	// A caller that gives up while waiting gets its own context's error.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err = l.unary(ctx, nil, info, nil)
	require.Equal(t, codes.Canceled, status.Code(err))
	<-waiting

	// A slot freed while a caller waits is handed to it.
	got := make(chan any, 1)
	go func() {
		resp, err := l.unary(context.Background(), nil, info, func(context.Context, any) (any, error) { return "admitted", nil })
		require.NoError(t, err)
		got <- resp
	}()
	<-waiting
	release <- struct{}{}
	require.Equal(t, "admitted", <-got)
	close(release)
	require.NoError(t, <-results)
	require.NoError(t, <-results)
	require.Len(t, l.slots, 0, "every slot returned")
}
