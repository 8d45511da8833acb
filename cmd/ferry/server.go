package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"
	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/ferry-id/ferry/internal/logging"
	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server"
)

func serverCommand() *cli.Command {
	configFlag := &cli.StringFlag{Name: "config", Usage: "path of server.conf", Value: "conf/server.conf"}
	return &cli.Command{
		Name:  "server",
		Usage: "run a server node, check its config or its health",
		Subcommands: []*cli.Command{
			{
				Name:  "run",
				Usage: "start a server node from its config file",
				Flags: []cli.Flag{
					configFlag,
					&cli.StringFlag{Name: "socket", Usage: "admin socket path (overrides the config)", EnvVars: []string{"FERRY_ADMIN_SOCKET"}},
				},
				Action: func(c *cli.Context) error {
					cfg, err := server.LoadConfig(c.String("config"))
					if err != nil {
						return err
					}
					if s := c.String("socket"); s != "" {
						cfg.AdminSocket = s
					}
					log, level, err := logging.NewLeveled(os.Stderr, cfg.LogLevel, cfg.LogFormat)
					if err != nil {
						return err
					}
					cfg.Logger, cfg.Level = log, level
					srv, err := server.New(cfg)
					if err != nil {
						return err
					}
					return runService(c.Context, service{role: "server", log: log, level: level, run: srv.Run, ready: srv.Serving(),
						reloadLevel: func() (string, error) {
							cfg, err := server.LoadConfig(c.String("config"))
							return cfg.LogLevel, err
						}})
				},
			},
			{
				Name:  "validate",
				Usage: "check a server config file as `server run` reads it, without starting anything",
				Flags: []cli.Flag{configFlag},
				Action: validateConfig(func(c *cli.Context) (string, string, error) {
					cfg, err := server.LoadConfig(c.String("config"))
					if err == nil {
						_, err = server.New(cfg)
					}
					return cfg.LogLevel, cfg.LogFormat, err
				}),
			},
			{
				Name:  "healthcheck",
				Usage: "exit 0 when the server behind the admin socket serves requests (gRPC health; --shallow: it answers at all)",
				Flags: adminFlags(&cli.BoolFlag{Name: "shallow", Usage: "only check that the server answers, not that it is ready"}),
				Action: func(c *cli.Context) error {
					conn, err := dialAdmin(c)
					if err != nil {
						return fmt.Errorf("server is unhealthy: %w", err)
					}
					defer conn.Close()
					return healthcheck(c, "server", conn, c.Bool("shallow"), nil)
				},
			},
			{
				Name:  "info",
				Usage: "describe the server node behind the admin socket: build, cluster role, readiness, state size",
				Flags: adminFlags(),
				Action: func(c *cli.Context) error {
					return withAdmin(c, func(ctx context.Context, a ferrypb.AdminClient) error {
						info, err := a.GetServerInfo(ctx, &ferrypb.GetServerInfoRequest{})
						if err != nil {
							return err
						}
						if jsonOutput(c) {
							return printJSON(c.App.Writer, info)
						}
						rev := info.VcsRevision
						if rev == "" {
							rev = "unknown"
						}
						ready := "yes"
						if !info.Ready {
							ready = "no: " + info.NotReadyReason
						}
						printFields(c.App.Writer,
							"Node ID", info.NodeId,
							"Trust domain", info.TrustDomain,
							"Version", info.Version,
							"Revision", rev,
							"Go version", info.GoVersion,
							"Started", time.Unix(info.StartedAt, 0).UTC().Format(time.RFC3339),
							"Raft state", info.RaftState,
							"Leader", info.LeaderId,
							"Applied index", fmt.Sprint(info.AppliedIndex),
							"Ready", ready,
							"Node attestors", fmt.Sprint(info.NodeAttestors),
							"Agents", fmt.Sprint(info.Agents),
							"Entries", fmt.Sprint(info.Entries),
							"Bundles", fmt.Sprint(info.Bundles),
						)
						return nil
					})
				},
			},
		},
	}
}

// validateConfig is the action of the validate commands: load reads the
// config file as the run command does and returns its log settings, which are
// checked too.
func validateConfig(load func(c *cli.Context) (level, format string, err error)) cli.ActionFunc {
	return func(c *cli.Context) error {
		level, format, err := load(c)
		if err != nil {
			return err
		}
		if _, err := logging.New(io.Discard, level, format); err != nil {
			return err
		}
		fmt.Fprintf(c.App.Writer, "%s: valid\n", c.String("config"))
		return nil
	}
}

// healthcheck asks the gRPC health service behind conn; md is metadata the
// service needs (the Workload API's security header).
func healthcheck(c *cli.Context, role string, conn *grpc.ClientConn, shallow bool, md []string) error {
	ctx, cancel := context.WithTimeout(c.Context, c.Duration("timeout"))
	defer cancel()
	if len(md) > 0 {
		ctx = metadata.AppendToOutgoingContext(ctx, md...)
	}
	resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(false))
	if err != nil {
		return fmt.Errorf("%s is unhealthy: %v", role, errorText(err))
	}
	if !shallow && resp.Status != healthpb.HealthCheckResponse_SERVING {
		return fmt.Errorf("%s is unhealthy: %s", role, resp.Status)
	}
	fmt.Fprintf(c.App.Writer, "%s is healthy\n", role)
	return nil
}

// loggerCommand is `ferry logger get|set|reset`: the log level of the server
// node behind the admin socket, changed while it runs (as SPIRE's).
func loggerCommand() *cli.Command {
	print := func(c *cli.Context, l *ferrypb.Logger) error {
		if jsonOutput(c) {
			return printJSON(c.App.Writer, l)
		}
		tw := tabwriter.NewWriter(c.App.Writer, 0, 4, 2, ' ', 0)
		fmt.Fprintf(tw, "Current level\t: %s\nLaunch level\t: %s\n", l.CurrentLevel, l.LaunchLevel)
		return tw.Flush()
	}
	return &cli.Command{
		Name:  "logger",
		Usage: "the log level of the server node behind the admin socket",
		Subcommands: []*cli.Command{
			{
				Name: "get", Usage: "show the current and launch log levels", Flags: adminFlags(),
				Action: func(c *cli.Context) error {
					return withAdmin(c, func(ctx context.Context, a ferrypb.AdminClient) error {
						l, err := a.GetLogger(ctx, &ferrypb.GetLoggerRequest{})
						if err != nil {
							return err
						}
						return print(c, l)
					})
				},
			},
			{
				Name: "set", Usage: "change the log level until the node restarts or `logger reset`",
				Flags: adminFlags(requiredChoice("level", "new log level", logging.Levels...)),
				Action: func(c *cli.Context) error {
					return withAdmin(c, func(ctx context.Context, a ferrypb.AdminClient) error {
						l, err := a.SetLogLevel(ctx, &ferrypb.SetLogLevelRequest{Level: c.String("level")})
						if err != nil {
							return err
						}
						return print(c, l)
					})
				},
			},
			{
				Name: "reset", Usage: "go back to the log level the node started with", Flags: adminFlags(),
				Action: func(c *cli.Context) error {
					return withAdmin(c, func(ctx context.Context, a ferrypb.AdminClient) error {
						l, err := a.ResetLogLevel(ctx, &ferrypb.ResetLogLevelRequest{})
						if err != nil {
							return err
						}
						return print(c, l)
					})
				},
			},
		},
	}
}

// errorText is an error as withAdmin words it: "Code: message" for a gRPC
// status.
func errorText(err error) string {
	if st, ok := status.FromError(err); ok {
		return st.Code().String() + ": " + st.Message()
	}
	return err.Error()
}
