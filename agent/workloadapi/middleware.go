package workloadapi

import (
	"context"
	"log/slog"
	"path"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// securityHeader is the metadata key every Workload API request must carry
// with the single value "true" (SPIFFE Workload Endpoint §3).
const securityHeader = "workload.spiffe.io"

// checkSecurityHeader rejects requests without exactly one
// `workload.spiffe.io: true`, with SPIRE's message.
func checkSecurityHeader(ctx context.Context) error {
	md, ok := metadata.FromIncomingContext(ctx)
	if v := md.Get(securityHeader); !ok || len(v) != 1 || v[0] != "true" {
		return status.Error(codes.InvalidArgument, "security header missing from request")
	}
	return nil
}

func (s *Server) unaryInterceptor(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	start := time.Now()
	err := checkSecurityHeader(ctx)
	var resp any
	if err == nil {
		resp, err = handler(ctx, req)
	}
	if shed := shedErr(ctx); shed != nil {
		resp, err = nil, shed
	}
	s.logCall(ctx, info.FullMethod, start, err, -1)
	return resp, err
}

func (s *Server) streamInterceptor(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	start := time.Now()
	counted := &countingStream{ServerStream: ss}
	err := checkSecurityHeader(ss.Context())
	if err == nil {
		err = handler(srv, counted)
	}
	if shed := shedErr(ss.Context()); shed != nil {
		err = shed
	}
	s.logCall(ss.Context(), info.FullMethod, start, err, counted.sent.Load())
	return err
}

// logCall writes the one line each call gets: at Debug for a call served
// or canceled by its client (as SPIRE logs issuance; a busy node makes
// thousands a second), at Info for a refusal, at Warn when the agent failed.
// Lines at Info and above are limited per caller's uid (callerLog), so that
// no caller can flood the log. Messages are never logged: responses carry
// keys and tokens. Error texts are produced by this package and carry
// neither.
func (s *Server) logCall(ctx context.Context, fullMethod string, start time.Time, err error, sent int64) {
	st := status.Convert(err)
	level := slog.LevelInfo
	switch st.Code() {
	case codes.OK, codes.Canceled:
		level = slog.LevelDebug
	case codes.Unavailable, codes.Internal, codes.Unknown, codes.DataLoss:
		level = slog.LevelWarn
	}
	if !s.log.Enabled(ctx, level) {
		return
	}
	attrs := make([]slog.Attr, 0, 8)
	attrs = append(attrs, slog.String("method", path.Base(fullMethod)))
	c, ok := callerFrom(ctx)
	if ok {
		attrs = append(attrs, slog.Int("pid", int(c.PID)), slog.Uint64("uid", uint64(c.UID)))
	}
	attrs = append(attrs, slog.String("code", st.Code().String()), slog.Duration("duration", time.Since(start)))
	if sent >= 0 {
		attrs = append(attrs, slog.Int64("sent", sent))
	}
	if err != nil {
		attrs = append(attrs, slog.String("error", st.Message()))
	}
	s.callerLog.Log(ctx, level, "uid", uint64(c.UID), "workload API call", attrs...)
}

// countingStream counts the messages a stream sends, for the call's log line.
type countingStream struct {
	grpc.ServerStream
	sent atomic.Int64
}

func (c *countingStream) SendMsg(m any) error {
	err := c.ServerStream.SendMsg(m)
	if err == nil {
		c.sent.Add(1)
	}
	return err
}
