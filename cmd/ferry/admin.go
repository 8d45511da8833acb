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

	"github.com/ferry-id/ferry/proto/ferrypb"
)

// defaultAdminSocket is where `ferry server run` puts the admin socket when the
// config names none and the data dir is the packaged default.
const defaultAdminSocket = "/tmp/ferry/server/admin.sock"

// socketFlag finds the server's admin socket: --socket, else $FERRY_ADMIN_SOCKET.
var socketFlag = &cli.StringFlag{
	Name:    "socket",
	Usage:   "path of the server's admin socket",
	EnvVars: []string{"FERRY_ADMIN_SOCKET"},
	Value:   defaultAdminSocket,
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
	return append([]cli.Flag{socketFlag, outputFlag, timeoutFlag}, extra...)
}

// withAdmin dials the admin socket and runs fn with a client.
func withAdmin(c *cli.Context, fn func(ctx context.Context, a ferrypb.AdminClient) error) error {
	path, err := filepath.Abs(c.String("socket"))
	if err != nil {
		return err
	}
	if _, err := os.Stat(path); err != nil {
		return fmt.Errorf("admin socket %s: %w (is the server running? set --socket or FERRY_ADMIN_SOCKET)", path, err)
	}
	conn, err := grpc.NewClient("unix://"+path,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20), grpc.MaxCallSendMsgSize(64<<20)))
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
