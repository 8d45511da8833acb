package main

import (
	"github.com/urfave/cli/v2"

	"github.com/ferry-id/ferry/server"
)

func serverCommand() *cli.Command {
	return &cli.Command{
		Name:  "server",
		Usage: "run a server node",
		Subcommands: []*cli.Command{{
			Name:  "run",
			Usage: "start a server node from its config file",
			Flags: []cli.Flag{
				&cli.StringFlag{Name: "config", Usage: "path of server.conf", Value: "conf/server.conf"},
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
				log, level, err := leveledLogger(cfg.LogLevel, cfg.LogFormat)
				if err != nil {
					return err
				}
				cfg.Logger = log
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
		}},
	}
}
