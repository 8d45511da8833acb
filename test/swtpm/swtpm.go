// Package swtpm runs a software TPM 2.0 for tests: Debian's swtpm and
// swtpm-tools. Start manufactures a TPM with swtpm_setup (an EK whose
// certificate, in NV index 0x01c00002, is issued by a local CA made for the
// test with swtpm_localca) and serves its command channel on a unix socket
// (swtpm socket, started and initialised with TPM2_Startup). Tests configure
// the ferry server to trust the local CA as it would a TPM manufacturer's.
//
// Where swtpm is not installed the test is skipped through internal/roottest,
// which fails it instead under CI=true or FERRY_REQUIRE_ROOT_TESTS=1:
// .ci/run installs swtpm, so a CI run cannot pass without running it.
package swtpm

import (
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/ferry-id/ferry/internal/roottest"
)

// TPM is a running software TPM.
type TPM struct {
	// Socket is the command channel, as the agent's tpm device.
	Socket string
	// CAs are the local CA's root and issuing certificates (the EK
	// certificate's chain).
	CAs []*x509.Certificate
	// CAFile holds CAs as PEM.
	CAFile string
}

// Start manufactures and starts a TPM in its own directory; it stops with
// the test.
func Start(t testing.TB) *TPM {
	t.Helper()
	for _, tool := range []string{"swtpm", "swtpm_setup", "swtpm_localca"} {
		if _, err := exec.LookPath(tool); err != nil {
			roottest.Skipf(t, "%s not installed (apt-get install swtpm swtpm-tools)", tool)
		}
	}
	// Short paths: unix socket paths are limited to 108 bytes.
	dir, err := os.MkdirTemp("", "swtpm-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	for _, d := range []string{"state", "ca", "tmp"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	caConf := write("localca.conf", fmt.Sprintf("statedir = %[1]s/ca\nsigningkey = %[1]s/ca/signkey.pem\nissuercert = %[1]s/ca/issuercert.pem\ncertserial = %[1]s/ca/certserial\n", dir))
	caOpts := write("localca.options", "--platform-manufacturer ferry\n--platform-version 2.1\n--platform-model test\n")
	setupConf := write("setup.conf", fmt.Sprintf("create_certs_tool = /usr/bin/swtpm_localca\ncreate_certs_tool_config = %s\ncreate_certs_tool_options = %s\nactive_pcr_banks = sha256\n", caConf, caOpts))
	setup := exec.Command("swtpm_setup", "--tpm2", "--tpmstate", filepath.Join(dir, "state"), "--create-ek-cert", "--config", setupConf, "--overwrite")
	setup.Env = append(os.Environ(), "TMPDIR="+filepath.Join(dir, "tmp"), "XDG_CONFIG_HOME="+dir)
	if out, err := setup.CombinedOutput(); err != nil {
		t.Fatalf("swtpm_setup: %v\n%s", err, out)
	}
	tp := &TPM{Socket: filepath.Join(dir, "tpm.sock")}
	for _, name := range []string{"swtpm-localca-rootca-cert.pem", "issuercert.pem"} {
		b, err := os.ReadFile(filepath.Join(dir, "ca", name))
		if err != nil {
			t.Fatal(err)
		}
		block, _ := pem.Decode(b)
		if block == nil {
			t.Fatalf("%s: no PEM", name)
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		tp.CAs = append(tp.CAs, c)
	}
	var pemOut []byte
	for _, c := range tp.CAs {
		pemOut = append(pemOut, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	tp.CAFile = write("ek-cas.pem", string(pemOut))
	cmd := exec.Command("swtpm", "socket", "--tpm2", "--tpmstate", "dir="+filepath.Join(dir, "state"),
		"--server", "type=unixio,path="+tp.Socket, "--ctrl", "type=unixio,path="+filepath.Join(dir, "ctrl.sock"),
		"--flags", "not-need-init,startup-clear")
	out, err := os.Create(filepath.Join(dir, "swtpm.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); out.Close(); close(done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-done
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		if c, err := net.Dial("unix", tp.Socket); err == nil {
			c.Close()
			break
		}
		select {
		case <-done:
			log, _ := os.ReadFile(filepath.Join(dir, "swtpm.log"))
			t.Fatalf("swtpm exited:\n%s", log)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatal("swtpm: socket not ready in 30s")
		}
	}
	return tp
}
