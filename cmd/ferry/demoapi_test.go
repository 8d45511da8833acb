package main

import (
	"net"
	"strconv"
	"testing"

	"github.com/stretchr/testify/require"
	"github.com/urfave/cli/v2"

	"github.com/ferry-id/ferry/agent/imds"
	bridgeservice "github.com/ferry-id/ferry/bridge/service"
	"github.com/ferry-id/ferry/server"
)

// demo-api refuses a flag with an empty value, or with the next flag taken
// for its value, and stray arguments, before it serves anything.
func TestDemoAPIRefusesEmptyValues(t *testing.T) {
	base := []string{"ferry", "demo-api", "--authority", "https://127.0.0.1:1", "--tenant", "t"}
	for _, tc := range []struct {
		args []string
		want string
	}{
		// `--audience $UNSET --role reader`
		{[]string{"--audience", "--role", "reader"}, "--audience is missing its value (the next word, --role, is a flag)"},
		{[]string{"--audience", "", "--role", "reader"}, "--audience has an empty value"},
		{[]string{"--audience", "api://demo", "--role", ""}, "--role has an empty value"},
		{[]string{"--audience", "api://demo", "--role", "--ca", "x"}, "--role is missing its value (the next word, --ca, is a flag)"},
		{[]string{"--audience", "api://demo", "reader"}, `unexpected argument "reader": it takes no arguments`},
		{[]string{"--audience", "api://demo", "--listen", ""}, "--listen has an empty value"},
	} {
		err := newApp().Run(append(append([]string{}, base...), tc.args...))
		require.ErrorContains(t, err, tc.want, "%q", tc.args)
	}
}

// The sample configs and the demo API's default listen on different ports,
// so a newcomer can run them side by side.
func TestSampleAddressesDistinct(t *testing.T) {
	srv, err := server.LoadConfig("../../conf/server.conf")
	require.NoError(t, err)
	br, err := bridgeservice.LoadConfig("../../conf/bridge.conf")
	require.NoError(t, err)
	addrs := map[string]string{
		"server health_addr": srv.HealthAddr, "server agent_addr": srv.AgentAddr, "server admin_addr": srv.AdminAddr,
		"server oidc addr": srv.OIDC.Addr, "server cluster bind_addr": srv.Cluster.BindAddr,
		"bridge listen_addr": br.ListenAddr,
		// The agent listens on TCP only for its managed-identity endpoint.
		"agent imds arc_addr": imds.DefaultArcAddress, "agent imds vm_addr": imds.DefaultVMAddress,
	}
	for _, f := range demoAPICommand().Flags {
		if f.Names()[0] == "listen" {
			addrs["demo-api --listen"] = f.(*cli.StringFlag).Value
		}
	}
	byPort := map[int]string{}
	for what, a := range addrs {
		if a == "" {
			continue
		}
		_, p, err := net.SplitHostPort(a)
		require.NoError(t, err, what)
		port, err := strconv.Atoi(p)
		require.NoError(t, err, what)
		if other, ok := byPort[port]; ok {
			t.Errorf("%s and %s both use port %d", what, other, port)
		}
		byPort[port] = what
	}
	require.Contains(t, addrs, "demo-api --listen")
}
