package cluster_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/cluster"
)

// clientTLS builds a client config that trusts roots and presents files' cert.
func clientTLS(t *testing.T, roots string, files cluster.TLSFiles) *tls.Config {
	t.Helper()
	pem, err := os.ReadFile(roots)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	cert, err := tls.LoadX509KeyPair(files.CertFile, files.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	return &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS13}
}

// rawStream is a raft.StreamLayer that dials with a given TLS config and
// announces the Raft connection type, as a node would.
type rawStream struct {
	net.Listener
	cfg *tls.Config
}

func (s *rawStream) Dial(addr raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: timeout}, "tcp", string(addr), s.cfg)
	if err != nil {
		return nil, err
	}
	if _, err := c.Write([]byte{0x01}); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

func grpcClient(t *testing.T, addr string, cfg *tls.Config) ferrypb.ClusterClient {
	t.Helper()
	cc, err := grpc.NewClient("passthrough:///"+addr,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, a string) (net.Conn, error) {
			c, err := (&tls.Dialer{Config: cfg}).DialContext(ctx, "tcp", a)
			if err != nil {
				return nil, err
			}
			if _, err := c.Write([]byte{0x02}); err != nil {
				c.Close()
				return nil, err
			}
			return c, nil
		}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return ferrypb.NewClusterClient(cc)
}

// raftAppend sends an AppendEntries RPC with the given term. A term above the
// target's would depose it if the RPC were accepted.
func raftAppend(t *testing.T, cfg *tls.Config, target *testNode, term uint64) (*raft.AppendEntriesResponse, error) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tr := raft.NewNetworkTransport(&rawStream{Listener: ln, cfg: cfg}, 1, 2*time.Second, io.Discard)
	defer tr.Close()
	req := &raft.AppendEntriesRequest{
		RPCHeader: raft.RPCHeader{ProtocolVersion: raft.ProtocolVersionMax, ID: []byte("intruder"), Addr: []byte(ln.Addr().String())},
		Term:      term,
		Entries:   []*raft.Log{{Index: 1 << 30, Term: term, Type: raft.LogCommand, Data: []byte{1}}},
	}
	var resp raft.AppendEntriesResponse
	err = tr.AppendEntries(raft.ServerID(target.ID()), raft.ServerAddress(target.Addr()), req, &resp)
	return &resp, err
}

// TestPeerAuthentication: a peer must present a certificate from the cluster
// CA naming a node of the same cluster, for Raft and for gRPC alike.
func TestPeerAuthentication(t *testing.T) {
	nodes, pki := startCluster(t, 1, nil)
	target := nodes[0]
	applyN(t, target, 3)
	wrong := newPKI(t)

	good := clientTLS(t, pki.ca.CertFile, pki.node(t, "probe"))
	wrongCA := clientTLS(t, pki.ca.CertFile, wrong.node(t, "probe"))
	otherDomain := clientTLS(t, pki.ca.CertFile, pki.node(t, "probe2", func(o *cluster.CertOptions) { o.TrustDomain = "other.test" }))

	// The good client gets real answers: the checks below fail for the
	// certificate, not for the way the test talks.
	resp, err := raftAppend(t, good, target, 0) // stale term: answered, refused, harmless
	if err != nil {
		t.Fatalf("raft RPC with a cluster certificate: %v", err)
	}
	if resp.Success || resp.Term == 0 {
		t.Fatalf("stale AppendEntries answered %+v", resp)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := grpcClient(t, target.Addr(), good).ReadIndex(ctx, &ferrypb.ReadIndexRequest{}); err != nil {
		t.Fatalf("gRPC with a cluster certificate: %v", err)
	}
	termBefore := target.Stats()["term"]

	for name, cfg := range map[string]*tls.Config{"wrong CA": wrongCA, "other trust domain": otherDomain} {
		t.Run(name, func(t *testing.T) {
			if resp, err := raftAppend(t, cfg, target, 1<<40); err == nil {
				t.Fatalf("raft AppendEntries answered: %+v", resp)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			defer cancel()
			c := grpcClient(t, target.Addr(), cfg)
			_, err := c.ReadIndex(ctx, &ferrypb.ReadIndexRequest{})
			if status.Code(err) != codes.Unavailable {
				t.Fatalf("gRPC ReadIndex: %v, want Unavailable", err)
			}
			_, err = c.Join(ctx, &ferrypb.JoinRequest{Id: "intruder", Address: "127.0.0.1:1"})
			if status.Code(err) != codes.Unavailable {
				t.Fatalf("gRPC Join: %v, want Unavailable", err)
			}
		})
	}
	if got := target.Stats()["term"]; got != termBefore {
		t.Fatalf("term moved from %s to %s", termBefore, got)
	}
	if got := target.fsm.Count(); got != 3 {
		t.Fatalf("FSM holds %d entries, want 3", got)
	}

	t.Run("UnknownConnectionType", func(t *testing.T) {
		c, err := tls.Dial("tcp", target.Addr(), good)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write([]byte{0x7f, 0, 0, 0})
		c.SetReadDeadline(time.Now().Add(3 * time.Second))
		if n, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("read %d bytes, err %v; want the connection closed", n, err)
		}
	})

	t.Run("NodeWithWrongCACannotJoin", func(t *testing.T) {
		cfg := fastConfig(t, wrong, "n9")
		intruder := startNode(t, cfg)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		err := intruder.Join(ctx, target.Addr())
		if err == nil {
			t.Fatal("join with a wrong-CA certificate succeeded")
		}
		// Refused for the certificate, at once, not retried until ctx ends.
		if ctx.Err() != nil || !strings.Contains(err.Error(), "certificate") {
			t.Fatalf("join error %v (ctx %v), want a certificate error", err, ctx.Err())
		}
		ms, err := target.Members(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if len(ms) != 1 {
			t.Fatalf("members after refused join: %+v", ms)
		}
	})
}

// TestOversizeForwardRefused: the Cluster service refuses an oversize encoded
// command itself, whoever sends it.
func TestOversizeForwardRefused(t *testing.T) {
	nodes, pki := startCluster(t, 1, nil)
	c := grpcClient(t, nodes[0].Addr(), clientTLS(t, pki.ca.CertFile, pki.node(t, "probe")))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	before := nodes[0].Stats()["last_log_index"]
	_, err := c.Apply(ctx, &ferrypb.ApplyRequest{Command: make([]byte, 512*1024+1)})
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("Apply of 512 KiB + 1: %v, want InvalidArgument", err)
	}
	if after := nodes[0].Stats()["last_log_index"]; after != before {
		t.Fatalf("log moved from %s to %s", before, after)
	}
}
