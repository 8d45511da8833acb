package main

import (
	"os"

	"github.com/urfave/cli/v2"

	bridgeservice "github.com/ferry-id/ferry/bridge/service"
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
				fc, err := bridgeservice.LoadConfig(c.String("config"))
				return fc.LogLevel, fc.LogFormat, err
			}),
		}, {
			Name:  "run",
			Usage: "start a bridge replica from its config file",
			Flags: []cli.Flag{&cli.StringFlag{Name: "config", Usage: "path of bridge.conf", Value: "conf/bridge.conf"}},
			Action: func(c *cli.Context) error {
				fc, err := bridgeservice.LoadConfig(c.String("config"))
				if err != nil {
					return err
				}
				log, level, err := logging.NewLeveled(os.Stderr, fc.LogLevel, fc.LogFormat)
				if err != nil {
					return err
				}
				fc.Logger = log
				svc, err := bridgeservice.New(fc.Config)
				if err != nil {
					return err
				}
				return runService(c.Context, service{role: "bridge", log: log, level: level, run: svc.Run, ready: svc.Ready(),
					reloadLevel: func() (string, error) {
						fc, err := bridgeservice.LoadConfig(c.String("config"))
						return fc.LogLevel, err
					}})
			},
		}},
	}
}
