package sshpop_test

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	"golang.org/x/crypto/ssh"

	"github.com/ferry-id/ferry/attestors/node"
	"github.com/ferry-id/ferry/attestors/node/sshpop"
	"github.com/ferry-id/ferry/internal/selector"
)

var td = spiffeid.RequireTrustDomainFromString("example.org")

func signer(t testing.TB) (ssh.Signer, ed25519.PrivateKey) {
	t.Helper()
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	s, err := ssh.NewSignerFromKey(priv)
	require.NoError(t, err)
	return s, priv
}

// hostFiles writes a host key and a certificate for it signed by ca, and
// returns the agent's config.
func hostFiles(t testing.TB, ca ssh.Signer, mod func(*ssh.Certificate)) sshpop.AgentConfig {
	t.Helper()
	host, priv := signer(t)
	cert := &ssh.Certificate{Key: host.PublicKey(), CertType: ssh.HostCert, KeyId: "web-1", ValidPrincipals: []string{"web-1.example.org", "web-1"},
		ValidAfter: uint64(time.Now().Add(-time.Hour).Unix()), ValidBefore: uint64(time.Now().Add(time.Hour).Unix())}
	if mod != nil {
		mod(cert)
	}
	require.NoError(t, cert.SignCert(rand.Reader, ca))
	dir := t.TempDir()
	block, err := ssh.MarshalPrivateKey(priv, "")
	require.NoError(t, err)
	c := sshpop.AgentConfig{HostKeyPath: filepath.Join(dir, "ssh_host_ed25519_key"), HostCertPath: filepath.Join(dir, "ssh_host_ed25519_key-cert.pub")}
	require.NoError(t, os.WriteFile(c.HostKeyPath, pem.EncodeToMemory(block), 0o600))
	require.NoError(t, os.WriteFile(c.HostCertPath, ssh.MarshalAuthorizedKey(cert), 0o644))
	return c
}

func newServer(t testing.TB, cas ...ssh.Signer) *sshpop.Server {
	t.Helper()
	var keys []ssh.PublicKey
	for _, c := range cas {
		keys = append(keys, c.PublicKey())
	}
	s, err := sshpop.NewServer(sshpop.ServerConfig{TrustDomain: td, CertAuthorities: keys})
	require.NoError(t, err)
	return s
}

func newAgent(t testing.TB, c sshpop.AgentConfig) *sshpop.Agent {
	t.Helper()
	a, err := sshpop.NewAgent(c)
	require.NoError(t, err)
	return a
}

func TestAttest(t *testing.T) {
	ca, _ := signer(t)
	s := newServer(t, ca)
	files := hostFiles(t, ca, nil)
	res, err := node.Exchange(context.Background(), newAgent(t, files), s)
	require.NoError(t, err)
	require.True(t, res.CanReattest)
	key, _ := os.ReadFile(files.HostCertPath)
	pub, _, _, _, err := ssh.ParseAuthorizedKey(key)
	require.NoError(t, err)
	require.Equal(t, "spiffe://example.org/spire/agent/sshpop/"+sshpop.KeyHash(pub.(*ssh.Certificate).Key), res.AgentID.String())
	var got []string
	for _, sel := range res.Selectors {
		got = append(got, selector.Format(sel))
		require.NoError(t, selector.MustRegistry(sshpop.Selectors()).Check(selector.Node, sel))
	}
	require.Equal(t, []string{"sshpop:ca:" + sshpop.KeyHash(ca.PublicKey()), "sshpop:principal:web-1", "sshpop:principal:web-1.example.org"}, got)
}

type relay struct {
	payload func() ([]byte, error)
	respond func(context.Context, []byte) ([]byte, error)
}

func (relay) Name() string                                            { return sshpop.Name }
func (r relay) Payload(context.Context) ([]byte, error)               { return r.payload() }
func (r relay) Respond(ctx context.Context, c []byte) ([]byte, error) { return r.respond(ctx, c) }

func TestRefusals(t *testing.T) {
	ca, _ := signer(t)
	other, _ := signer(t)
	s := newServer(t, ca)
	ctx := context.Background()
	for name, c := range map[string]struct {
		files sshpop.AgentConfig
		want  string
	}{
		"untrusted CA":  {hostFiles(t, other, nil), "host certificate refused"},
		"user cert":     {hostFiles(t, ca, func(c *ssh.Certificate) { c.CertType = ssh.UserCert }), "not a host certificate"},
		"expired":       {hostFiles(t, ca, func(c *ssh.Certificate) { c.ValidBefore = uint64(time.Now().Add(-time.Minute).Unix()) }), "host certificate refused"},
		"not yet valid": {hostFiles(t, ca, func(c *ssh.Certificate) { c.ValidAfter = uint64(time.Now().Add(time.Hour).Unix()) }), "host certificate refused"},
		"no principal":  {hostFiles(t, ca, func(c *ssh.Certificate) { c.ValidPrincipals = nil }), "names no principal"},
	} {
		_, err := node.Exchange(ctx, newAgent(t, c.files), s)
		require.ErrorContains(t, err, c.want, name)
	}

	// A copied certificate without the key: the signature is the thief's.
	good := newAgent(t, hostFiles(t, ca, nil))
	thief := newAgent(t, hostFiles(t, ca, nil))
	_, err := node.Exchange(ctx, relay{payload: func() ([]byte, error) {
		if _, err := thief.Payload(ctx); err != nil {
			return nil, err
		}
		return good.Payload(ctx)
	}, respond: thief.Respond}, s)
	require.ErrorContains(t, err, "does not hold the host key")

	// A replayed answer to an earlier challenge.
	var captured []byte
	_, err = node.Exchange(ctx, relay{payload: func() ([]byte, error) { return good.Payload(ctx) }, respond: func(ctx context.Context, c []byte) ([]byte, error) {
		r, err := good.Respond(ctx, c)
		captured = r
		return r, err
	}}, s)
	require.NoError(t, err)
	_, err = node.Exchange(ctx, relay{payload: func() ([]byte, error) { return good.Payload(ctx) }, respond: func(context.Context, []byte) ([]byte, error) { return captured, nil }}, s)
	require.ErrorContains(t, err, "does not hold the host key")

	plain, _ := json.Marshal(map[string][]byte{"cert": ca.PublicKey().Marshal()})
	for name, c := range map[string]struct{ payload, want string }{
		"malformed": {"{", "malformed payload"},
		"garbage":   {`{"cert":"AAAA"}`, "certificate"},
		"plain key": {string(plain), "not a certificate"},
		"oversized": {strings.Repeat("a", node.MaxPayloadSize+1), "over"},
	} {
		_, err := s.Attest(ctx, []byte(c.payload), nil)
		require.ErrorContains(t, err, c.want, name)
	}
	_, err = sshpop.NewServer(sshpop.ServerConfig{TrustDomain: td})
	require.Error(t, err)
	_, err = sshpop.NewAgent(sshpop.AgentConfig{HostKeyPath: "/nonexistent", HostCertPath: "/nonexistent"})
	require.Error(t, err)
	mismatch := hostFiles(t, ca, nil)
	mismatch.HostKeyPath = hostFiles(t, ca, nil).HostKeyPath
	_, err = sshpop.NewAgent(mismatch)
	require.ErrorContains(t, err, "is not for the key")
}
