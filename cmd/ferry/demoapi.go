package main

import (
	"crypto/tls"
	"errors"
	"net"
	"os"
	"os/signal"
	"syscall"

	"github.com/urfave/cli/v2"

	"github.com/ferry-id/ferry/demoapi"
	"github.com/ferry-id/ferry/internal/logging"
)

func demoAPICommand() *cli.Command {
	return &cli.Command{
		Name:  "demo-api",
		Usage: "run a small API that accepts Entra-style access tokens (validated as a real API does) and says who called",
		Description: `Answers every path: 200 with {"oid","appid","tid","roles","ver","aud"} for a valid
token that grants --role, 401 (RFC 6750 WWW-Authenticate: Bearer ...) for a missing
or refused token, 403 for a valid token without the role.

Give every value aud may take: the identifier URI (v1 tokens, requested by it) and
the app ID (v2 tokens, as the managed-identity endpoint gets them).`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "listen", Value: "127.0.0.1:8080", Usage: "address to serve on"},
			&cli.StringFlag{Name: "authority", EnvVars: []string{"AZURE_AUTHORITY_HOST"}, Usage: "token service URL (https); tenant metadata is read from {authority}/{tenant}/v2.0/.well-known/openid-configuration"},
			&cli.StringFlag{Name: "tenant", EnvVars: []string{"AZURE_TENANT_ID"}, Usage: "tenant ID tokens must come from"},
			&cli.StringSliceFlag{Name: "audience", Usage: "accepted aud: identifier URI and/or app ID (repeatable)"},
			&cli.StringFlag{Name: "role", Usage: "app role every caller must hold (default: none required)"},
			&cli.StringFlag{Name: "ca", EnvVars: []string{"FERRY_BRIDGE_CA"}, Usage: "PEM file of the only roots trusted for the authority (default: system roots)"},
			&cli.StringFlag{Name: "tls-cert", Usage: "serve HTTPS with this certificate (PEM)"},
			&cli.StringFlag{Name: "tls-key", Usage: "key of --tls-cert (PEM)"},
			logLevelFlag(),
		},
		Action: func(c *cli.Context) error {
			if c.String("authority") == "" || c.String("tenant") == "" || len(c.StringSlice("audience")) == 0 {
				return errors.New("--authority, --tenant and --audience are required")
			}
			if (c.String("tls-cert") == "") != (c.String("tls-key") == "") {
				return errors.New("--tls-cert and --tls-key go together")
			}
			log, err := logging.New(os.Stderr, c.String("log-level"), "text")
			if err != nil {
				return err
			}
			client, err := demoapi.HTTPClient(c.String("ca"))
			if err != nil {
				return err
			}
			api, err := demoapi.New(demoapi.Config{
				Authority: c.String("authority"), Tenant: c.String("tenant"),
				Audiences: c.StringSlice("audience"), Role: c.String("role"),
				HTTPClient: client, Logger: log,
			})
			if err != nil {
				return err
			}
			var tlsCfg *tls.Config
			if c.String("tls-cert") != "" {
				cert, err := tls.LoadX509KeyPair(c.String("tls-cert"), c.String("tls-key"))
				if err != nil {
					return err
				}
				tlsCfg = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
			}
			ln, err := net.Listen("tcp", c.String("listen"))
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(c.Context, os.Interrupt, syscall.SIGTERM)
			defer stop()
			if err := api.Prefetch(ctx); err != nil {
				// Not fatal: the authority may come up later; requests retry.
				log.Warn("tenant metadata not read yet", "url", api.MetadataURL(), "error", err)
			}
			log.Info("demo API listening", "addr", ln.Addr().String(), "tls", tlsCfg != nil, "audiences", c.StringSlice("audience"), "app_role", c.String("role"))
			return api.Serve(ctx, ln, tlsCfg)
		},
	}
}
