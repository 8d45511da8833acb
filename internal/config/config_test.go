package config_test

import (
	"path/filepath"
	"testing"

	"github.com/hashicorp/hcl/hcl/token"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/internal/config"
)

type inner struct {
	Addr       string                 `hcl:"addr"`
	UnusedKeys map[string][]token.Pos `hcl:",unusedKeyPositions"`
}

type outer struct {
	Name       string                 `hcl:"name"`
	Inner      *inner                 `hcl:"inner"`
	UnusedKeys map[string][]token.Pos `hcl:",unusedKeyPositions"`
}

type file struct {
	Outer      *outer                 `hcl:"outer"`
	UnusedKeys map[string][]token.Pos `hcl:",unusedKeyPositions"`
}

func TestDecode(t *testing.T) {
	var f file
	require.NoError(t, config.DecodeString("t.conf", `
outer {
  name = "a"
  inner { addr = "127.0.0.1:1" }
}`, &f))
	require.Equal(t, "a", f.Outer.Name)
	require.Equal(t, "127.0.0.1:1", f.Outer.Inner.Addr)
}

func TestDecodeRefusesUnknownKeys(t *testing.T) {
	var f file
	err := config.DecodeString("t.conf", `
outer {
  nmae = "a"
  inner { adr = "x" }
}
other = 1`, &f)
	require.EqualError(t, err, "config: t.conf: unknown setting(s): other (line 6), outer.inner.adr (line 4), outer.nmae (line 3)")
}

func TestResolve(t *testing.T) {
	require.Equal(t, "/etc/ferry/data", config.Resolve("/etc/ferry/server.conf", "data"))
	require.Equal(t, "/abs", config.Resolve("/etc/ferry/server.conf", "/abs"))
	require.Equal(t, "", config.Resolve("/etc/ferry/server.conf", ""))
}

func TestRuntimeDir(t *testing.T) {
	t.Setenv("RUNTIME_DIRECTORY", "")
	require.Equal(t, "/run/ferry/agent", config.RuntimeDir("agent"))
	require.Equal(t, config.AdminSocket, filepath.Join(config.RuntimeDir("server"), "admin.sock"))
	require.Equal(t, config.WorkloadAPISocket, filepath.Join(config.RuntimeDir("agent"), "public", "api.sock"))
	// systemd joins several RuntimeDirectory= entries with colons.
	t.Setenv("RUNTIME_DIRECTORY", "/run/ferry/agent:/run/other")
	require.Equal(t, "/run/ferry/agent", config.RuntimeDir("agent"))
	t.Setenv("RUNTIME_DIRECTORY", "/run/custom/")
	require.Equal(t, "/run/custom", config.RuntimeDir("server"))
	t.Setenv("RUNTIME_DIRECTORY", "relative")
	require.Equal(t, "/run/ferry/server", config.RuntimeDir("server"))
}

func TestKeys(t *testing.T) {
	type inner struct {
		A      string         `hcl:"a"`
		Unused map[string]int `hcl:",unusedKeyPositions"`
	}
	type outer struct {
		Top struct {
			X     int      `hcl:"x"`
			In    *inner   `hcl:"in"`
			Items []inner  `hcl:"items"`
			List  []string `hcl:"list"`
		} `hcl:"top"`
	}
	require.Equal(t, []string{"top", "top.in", "top.in.a", "top.items", "top.items.a", "top.list", "top.x"}, config.Keys(outer{}))
}
