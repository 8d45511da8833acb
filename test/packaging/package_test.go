// Package packaging_test builds the packages with `make package` and installs
// the .deb the way an operator would, on a copy-on-write view of this machine:
// an overlay whose lower layer is / and whose upper layer is a tmpfs, in
// mount, network and PID namespaces of its own, so the machine's own files,
// users, ports and processes are never touched. There it checks every file,
// owner and mode the package promises, verifies the units with
// systemd-analyze, runs server, agent and bridge as their units would (same
// user, capabilities, directories and environment, READY=1, RELOADING=1,
// STOPPING=1 and exit 0 on SIGTERM), upgrades with an edited config, purges,
// and installs again.
package packaging_test

import (
	"fmt"
	"os"
	"os/exec"
	osuser "os/user"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"golang.org/x/sys/unix"

	"github.com/ferry-id/ferry/internal/roottest"
)

const (
	childEnv = "FERRY_PACKAGE_TEST_DEBS"
	// dropinEnv carries the agent drop-in docs/azure-vm.md gives for the
	// VM-style endpoint, so the test installs what the guide says.
	dropinEnv = "FERRY_PACKAGE_TEST_VM_DROPIN"
)

// vmDropin is the first ini block after "systemctl edit ferry-agent" in
// docs/azure-vm.md.
func vmDropin(t *testing.T) string {
	t.Helper()
	doc, err := os.ReadFile("../../docs/azure-vm.md")
	if err != nil {
		t.Fatal(err)
	}
	s := string(doc)
	i := strings.Index(s, "systemctl edit ferry-agent")
	j := strings.Index(s[i:], "```ini\n")
	if i < 0 || j < 0 {
		t.Fatal("docs/azure-vm.md has no drop-in after `systemctl edit ferry-agent`")
	}
	block := s[i+j+len("```ini\n"):]
	return block[:strings.Index(block, "```")]
}

var (
	distRoot  string // removed by TestMain
	buildOnce sync.Once
	built     map[string]string // version -> dist dir
	buildErr  error
)

// versions are two releases: the first installed, the second an upgrade.
var versions = []string{"0.0.1", "0.0.2"}

// packages runs `make package` for each version, once per test process.
func packages(t *testing.T) map[string]string {
	t.Helper()
	buildOnce.Do(func() {
		root, err := filepath.Abs("../..")
		if err != nil {
			buildErr = err
			return
		}
		tmp, err := os.MkdirTemp("", "ferry-dist-")
		if err != nil {
			buildErr = err
			return
		}
		distRoot = tmp
		built = map[string]string{}
		for _, v := range versions {
			dist := filepath.Join(tmp, v)
			cmd := exec.Command("make", "package", "VERSION="+v, "DIST="+dist, "BIN="+filepath.Join(tmp, "bin", "ferry"))
			cmd.Dir = root
			if out, err := cmd.CombinedOutput(); err != nil {
				buildErr = fmt.Errorf("make package VERSION=%s: %v\n%s", v, err, out)
				return
			}
			built[v] = dist
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return built
}

func TestMain(m *testing.M) {
	code := m.Run()
	if distRoot != "" {
		os.RemoveAll(distRoot)
	}
	os.Exit(code)
}

func need(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			roottest.Skipf(t, "%s not installed (apt-get install %s)", tool, tool)
		}
	}
}

func glob1(t *testing.T, pattern string) string {
	t.Helper()
	m, err := filepath.Glob(pattern)
	if err != nil || len(m) != 1 {
		t.Fatalf("%s: want one file, got %v (%v)", pattern, m, err)
	}
	return m[0]
}

func TestDebInstall(t *testing.T) {
	if debs := os.Getenv(childEnv); debs != "" {
		installChild(t, strings.Split(debs, ":"))
		return
	}
	roottest.Require(t)
	need(t, "dpkg", "unshare", "setpriv", "systemd-analyze", "ip", "curl")
	dist := packages(t)
	var debs []string
	for _, v := range versions {
		debs = append(debs, glob1(t, filepath.Join(dist[v], "*.deb")))
	}
	// The test binary again, as PID 1 of new mount, network and PID
	// namespaces: what it mounts and starts there ends with it.
	cmd := exec.Command("unshare", "--mount", "--net", "--pid", "--fork", "--propagation", "private",
		os.Args[0], "-test.run", "^TestDebInstall$", "-test.v", "-test.count=1")
	cmd.Env = append(os.Environ(), childEnv+"="+strings.Join(debs, ":"), dropinEnv+"="+vmDropin(t))
	out, err := cmd.CombinedOutput()
	t.Logf("install run:\n%s", out)
	if err != nil {
		t.Fatalf("install run failed: %v", err)
	}
	if !strings.Contains(string(out), "--- PASS: TestDebInstall") {
		t.Fatal("install run did not pass")
	}
}

// TestRPMContents checks the .rpm's files, modes, owners and scripts with
// rpm itself (installing it needs an rpm-based system).
func TestRPMContents(t *testing.T) {
	need(t, "rpm")
	rpmFile := glob1(t, filepath.Join(packages(t)[versions[0]], "*.rpm"))
	out := run(t, "rpm", "-qp", "--queryformat", "[%{FILEMODES:perms} %{FILEUSERNAME} %{FILEGROUPNAME} %{FILEFLAGS:fflags} %{FILENAMES}\n]", rpmFile)
	for _, want := range []string{
		"-rwxr-xr-x root root  /usr/bin/ferry",
		"-rw-r--r-- root root  /usr/lib/systemd/system/ferry-server.service",
		"-rw-r--r-- root root  /usr/lib/systemd/system/ferry-agent.service",
		"-rw-r--r-- root root  /usr/lib/systemd/system/ferry-bridge.service",
		"drwxr-x--- root ferry  /etc/ferry",
		"-rw-r----- root ferry cn /etc/ferry/server.conf",
		"-rw-r----- root ferry cn /etc/ferry/agent.conf",
		"-rw-r----- root ferry cn /etc/ferry/bridge.conf",
		"drwx------ ferry ferry  /var/lib/ferry/server",
		"drwx------ ferry ferry  /var/lib/ferry/agent",
		"drwx------ ferry ferry  /var/lib/ferry/bridge",
		"drwx--x--x ferry ferry  /var/opt/azcmagent/tokens",
	} {
		if !strings.Contains(out, want+"\n") {
			t.Errorf("rpm lacks %q:\n%s", want, out)
		}
	}
	scripts := run(t, "rpm", "-qp", "--scripts", rpmFile)
	for _, want := range []string{"preinstall scriptlet", "groupadd --system ferry", "useradd --system --gid ferry",
		"groupadd --system ferry-mi", "postinstall scriptlet", "try-restart", "preuninstall scriptlet", "postuninstall scriptlet"} {
		if !strings.Contains(scripts, want) {
			t.Errorf("rpm scripts lack %q:\n%s", want, scripts)
		}
	}
	if deps := run(t, "rpm", "-qpR", rpmFile); !strings.Contains(deps, "shadow-utils") {
		t.Errorf("rpm does not require shadow-utils (useradd):\n%s", deps)
	}
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// as runs a command as user (with the user's groups), as `sudo -u` would.
func as(t *testing.T, user string, args ...string) (string, error) {
	t.Helper()
	u, err := osuser.Lookup(user)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("setpriv", append([]string{"--reuid=" + u.Uid, "--regid=" + u.Gid, "--init-groups", "--"}, args...)...)
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/"}
	cmd.Dir = "/"
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func mustAs(t *testing.T, user string, args ...string) string {
	t.Helper()
	out, err := as(t, user, args...)
	if err != nil {
		t.Fatalf("as %s: %s: %v\n%s", user, strings.Join(args, " "), err, out)
	}
	return out
}

func mount(t *testing.T, src, target, fstype string, flags uintptr, data string) {
	t.Helper()
	if err := os.MkdirAll(target, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(src, target, fstype, flags, data); err != nil {
		t.Fatalf("mount %s on %s: %v", fstype, target, err)
	}
}

// enterOverlay makes the copy-on-write root and chroots into it.
func enterOverlay(t *testing.T, debs []string) {
	if os.Getpid() != 1 {
		t.Fatalf("the install run must be PID 1 of its own PID namespace (pid %d)", os.Getpid())
	}
	base, err := os.MkdirTemp("", "ferry-pkgroot-")
	if err != nil {
		t.Fatal(err)
	}
	mount(t, "tmpfs", base, "tmpfs", 0, "mode=0700")
	root := filepath.Join(base, "root")
	for _, d := range []string{"upper", "work", "root"} {
		if err := os.Mkdir(filepath.Join(base, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	mount(t, "overlay", root, "overlay", 0, "lowerdir=/,upperdir="+base+"/upper,workdir="+base+"/work")
	mount(t, "proc", root+"/proc", "proc", 0, "")
	mount(t, "sysfs", root+"/sys", "sysfs", unix.MS_RDONLY, "")
	mount(t, "/dev", root+"/dev", "", unix.MS_BIND|unix.MS_REC, "")
	mount(t, "tmpfs", root+"/run", "tmpfs", 0, "mode=0755")
	mount(t, "tmpfs", root+"/tmp", "tmpfs", 0, "mode=1777")
	if err := os.MkdirAll(root+"/root/pkgs", 0o700); err != nil {
		t.Fatal(err)
	}
	for _, d := range debs {
		data, err := os.ReadFile(d)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(root, "root/pkgs", filepath.Base(d)), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := unix.Chroot(root); err != nil {
		t.Fatal(err)
	}
	if err := os.Chdir("/"); err != nil {
		t.Fatal(err)
	}
	run(t, "ip", "link", "set", "lo", "up")
}

type entry struct {
	path, kind, mode, owner, group string
}

// layout is what the package promises, before any role has run.
var layout = []entry{
	{"/usr/bin/ferry", "f", "0755", "root", "root"},
	{"/usr/lib/systemd/system/ferry-server.service", "f", "0644", "root", "root"},
	{"/usr/lib/systemd/system/ferry-agent.service", "f", "0644", "root", "root"},
	{"/usr/lib/systemd/system/ferry-bridge.service", "f", "0644", "root", "root"},
	{"/etc/ferry", "d", "0750", "root", "ferry"},
	{"/etc/ferry/server.conf", "f", "0640", "root", "ferry"},
	{"/etc/ferry/agent.conf", "f", "0640", "root", "ferry"},
	{"/etc/ferry/bridge.conf", "f", "0640", "root", "ferry"},
	{"/var/lib/ferry", "d", "0755", "root", "root"},
	{"/var/lib/ferry/server", "d", "0700", "ferry", "ferry"},
	{"/var/lib/ferry/agent", "d", "0700", "ferry", "ferry"},
	{"/var/lib/ferry/bridge", "d", "0700", "ferry", "ferry"},
	{"/var/opt/azcmagent", "d", "0755", "root", "root"},
	{"/var/opt/azcmagent/tokens", "d", "0711", "ferry", "ferry"},
	{"/usr/share/doc/ferry/README.md", "f", "0644", "root", "root"},
	{"/usr/share/doc/ferry/CHANGELOG.md", "f", "0644", "root", "root"},
	{"/usr/share/doc/ferry/copyright", "f", "0644", "root", "root"},
	{"/usr/share/doc/ferry/install.md", "f", "0644", "root", "root"},
	{"/usr/share/doc/ferry/config.md", "f", "0644", "root", "root"},
}

func checkLayout(t *testing.T, entries []entry) {
	t.Helper()
	for _, e := range entries {
		out, err := exec.Command("stat", "-c", "%F %a %U %G", e.path).CombinedOutput()
		if err != nil {
			t.Errorf("%s: %v %s", e.path, err, out)
			continue
		}
		kind := map[string]string{"regular file": "f", "directory": "d", "socket": "s"}
		f := strings.Fields(strings.Replace(string(out), "regular file", "regular-file", 1))
		got := entry{e.path, kind[strings.Replace(f[0], "-", " ", 1)], fmt.Sprintf("%04s", f[1]), f[2], f[3]}
		if got != e {
			t.Errorf("%s: got %s %s %s:%s, want %s %s %s:%s", e.path, got.kind, got.mode, got.owner, got.group, e.kind, e.mode, e.owner, e.group)
		}
	}
}

// checkUsers checks the service user and the groups the package creates.
func checkUsers(t *testing.T) {
	t.Helper()
	pw := strings.Split(strings.TrimSpace(run(t, "getent", "passwd", "ferry")), ":")
	if len(pw) != 7 || pw[5] != "/var/lib/ferry" || pw[6] != "/usr/sbin/nologin" {
		t.Errorf("ferry user: %v", pw)
	}
	if uid := pw[2]; len(uid) > 3 { // a system uid (below 1000)
		t.Errorf("ferry uid %s is not a system uid", uid)
	}
	run(t, "getent", "group", "ferry")
	run(t, "getent", "group", "ferry-mi")
}

// checkState checks that nothing a role wrote can be read or changed by
// another user: every file under /var/lib/ferry/<role> belongs to ferry
// and has no group or other bits.
func checkState(t *testing.T) {
	t.Helper()
	n := 0
	_ = filepath.Walk("/var/lib/ferry", func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			t.Error(err)
			return nil
		}
		if p == "/var/lib/ferry" {
			return nil
		}
		st := fi.Sys().(*syscall.Stat_t)
		if fi.Mode().Perm()&0o077 != 0 && !strings.HasSuffix(p, ".pem") || fi.Mode().Perm()&0o022 != 0 {
			// Public certificates (tls-ca.pem, bundles) may be world-readable; nothing is writable by others.
			t.Errorf("%s: mode %s", p, fi.Mode())
		}
		if fi.IsDir() && fi.Mode().Perm() != 0o700 {
			t.Errorf("%s: directory mode %s, want 0700", p, fi.Mode())
		}
		if u := lookupName(st.Uid); u != "ferry" {
			t.Errorf("%s: owner %s, want ferry", p, u)
		}
		n++
		return nil
	})
	if n < 5 {
		t.Errorf("only %d entries under /var/lib/ferry: the roles wrote nothing?", n)
	}
}

func lookupName(uid uint32) string {
	out, err := exec.Command("getent", "passwd", fmt.Sprint(uid)).Output()
	if err != nil {
		return fmt.Sprint(uid)
	}
	return strings.SplitN(string(out), ":", 2)[0]
}

func editFile(t *testing.T, path string, edit func(string) string) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	out := edit(string(data))
	if out == string(data) {
		t.Fatalf("%s: edit changed nothing", path)
	}
	if err := os.WriteFile(path, []byte(out), 0o640); err != nil {
		t.Fatal(err)
	}
}

// insertInBlock puts text before the last closing brace of an HCL file (the
// end of its role block).
func insertInBlock(text string) func(string) string {
	return func(s string) string {
		i := strings.LastIndex(s, "}")
		return s[:i] + text + s[i:]
	}
}

func installChild(t *testing.T, debs []string) {
	enterOverlay(t, debs)
	first, second := "/root/pkgs/"+filepath.Base(debs[0]), "/root/pkgs/"+filepath.Base(debs[1])

	// --- install (docs/install.md) ---
	run(t, "dpkg", "-i", first)
	checkUsers(t)
	checkLayout(t, layout)
	if got := run(t, "dpkg-query", "-W", "-f=${Conffiles}", "ferry"); strings.Count(got, "/etc/ferry/") != 3 {
		t.Errorf("conffiles: %q", got)
	}
	// The units as installed, with the binary they name in place.
	units := []string{"/usr/lib/systemd/system/ferry-server.service", "/usr/lib/systemd/system/ferry-agent.service", "/usr/lib/systemd/system/ferry-bridge.service"}
	if out, err := exec.Command("systemd-analyze", append([]string{"verify", "--man=no"}, units...)...).CombinedOutput(); err != nil || len(strings.TrimSpace(string(out))) > 0 {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
	// What every unit promises (docs/install.md), and the capabilities
	// each role may have: the agent those its attestation needs, the
	// others none.
	roleCaps := map[string][]string{
		"ferry-server": nil,
		"ferry-agent":  {"CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH", "CAP_CHOWN", "CAP_FOWNER"},
		"ferry-bridge": nil,
	}
	for _, path := range units {
		u := loadUnit(t, path)
		for k, want := range map[string]string{"Type": "notify", "Restart": "on-failure", "NoNewPrivileges": "yes",
			"ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes", "User": "ferry"} {
			if got := u.get(k); got != want {
				t.Errorf("%s: %s=%q, want %q", u.name, k, got, want)
			}
		}
		role := strings.TrimPrefix(u.name, "ferry-")
		runtime := "ferry/" + role
		if role == "bridge" {
			runtime = "" // no socket of its own
		}
		if u.get("StateDirectory") != "ferry/"+role || u.get("RuntimeDirectory") != runtime {
			t.Errorf("%s: StateDirectory=%q RuntimeDirectory=%q", u.name, u.get("StateDirectory"), u.get("RuntimeDirectory"))
		}
		for _, k := range []string{"CapabilityBoundingSet", "AmbientCapabilities"} {
			if got := u.list(k); !slices.Equal(got, roleCaps[u.name]) {
				t.Errorf("%s: %s=%v, want %v", u.name, k, got, roleCaps[u.name])
			}
		}
	}
	for _, u := range units {
		out, _ := exec.Command("systemd-analyze", "security", "--offline=yes", "--no-pager", u).CombinedOutput()
		m := regexp.MustCompile(`Overall exposure level for \S+: ([0-9.]+) (\S+)`).FindStringSubmatch(string(out))
		if m == nil {
			t.Errorf("systemd-analyze security %s:\n%s", u, out)
			continue
		}
		t.Logf("systemd-analyze security %s: %s %s", filepath.Base(u), m[1], m[2])
		if m[2] != "OK" {
			t.Errorf("%s: exposure %s %s", u, m[1], m[2])
		}
	}

	// --- configure one node as docs/install.md says ---
	run(t, "ferry", "cluster", "tls", "ca", "create", "--dir", "/etc/ferry/cluster-tls")
	run(t, "ferry", "cluster", "tls", "cert", "create", "--node", "server-1", "--dir", "/etc/ferry/cluster-tls/server-1",
		"--ca", "/etc/ferry/cluster-tls/ca.pem", "--ca-key", "/etc/ferry/cluster-tls/ca-key.pem")
	run(t, "sh", "-c", "mv /etc/ferry/cluster-tls/ca-key.pem /root/ && chown -R ferry:ferry /etc/ferry/cluster-tls && chmod -R go-rwx /etc/ferry/cluster-tls")

	server := startService(t, units[0])
	server.waitNotify(t, "READY=1", 2*time.Minute)
	checkLayout(t, []entry{
		{"/run/ferry/server", "d", "0700", "ferry", "ferry"},
		{"/run/ferry/server/admin.sock", "s", "0600", "ferry", "ferry"},
	})
	if out, err := exec.Command("curl", "-sf", "http://127.0.0.1:8083/ready").CombinedOutput(); err != nil {
		t.Fatalf("server notified READY=1 but /ready says %v: %s", err, out)
	}

	run(t, "sh", "-c", "setpriv --reuid=ferry --regid=ferry --init-groups ferry bundle show > /etc/ferry/bundle.pem")
	if strings.Contains(server.logTail(), "readable by others") {
		t.Errorf("the guide's file modes draw a warning:\n%s", server.logTail())
	}
	tok := mustAs(t, "ferry", "ferry", "token", "generate", "--spiffe-id", "spiffe://example.org/spire/agent/node1")
	m := regexp.MustCompile(`Token: (\S+)`).FindStringSubmatch(tok)
	if m == nil {
		t.Fatalf("token generate: %s", tok)
	}
	if err := os.WriteFile("/etc/ferry/agent.env", []byte("FERRY_JOIN_TOKEN="+m[1]+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	bridge := startService(t, units[2])
	bridge.waitNotify(t, "READY=1", 2*time.Minute)

	// The Arc-style endpoint for members of ferry-mi only, with the
	// bridge as authority.
	editFile(t, "/etc/ferry/agent.conf", insertInBlock(`
  imds {
    authority         = "https://127.0.0.1:8443"
    authority_ca_file = "/var/lib/ferry/bridge/tls-ca.pem"
    allowed_groups    = ["ferry-mi"]
  }
`))
	// The Arc port reserved as docs/azure-vm.md says (in this network
	// namespace only), so no connection of the server's or the bridge's
	// holds it as its local port when the agent binds it.
	if err := os.WriteFile("/proc/sys/net/ipv4/ip_local_reserved_ports", []byte("40342\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	agent := startService(t, units[1])
	agent.waitNotify(t, "READY=1", 2*time.Minute)
	checkLayout(t, []entry{
		{"/run/ferry/agent", "d", "0755", "ferry", "ferry"},
		{"/run/ferry/agent/public/api.sock", "s", "0777", "ferry", "ferry"},
	})

	// A workload of another user gets its SVID by uid and by executable
	// path: the agent, running as ferry, reads nobody's /proc/PID/exe.
	mustAs(t, "ferry", "ferry", "entry", "create", "--spiffe-id", "spiffe://example.org/pkgtest", "--parent-id", "spiffe://example.org/spire/agent/node1",
		"--selector", "unix:uid:65534", "--selector", "unix:path:/usr/bin/ferry")
	// The entry reaches the agent through its stream: ask until it has.
	var svid string
	if !assert.Eventually(t, func() bool {
		agent.assertRunning(t)
		out, err := as(t, "nobody", "ferry", "api", "fetch", "x509")
		svid = fmt.Sprint(out, err)
		return err == nil && strings.Contains(out, "spiffe://example.org/pkgtest")
	}, 2*time.Minute, 100*time.Millisecond) {
		t.Fatalf("nobody got no SVID: %s\n%s\n%s", svid, agent.logTail(), server.logTail())
	}
	t.Logf("nobody's SVID:\n%s", svid)

	// Arc challenge: a member of ferry-mi gets a file only it can read (the
	// agent gave it away: CAP_CHOWN, CAP_FOWNER); others get 403.
	run(t, "useradd", "--system", "--no-create-home", "--groups", "ferry-mi", "mi-user")
	arc := "http://127.0.0.1:40342/metadata/identity/oauth2/token?api-version=2020-06-01&resource=api%3A%2F%2Fdemo"
	out, _ := as(t, "mi-user", "curl", "-s", "-D", "-", "-o", "/dev/null", "-H", "Metadata: true", arc)
	m = regexp.MustCompile(`(?i)www-authenticate: Basic realm=(/var/opt/azcmagent/tokens/[0-9a-f]+\.key)`).FindStringSubmatch(out)
	if !strings.Contains(out, " 401") || m == nil {
		t.Fatalf("Arc challenge for a ferry-mi member: %s\n%s", out, agent.logTail())
	}
	// The caller's, mode 0600 (the group stays the agent's: it has no access).
	checkLayout(t, []entry{{m[1], "f", "0600", "mi-user", "ferry"}})
	if _, err := as(t, "mi-user", "cat", m[1]); err != nil {
		t.Errorf("the caller cannot read its challenge file: %v", err)
	}
	out, _ = as(t, "nobody", "curl", "-s", "-D", "-", "-o", "/dev/null", "-H", "Metadata: true", arc)
	if !strings.Contains(out, " 403") {
		t.Errorf("Arc endpoint for a user outside ferry-mi: %s", out)
	}

	// --- the VM-style endpoint (docs/azure-vm.md): the drop-in adds
	// CAP_NET_ADMIN and CAP_NET_BIND_SERVICE; the agent puts
	// 169.254.169.254 on lo and answers on port 80 where SDKs call ---
	agent.stop(t)
	if err := os.MkdirAll("/etc/systemd/system/ferry-agent.service.d", 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile("/etc/systemd/system/ferry-agent.service.d/vm.conf", []byte(os.Getenv(dropinEnv)), 0o644); err != nil {
		t.Fatal(err)
	}
	editFile(t, "/etc/ferry/agent.conf", func(s string) string {
		return strings.Replace(s, `    allowed_groups    = ["ferry-mi"]`, `    allowed_groups    = ["ferry-mi"]
    vm                   = true
    add_loopback_address = true`, 1)
	})
	agent = startService(t, units[1])
	agent.waitNotify(t, "READY=1", 2*time.Minute)
	if out := run(t, "ip", "-o", "addr", "show", "dev", "lo"); !strings.Contains(out, "169.254.169.254/32") {
		t.Errorf("lo lacks 169.254.169.254/32:\n%s", out)
	}
	vm := "http://169.254.169.254/metadata/identity/oauth2/token?api-version=2018-02-01&resource=api%3A%2F%2Fdemo"
	out, _ = as(t, "mi-user", "curl", "-s", "-w", "\n%{http_code}", "-H", "Metadata: true", vm)
	if !strings.HasSuffix(out, "\n400") || !strings.Contains(out, `"error":"invalid_request"`) {
		// No identity is configured: Azure's answer for that, from the endpoint.
		t.Errorf("VM-style endpoint: %s\n%s", out, agent.logTail())
	}
	out, _ = as(t, "nobody", "curl", "-s", "-w", "\n%{http_code}", "-H", "Metadata: true", vm)
	if !strings.HasSuffix(out, "\n403") {
		t.Errorf("VM-style endpoint for a user outside ferry-mi: %s", out)
	}

	// --- reload: log_level from the file, at once ---
	editFile(t, "/etc/ferry/agent.conf", func(s string) string {
		return strings.Replace(s, `log_level  = "info"`, `log_level  = "debug"`, 1)
	})
	agent.reload(t)
	if !strings.Contains(agent.logTail(), `msg="log level changed" from=INFO to=DEBUG`) {
		t.Errorf("reload did not change the level:\n%s", agent.logTail())
	}
	// On a server, the reloaded level is also the one `ferry logger reset`
	// goes back to, whatever `ferry logger set` said before.
	mustAs(t, "ferry", "ferry", "logger", "set", "--level", "error")
	editFile(t, "/etc/ferry/server.conf", func(s string) string {
		return strings.Replace(s, `log_level  = "info"`, `log_level  = "warn"`, 1)
	})
	server.reload(t)
	if out := mustAs(t, "ferry", "ferry", "logger", "get"); !regexp.MustCompile(`Current level\s*: warn\nLaunch level\s*: warn`).MatchString(out) {
		t.Errorf("logger get after a reload to warn:\n%s", out)
	}

	checkState(t)

	// --- stop, as systemctl stop does ---
	agent.stop(t)
	bridge.stop(t)
	server.stop(t)
	if _, err := os.Stat("/run/ferry/agent/public/api.sock"); err == nil {
		t.Errorf("the agent left its socket behind")
	}

	// --- upgrade: the operator's config survives, modes are restored ---
	run(t, "chmod", "0755", "/var/lib/ferry/agent")
	run(t, "dpkg", "-i", second)
	checkLayout(t, layout)
	if data, _ := os.ReadFile("/etc/ferry/agent.conf"); !strings.Contains(string(data), `allowed_groups    = ["ferry-mi"]`) {
		t.Errorf("the upgrade overwrote /etc/ferry/agent.conf")
	}
	if v := run(t, "dpkg-query", "-W", "-f=${Version}", "ferry"); v != versions[1] {
		t.Errorf("installed version %q after the upgrade", v)
	}
	// The upgraded binary serves the state the first one wrote.
	server = startService(t, units[0])
	server.waitNotify(t, "READY=1", 2*time.Minute)
	if out := mustAs(t, "ferry", "ferry", "entry", "list"); !strings.Contains(out, "spiffe://example.org/pkgtest") {
		t.Errorf("entry lost across the upgrade:\n%s", out)
	}
	server.stop(t)

	// --- purge: binary, units and configs go; state and users stay ---
	run(t, "dpkg", "--purge", "ferry")
	for _, p := range []string{"/usr/bin/ferry", "/usr/lib/systemd/system/ferry-server.service", "/etc/ferry/agent.conf", "/etc/ferry/server.conf"} {
		if _, err := os.Lstat(p); err == nil {
			t.Errorf("%s survived the purge", p)
		}
	}
	if _, err := os.Stat("/var/lib/ferry/server/raft"); err != nil {
		t.Errorf("purge removed the server's state: %v", err)
	}
	checkUsers(t)

	// --- install again ---
	run(t, "dpkg", "-i", first)
	checkLayout(t, layout)
	if data, _ := os.ReadFile("/etc/ferry/agent.conf"); strings.Contains(string(data), "allowed_groups    =") {
		t.Errorf("a purge and install kept the old agent.conf")
	}
	if out := run(t, "ferry", "--version"); !strings.Contains(out, versions[0]) {
		t.Errorf("ferry --version: %s", out)
	}
}

// assertRunning fails the test if the service has exited.
func (s *service) assertRunning(t *testing.T) {
	t.Helper()
	select {
	case <-s.done:
		t.Fatalf("%s exited: %v\n%s", s.unit.name, s.err, s.logTail())
	default:
	}
}
