package config

import (
	"os"
	"path/filepath"
	"strings"
)

// Where the roles' sockets are on a real host when their configs name none:
// under /run/ferry/<role>/, which only root may write (systemd creates it from
// the unit's RuntimeDirectory=). Never under /tmp, where any user could take
// the name first.
const (
	// AdminSocket is where clients (the CLI, a bridge replica) find the
	// server's admin socket.
	AdminSocket = "/run/ferry/server/admin.sock"
	// WorkloadAPISocket is where clients find the agent's Workload API.
	WorkloadAPISocket = "/run/ferry/agent/public/api.sock"
)

// RuntimeDir is the directory where role puts its sockets: the first
// directory of $RUNTIME_DIRECTORY, which systemd sets from the unit's
// RuntimeDirectory= (e.g. RuntimeDirectory=ferry/agent gives
// /run/ferry/agent), else /run/ferry/<role>.
func RuntimeDir(role string) string {
	first, _, _ := strings.Cut(os.Getenv("RUNTIME_DIRECTORY"), ":")
	if filepath.IsAbs(first) {
		return filepath.Clean(first)
	}
	return filepath.Join("/run/ferry", role)
}
