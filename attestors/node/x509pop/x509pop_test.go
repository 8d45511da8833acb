package x509pop_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"log/slog"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/attestors/node"
	"github.com/ferry-id/ferry/attestors/node/x509pop"
	"github.com/ferry-id/ferry/internal/selector"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

var td = spiffeid.RequireTrustDomainFromString("example.org")

func sha1Hex(c *x509.Certificate) string {
	sum := sha1.Sum(c.Raw)
	return hex.EncodeToString(sum[:])
}

func values(sels []*ferrypb.Selector) []string {
	var out []string
	for _, s := range sels {
		out = append(out, s.GetType()+":"+s.GetValue())
	}
	return out
}

func newServer(t testing.TB, c x509pop.ServerConfig) *x509pop.Server {
	t.Helper()
	if c.TrustDomain.IsZero() {
		c.TrustDomain = td
	}
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
	s, err := x509pop.NewServer(c)
	require.NoError(t, err)
	return s
}

func newAgent(t testing.TB, key crypto.Signer, chain ...*x509.Certificate) *x509pop.Agent {
	t.Helper()
	certPath, keyPath := agentFiles(t, key, chain...)
	a, err := x509pop.NewAgent(x509pop.AgentConfig{CertificatePath: certPath, PrivateKeyPath: keyPath})
	require.NoError(t, err)
	return a
}

// pki is a root, an intermediate and an EC leaf for "node-1".
type pki struct {
	root, inter *testCA
	leaf        *x509.Certificate
	key         *ecdsa.PrivateKey
}

func newPKI(t testing.TB) *pki {
	p := &pki{root: newRoot(t, "root")}
	p.inter = p.root.intermediate(t, "intermediate")
	p.key = ecKey(t, elliptic.P256())
	tmpl := leafTemplate("node-1", "x509pop://example.org/datacenter/us-east-1", "x509pop://other.org/rack/9", "spiffe://example.org/x")
	tmpl.SerialNumber = big.NewInt(0xa1b2c)
	p.leaf = p.inter.sign(t, tmpl, p.key.Public())
	return p
}

func TestAttestECChain(t *testing.T) {
	p := newPKI(t)
	var logs bytes.Buffer
	s := newServer(t, x509pop.ServerConfig{Roots: []*x509.Certificate{p.root.cert}, Log: slog.New(slog.NewTextHandler(&logs, nil))})
	a := newAgent(t, p.key, p.leaf, p.inter.cert)

	res, err := node.Exchange(context.Background(), a, s)
	require.NoError(t, err)
	assert.Equal(t, "spiffe://example.org/spire/agent/x509pop/"+sha1Hex(p.leaf), res.AgentID.String())
	assert.True(t, res.CanReattest)
	assert.ElementsMatch(t, []string{
		"x509pop:subject:cn:node-1",
		"x509pop:ca:fingerprint:" + sha1Hex(p.inter.cert),
		"x509pop:ca:fingerprint:" + sha1Hex(p.root.cert),
		"x509pop:serialnumber:0a1b2c",
		"x509pop:san:datacenter:us-east-1",
	}, values(res.Selectors))
	assert.Contains(t, logs.String(), "x509pop attestation succeeded")
	// What the attestor produces is what it declares, kind by kind.
	reg := selector.MustRegistry(x509pop.Selectors())
	kinds := map[string]bool{}
	for _, sel := range res.Selectors {
		assert.NoError(t, reg.Check(selector.Node, sel))
		kind, _, _ := strings.Cut(sel.GetValue(), ":")
		kinds[kind] = true
	}
	assert.Len(t, kinds, len(x509pop.Selectors().Kinds))
}

func TestAttestRSALeafDirectlyUnderRoot(t *testing.T) {
	root := newRoot(t, "root")
	key := rsaKey(t, 2048)
	leaf := root.sign(t, leafTemplate(""), key.Public())
	s := newServer(t, x509pop.ServerConfig{Roots: []*x509.Certificate{root.cert}})
	res, err := node.Exchange(context.Background(), newAgent(t, key, leaf), s)
	require.NoError(t, err)
	assert.Equal(t, []string{
		"x509pop:ca:fingerprint:" + sha1Hex(root.cert),
		"x509pop:serialnumber:" + hexEven(leaf.SerialNumber),
	}, values(res.Selectors))
}

func hexEven(n *big.Int) string {
	s := n.Text(16)
	if len(s)%2 == 1 {
		s = "0" + s
	}
	return s
}

func TestAttestIntermediatesFromSeparateFile(t *testing.T) {
	p := newPKI(t)
	certPath, keyPath := agentFiles(t, p.key, p.leaf)
	interPath := filepath.Join(t.TempDir(), "inter.pem")
	require.NoError(t, os.WriteFile(interPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: p.inter.cert.Raw}), 0o644))
	a, err := x509pop.NewAgent(x509pop.AgentConfig{CertificatePath: certPath, IntermediatesPath: interPath, PrivateKeyPath: keyPath})
	require.NoError(t, err)
	_, err = node.Exchange(context.Background(), a, newServer(t, x509pop.ServerConfig{Roots: []*x509.Certificate{p.root.cert}}))
	require.NoError(t, err)
}

func TestAttestRejectsChains(t *testing.T) {
	root := newRoot(t, "root")
	other := newRoot(t, "other root")
	key := ecKey(t, elliptic.P256())

	deep := func(n int) []*x509.Certificate {
		ca := root
		var inters []*x509.Certificate
		for i := 0; i < n; i++ {
			ca = ca.intermediate(t, "inter")
			inters = append([]*x509.Certificate{ca.cert}, inters...)
		}
		leaf := ca.sign(t, leafTemplate("deep"), key.Public())
		return append([]*x509.Certificate{leaf}, inters...)
	}

	tests := []struct {
		name    string
		chain   []*x509.Certificate
		key     crypto.Signer
		wantErr string
	}{
		{"wrong CA", []*x509.Certificate{other.sign(t, leafTemplate("n"), key.Public())}, key, "certificate signed by unknown authority"},
		{"expired", []*x509.Certificate{root.sign(t, withTimes(leafTemplate("n"), -2*time.Hour, -time.Hour), key.Public())}, key, "expired"},
		{"not yet valid", []*x509.Certificate{root.sign(t, withTimes(leafTemplate("n"), time.Hour, 2*time.Hour), key.Public())}, key, "not yet valid"},
		{"too deep", deep(5), key, "5 intermediates, more than the 4 allowed"},
		{"no digitalSignature", []*x509.Certificate{root.sign(t, withKU(leafTemplate("n"), x509.KeyUsageKeyEncipherment), key.Public())}, key, "lacks the digitalSignature"},
		{"CA key usage", []*x509.Certificate{root.sign(t, withKU(leafTemplate("n"), x509.KeyUsageDigitalSignature|x509.KeyUsageCertSign), key.Public())}, key, "CA key usages"},
		{"leaf is CA", []*x509.Certificate{root.intermediate(t, "ca").cert}, nil, "leaf certificate is a CA"},
		{"serverAuth only", []*x509.Certificate{root.sign(t, withEKU(leafTemplate("n"), x509.ExtKeyUsageServerAuth), key.Public())}, key, "incompatible key usage"},
	}
	s := newServer(t, x509pop.ServerConfig{Roots: []*x509.Certificate{root.cert}})
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			payload := payloadOf(tt.chain...)
			challenged := false
			_, err := s.Attest(context.Background(), payload, func(context.Context, []byte) ([]byte, error) {
				challenged = true
				return nil, errors.New("unreachable")
			})
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.wantErr)
			assert.True(t, strings.HasPrefix(err.Error(), "x509pop: "), err.Error())
			assert.False(t, challenged, "no challenge before the chain is verified")
		})
	}

	// The depth cap is what rejected the deep chain: raising it accepts it.
	chain := deep(5)
	s5 := newServer(t, x509pop.ServerConfig{Roots: []*x509.Certificate{root.cert}, MaxIntermediates: 5})
	_, err := node.Exchange(context.Background(), newAgent(t, key, chain...), s5)
	require.NoError(t, err)

	// ExtKeyUsageAny accepts the serverAuth-only leaf.
	sa := root.sign(t, withEKU(leafTemplate("n"), x509.ExtKeyUsageServerAuth), key.Public())
	sAny := newServer(t, x509pop.ServerConfig{Roots: []*x509.Certificate{root.cert}, ExtKeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	_, err = node.Exchange(context.Background(), newAgent(t, key, sa), sAny)
	require.NoError(t, err)
}

func withTimes(c *x509.Certificate, from, to time.Duration) *x509.Certificate {
	c.NotBefore, c.NotAfter = time.Now().Add(from), time.Now().Add(to)
	return c
}

func withKU(c *x509.Certificate, ku x509.KeyUsage) *x509.Certificate { c.KeyUsage = ku; return c }

func withEKU(c *x509.Certificate, eku ...x509.ExtKeyUsage) *x509.Certificate {
	c.ExtKeyUsage = eku
	return c
}

func payloadOf(chain ...*x509.Certificate) []byte {
	var ders [][]byte
	for _, c := range chain {
		ders = append(ders, c.Raw)
	}
	b, err := json.Marshal(map[string]any{"certificates": ders})
	if err != nil {
		panic(err)
	}
	return b
}

func TestAttestRejectsKeys(t *testing.T) {
	root := newRoot(t, "root")
	s := newServer(t, x509pop.ServerConfig{Roots: []*x509.Certificate{root.cert}})

	// A 9000-bit modulus: only the public half is needed to issue the
	// certificate, and the server must refuse it before doing RSA work.
	buf := make([]byte, 9000/8)
	_, err := rand.Read(buf)
	require.NoError(t, err)
	buf[0] |= 0x80
	buf[len(buf)-1] |= 1
	huge := &rsa.PublicKey{N: new(big.Int).SetBytes(buf), E: 65537}

	tests := []struct {
		name    string
		pub     crypto.PublicKey
		wantErr string
	}{
		{"small RSA", rsaKey(t, 1024).Public(), "RSA key of 1024 bits"},
		{"huge RSA", huge, "RSA key of 9000 bits"},
		{"P-521", ecKey(t, elliptic.P521()).Public(), "ECDSA curve P-521 not allowed"},
		{"P-224", ecKey(t, elliptic.P224()).Public(), "ECDSA curve P-224 not allowed"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			leaf := root.sign(t, leafTemplate("n"), tt.pub)
			_, err := s.Attest(context.Background(), payloadOf(leaf), nil)
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.wantErr)
		})
	}

	// An intermediate with a small key is refused too.
	weak := rsaKey(t, 1024)
	inter := root.sign(t, &x509.Certificate{IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}, weak.Public())
	key := ecKey(t, elliptic.P256())
	leaf := (&testCA{cert: inter, key: weak}).sign(t, leafTemplate("n"), key.Public())
	_, err = s.Attest(context.Background(), payloadOf(leaf, inter), nil)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "certificate 1: RSA key of 1024 bits")
}

// wire mirrors of the challenge/response format, to tamper with responses.
type wireResponse struct {
	RSA *struct {
		Nonce     []byte `json:"nonce"`
		Signature []byte `json:"signature"`
	} `json:"rsa_signature"`
	ECDSA *struct {
		Nonce []byte `json:"nonce"`
		R     []byte `json:"r"`
		S     []byte `json:"s"`
	} `json:"ecdsa_signature"`
}

func tamper(t *testing.T, a *x509pop.Agent, edit func(*wireResponse)) node.ChallengeFunc {
	return func(ctx context.Context, c []byte) ([]byte, error) {
		b, err := a.Respond(ctx, c)
		require.NoError(t, err)
		var r wireResponse
		require.NoError(t, json.Unmarshal(b, &r))
		edit(&r)
		return json.Marshal(r)
	}
}

func TestAttestBadSignature(t *testing.T) {
	p := newPKI(t)
	rsaRoot := newRoot(t, "rsa root")
	rkey := rsaKey(t, 2048)
	rleaf := rsaRoot.sign(t, leafTemplate("r"), rkey.Public())
	s := newServer(t, x509pop.ServerConfig{Roots: []*x509.Certificate{p.root.cert, rsaRoot.cert}})

	ec := newAgent(t, p.key, p.leaf, p.inter.cert)
	rs := newAgent(t, rkey, rleaf)
	tests := []struct {
		name    string
		agent   *x509pop.Agent
		edit    func(*wireResponse)
		wantErr string
	}{
		{"ECDSA flipped bit", ec, func(r *wireResponse) { r.ECDSA.S[0] ^= 1 }, "ECDSA signature verification failed"},
		{"ECDSA other nonce", ec, func(r *wireResponse) { r.ECDSA.Nonce[0] ^= 1 }, "ECDSA signature verification failed"},
		{"ECDSA oversized r", ec, func(r *wireResponse) { r.ECDSA.R = append(make([]byte, 40), r.ECDSA.R...) }, "ECDSA signature verification failed"},
		{"ECDSA short nonce", ec, func(r *wireResponse) { r.ECDSA.Nonce = r.ECDSA.Nonce[:16] }, "agent nonce is 16 bytes"},
		{"ECDSA missing", ec, func(r *wireResponse) { r.ECDSA = nil }, "expected an ECDSA signature response"},
		{"RSA flipped bit", rs, func(r *wireResponse) { r.RSA.Signature[10] ^= 1 }, "RSA signature verification failed"},
		{"RSA other nonce", rs, func(r *wireResponse) { r.RSA.Nonce[31] ^= 1 }, "RSA signature verification failed"},
		{"RSA missing", rs, func(r *wireResponse) { r.RSA = nil }, "expected an RSA signature response"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			payload, err := tt.agent.Payload(context.Background())
			require.NoError(t, err)
			_, err = s.Attest(context.Background(), payload, tamper(t, tt.agent, tt.edit))
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.wantErr)
		})
	}
}

// TestAttestOtherKey is a node that holds a certificate but not its key: it
// signs with a key of its own.
func TestAttestOtherKey(t *testing.T) {
	p := newPKI(t)
	s := newServer(t, x509pop.ServerConfig{Roots: []*x509.Certificate{p.root.cert}})
	own := ecKey(t, elliptic.P256())
	impostor := newAgent(t, own, p.root.sign(t, leafTemplate("impostor"), own.Public()))
	_, err := s.Attest(context.Background(), payloadOf(p.leaf, p.inter.cert), func(ctx context.Context, c []byte) ([]byte, error) {
		_, err := impostor.Payload(ctx)
		require.NoError(t, err)
		return impostor.Respond(ctx, c)
	})
	require.Error(t, err)
	assert.Contains(t, err.Error(), "ECDSA signature verification failed")
}

func TestAttestReplayedResponse(t *testing.T) {
	p := newPKI(t)
	s := newServer(t, x509pop.ServerConfig{Roots: []*x509.Certificate{p.root.cert}})
	a := newAgent(t, p.key, p.leaf, p.inter.cert)
	payload, err := a.Payload(context.Background())
	require.NoError(t, err)

	var captured []byte
	var challenges [][]byte
	_, err = s.Attest(context.Background(), payload, func(ctx context.Context, c []byte) ([]byte, error) {
		challenges = append(challenges, c)
		captured, err = a.Respond(ctx, c)
		return captured, err
	})
	require.NoError(t, err)

	// An eavesdropper replays the captured payload and response.
	_, err = s.Attest(context.Background(), payload, func(_ context.Context, c []byte) ([]byte, error) {
		challenges = append(challenges, c)
		return captured, nil
	})
	require.Error(t, err)
	assert.Contains(t, err.Error(), "signature verification failed")
	require.Len(t, challenges, 2)
	assert.NotEqual(t, challenges[0], challenges[1], "every challenge carries a fresh nonce")
}

func TestAttestMalformed(t *testing.T) {
	p := newPKI(t)
	s := newServer(t, x509pop.ServerConfig{Roots: []*x509.Certificate{p.root.cert}})
	tests := []struct {
		name, payload, wantErr string
	}{
		{"not json", "nope", "malformed payload"},
		{"empty", `{"certificates":[]}`, "no certificate"},
		{"garbage DER", `{"certificates":["AAAA"]}`, "certificate 0"},
		{"huge", `{"certificates":["` + strings.Repeat("A", node.MaxPayloadSize) + `"]}`, "over"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := s.Attest(context.Background(), []byte(tt.payload), nil)
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.wantErr)
		})
	}

	// Malformed challenge responses.
	payload := payloadOf(p.leaf, p.inter.cert)
	for name, resp := range map[string]string{
		"not json": "nope", "empty object": "{}", "huge": strings.Repeat(" ", node.MaxPayloadSize+1),
	} {
		t.Run("response "+name, func(t *testing.T) {
			_, err := s.Attest(context.Background(), payload, func(context.Context, []byte) ([]byte, error) { return []byte(resp), nil })
			require.Error(t, err)
		})
	}
	_, err := s.Attest(context.Background(), payload, func(context.Context, []byte) ([]byte, error) { return nil, errors.New("stream closed") })
	require.ErrorContains(t, err, "x509pop: challenge: stream closed")
}

func TestAgentPathTemplate(t *testing.T) {
	root := newRoot(t, "root")
	key := ecKey(t, elliptic.P256())
	s := newServer(t, x509pop.ServerConfig{Roots: []*x509.Certificate{root.cert}, AgentPathTemplate: "cn/{{ .Subject.CommonName }}/{{ .SerialNumberHex }}"})

	leaf := root.sign(t, withSerial(leafTemplate("rack-7"), 255), key.Public())
	res, err := node.Exchange(context.Background(), newAgent(t, key, leaf), s)
	require.NoError(t, err)
	assert.Equal(t, "spiffe://example.org/spire/agent/cn/rack-7/ff", res.AgentID.String())

	// Certificate fields cannot walk out of the agent namespace.
	for _, cn := range []string{"../../server", "a/../b", "%2e%2e", "", "a b"} {
		leaf := root.sign(t, leafTemplate(cn), key.Public())
		_, err := node.Exchange(context.Background(), newAgent(t, key, leaf), s)
		require.Error(t, err, cn)
		assert.Contains(t, err.Error(), "x509pop: agent path")
	}

	_, err = x509pop.NewServer(x509pop.ServerConfig{TrustDomain: td, Roots: []*x509.Certificate{root.cert}, AgentPathTemplate: "{{ .Nope "})
	require.Error(t, err)
	bad := newServer(t, x509pop.ServerConfig{Roots: []*x509.Certificate{root.cert}, AgentPathTemplate: "{{ .NoSuchField }}"})
	_, err = node.Exchange(context.Background(), newAgent(t, key, leaf), bad)
	require.ErrorContains(t, err, "agent path template")
}

func withSerial(c *x509.Certificate, n int64) *x509.Certificate {
	c.SerialNumber = big.NewInt(n)
	return c
}

func TestAgentFiles(t *testing.T) {
	p := newPKI(t)
	_, err := x509pop.NewAgent(x509pop.AgentConfig{})
	require.Error(t, err)

	// Key does not match the certificate.
	certPath, keyPath := agentFiles(t, ecKey(t, elliptic.P256()), p.leaf)
	_, err = x509pop.NewAgent(x509pop.AgentConfig{CertificatePath: certPath, PrivateKeyPath: keyPath})
	require.ErrorContains(t, err, "does not match")

	// SEC 1 and PKCS#1 key files load too.
	certPath, keyPath = agentFiles(t, p.key, p.leaf, p.inter.cert)
	der, err := x509.MarshalECPrivateKey(p.key)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}), 0o600))
	a, err := x509pop.NewAgent(x509pop.AgentConfig{CertificatePath: certPath, PrivateKeyPath: keyPath})
	require.NoError(t, err)
	assert.Equal(t, "x509pop", a.Name())

	rkey := rsaKey(t, 2048)
	rleaf := p.root.sign(t, leafTemplate("r"), rkey.Public())
	certPath, keyPath = agentFiles(t, rkey, rleaf)
	require.NoError(t, os.WriteFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(rkey)}), 0o600))
	_, err = x509pop.NewAgent(x509pop.AgentConfig{CertificatePath: certPath, PrivateKeyPath: keyPath})
	require.NoError(t, err)

	// Respond before Payload.
	_, err = a.Respond(context.Background(), []byte("{}"))
	require.ErrorContains(t, err, "challenge before payload")

	// Empty certificate file.
	require.NoError(t, os.WriteFile(certPath, []byte("nothing"), 0o644))
	_, err = x509pop.NewAgent(x509pop.AgentConfig{CertificatePath: certPath, PrivateKeyPath: keyPath})
	require.ErrorContains(t, err, "no certificates")
}

// TestAgentPicksUpRenewedFiles renews the node certificate on disk between
// attestations: the next attestation uses the new one.
func TestAgentPicksUpRenewedFiles(t *testing.T) {
	p := newPKI(t)
	s := newServer(t, x509pop.ServerConfig{Roots: []*x509.Certificate{p.root.cert}})
	certPath, keyPath := agentFiles(t, p.key, p.leaf, p.inter.cert)
	a, err := x509pop.NewAgent(x509pop.AgentConfig{CertificatePath: certPath, PrivateKeyPath: keyPath})
	require.NoError(t, err)
	first, err := node.Exchange(context.Background(), a, s)
	require.NoError(t, err)

	key2 := ecKey(t, elliptic.P384())
	leaf2 := p.inter.sign(t, leafTemplate("node-1"), key2.Public())
	newCert, newKey := agentFiles(t, key2, leaf2, p.inter.cert)
	require.NoError(t, os.Rename(newCert, certPath))
	require.NoError(t, os.Rename(newKey, keyPath))
	second, err := node.Exchange(context.Background(), a, s)
	require.NoError(t, err)
	assert.Equal(t, "spiffe://example.org/spire/agent/x509pop/"+sha1Hex(leaf2), second.AgentID.String())
	assert.NotEqual(t, first.AgentID, second.AgentID)
}

func TestNewServerValidates(t *testing.T) {
	root := newRoot(t, "root")
	_, err := x509pop.NewServer(x509pop.ServerConfig{Roots: []*x509.Certificate{root.cert}})
	require.ErrorContains(t, err, "trust domain")
	_, err = x509pop.NewServer(x509pop.ServerConfig{TrustDomain: td})
	require.ErrorContains(t, err, "root CA")
	key := ecKey(t, elliptic.P256())
	_, err = x509pop.NewServer(x509pop.ServerConfig{TrustDomain: td, Roots: []*x509.Certificate{root.sign(t, leafTemplate("x"), key.Public())}})
	require.ErrorContains(t, err, "not a CA")
	_, err = x509pop.NewServer(x509pop.ServerConfig{TrustDomain: td, Roots: []*x509.Certificate{root.cert}, MaxIntermediates: -1})
	require.Error(t, err)
}

func TestLoadCertificates(t *testing.T) {
	p := newPKI(t)
	path := filepath.Join(t.TempDir(), "bundle.pem")
	var b []byte
	b = append(b, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: p.root.cert.Raw})...)
	b = append(b, pem.EncodeToMemory(&pem.Block{Type: "EC PARAMETERS", Bytes: []byte{1}})...)
	b = append(b, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: p.inter.cert.Raw})...)
	require.NoError(t, os.WriteFile(path, b, 0o644))
	certs, err := x509pop.LoadCertificates(path)
	require.NoError(t, err)
	require.Len(t, certs, 2)
	assert.True(t, certs[0].Equal(p.root.cert))
	assert.True(t, certs[1].Equal(p.inter.cert))
}

func FuzzServerAttest(f *testing.F) {
	p := newPKI(f)
	s := newServer(f, x509pop.ServerConfig{Roots: []*x509.Certificate{p.root.cert}})
	a := newAgent(f, p.key, p.leaf, p.inter.cert)
	payload, err := a.Payload(context.Background())
	require.NoError(f, err)
	f.Add(payload, []byte(`{"ecdsa_signature":{"nonce":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=","r":"AQ==","s":"AQ=="}}`))
	f.Add([]byte(`{"certificates":["AAAA"]}`), []byte(`{}`))
	f.Add([]byte(`{"certificates":[]}`), []byte(`null`))
	f.Add(payloadOf(p.leaf), []byte(`{"rsa_signature":{"nonce":"","signature":""}}`))
	f.Fuzz(func(t *testing.T, payload, resp []byte) {
		res, err := s.Attest(context.Background(), payload, func(context.Context, []byte) ([]byte, error) { return resp, nil })
		if err == nil {
			// Without the private key a fixed response can never answer a
			// fresh nonce.
			t.Fatalf("attestation succeeded without proof of possession: %v", res.AgentID)
		}
		if !strings.HasPrefix(err.Error(), "x509pop: ") {
			t.Fatalf("error without package prefix: %v", err)
		}
	})
}

func BenchmarkAttest(b *testing.B) {
	p := newPKI(b)
	s := newServer(b, x509pop.ServerConfig{Roots: []*x509.Certificate{p.root.cert}})
	a := newAgent(b, p.key, p.leaf, p.inter.cert)
	ctx := context.Background()
	for b.Loop() {
		if _, err := node.Exchange(ctx, a, s); err != nil {
			b.Fatal(err)
		}
	}
}
