// Package grpchealth serves the standard gRPC health service
// (grpc.health.v1.Health) from one readiness function, as SPIRE's server and
// agent sockets do: `ferry server healthcheck`, `ferry agent healthcheck` and
// any gRPC probe ask it.
package grpchealth

import (
	"context"

	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

// Server answers Check for the empty service name: SERVING while ready
// returns nil, NOT_SERVING otherwise. List and Watch are not served.
type Server struct {
	healthpb.UnimplementedHealthServer
	ready func() error
}

var _ healthpb.HealthServer = (*Server)(nil)

// New returns the service for ready, which must be safe for concurrent use.
func New(ready func() error) *Server { return &Server{ready: ready} }

// Check reports whether the process is ready.
func (s *Server) Check(_ context.Context, req *healthpb.HealthCheckRequest) (*healthpb.HealthCheckResponse, error) {
	if req.Service != "" {
		return nil, status.Errorf(codes.NotFound, "unknown service %q (ask for \"\")", req.Service)
	}
	if s.ready() != nil {
		return &healthpb.HealthCheckResponse{Status: healthpb.HealthCheckResponse_NOT_SERVING}, nil
	}
	return &healthpb.HealthCheckResponse{Status: healthpb.HealthCheckResponse_SERVING}, nil
}
