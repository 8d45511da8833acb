package main

import (
	"fmt"
	"os"
	"strings"

	"github.com/urfave/cli/v2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/ferry-id/ferry/agent"
	"github.com/ferry-id/ferry/internal/logging"
)

func agentCommand() *cli.Command {
	run := &cli.Command{
		Name:  "run",
		Usage: "start an agent from its config file",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "config", Usage: "path of agent.conf", Value: "conf/agent.conf"},
			&cli.StringFlag{Name: "join-token", Usage: "join token for the first attestation (overrides the config)", EnvVars: []string{"FERRY_JOIN_TOKEN"}},
		},
		Action: func(c *cli.Context) error {
			fc, err := agent.LoadConfig(c.String("config"), c.String("join-token"))
			if err != nil {
				return err
			}
			log, level, err := logging.NewLeveled(os.Stderr, fc.LogLevel, fc.LogFormat)
			if err != nil {
				return err
			}
			fc.Logger = log
			a, err := agent.New(fc.Config)
			if err != nil {
				return err
			}
			return runService(c.Context, service{role: "agent", log: log, level: level, run: a.Run, ready: a.Ready(),
				reloadLevel: func() (string, error) {
					// The join token is spent: a reload reads the file only.
					fc, err := agent.LoadConfig(c.String("config"), "")
					return fc.LogLevel, err
				}})
		},
	}
	validate := &cli.Command{
		Name:  "validate",
		Usage: "check an agent config file as `agent run` reads it, without starting anything",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "config", Usage: "path of agent.conf", Value: "conf/agent.conf"},
			&cli.StringFlag{Name: "join-token", Usage: "join token, checked as `agent run` would take it", EnvVars: []string{"FERRY_JOIN_TOKEN"}},
		},
		Action: validateConfig(func(c *cli.Context) (string, string, error) {
			fc, err := agent.LoadConfig(c.String("config"), c.String("join-token"))
			return fc.LogLevel, fc.LogFormat, err
		}),
	}
	healthcheck := &cli.Command{
		Name:  "healthcheck",
		Usage: "exit 0 when the agent serves the Workload API with a valid agent SVID (gRPC health; --shallow: it answers at all)",
		Flags: []cli.Flag{workloadSocketFlag, workloadTimeoutFlag,
			&cli.BoolFlag{Name: "shallow", Usage: "only check that the agent answers, not that its SVID is valid"}},
		Action: func(c *cli.Context) error {
			path, ok := strings.CutPrefix(c.String("socket"), "unix://")
			if !ok {
				return fmt.Errorf("--socket %q: want unix:///path", c.String("socket"))
			}
			conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
			if err != nil {
				return err
			}
			defer conn.Close()
			return healthcheck(c, "agent", conn, c.Bool("shallow"), []string{"workload.spiffe.io", "true"})
		},
	}
	return &cli.Command{
		Name:        "agent",
		Usage:       "run an agent, check its config or health, or manage attested agents",
		Subcommands: append([]*cli.Command{run, validate, healthcheck}, agentAdminCommands()...),
	}
}
