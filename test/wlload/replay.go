package wlload

import (
	"context"
	"fmt"
	"net"

	workloadpb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
)

// Replayer is a Workload API server that does nothing but answer
// FetchX509SVID and FetchJWTSVID with responses recorded from a real
// endpoint: no attestation, no cache, no log. Driven like the real endpoint,
// it shows what the clients alone can do on the machine: the ceiling of any
// Workload API server for them.
type Replayer struct {
	workloadpb.UnimplementedSpiffeWorkloadAPIServer
	x509 *workloadpb.X509SVIDResponse
	jwt  *workloadpb.JWTSVIDResponse
}

// Record fetches one X509-SVID response and one JWT-SVID response for
// audience from the endpoint at addr.
func Record(ctx context.Context, addr, audience string) (*Replayer, error) {
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	defer cc.Close()
	api := workloadpb.NewSpiffeWorkloadAPIClient(cc)
	ctx, cancel := context.WithCancel(metadata.AppendToOutgoingContext(ctx, "workload.spiffe.io", "true"))
	defer cancel()
	stream, err := api.FetchX509SVID(ctx, &workloadpb.X509SVIDRequest{})
	if err != nil {
		return nil, fmt.Errorf("record FetchX509SVID: %w", err)
	}
	x, err := stream.Recv()
	if err != nil {
		return nil, fmt.Errorf("record FetchX509SVID: %w", err)
	}
	j, err := api.FetchJWTSVID(ctx, &workloadpb.JWTSVIDRequest{Audience: []string{audience}})
	if err != nil {
		return nil, fmt.Errorf("record FetchJWTSVID: %w", err)
	}
	return &Replayer{x509: x, jwt: j}, nil
}

// Serve answers on l until it fails, with grpc-go's server and the
// transport settings the agent serves with.
func (r *Replayer) Serve(l net.Listener) error {
	srv := grpc.NewServer(grpc.ReadBufferSize(4<<10), grpc.SharedWriteBuffer(true),
		grpc.InitialWindowSize(64<<10), grpc.InitialConnWindowSize(64<<10), grpc.NumStreamWorkers(4))
	workloadpb.RegisterSpiffeWorkloadAPIServer(srv, r)
	return srv.Serve(l)
}

// FetchX509SVID sends the recorded response and holds the stream open, as
// a Workload API server does.
func (r *Replayer) FetchX509SVID(_ *workloadpb.X509SVIDRequest, stream workloadpb.SpiffeWorkloadAPI_FetchX509SVIDServer) error {
	if err := stream.Send(r.x509); err != nil {
		return err
	}
	<-stream.Context().Done()
	return nil
}

// FetchJWTSVID returns the recorded response.
func (r *Replayer) FetchJWTSVID(context.Context, *workloadpb.JWTSVIDRequest) (*workloadpb.JWTSVIDResponse, error) {
	return r.jwt, nil
}
