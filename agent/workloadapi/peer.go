package workloadapi

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"

	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"

	"github.com/ferry-id/ferry/agent/budget"
	"github.com/ferry-id/ferry/attestors/workload"
	"github.com/ferry-id/ferry/internal/logging"
)

// authType is what callerInfo reports as its credentials.AuthInfo type.
const authType = "ferry-peercred"

// watcher is a caller's process pinned at connect time. CheckAlive reports an
// error once the process has exited or its PID names another process.
type watcher interface {
	CheckAlive() error
	Close() error
}

// pinFunc pins pid; the default opens /proc/PID through workload.OpenProcessIn.
type pinFunc func(pid int32) (watcher, error)

// callerInfo is the credentials.AuthInfo of a Workload API connection: the
// kernel-reported credentials of the peer when it connected, and the watcher
// pinning its process.
type callerInfo struct {
	credentials.CommonAuthInfo
	PID int32
	UID uint32
	GID uint32

	proc watcher
}

// AuthType implements credentials.AuthInfo.
func (callerInfo) AuthType() string { return authType }

// callerFrom returns the caller of the RPC whose context is ctx.
func callerFrom(ctx context.Context) (callerInfo, bool) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return callerInfo{}, false
	}
	ci, ok := p.AuthInfo.(callerInfo)
	return ci, ok
}

// peerCreds is the server side of the Workload API's transport: no encryption
// (the spec forbids requiring TLS) but, at accept time, the SO_PEERCRED
// credentials of the unix-socket peer and a pin on its process, taken before
// the peer can send a single request. The pin lives as long as the connection.
type peerCreds struct {
	pin pinFunc
	log *logging.PerKey
}

var _ credentials.TransportCredentials = (*peerCreds)(nil)

func (c *peerCreds) ClientHandshake(context.Context, string, net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return nil, nil, errors.New("workloadapi: peer credentials are server-side only")
}

func (c *peerCreds) ServerHandshake(conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	ucred, err := budget.PeerCred(conn)
	if err != nil {
		return nil, nil, err
	}
	if ucred.Pid <= 0 {
		// The peer is in a PID namespace the agent cannot see.
		return nil, nil, fmt.Errorf("workloadapi: caller pid not visible (uid %d)", ucred.Uid)
	}
	proc, err := c.pin(ucred.Pid)
	if err != nil {
		// Typically a caller that exited right after connecting.
		c.log.Log(context.Background(), slog.LevelWarn, "uid", uint64(ucred.Uid), "workload API connection refused",
			slog.Int("pid", int(ucred.Pid)), slog.Uint64("uid", uint64(ucred.Uid)), slog.String("error", err.Error()))
		return nil, nil, fmt.Errorf("workloadapi: pin caller pid %d: %w", ucred.Pid, err)
	}
	info := callerInfo{
		CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.NoSecurity},
		PID:            ucred.Pid,
		UID:            ucred.Uid,
		GID:            ucred.Gid,
		proc:           proc,
	}
	return &pinnedConn{Conn: conn, proc: proc}, info, nil
}

func (c *peerCreds) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: authType}
}

func (c *peerCreds) Clone() credentials.TransportCredentials {
	return &peerCreds{pin: c.pin, log: c.log}
}

func (c *peerCreds) OverrideServerName(string) error { return nil }

// pinnedConn releases the caller's process pin when the connection closes, so
// a client that opens and drops connections cannot exhaust descriptors.
type pinnedConn struct {
	net.Conn
	proc watcher
	once sync.Once
}

func (c *pinnedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { _ = c.proc.Close() })
	return err
}

// procPinner pins processes under procRoot with workload.OpenProcessIn.
func procPinner(procRoot string) pinFunc {
	return func(pid int32) (watcher, error) {
		p, err := workload.OpenProcessIn(procRoot, pid)
		if err != nil {
			return nil, err
		}
		return p, nil
	}
}
