package server

import (
	"context"
	"crypto/tls"
	"errors"
	"net"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/ferry-id/ferry/server/state"
)

// adminCreds lets one gRPC server answer on the admin unix socket without TLS
// (the socket's file mode is the guard) and on admin_addr with mutual TLS.
type adminCreds struct{ tls *svidTLS }

// localAuth marks a connection that came through the unix socket.
type localAuth struct{ credentials.CommonAuthInfo }

func (localAuth) AuthType() string { return "local" }

func (c adminCreds) ServerHandshake(conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	if conn.LocalAddr().Network() == "unix" {
		return conn, localAuth{credentials.CommonAuthInfo{SecurityLevel: credentials.PrivacyAndIntegrity}}, nil
	}
	cfg := c.tls.config()
	tc := tls.Server(conn, &tls.Config{
		MinVersion: tls.VersionTLS12,
		GetConfigForClient: func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
			inner, err := cfg.GetConfigForClient(hello)
			if err != nil {
				return nil, err
			}
			inner.ClientAuth = tls.RequireAndVerifyClientCert
			return inner, nil
		},
	})
	if err := tc.Handshake(); err != nil {
		conn.Close()
		return nil, nil, err
	}
	return tc, credentials.TLSInfo{State: tc.ConnectionState(), CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.PrivacyAndIntegrity}}, nil
}

func (adminCreds) ClientHandshake(context.Context, string, net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return nil, nil, errors.New("server: admin credentials are server-side only")
}

func (adminCreds) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "tls"}
}

func (c adminCreds) Clone() credentials.TransportCredentials { return c }

func (adminCreds) OverrideServerName(string) error { return nil }

// adminAllowed lets through calls from the unix socket, and over TLS those whose
// client X509-SVID is the SPIFFE ID of some entry marked admin.
func (s *Server) adminAllowed(ctx context.Context) error {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return status.Error(codes.Unauthenticated, "no peer")
	}
	switch ai := p.AuthInfo.(type) {
	case localAuth:
		return nil
	case credentials.TLSInfo:
		if len(ai.State.VerifiedChains) == 0 {
			return status.Error(codes.Unauthenticated, "an X509-SVID is required")
		}
		id, err := x509svid.IDFromCert(ai.State.PeerCertificates[0])
		if err != nil {
			return status.Errorf(codes.Unauthenticated, "client certificate is not an X509-SVID: %v", err)
		}
		entries, _ := s.store.View().ListEntries(state.EntryFilter{SpiffeID: id.String()}, "", 0)
		for _, e := range entries {
			if e.Admin {
				return nil
			}
		}
		return status.Errorf(codes.PermissionDenied, "%s is not an admin identity (no entry with --admin issues it)", id)
	}
	return status.Error(codes.Unauthenticated, "unknown transport")
}

func (s *Server) adminUnaryAuth(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	if err := s.adminAllowed(ctx); err != nil {
		return nil, err
	}
	return h(ctx, req)
}

func (s *Server) adminStreamAuth(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	if err := s.adminAllowed(ss.Context()); err != nil {
		return err
	}
	return h(srv, ss)
}
