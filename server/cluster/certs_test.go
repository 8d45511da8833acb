package cluster_test

import (
	"crypto/x509"
	"encoding/pem"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ferry-id/ferry/server/cluster"
)

func readCert(t *testing.T, path string) *x509.Certificate {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(b)
	if block == nil {
		t.Fatalf("%s: no PEM", path)
	}
	c, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func mode(t *testing.T, path string) os.FileMode {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Mode().Perm()
}

func TestCreateCAAndNodeCert(t *testing.T) {
	dir := t.TempDir()
	ca, err := cluster.CreateCA(cluster.CAOptions{Dir: filepath.Join(dir, "tls")})
	if err != nil {
		t.Fatal(err)
	}
	if filepath.Base(ca.CertFile) != "ca.pem" || filepath.Base(ca.KeyFile) != "ca-key.pem" {
		t.Fatalf("CA files %+v", ca)
	}
	if m := mode(t, ca.KeyFile); m != 0o600 {
		t.Fatalf("CA key mode %v", m)
	}
	if m := mode(t, filepath.Join(dir, "tls")); m != 0o700 {
		t.Fatalf("output dir mode %v", m)
	}
	caCert := readCert(t, ca.CertFile)
	if !caCert.IsCA || caCert.KeyUsage&x509.KeyUsageCertSign == 0 {
		t.Fatalf("CA certificate: IsCA=%v usage=%v", caCert.IsCA, caCert.KeyUsage)
	}
	if _, err := cluster.CreateCA(cluster.CAOptions{Dir: filepath.Join(dir, "tls")}); err == nil {
		t.Fatal("CreateCA overwrote an existing CA without Force")
	}

	files, err := cluster.CreateNodeCert(cluster.CertOptions{
		Dir:         filepath.Join(dir, "n1"),
		CACertFile:  ca.CertFile,
		CAKeyFile:   ca.KeyFile,
		NodeID:      "server-1",
		TrustDomain: "prod.example",
		DNSNames:    []string{"server-1.internal"},
		IPs:         []net.IP{net.ParseIP("10.0.0.7")},
		Validity:    time.Hour,
	})
	if err != nil {
		t.Fatal(err)
	}
	if filepath.Base(files.CertFile) != "node.pem" || filepath.Base(files.KeyFile) != "node-key.pem" || files.CAFile != ca.CertFile {
		t.Fatalf("node files %+v", files)
	}
	if m := mode(t, files.KeyFile); m != 0o600 {
		t.Fatalf("node key mode %v", m)
	}
	leaf := readCert(t, files.CertFile)
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != "spiffe://prod.example/ferry/cluster/server-1" {
		t.Fatalf("URI SANs %v", leaf.URIs)
	}
	pool := x509.NewCertPool()
	pool.AddCert(caCert)
	for _, name := range []string{"127.0.0.1", "::1", "localhost", "server-1.internal", "10.0.0.7"} {
		_, err := leaf.Verify(x509.VerifyOptions{Roots: pool, DNSName: name, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
		if err != nil {
			t.Errorf("verify as server %s: %v", name, err)
		}
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Errorf("verify as client: %v", err)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, DNSName: "10.0.0.8"}); err == nil {
		t.Error("certificate verified for an address it does not name")
	}
	if got := leaf.NotAfter.Sub(leaf.NotBefore); got > time.Hour+2*time.Minute {
		t.Errorf("validity %v", got)
	}
}

func TestCreateNodeCertRejects(t *testing.T) {
	dir := t.TempDir()
	ca, err := cluster.CreateCA(cluster.CAOptions{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	for name, opts := range map[string]cluster.CertOptions{
		"no node ID":       {Dir: dir, CACertFile: ca.CertFile, CAKeyFile: ca.KeyFile},
		"slash in node ID": {Dir: dir, CACertFile: ca.CertFile, CAKeyFile: ca.KeyFile, NodeID: "a/b"},
		"missing CA key":   {Dir: dir, CACertFile: ca.CertFile, CAKeyFile: filepath.Join(dir, "nope.pem"), NodeID: "n1"},
		"leaf as CA":       {Dir: dir, CACertFile: ca.KeyFile, CAKeyFile: ca.KeyFile, NodeID: "n1"},
	} {
		if _, err := cluster.CreateNodeCert(opts); err == nil || !strings.HasPrefix(err.Error(), "cluster: ") {
			t.Errorf("%s: %v", name, err)
		}
	}
}

func TestNewRejectsBadConfig(t *testing.T) {
	pki := newPKI(t)
	base := fastConfig(t, pki, "n1")
	base.FSM = newRecordFSM()
	wrong := newPKI(t)
	for name, mod := range map[string]func(*cluster.Config){
		"no FSM":            func(c *cluster.Config) { c.FSM = nil },
		"unknown log store": func(c *cluster.Config) { c.LogStore = "sqlite" },
		"unspecified bind":  func(c *cluster.Config) { c.BindAddr = "0.0.0.0:0" },
		"cert of another CA": func(c *cluster.Config) {
			c.TLS.CertFile, c.TLS.KeyFile = wrong.node(t, "n1").CertFile, wrong.node(t, "n1").KeyFile
		},
	} {
		cfg := base
		cfg.DataDir = filepath.Join(t.TempDir(), "data")
		mod(&cfg)
		if n, err := cluster.New(cfg); err == nil {
			n.Close()
			t.Errorf("%s: New succeeded", name)
		}
	}
}

// TestLogStoreSwitchRefused: a data dir written by one log store is not
// silently opened as the other.
func TestLogStoreSwitchRefused(t *testing.T) {
	pki := newPKI(t)
	cfg := fastConfig(t, pki, "n1")
	cfg.Bootstrap = true
	cfg.LogStore = cluster.LogStoreBoltDB
	n := startNode(t, cfg)
	waitLeader(t, []*testNode{n})
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	cfg.LogStore = cluster.LogStoreWAL
	cfg.FSM = newRecordFSM()
	if n2, err := cluster.New(cfg); err == nil {
		n2.Close()
		t.Fatal("opened a boltdb data dir as wal")
	} else if !strings.Contains(err.Error(), "boltdb") {
		t.Fatalf("error %v does not name the existing store", err)
	}
}
