package spire_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/test/freeport"
)

// proc is one program under test, its output in dir/name.log.
type proc struct {
	name string
	log  string
	cmd  *exec.Cmd
	done chan struct{}
}

// start runs bin with args in dir and stops it (SIGTERM) when the test ends,
// printing the end of its log if the test failed.
func start(t *testing.T, name, dir string, env []string, bin string, args ...string) *proc {
	t.Helper()
	p := &proc{name: name, log: filepath.Join(dir, name+".log"), done: make(chan struct{})}
	logf, err := os.Create(p.log)
	require.NoError(t, err)
	p.cmd = exec.Command(bin, args...)
	p.cmd.Dir = dir
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	p.cmd.Env = append(os.Environ(), env...)
	require.NoError(t, p.cmd.Start())
	go func() { _ = p.cmd.Wait(); logf.Close(); close(p.done) }()
	t.Cleanup(func() {
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(15 * time.Second):
			_ = p.cmd.Process.Kill()
			<-p.done
		}
		if t.Failed() {
			t.Logf("==== %s (%s)\n%s", name, p.log, tail(p.log, 60))
		}
	})
	return p
}

// exited reports whether the process has ended.
func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

func tail(path string, n int) string {
	data, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// waitFor polls cond until it holds; what names it in the failure.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	require.Eventually(t, cond, timeout, 100*time.Millisecond, "%s", what)
}

// run runs a command to completion and returns its output.
func run(bin string, env []string, args ...string) (string, error) {
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w\n%s", filepath.Base(bin), strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// freeAddr is a loopback address with a port reserved for this test binary.
func freeAddr(t *testing.T) string {
	t.Helper()
	return freeport.Addr(t)
}

// webPKI is a stand-in for a public CA: bundle endpoints of the https_web
// profile serve certificates it issued for 127.0.0.1, and peers trust it as a
// system root (SSL_CERT_FILE for SPIRE, web_pki_ca_file for ferry).
type webPKI struct {
	dir    string
	caFile string
	cert   *x509.Certificate
	key    *ecdsa.PrivateKey
}

func newWebPKI(t *testing.T) *webPKI {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "interop web root"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	require.NoError(t, err)
	cert, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	w := &webPKI{dir: t.TempDir(), cert: cert, key: key}
	w.caFile = filepath.Join(w.dir, "web-ca.pem")
	require.NoError(t, os.WriteFile(w.caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644))
	return w
}

// issue writes a serving certificate for 127.0.0.1 and localhost, and its
// key, and returns their paths.
func (w *webPKI) issue(t *testing.T, name string) (certFile, keyFile string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		DNSNames: []string{"localhost"}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, w.cert, key.Public(), w.key)
	require.NoError(t, err)
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	require.NoError(t, err)
	certFile, keyFile = filepath.Join(w.dir, name+".pem"), filepath.Join(w.dir, name+"-key.pem")
	require.NoError(t, os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644))
	require.NoError(t, os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600))
	return certFile, keyFile
}

// Bundle endpoint profiles.
const (
	httpsSPIFFE = "https_spiffe"
	httpsWeb    = "https_web"
)

// --- ferry -------------------------------------------------------------------

// ferryDomain is a one-node ferry server for ferry.test and one agent.
type ferryDomain struct {
	td       spiffeid.TrustDomain
	dir      string
	admin    string // admin socket
	agentSck string // Workload API socket
	agentID  string
	endpoint string // https://127.0.0.1:port of the bundle endpoint
	server   *proc
}

// startFerry starts ferry.test with its bundle endpoint on profile; web
// issues the https_web certificate and is trusted for SPIRE's https_web
// endpoint.
func startFerry(t *testing.T, profile string, web *webPKI) *ferryDomain {
	t.Helper()
	dir := t.TempDir()
	require.NoError(t, os.Chmod(dir, 0o755))
	f := &ferryDomain{td: spiffeid.RequireTrustDomainFromString("ferry.test"), dir: dir, admin: filepath.Join(dir, "admin.sock"),
		agentSck: filepath.Join(dir, "agent", "api.sock"), agentID: "spiffe://ferry.test/spire/agent/node1"}
	if _, err := run(bins.ferry, nil, "cluster", "tls", "ca", "create", "--dir", filepath.Join(dir, "tls")); err != nil {
		t.Fatal(err)
	}
	if _, err := run(bins.ferry, nil, "cluster", "tls", "cert", "create", "--node", "s1", "--dir", filepath.Join(dir, "tls", "s1"),
		"--ca", filepath.Join(dir, "tls", "ca.pem"), "--ca-key", filepath.Join(dir, "tls", "ca-key.pem")); err != nil {
		t.Fatal(err)
	}
	endpointAddr := freeAddr(t)
	f.endpoint = "https://" + endpointAddr
	var webFiles string
	if profile == httpsWeb {
		certFile, keyFile := web.issue(t, "ferry-endpoint")
		webFiles = fmt.Sprintf("\n      cert_file = %q\n      key_file  = %q", certFile, keyFile)
	}
	// Short JWT-SVIDs release a JWT authority soon after its taint; the
	// endpoint's 10 s hint has peers refresh often.
	conf := fmt.Sprintf(`server {
  node_id      = "s1"
  trust_domain = "ferry.test"
  data_dir     = "data"
  admin_socket = "admin.sock"
  agent_addr   = %q
  log_level    = "debug"
  ca {
    jwt_svid_ttl = "30s"
  }
  federation {
    web_pki_ca_file = %q
    bundle_endpoint {
      addr         = %q
      profile      = %q
      refresh_hint = "10s"%s
    }
  }
  cluster {
    bind_addr = %q
    bootstrap = true
    ca_file   = "tls/ca.pem"
    cert_file = "tls/s1/node.pem"
    key_file  = "tls/s1/node-key.pem"
  }
}
`, freeAddr(t), web.caFile, endpointAddr, profile, webFiles, freeAddr(t))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "server.conf"), []byte(conf), 0o600))
	agentAddr := between(conf, `agent_addr   = "`, `"`)
	f.server = start(t, "ferry-server", dir, []string{"FERRY_ADMIN_SOCKET="}, bins.ferry, "server", "run", "--config", "server.conf")
	var bundle string
	waitFor(t, 60*time.Second, "ferry's first authorities are published", func() bool {
		out, err := f.cli("bundle", "show")
		bundle = out
		return err == nil && strings.Contains(out, "BEGIN CERTIFICATE")
	})
	require.NoError(t, os.WriteFile(filepath.Join(dir, "bundle.pem"), []byte(bundle), 0o644))
	out, err := f.cli("token", "generate", "--spiffe-id", f.agentID, "--ttl", "10m", "--output", "json")
	require.NoError(t, err, out)
	var tok struct {
		Token string `json:"token"`
	}
	require.NoError(t, json.Unmarshal([]byte(out), &tok), out)
	// Agents replace what a tainted authority signed within 2 s.
	agentConf := fmt.Sprintf(`agent {
  trust_domain      = "ferry.test"
  server_addresses  = [%q]
  trust_bundle_file = "bundle.pem"
  data_dir          = "agent-data"
  socket_path       = %q
  log_level         = "debug"
  join_token        = %q
  taint_jitter      = "2s"
}
`, agentAddr, f.agentSck, tok.Token)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "agent.conf"), []byte(agentConf), 0o600))
	agent := start(t, "ferry-agent", dir, nil, bins.ferry, "agent", "run", "--config", "agent.conf")
	waitFor(t, 60*time.Second, "the ferry agent serves the Workload API", func() bool {
		if agent.exited() {
			t.Fatalf("ferry agent exited:\n%s", tail(agent.log, 40))
		}
		c, err := net.Dial("unix", f.agentSck)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
	return f
}

func between(s, from, to string) string {
	_, after, _ := strings.Cut(s, from)
	v, _, _ := strings.Cut(after, to)
	return v
}

// cli runs `ferry ARGS` against the server's admin socket.
func (f *ferryDomain) cli(args ...string) (string, error) {
	return run(bins.ferry, []string{"FERRY_ADMIN_SOCKET=" + f.admin}, args...)
}

func (f *ferryDomain) must(t *testing.T, args ...string) string {
	t.Helper()
	out, err := f.cli(args...)
	require.NoError(t, err)
	return out
}

// localAuthority is what `ferry authority KIND list --output json` shows of
// one authority.
type localAuthority struct {
	ID            string `json:"id"`
	Status        string `json:"status"`
	HoldingAgents uint32 `json:"holding_agents"`
}

func (f *ferryDomain) authorities(t *testing.T, kind string) []localAuthority {
	t.Helper()
	var resp struct {
		Authorities []localAuthority `json:"authorities"`
	}
	out := f.must(t, "authority", kind, "list", "--output", "json")
	require.NoError(t, json.Unmarshal([]byte(out), &resp), out)
	return resp.Authorities
}

func (f *ferryDomain) authority(t *testing.T, kind, status string) string {
	t.Helper()
	for _, a := range f.authorities(t, kind) {
		if a.Status == status {
			return a.ID
		}
	}
	t.Fatalf("ferry has no %s %s authority", status, kind)
	return ""
}

func (f *ferryDomain) heldBy(t *testing.T, kind, id string) uint32 {
	t.Helper()
	for _, a := range f.authorities(t, kind) {
		if a.ID == id {
			return a.HoldingAgents
		}
	}
	return 0
}

func (f *ferryDomain) op(t *testing.T, kind, op, id string) string {
	t.Helper()
	args := []string{"authority", kind, op, "--output", "json"}
	if id != "" {
		args = append(args, "--authority-id", id)
	}
	var a localAuthority
	out := f.must(t, args...)
	require.NoError(t, json.Unmarshal([]byte(out), &a), out)
	return a.ID
}

// lastRefresh is when ferry last fetched td's bundle, zero while the last
// fetch failed.
func (f *ferryDomain) lastRefresh(t *testing.T, td string) time.Time {
	t.Helper()
	var st struct {
		Relationship struct {
			LastRefresh string `json:"last_refresh"`
			LastError   string `json:"last_error"`
		} `json:"relationship"`
	}
	out := f.must(t, "federation", "show", "--trust-domain", td, "--output", "json")
	require.NoError(t, json.Unmarshal([]byte(out), &st), out)
	if st.Relationship.LastError != "" {
		return time.Time{}
	}
	var sec int64
	fmt.Sscan(st.Relationship.LastRefresh, &sec)
	return time.Unix(sec, 0)
}

// refreshFailures lists the fetches of a federated bundle that failed after
// since, as ferry's log shows them.
func (f *ferryDomain) refreshFailures(since time.Time) []string {
	data, _ := os.ReadFile(f.server.log)
	var out []string
	for _, line := range bytes.Split(data, []byte("\n")) {
		if !bytes.Contains(line, []byte("federated bundle refresh failed")) {
			continue
		}
		at, err := time.Parse(time.RFC3339Nano, between(string(line), "time=", " "))
		if err == nil && at.After(since) {
			out = append(out, string(line))
		}
	}
	return out
}

// --- SPIRE -------------------------------------------------------------------

// spireDomain is a SPIRE server for spire.test (SQLite datastore, disk keys,
// join_token attestation) and one SPIRE agent.
type spireDomain struct {
	td        spiffeid.TrustDomain
	dir       string
	sock      string // server API socket
	agentSck  string // Workload API socket
	agentID   string
	agentData string
	endpoint  string
	server    *proc
}

// startSPIRE starts spire.test with its bundle endpoint on profile; web
// issues the https_web certificate, and its CA is what SPIRE's https_web
// client trusts as a system root (SSL_CERT_FILE).
func startSPIRE(t *testing.T, profile string, web *webPKI) *spireDomain {
	t.Helper()
	dir := t.TempDir()
	require.NoError(t, os.Chmod(dir, 0o755))
	s := &spireDomain{td: spiffeid.RequireTrustDomainFromString("spire.test"), dir: dir, sock: filepath.Join(dir, "server.sock"),
		agentSck: filepath.Join(dir, "agent.sock"), agentData: filepath.Join(dir, "agent-data")}
	serverAddr, endpointAddr := freeAddr(t), freeAddr(t)
	s.endpoint = "https://" + endpointAddr
	profileConf := `profile "https_spiffe" {}`
	if profile == httpsWeb {
		certFile, keyFile := web.issue(t, "spire-endpoint")
		profileConf = fmt.Sprintf(`profile "https_web" {
        serving_cert_file {
          cert_file_path     = %q
          key_file_path      = %q
          file_sync_interval = "1h"
        }
      }`, certFile, keyFile)
	}
	host, port, _ := net.SplitHostPort(serverAddr)
	_, eport, _ := net.SplitHostPort(endpointAddr)
	conf := fmt.Sprintf(`server {
  bind_address         = %q
  bind_port            = %q
  socket_path          = %q
  trust_domain         = "spire.test"
  data_dir             = %q
  log_level            = "DEBUG"
  log_format           = "json"
  default_jwt_svid_ttl = "30s"
  federation {
    bundle_endpoint {
      address      = "127.0.0.1"
      port         = %s
      refresh_hint = "10s"
      %s
    }
  }
}

plugins {
  DataStore "sql" {
    plugin_data {
      database_type     = "sqlite3"
      connection_string = %q
    }
  }
  KeyManager "disk" {
    plugin_data {
      keys_path = %q
    }
  }
  NodeAttestor "join_token" {
    plugin_data {}
  }
}
`, host, port, s.sock, filepath.Join(dir, "data"), eport, profileConf,
		filepath.Join(dir, "data", "datastore.sqlite3"), filepath.Join(dir, "data", "keys.json"))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "server.conf"), []byte(conf), 0o600))
	s.server = start(t, "spire-server", dir, []string{"SSL_CERT_FILE=" + web.caFile}, bins.spireServer, "run", "-config", "server.conf")
	waitFor(t, 90*time.Second, "the SPIRE server is healthy", func() bool {
		if s.server.exited() {
			t.Fatalf("spire-server exited:\n%s", tail(s.server.log, 40))
		}
		_, err := s.cli("healthcheck")
		return err == nil
	})
	bundle := s.must(t, "bundle", "show")
	require.NoError(t, os.WriteFile(filepath.Join(dir, "bootstrap.pem"), []byte(bundle), 0o644))
	// "Token: <token>", then a warning that the token names no SPIFFE ID.
	out := s.must(t, "token", "generate", "-ttl", "600")
	first, _, _ := strings.Cut(strings.TrimSpace(out), "\n")
	token := strings.TrimSpace(strings.TrimPrefix(first, "Token:"))
	require.NotEmpty(t, token, out)
	s.agentID = "spiffe://spire.test/spire/agent/join_token/" + token
	agentConf := fmt.Sprintf(`agent {
  data_dir          = %q
  log_level         = "DEBUG"
  server_address    = %q
  server_port       = %q
  socket_path       = %q
  trust_bundle_path = "bootstrap.pem"
  trust_domain      = "spire.test"
  join_token        = %q
}

plugins {
  NodeAttestor "join_token" {
    plugin_data {}
  }
  KeyManager "memory" {
    plugin_data {}
  }
  WorkloadAttestor "unix" {
    plugin_data {}
  }
}
`, s.agentData, host, port, s.agentSck, token)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "agent.conf"), []byte(agentConf), 0o600))
	agent := start(t, "spire-agent", dir, nil, bins.spireAgent, "run", "-config", "agent.conf")
	waitFor(t, 90*time.Second, "the SPIRE agent is healthy", func() bool {
		if agent.exited() {
			t.Fatalf("spire-agent exited:\n%s", tail(agent.log, 40))
		}
		_, err := run(bins.spireAgent, nil, "healthcheck", "-socketPath", s.agentSck)
		return err == nil
	})
	return s
}

// cli runs `spire-server SUBCOMMAND... -socketPath SOCK ARGS...`: the
// command words are the leading arguments without a dash.
func (s *spireDomain) cli(args ...string) (string, error) {
	i := 0
	for i < len(args) && !strings.HasPrefix(args[i], "-") {
		i++
	}
	full := append(append(append([]string{}, args[:i]...), "-socketPath", s.sock), args[i:]...)
	return run(bins.spireServer, nil, full...)
}

func (s *spireDomain) must(t *testing.T, args ...string) string {
	t.Helper()
	out, err := s.cli(args...)
	require.NoError(t, err)
	return out
}

// authorities is `spire-server localauthority KIND show`: the active,
// prepared and old authorities' IDs.
func (s *spireDomain) authorities(t *testing.T, kind string) (active, prepared, old string) {
	t.Helper()
	var st struct {
		Active, Prepared, Old *struct {
			AuthorityID string `json:"authority_id"`
		}
	}
	out := s.must(t, "localauthority", kind, "show", "-output", "json")
	require.NoError(t, json.Unmarshal([]byte(out), &st), out)
	id := func(a *struct {
		AuthorityID string `json:"authority_id"`
	}) string {
		if a == nil {
			return ""
		}
		return a.AuthorityID
	}
	return id(st.Active), id(st.Prepared), id(st.Old)
}

// op runs a localauthority operation and returns the authority it names.
func (s *spireDomain) op(t *testing.T, kind, op, id string) {
	t.Helper()
	args := []string{"localauthority", kind, op, "-output", "json"}
	if id != "" {
		args = append(args, "-authorityID", id)
	}
	s.must(t, args...)
}

// agentSVIDAuthority is the authority key ID of the SPIRE agent's own SVID,
// as the agent keeps it on disk (agent-data.json: the chain, each
// certificate PEM).
func (s *spireDomain) agentSVIDAuthority() string {
	data, err := os.ReadFile(filepath.Join(s.agentData, "agent-data.json"))
	if err != nil {
		return ""
	}
	var st struct {
		SVID [][]byte `json:"svid"`
	}
	if json.Unmarshal(data, &st) != nil || len(st.SVID) == 0 {
		return ""
	}
	block, _ := pem.Decode(st.SVID[0])
	if block == nil {
		return ""
	}
	c, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return ""
	}
	return fmt.Sprintf("%x", c.AuthorityKeyId)
}

// spireLogLine is one line of SPIRE's JSON log.
type spireLogLine struct {
	Time        time.Time `json:"time"`
	Level       string    `json:"level"`
	Msg         string    `json:"msg"`
	TrustDomain string    `json:"trust_domain"`
	Error       string    `json:"error"`
}

func (s *spireDomain) logLines() []spireLogLine {
	f, err := os.Open(s.server.log)
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []spireLogLine
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var l spireLogLine
		if json.Unmarshal(sc.Bytes(), &l) == nil && l.Msg != "" {
			out = append(out, l)
		}
	}
	return out
}

// polledAfter reports whether SPIRE fetched td's bundle successfully in a
// poll that began after since (its log: "Polling for bundle update", then
// no "Error updating bundle" before the next schedule).
func (s *spireDomain) polledAfter(td string, since time.Time) bool {
	polling := false
	for _, l := range s.logLines() {
		if l.TrustDomain != td {
			continue
		}
		switch l.Msg {
		case "Polling for bundle update":
			polling = l.Time.After(since)
		case "Error updating bundle":
			polling = false
		case "Scheduling next bundle refresh":
			if polling {
				return true
			}
		}
	}
	return false
}

// refreshFailures lists SPIRE's failed fetches of td's bundle after since.
func (s *spireDomain) refreshFailures(td string, since time.Time) []string {
	var out []string
	for _, l := range s.logLines() {
		if l.TrustDomain == td && l.Msg == "Error updating bundle" && l.Time.After(since) {
			out = append(out, l.Time.Format("15:04:05.000")+" "+l.Error)
		}
	}
	return out
}

// waitCtx is a context for a bounded wait inside a test.
func waitCtx(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}
