// Command ferry is the single binary of every ferry role: server, agent, bridge,
// and the operator and workload commands that talk to them.
package main

import (
	"fmt"
	"os"

	"github.com/urfave/cli/v2"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	if err := newApp().Run(os.Args); err != nil {
		fmt.Fprintln(os.Stderr, "ferry:", err)
		os.Exit(1)
	}
}

func newApp() *cli.App {
	return &cli.App{
		Name:                 "ferry",
		Usage:                "workload identity for every process on every machine",
		Version:              version,
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
		},
	}
}
