// Command ferry is the single binary of every ferry role: server, agent, bridge,
// and the operator and workload commands that talk to them.
package main

import (
	"fmt"
	"os"

	"github.com/urfave/cli/v2"

	"github.com/ferry-id/ferry/internal/buildinfo"
)

func main() {
	if err := newApp().Run(os.Args); err != nil {
		fmt.Fprintln(os.Stderr, "ferry:", err)
		os.Exit(1)
	}
}

func newApp() *cli.App {
	app := &cli.App{
		Name:                 "ferry",
		Usage:                "workload identity for every process on every machine",
		Version:              buildinfo.Get().String(),
		EnableBashCompletion: true,
		Commands: []*cli.Command{
			serverCommand(),
			clusterCommand(),
			entryCommand(),
			devCommand(),
			tenantCommand(),
			identityCommand(),
			resourceCommand(),
			roleCommand(),
			tokenCommand(),
			withBundleEdits(bundleCommand()),
			agentCommand(),
			apiCommand(),
			bridgeCommand(),
			authorityCommand(),
			x509Command(),
			jwtCommand(),
			federationCommand(),
			demoAPICommand(),
			loggerCommand(),
			versionCommand(),
		},
	}
	strict(app)
	return app
}

// versionCommand is `ferry version`: the build, from the binary's build
// information (`ferry --version` prints the same on one line).
func versionCommand() *cli.Command {
	return &cli.Command{
		Name:  "version",
		Usage: "print the version, VCS revision and Go version of this binary",
		Action: func(c *cli.Context) error {
			_, err := fmt.Fprint(c.App.Writer, buildinfo.Get().Lines())
			return err
		},
	}
}
