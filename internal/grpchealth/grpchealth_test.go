package grpchealth_test

import (
	"context"
	"errors"
	"testing"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/ferry-id/ferry/internal/grpchealth"
)

func TestCheck(t *testing.T) {
	var err error
	s := grpchealth.New(func() error { return err })
	resp, cerr := s.Check(context.Background(), &healthpb.HealthCheckRequest{})
	require.NoError(t, cerr)
	require.Equal(t, healthpb.HealthCheckResponse_SERVING, resp.Status)

	err = errors.New("starting")
	resp, cerr = s.Check(context.Background(), &healthpb.HealthCheckRequest{})
	require.NoError(t, cerr)
	require.Equal(t, healthpb.HealthCheckResponse_NOT_SERVING, resp.Status)

	_, cerr = s.Check(context.Background(), &healthpb.HealthCheckRequest{Service: "x"})
	require.Equal(t, codes.NotFound, status.Code(cerr))
}
