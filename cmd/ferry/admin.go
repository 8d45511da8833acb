package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/urfave/cli/v2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/ferry-id/ferry/internal/config"
	"github.com/ferry-id/ferry/internal/securedir"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

// socketFlag finds the server's admin socket: --socket, else
// $FERRY_ADMIN_SOCKET, else where `ferry server run` puts it by default.
var socketFlag = &cli.StringFlag{
	Name:    "socket",
	Usage:   "path of the server's admin socket",
	EnvVars: []string{"FERRY_ADMIN_SOCKET"},
	Value:   config.AdminSocket,
}

// insecureSocketFlag lets the CLI talk to an admin socket it would refuse
// (another user's, or in a directory another user could change): for a
// socket mounted into a container from a host whose uids it does not know.
var insecureSocketFlag = &cli.BoolFlag{
	Name:  "insecure-socket",
	Usage: "talk to the admin socket even if it is not owned by root or this user, or sits in a directory another user could change",
}

var outputFlag = &cli.StringFlag{
	Name:  "output",
	Usage: "output format: pretty or json",
	Value: "pretty",
}

var timeoutFlag = &cli.DurationFlag{
	Name:  "timeout",
	Usage: "how long to wait for the server",
	Value: 30 * time.Second,
}

// adminFlags are on every command that talks to the admin API.
func adminFlags(extra ...cli.Flag) []cli.Flag {
	return append([]cli.Flag{socketFlag, insecureSocketFlag, outputFlag, timeoutFlag}, extra...)
}

// dialAdmin connects to the admin socket named by --socket, after checking
// that it is the server's: a socket owned by root or by this user, in
// directories no other user can change. Anyone else's socket could be a
// relay that shows and changes what it likes.
func dialAdmin(c *cli.Context) (*grpc.ClientConn, error) {
	path, err := filepath.Abs(c.String("socket"))
	if err != nil {
		return nil, err
	}
	if _, err := os.Stat(path); err != nil {
		return nil, fmt.Errorf("admin socket %s: %w (is the server running? set --socket or FERRY_ADMIN_SOCKET)", path, err)
	}
	if !c.Bool(insecureSocketFlag.Name) {
		if err := securedir.CheckSocket(path); err != nil {
			return nil, fmt.Errorf("admin socket %s refused: %w (--insecure-socket to talk to it anyway)", path, err)
		}
	}
	return grpc.NewClient("unix://"+path,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20), grpc.MaxCallSendMsgSize(64<<20)))
}

// withAdmin dials the admin socket and runs fn with a client.
func withAdmin(c *cli.Context, fn func(ctx context.Context, a ferrypb.AdminClient) error) error {
	conn, err := dialAdmin(c)
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(c.Context, c.Duration("timeout"))
	defer cancel()
	if err := fn(ctx, ferrypb.NewAdminClient(conn)); err != nil {
		if st, ok := status.FromError(err); ok {
			return fmt.Errorf("%s: %s", st.Code(), st.Message())
		}
		return err
	}
	return nil
}

// printJSON writes protobuf messages as JSON (one document; a list when several).
func printJSON(w io.Writer, msgs ...proto.Message) error {
	raw := make([]json.RawMessage, 0, len(msgs))
	for _, m := range msgs {
		b, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(m)
		if err != nil {
			return err
		}
		raw = append(raw, b)
	}
	var v any = raw
	if len(raw) == 1 {
		v = raw[0]
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func jsonOutput(c *cli.Context) bool { return c.String("output") == "json" }
