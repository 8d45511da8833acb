package main

import (
	"os"
	"os/signal"
	"runtime/debug"
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
			tuneAgentGC()
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

// The agent process's collector: every workload that connects per call
// makes a little garbage (its connection's buffers and goroutines), and at
// Go's default GOGC (100) collecting it takes a large share of the agent's
// CPU per call. A higher GOGC collects less often; the soft memory limit
// makes the collector work harder instead of letting the heap grow past it,
// so that the agent stays within the bound its Workload API budgets are
// measured against (RELIABILITY.md). $GOGC and $GOMEMLIMIT still win.
const (
	agentGCPercent   = 400
	agentMemoryLimit = 160 << 20
)

func tuneAgentGC() {
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(agentGCPercent)
	}
	if os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(agentMemoryLimit)
	}
}
