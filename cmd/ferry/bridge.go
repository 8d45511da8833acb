package main

import (
	"os"
	"os/signal"
	"syscall"

	"github.com/urfave/cli/v2"

	"github.com/ferry-id/ferry/bridge/service"
	"github.com/ferry-id/ferry/internal/logging"
)

func bridgeCommand() *cli.Command {
	return &cli.Command{
		Name:  "bridge",
		Usage: "run an Entra-style token service replica, or check its config",
		Subcommands: []*cli.Command{{
			Name:  "validate",
			Usage: "check a bridge config file as `bridge run` reads it, without starting anything",
			Flags: []cli.Flag{&cli.StringFlag{Name: "config", Usage: "path of bridge.conf", Value: "conf/bridge.conf"}},
			Action: validateConfig(func(c *cli.Context) (string, string, error) {
				fc, err := service.LoadConfig(c.String("config"))
				return fc.LogLevel, fc.LogFormat, err
			}),
		}, {
			Name:  "run",
			Usage: "start a bridge replica from its config file",
			Flags: []cli.Flag{&cli.StringFlag{Name: "config", Usage: "path of bridge.conf", Value: "conf/bridge.conf"}},
			Action: func(c *cli.Context) error {
				fc, err := service.LoadConfig(c.String("config"))
				if err != nil {
					return err
				}
				log, err := logging.New(os.Stderr, fc.LogLevel, fc.LogFormat)
				if err != nil {
					return err
				}
				fc.Logger = log
				svc, err := service.New(fc.Config)
				if err != nil {
					return err
				}
				ctx, stop := signal.NotifyContext(c.Context, os.Interrupt, syscall.SIGTERM)
				defer stop()
				return svc.Run(ctx)
			},
		}},
	}
}
