package main

import (
	"os"
	"os/signal"
	"syscall"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/urfave/cli/v2"

	"github.com/ferry-id/ferry/cmd/ferry/dev"
	"github.com/ferry-id/ferry/internal/logging"
)

func devCommand() *cli.Command {
	return &cli.Command{
		Name:  "dev",
		Usage: "run everything on this machine in one process, with generated keys and config under --data-dir",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "data-dir", Value: ".dev", Usage: "where keys, state, sockets and the env file live"},
			&cli.StringFlag{Name: "trust-domain", Value: "example.org", Usage: "the trust domain of the dev server"},
			logLevelFlag(),
		},
		Action: func(c *cli.Context) error {
			td, err := spiffeid.TrustDomainFromString(c.String("trust-domain"))
			if err != nil {
				return err
			}
			log, err := logging.New(os.Stderr, c.String("log-level"), "text")
			if err != nil {
				return err
			}
			stack, err := dev.New(dev.Config{DataDir: c.String("data-dir"), TrustDomain: td, Logger: log, Out: c.App.Writer})
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(c.Context, os.Interrupt, syscall.SIGTERM)
			defer stop()
			return stack.Run(ctx)
		},
	}
}
