package main

import (
	"os"
	"os/signal"
	"syscall"

	"github.com/urfave/cli/v2"

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
			log, err := logging.New(os.Stderr, fc.LogLevel, fc.LogFormat)
			if err != nil {
				return err
			}
			fc.Logger = log
			a, err := agent.New(fc.Config)
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(c.Context, os.Interrupt, syscall.SIGTERM)
			defer stop()
			return a.Run(ctx)
		},
	}
	return &cli.Command{
		Name:        "agent",
		Usage:       "run an agent, or manage attested agents",
		Subcommands: append([]*cli.Command{run}, agentAdminCommands()...),
	}
}
