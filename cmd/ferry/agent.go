package main

import (
	"github.com/urfave/cli/v2"

	"github.com/ferry-id/ferry/agent"
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
			log, level, err := leveledLogger(fc.LogLevel, fc.LogFormat)
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
	return &cli.Command{
		Name:        "agent",
		Usage:       "run an agent, or manage attested agents",
		Subcommands: append([]*cli.Command{run}, agentAdminCommands()...),
	}
}
