package packaging_test

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// unitFile is the [Service] section of an installed systemd unit: each key's
// values in order.
type unitFile struct {
	name string
	keys map[string][]string
}

func loadUnit(t *testing.T, path string) unitFile {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	u := unitFile{name: strings.TrimSuffix(filepath.Base(path), ".service"), keys: map[string][]string{}}
	section := ""
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' || line[0] == ';' {
			continue
		}
		if line[0] == '[' {
			section = line
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			t.Fatalf("%s: line %q is not key=value", path, line)
		}
		if section == "[Service]" {
			u.keys[k] = append(u.keys[k], v)
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	// Drop-ins (`systemctl edit`), in name order, after the unit.
	dropins, _ := filepath.Glob(filepath.Join("/etc/systemd/system", filepath.Base(path)+".d", "*.conf"))
	for _, d := range dropins {
		du := loadUnit(t, d)
		for k, v := range du.keys {
			u.keys[k] = append(u.keys[k], v...)
		}
	}
	return u
}

// list is a list-valued key as systemd reads it: every assignment adds to
// the list, an empty one clears it.
func (u unitFile) list(key string) []string {
	var out []string
	for _, v := range u.keys[key] {
		if v == "" {
			out = nil
			continue
		}
		for _, f := range strings.Fields(v) {
			if !slices.Contains(out, f) {
				out = append(out, f)
			}
		}
	}
	return out
}

// get is the value that wins for a single-valued key: the last one.
func (u unitFile) get(key string) string {
	v := u.keys[key]
	if len(v) == 0 {
		return ""
	}
	return v[len(v)-1]
}

// service is a role started the way systemd starts its unit: as the unit's
// User= and Group= with their supplementary groups (setpriv --init-groups),
// NoNewPrivileges, the ambient and bounding capability sets, UMask=, a clean
// environment with RUNTIME_DIRECTORY, STATE_DIRECTORY, NOTIFY_SOCKET and the
// EnvironmentFile's variables, RuntimeDirectory= and StateDirectory= made
// with their owners and modes, and stdout/stderr to a log (the journal).
// What needs systemd as PID 1 (the mount, syscall and address-family
// sandbox) is what `systemd-analyze verify` and `security` judge instead.
type service struct {
	unit   unitFile
	cmd    *exec.Cmd
	log    string
	notify *net.UnixConn
	msgs   chan string
	done   chan struct{}
	err    error
}

func startService(t *testing.T, unitPath string) *service {
	t.Helper()
	u := loadUnit(t, unitPath)
	usr, err := user.Lookup(u.get("User"))
	if err != nil {
		t.Fatal(err)
	}
	grp, err := user.LookupGroup(u.get("Group"))
	if err != nil {
		t.Fatal(err)
	}
	uid, _ := strconv.Atoi(usr.Uid)
	gid, _ := strconv.Atoi(grp.Gid)
	env := []string{
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"HOME=" + usr.HomeDir, "USER=" + usr.Username, "LOGNAME=" + usr.Username, "SHELL=/usr/sbin/nologin",
	}
	dirs := func(key, base, modeKey, envName string) {
		var paths []string
		for _, d := range strings.Fields(u.get(key)) {
			p := filepath.Join(base, d)
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				t.Fatal(err)
			}
			mode := uint64(0o755)
			if m := u.get(modeKey); m != "" {
				mode, err = strconv.ParseUint(m, 8, 32)
				if err != nil {
					t.Fatal(err)
				}
			}
			if err := os.Mkdir(p, os.FileMode(mode)); err != nil && !errors.Is(err, os.ErrExist) {
				t.Fatal(err)
			}
			if err := os.Chown(p, uid, gid); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(p, os.FileMode(mode)); err != nil {
				t.Fatal(err)
			}
			paths = append(paths, p)
		}
		if len(paths) > 0 {
			env = append(env, envName+"="+strings.Join(paths, ":"))
		}
	}
	dirs("RuntimeDirectory", "/run", "RuntimeDirectoryMode", "RUNTIME_DIRECTORY")
	dirs("StateDirectory", "/var/lib", "StateDirectoryMode", "STATE_DIRECTORY")
	for _, ef := range u.keys["EnvironmentFile"] {
		optional := strings.HasPrefix(ef, "-")
		data, err := os.ReadFile(strings.TrimPrefix(ef, "-"))
		if err != nil {
			if optional && errors.Is(err, os.ErrNotExist) {
				continue
			}
			t.Fatal(err)
		}
		for _, l := range strings.Split(string(data), "\n") {
			if l = strings.TrimSpace(l); l != "" && l[0] != '#' {
				env = append(env, l)
			}
		}
	}

	// The notify socket, as systemd's /run/systemd/notify: a datagram
	// socket every process may send to.
	notifyDir := "/run/test-notify"
	if err := os.MkdirAll(notifyDir, 0o755); err != nil {
		t.Fatal(err)
	}
	notifyPath := filepath.Join(notifyDir, u.name)
	_ = os.Remove(notifyPath)
	nc, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: notifyPath, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(notifyPath, 0o777); err != nil {
		t.Fatal(err)
	}
	env = append(env, "NOTIFY_SOCKET="+notifyPath)

	caps := func(list []string) string {
		var out []string
		for _, c := range list {
			out = append(out, "+"+strings.ToLower(strings.TrimPrefix(c, "CAP_")))
		}
		return strings.Join(out, ",")
	}
	args := []string{"--reuid=" + usr.Uid, "--regid=" + grp.Gid, "--init-groups"}
	if u.get("NoNewPrivileges") == "yes" {
		args = append(args, "--no-new-privs")
	}
	bounding := caps(u.list("CapabilityBoundingSet"))
	args = append(args, "--bounding-set=-all"+prefixComma(bounding))
	if amb := caps(u.list("AmbientCapabilities")); amb != "" {
		args = append(args, "--inh-caps=-all,"+amb, "--ambient-caps=-all,"+amb)
	} else {
		args = append(args, "--inh-caps=-all")
	}
	args = append(args, "--")
	args = append(args, strings.Fields(u.get("ExecStart"))...)

	logPath := filepath.Join("/run/test-logs", u.name+".log")
	if err := os.MkdirAll(filepath.Dir(logPath), 0o700); err != nil {
		t.Fatal(err)
	}
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("setpriv", args...)
	cmd.Env = env
	cmd.Dir = "/"
	cmd.Stdout, cmd.Stderr = logf, logf
	umask := 0o022
	if m := u.get("UMask"); m != "" {
		v, err := strconv.ParseUint(m, 8, 32)
		if err != nil {
			t.Fatal(err)
		}
		umask = int(v)
	}
	old := syscall.Umask(umask)
	err = cmd.Start()
	syscall.Umask(old)
	logf.Close()
	if err != nil {
		t.Fatal(err)
	}
	s := &service{unit: u, cmd: cmd, log: logPath, notify: nc, msgs: make(chan string, 64), done: make(chan struct{})}
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := nc.Read(buf)
			if err != nil {
				close(s.msgs)
				return
			}
			s.msgs <- string(buf[:n])
		}
	}()
	go func() {
		s.err = cmd.Wait()
		// Said after every datagram the process sent: waitNotify sees
		// what the process said before it learns that it exited. Sent
		// before done closes, so that it never reaches the socket of the
		// next start of the same unit.
		if c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: notifyPath, Net: "unixgram"}); err == nil {
			_, _ = c.Write([]byte(exitedNote))
			c.Close()
		}
		close(s.done)
	}()
	t.Cleanup(func() {
		select {
		case <-s.done:
		default:
			_ = cmd.Process.Kill()
			<-s.done
		}
		nc.Close()
	})
	return s
}

// exitedNote is what the test itself sends to a service's notify socket once
// the process has exited.
const exitedNote = "X-TEST-EXITED=1"

func prefixComma(s string) string {
	if s == "" {
		return ""
	}
	return "," + s
}

// waitNotify waits for a notification that holds line (e.g. "READY=1"). The
// process exiting first fails the test; so does a service that says nothing
// for limit (a bound that only ends a hung run).
func (s *service) waitNotify(t *testing.T, line string, limit time.Duration) string {
	t.Helper()
	deadline := time.NewTimer(limit)
	defer deadline.Stop()
	for {
		select {
		case m, ok := <-s.msgs:
			if !ok {
				t.Fatalf("%s: notify socket closed", s.unit.name)
			}
			if m == exitedNote {
				t.Fatalf("%s exited (%v) before %s:\n%s", s.unit.name, s.err, line, s.logTail())
			}
			t.Logf("%s notified %q", s.unit.name, m)
			for _, l := range strings.Split(m, "\n") {
				if l == line {
					return m
				}
			}
		case <-deadline.C:
			t.Fatalf("%s: no %s within %s:\n%s", s.unit.name, line, limit, s.logTail())
		}
	}
}

// stop does what `systemctl stop` does: SIGTERM, then at most
// TimeoutStopSec= for the process to exit. It must say STOPPING=1 and exit
// with status 0.
func (s *service) stop(t *testing.T) {
	t.Helper()
	limit, err := time.ParseDuration(s.unit.get("TimeoutStopSec"))
	if err != nil {
		t.Fatalf("%s: TimeoutStopSec: %v", s.unit.name, err)
	}
	if err := s.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	s.waitNotify(t, "STOPPING=1", limit)
	timer := time.NewTimer(limit)
	defer timer.Stop()
	select {
	case <-s.done:
	case <-timer.C:
		t.Fatalf("%s did not exit within TimeoutStopSec=%s after SIGTERM (systemd would SIGKILL it):\n%s", s.unit.name, limit, s.logTail())
	}
	if s.err != nil {
		t.Fatalf("%s exited with %v after SIGTERM (systemd counts that as a failure):\n%s", s.unit.name, s.err, s.logTail())
	}
}

// reload does what `systemctl reload` does with ExecReload=kill -HUP.
func (s *service) reload(t *testing.T) {
	t.Helper()
	if got := s.unit.get("ExecReload"); got != "/bin/kill -HUP $MAINPID" {
		t.Fatalf("%s: ExecReload=%q", s.unit.name, got)
	}
	if err := s.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	s.waitNotify(t, "RELOADING=1", time.Minute)
	s.waitNotify(t, "READY=1", time.Minute)
}

func (s *service) logTail() string {
	data, _ := os.ReadFile(s.log)
	lines := bytes.Split(bytes.TrimSpace(data), []byte("\n"))
	if len(lines) > 40 {
		lines = lines[len(lines)-40:]
	}
	return fmt.Sprintf("--- %s ---\n%s", s.log, bytes.Join(lines, []byte("\n")))
}
