package workloadapi

import (
	"context"

	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

// health is the standard gRPC health service on the Workload API socket (as
// SPIRE's agent has it), for `ferry agent healthcheck` and gRPC probes:
// SERVING while Config.Health reports nothing wrong. Calls carry the
// Workload API's security header like any other.
type health struct{ check func() error }

func (h health) Check(_ context.Context, req *healthpb.HealthCheckRequest) (*healthpb.HealthCheckResponse, error) {
	if req.Service != "" {
		return nil, status.Errorf(codes.NotFound, "unknown service %q (ask for \"\")", req.Service)
	}
	if err := h.check(); err != nil {
		return &healthpb.HealthCheckResponse{Status: healthpb.HealthCheckResponse_NOT_SERVING}, nil
	}
	return &healthpb.HealthCheckResponse{Status: healthpb.HealthCheckResponse_SERVING}, nil
}

func (health) List(context.Context, *healthpb.HealthListRequest) (*healthpb.HealthListResponse, error) {
	return nil, status.Error(codes.Unimplemented, "List is not served; Check the empty service name")
}

func (health) Watch(*healthpb.HealthCheckRequest, healthpb.Health_WatchServer) error {
	return status.Error(codes.Unimplemented, "Watch is not served; use Check")
}
