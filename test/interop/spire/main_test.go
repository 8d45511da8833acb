// Package spire_test runs ferry against SPIRE as a federation peer: a real
// ferry server and agent, a real SPIRE server and agent (release
// spireVersion, built from the Go module proxy by tools/go.mod), federated
// both ways over both bundle endpoint profiles, with go-spiffe workloads on
// each side calling the other over mutual TLS and with JWT-SVIDs while each
// side rotates its X.509 and JWT authorities.
//
// SPIRE is built once and cached (FERRY_SPIRE_CACHE, default the user cache
// directory's ferry/spire); FERRY_SPIRE_BIN names a directory that already
// holds spire-server and spire-agent of that release.
package spire_test

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"
)

// spireVersion is the SPIRE release tools/go.mod pins.
const spireVersion = "v1.13.3"

// bins are the programs under test.
var bins struct {
	ferry, spireServer, spireAgent string
}

func TestMain(m *testing.M) { os.Exit(runSuite(m)) }

func runSuite(m *testing.M) int {
	tmp, err := os.MkdirTemp("", "ferry-spire-interop-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(tmp)
	bins.ferry = filepath.Join(tmp, "ferry")
	build := exec.Command("go", "build", "-o", bins.ferry, "./cmd/ferry")
	build.Dir = "../../.."
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "building ferry: %v\n%s", err, out)
		return 1
	}
	if bins.spireServer, bins.spireAgent, err = spireBinaries(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return m.Run()
}

// spireBinaries returns spire-server and spire-agent: from FERRY_SPIRE_BIN,
// or from the cache, building them there first when they are missing. The
// cache key covers tools/go.mod, tools/go.sum and the Go toolchain.
func spireBinaries() (server, agent string, err error) {
	if dir := os.Getenv("FERRY_SPIRE_BIN"); dir != "" {
		server, agent = filepath.Join(dir, "spire-server"), filepath.Join(dir, "spire-agent")
		return server, agent, checkVersion(server)
	}
	h := sha256.New()
	for _, f := range []string{"tools/go.mod", "tools/go.sum"} {
		data, err := os.ReadFile(f)
		if err != nil {
			return "", "", fmt.Errorf("spire: %w", err)
		}
		h.Write(data)
	}
	h.Write([]byte(runtime.Version()))
	cache := os.Getenv("FERRY_SPIRE_CACHE")
	if cache == "" {
		base, err := os.UserCacheDir()
		if err != nil {
			return "", "", fmt.Errorf("spire: no cache directory (set FERRY_SPIRE_CACHE): %w", err)
		}
		cache = filepath.Join(base, "ferry", "spire")
	}
	dir := filepath.Join(cache, spireVersion+"-"+hex.EncodeToString(h.Sum(nil))[:12])
	server, agent = filepath.Join(dir, "spire-server"), filepath.Join(dir, "spire-agent")
	if fileExists(server) && fileExists(agent) {
		fmt.Fprintf(os.Stderr, "spire: using SPIRE %s cached in %s\n", spireVersion, dir)
		return server, agent, checkVersion(server)
	}
	if err := os.MkdirAll(cache, 0o755); err != nil {
		return "", "", fmt.Errorf("spire: %w", err)
	}
	tmp, err := os.MkdirTemp(cache, "build-")
	if err != nil {
		return "", "", fmt.Errorf("spire: %w", err)
	}
	defer os.RemoveAll(tmp)
	start := time.Now()
	cmd := exec.Command("go", "install", "github.com/spiffe/spire/cmd/spire-server", "github.com/spiffe/spire/cmd/spire-agent")
	cmd.Dir = "tools"
	cmd.Env = append(os.Environ(), "GOBIN="+tmp, "CGO_ENABLED=1")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", "", fmt.Errorf("spire: building SPIRE %s: %v\n%s", spireVersion, err, out)
	}
	// Another run may have finished first: either copy will do.
	if err := os.Rename(tmp, dir); err != nil && !(fileExists(server) && fileExists(agent)) {
		return "", "", fmt.Errorf("spire: %w", err)
	}
	fmt.Fprintf(os.Stderr, "spire: built SPIRE %s in %s (cached in %s)\n", spireVersion, time.Since(start).Round(time.Second), dir)
	return server, agent, checkVersion(server)
}

// checkVersion makes sure server is the release the suite expects.
func checkVersion(server string) error {
	out, err := exec.Command(server, "--version").CombinedOutput()
	if err != nil {
		return fmt.Errorf("spire: %s --version: %v\n%s", server, err, out)
	}
	if got := strings.TrimSpace(string(out)); !strings.HasPrefix("v"+got, spireVersion) {
		return fmt.Errorf("spire: %s is SPIRE %s, want %s", server, got, spireVersion)
	}
	return nil
}

func fileExists(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.Mode().IsRegular()
}
