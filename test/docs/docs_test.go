// Package docs_test keeps the operator guides true: the configuration
// reference is checked against the config structs, every guide is linked
// from the README, and the sample cluster configs start a real cluster.
package docs_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/agent"
	bridgeservice "github.com/ferry-id/ferry/bridge/service"
	"github.com/ferry-id/ferry/server"
	"github.com/ferry-id/ferry/test/testcluster"
)

func read(t *testing.T, path string) string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("../..", path))
	require.NoError(t, err)
	return string(data)
}

// TestConfigReference fails when docs/config.md lists a key ferry does not
// accept, or misses one it does.
func TestConfigReference(t *testing.T) {
	doc := read(t, "docs/config.md")
	var documented []string
	for _, m := range regexp.MustCompile("(?m)^\\| `([a-z0-9_.]+)` \\|").FindAllStringSubmatch(doc, -1) {
		documented = append(documented, m[1])
	}
	sort.Strings(documented)
	want := slices.Concat(server.ConfigKeys(), agent.ConfigKeys(), bridgeservice.ConfigKeys())
	sort.Strings(want)
	for _, k := range want {
		if _, found := slices.BinarySearch(documented, k); !found {
			t.Errorf("docs/config.md does not document %s", k)
		}
	}
	for i, k := range documented {
		if _, found := slices.BinarySearch(want, k); !found {
			t.Errorf("docs/config.md documents %s, which no config accepts", k)
		}
		if i > 0 && documented[i-1] == k {
			t.Errorf("docs/config.md documents %s twice", k)
		}
	}
}

// TestGuidesLinked fails when a guide in docs/ is not linked from the README
// or a relative link in the README or a guide points nowhere.
func TestGuidesLinked(t *testing.T) {
	readme := read(t, "README.md")
	guides, err := filepath.Glob("../../docs/*.md")
	require.NoError(t, err)
	require.NotEmpty(t, guides)
	for _, g := range guides {
		name := "docs/" + filepath.Base(g)
		if !strings.Contains(readme, "("+name+")") {
			t.Errorf("README.md does not link %s", name)
		}
	}
	link := regexp.MustCompile(`\]\(([^)#:]+)(#[^)]*)?\)`)
	for _, doc := range append([]string{"../../README.md", "../../CONTRIBUTING.md", "../../CHANGELOG.md"}, guides...) {
		data, err := os.ReadFile(doc)
		require.NoError(t, err)
		for _, m := range link.FindAllStringSubmatch(string(data), -1) {
			target := filepath.Join(filepath.Dir(doc), m[1])
			if _, err := os.Stat(target); err != nil {
				t.Errorf("%s links %s: %v", filepath.Base(doc), m[1], err)
			}
		}
	}
}

// TestClusterFromSampleConfigs starts the three servers of docs/cluster.md
// from conf/cluster/server-{1,2,3}.conf, changed only in addresses (free
// loopback ports for 10.0.0.N) and paths (a temp dir for /var/lib, /run and
// /etc), with the TLS files made by the commands the guide gives. The nodes
// form one cluster through retry_join, and a write on one is read on another.
func TestClusterFromSampleConfigs(t *testing.T) {
	bin := testcluster.Binary(t)
	dir := t.TempDir()
	ferry := func(env []string, args ...string) string {
		t.Helper()
		cmd := exec.Command(bin, args...)
		cmd.Env = append(os.Environ(), env...)
		out, err := cmd.CombinedOutput()
		require.NoError(t, err, "ferry %s:\n%s", strings.Join(args, " "), out)
		return string(out)
	}
	tls := filepath.Join(dir, "etc/ferry/cluster-tls")
	ferry(nil, "cluster", "tls", "ca", "create", "--dir", tls)
	repl := []string{}
	for _, n := range []string{"1", "2", "3"} {
		ferry(nil, "cluster", "tls", "cert", "create", "--node", "server-"+n, "--dir", filepath.Join(tls, "server-"+n),
			"--ca", filepath.Join(tls, "ca.pem"), "--ca-key", filepath.Join(tls, "ca-key.pem"))
		repl = append(repl, "10.0.0."+n+":8301", testcluster.FreeAddr(t), "10.0.0."+n+":8081", testcluster.FreeAddr(t))
	}
	type node struct {
		conf, socket string
		cmd          *exec.Cmd
	}
	var nodes []node
	for _, n := range []string{"1", "2", "3"} {
		base := filepath.Join(dir, "server-"+n)
		require.NoError(t, os.MkdirAll(base, 0o700))
		conf := strings.NewReplacer(append(slices.Clone(repl),
			"127.0.0.1:8083", testcluster.FreeAddr(t),
			"/var/lib/ferry/server", filepath.Join(base, "data"),
			"/run/ferry/server/admin.sock", filepath.Join(base, "run", "admin.sock"),
			"/etc/ferry/cluster-tls", tls,
		)...).Replace(read(t, "conf/cluster/server-"+n+".conf"))
		path := filepath.Join(base, "server.conf")
		require.NoError(t, os.WriteFile(path, []byte(conf), 0o600))
		logf, err := os.Create(filepath.Join(base, "server.log"))
		require.NoError(t, err)
		cmd := exec.Command(bin, "server", "run", "--config", path)
		cmd.Stdout, cmd.Stderr = logf, logf
		cmd.Env = append(os.Environ(), "FERRY_ADMIN_SOCKET=")
		require.NoError(t, cmd.Start())
		t.Cleanup(func() {
			_ = cmd.Process.Kill()
			_, _ = cmd.Process.Wait()
			logf.Close()
			if t.Failed() {
				data, _ := os.ReadFile(logf.Name())
				t.Logf("server-%s log:\n%s", n, data)
			}
		})
		nodes = append(nodes, node{conf: path, socket: filepath.Join(base, "run", "admin.sock"), cmd: cmd})
	}
	on := func(n node) []string { return []string{"FERRY_ADMIN_SOCKET=" + n.socket} }
	voters := func(want int) {
		t.Helper()
		require.Eventually(t, func() bool {
			cmd := exec.Command(bin, "cluster", "list", "--output", "json")
			cmd.Env = append(os.Environ(), on(nodes[0])...)
			out, err := cmd.CombinedOutput()
			return err == nil && strings.Count(strings.ReplaceAll(string(out), " ", ""), `"voter":true`) == want
		}, 2*time.Minute, 100*time.Millisecond, "%d voters", want)
	}
	voters(3)

	ferry(on(nodes[2]), "entry", "create", "--entry-id", "from-node-3", "--spiffe-id", "spiffe://example.org/web",
		"--parent-id", "spiffe://example.org/spire/agent/node1", "--selector", "unix:uid:1000")
	out := ferry(on(nodes[1]), "entry", "show", "--entry-id", "from-node-3", "--consistent")
	require.Contains(t, out, "spiffe://example.org/web")

	// Removing a node (docs/cluster.md): remove it, stop it; the others go
	// on. Back with an empty data dir, it joins again as a new member.
	ferry(on(nodes[0]), "cluster", "remove", "server-3")
	voters(2)
	require.NoError(t, nodes[2].cmd.Process.Signal(os.Interrupt))
	require.NoError(t, nodes[2].cmd.Wait())
	ferry(on(nodes[1]), "entry", "create", "--entry-id", "after-removal", "--spiffe-id", "spiffe://example.org/db",
		"--parent-id", "spiffe://example.org/spire/agent/node1", "--selector", "unix:uid:1001")
	require.NoError(t, os.RemoveAll(filepath.Join(dir, "server-3", "data")))
	again := exec.Command(bin, "server", "run", "--config", nodes[2].conf)
	logf, err := os.OpenFile(filepath.Join(dir, "server-3", "server.log"), os.O_WRONLY|os.O_APPEND, 0o600)
	require.NoError(t, err)
	defer logf.Close()
	again.Stdout, again.Stderr, again.Env = logf, logf, append(os.Environ(), "FERRY_ADMIN_SOCKET=")
	require.NoError(t, again.Start())
	t.Cleanup(func() { _ = again.Process.Kill(); _ = again.Wait() })
	voters(3)
	out = ferry(on(nodes[2]), "entry", "show", "--entry-id", "after-removal", "--consistent")
	require.Contains(t, out, "spiffe://example.org/db")
}
