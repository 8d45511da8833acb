package e2e

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/test/testcluster"
)

// authorityEnv drives one real server through the CLI, and relies on what a
// relying party would: the bundle from `ferry bundle show` and the OIDC
// discovery endpoint over HTTPS.
type authorityEnv struct {
	t      *testing.T
	srv    *testcluster.Node
	issuer string
	http   *http.Client // dials the OIDC listener, trusting roots
	roots  *x509.CertPool
}

func (e *authorityEnv) cli(args ...string) string {
	e.t.Helper()
	out, err := e.srv.CLI(args...)
	require.NoError(e.t, err, "ferry %s: %s", strings.Join(args, " "), out)
	return out
}

func (e *authorityEnv) cliJSON(m proto.Message, args ...string) {
	e.t.Helper()
	out := e.cli(append(args, "--output", "json")...)
	require.NoError(e.t, protojson.Unmarshal([]byte(out), m), out)
}

func (e *authorityEnv) authorities(kind string) []*ferrypb.LocalAuthority {
	e.t.Helper()
	var resp ferrypb.ListLocalAuthoritiesResponse
	e.cliJSON(&resp, "authority", kind, "list")
	return resp.Authorities
}

func byStatus(as []*ferrypb.LocalAuthority, status string) []*ferrypb.LocalAuthority {
	var out []*ferrypb.LocalAuthority
	for _, a := range as {
		if a.Status == status {
			out = append(out, a)
		}
	}
	return out
}

// bundle is the trust domain's X.509 bundle as `ferry bundle show` prints it.
func (e *authorityEnv) bundle() *x509.CertPool {
	e.t.Helper()
	out := e.cli("bundle", "show", "--trust-domain", "example.org")
	pool := x509.NewCertPool()
	require.True(e.t, pool.AppendCertsFromPEM([]byte(out)), out)
	return pool
}

func (e *authorityEnv) bundleSize() int {
	e.t.Helper()
	var b ferrypb.Bundle
	e.cliJSON(&b, "bundle", "show", "--trust-domain", "example.org")
	return len(b.X509Authorities)
}

type mintedX509 struct {
	leaf  *x509.Certificate
	chain []*x509.Certificate
	key   crypto.Signer
}

func (e *authorityEnv) mintX509(id string) mintedX509 {
	e.t.Helper()
	dir := e.t.TempDir()
	e.cli("x509", "mint", "--spiffe-id", id, "--dns", "svc.example.org", "--ttl", "20m", "--write", dir)
	fi, err := os.Stat(filepath.Join(dir, "key.pem"))
	require.NoError(e.t, err)
	require.Equal(e.t, os.FileMode(0o600), fi.Mode().Perm(), "the private key is written owner-only")
	pair, err := tls.LoadX509KeyPair(filepath.Join(dir, "svid.pem"), filepath.Join(dir, "key.pem"))
	require.NoError(e.t, err, "svid.pem and key.pem are a pair")
	var m mintedX509
	for _, der := range pair.Certificate {
		c, err := x509.ParseCertificate(der)
		require.NoError(e.t, err)
		m.chain = append(m.chain, c)
	}
	m.leaf, m.key = m.chain[0], pair.PrivateKey.(crypto.Signer)
	require.Equal(e.t, id, m.leaf.URIs[0].String())
	// bundle.pem is the bundle the server had when it minted.
	data, err := os.ReadFile(filepath.Join(dir, "bundle.pem"))
	require.NoError(e.t, err)
	pool := x509.NewCertPool()
	require.True(e.t, pool.AppendCertsFromPEM(data))
	require.NoError(e.t, verifySVID(m, pool), "the SVID verifies against the bundle.pem minted with it")
	return m
}

func mustLeaf(t *testing.T, p string) *x509.Certificate {
	t.Helper()
	block, _ := pem.Decode([]byte(p))
	require.NotNil(t, block, p)
	c, err := x509.ParseCertificate(block.Bytes)
	require.NoError(t, err)
	return c
}

func verifySVID(m mintedX509, roots *x509.CertPool) error {
	inter := x509.NewCertPool()
	for _, c := range m.chain[1:] {
		inter.AddCert(c)
	}
	_, err := m.leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	return err
}

func (e *authorityEnv) mintJWT(id, aud string) *ferrypb.MintJWTSVIDResponse {
	e.t.Helper()
	var resp ferrypb.MintJWTSVIDResponse
	e.cliJSON(&resp, "jwt", "mint", "--spiffe-id", id, "--audience", aud, "--ttl", "10m")
	return &resp
}

type oidcDiscovery struct {
	Issuer        string   `json:"issuer"`
	JWKSURI       string   `json:"jwks_uri"`
	Algs          []string `json:"id_token_signing_alg_values_supported"`
	ResponseTypes []string `json:"response_types_supported"`
	SubjectTypes  []string `json:"subject_types_supported"`
}

type testJWK struct {
	Kty, Use, Kid, Alg, Crv, X, Y, N, E string
}

func (e *authorityEnv) getJSON(url string, v any) {
	e.t.Helper()
	resp, err := e.http.Get(url)
	require.NoError(e.t, err)
	defer resp.Body.Close()
	require.Equal(e.t, http.StatusOK, resp.StatusCode)
	require.NoError(e.t, json.NewDecoder(resp.Body).Decode(v))
}

// discover fetches the discovery document and the JWKS it names, as a
// relying party does, and returns the keys by kid.
func (e *authorityEnv) discover() (oidcDiscovery, map[string]testJWK) {
	e.t.Helper()
	var d oidcDiscovery
	e.getJSON(e.issuer+"/.well-known/openid-configuration", &d)
	var set struct{ Keys []testJWK }
	e.getJSON(d.JWKSURI, &set)
	keys := map[string]testJWK{}
	for _, k := range set.Keys {
		keys[k.Kid] = k
	}
	return d, keys
}

func jwkPublicKey(k testJWK) (crypto.PublicKey, error) {
	dec := func(s string) (*big.Int, error) {
		b, err := base64.RawURLEncoding.DecodeString(s)
		return new(big.Int).SetBytes(b), err
	}
	switch k.Kty {
	case "RSA":
		n, err := dec(k.N)
		if err != nil {
			return nil, err
		}
		ex, err := dec(k.E)
		if err != nil {
			return nil, err
		}
		return &rsa.PublicKey{N: n, E: int(ex.Int64())}, nil
	case "EC":
		curves := map[string]elliptic.Curve{"P-256": elliptic.P256(), "P-384": elliptic.P384(), "P-521": elliptic.P521()}
		curve, ok := curves[k.Crv]
		if !ok {
			return nil, fmt.Errorf("curve %q", k.Crv)
		}
		x, err := base64.RawURLEncoding.DecodeString(k.X)
		if err != nil {
			return nil, err
		}
		y, err := base64.RawURLEncoding.DecodeString(k.Y)
		if err != nil {
			return nil, err
		}
		return ecdsa.ParseUncompressedPublicKey(curve, append(append([]byte{4}, x...), y...))
	}
	return nil, fmt.Errorf("kty %q", k.Kty)
}

// verifyJWT validates a JWT-SVID as an OIDC relying party: key by kid from the
// JWKS, algorithm from the discovery document, issuer and audience.
func verifyJWT(token string, d oidcDiscovery, keys map[string]testJWK, aud string) (*jwt.Token, error) {
	return jwt.Parse(token, func(t *jwt.Token) (any, error) {
		kid, _ := t.Header["kid"].(string)
		k, ok := keys[kid]
		if !ok {
			return nil, fmt.Errorf("kid %q not in the JWKS", kid)
		}
		if k.Alg != t.Method.Alg() || k.Use != "sig" {
			return nil, fmt.Errorf("key %s: alg %s use %s", kid, k.Alg, k.Use)
		}
		return jwkPublicKey(k)
	}, jwt.WithValidMethods(d.Algs), jwt.WithIssuer(d.Issuer), jwt.WithAudience(aud), jwt.WithExpirationRequired())
}

func TestAuthorityOperations(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a real server process")
	}
	oidcAddr := testcluster.FreeAddr(t)
	_, port, err := net.SplitHostPort(oidcAddr)
	require.NoError(t, err)
	issuer := "https://localhost:" + port
	c := testcluster.New(t, testcluster.Options{Nodes: 1, ExtraServerConfig: fmt.Sprintf(`  ca {
    jwt_algorithm = "RS256"
  }
  oidc {
    addr   = %q
    issuer = %q
  }`, oidcAddr, issuer)})
	e := &authorityEnv{t: t, srv: c.Nodes[0], issuer: issuer}

	// The CA publishes and activates its first authorities once it leads.
	require.Eventually(t, func() bool {
		out, err := e.srv.CLI("authority", "jwt", "list", "--output", "json")
		return err == nil && strings.Contains(out, `"active"`)
	}, 30*time.Second, 100*time.Millisecond)

	// A relying party trusts the bundle and reaches the OIDC listener, which
	// serves the server's own SVID for localhost.
	e.roots = e.bundle()
	e.http = &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: e.roots},
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, oidcAddr)
		},
	}}

	x509s := e.authorities("x509")
	require.Len(t, x509s, 1)
	require.Equal(t, "active", x509s[0].Status)
	require.True(t, x509s[0].Published)
	require.False(t, x509s[0].Tainted)
	table := e.cli("authority", "x509", "list")
	require.Contains(t, table, "AUTHORITY ID")
	require.Contains(t, table, x509s[0].Id)
	oldX509 := x509s[0].Id
	oldJWT := byStatus(e.authorities("jwt"), "active")[0].Id

	// x509 mint: the SVID verifies against `ferry bundle show`.
	svidA := e.mintX509("spiffe://example.org/ops/a")
	require.NoError(t, verifySVID(svidA, e.bundle()))
	require.Equal(t, oldX509, hex.EncodeToString(svidA.leaf.AuthorityKeyId))
	require.Equal(t, []string{"svc.example.org"}, svidA.leaf.DNSNames)

	// jwt mint: the token validates against the OIDC discovery JWKS.
	d, keys := e.discover()
	require.Equal(t, issuer, d.Issuer)
	require.Equal(t, issuer+"/keys", d.JWKSURI)
	require.Equal(t, []string{"RS256"}, d.Algs)
	require.Equal(t, []string{"id_token"}, d.ResponseTypes)
	require.Equal(t, []string{"public"}, d.SubjectTypes)
	require.Contains(t, keys, oldJWT)
	jwtA := e.mintJWT("spiffe://example.org/ops/a", "api://AzureADTokenExchange")
	require.Equal(t, oldJWT, jwtA.KeyId)
	tok, err := verifyJWT(jwtA.Token, d, keys, "api://AzureADTokenExchange")
	require.NoError(t, err)
	sub, _ := tok.Claims.GetSubject()
	require.Equal(t, "spiffe://example.org/ops/a", sub)
	_, err = verifyJWT(jwtA.Token, d, keys, "api://other")
	require.Error(t, err, "the audience is checked")

	// CA rotation without a failed verification. Prepare publishes first...
	var prepared ferrypb.LocalAuthority
	e.cliJSON(&prepared, "authority", "x509", "prepare")
	require.Equal(t, "prepared", prepared.Status)
	require.True(t, prepared.Published)
	var preparedJWT ferrypb.LocalAuthority
	e.cliJSON(&preparedJWT, "authority", "jwt", "prepare")
	require.Equal(t, 2, e.bundleSize())
	bundleBefore := e.bundle() // what a relying party holds before the switch
	dBefore, keysBefore := e.discover()
	require.Contains(t, keysBefore, preparedJWT.Id, "a prepared JWT key is in the JWKS before it signs")
	require.NoError(t, verifySVID(svidA, bundleBefore))

	// ...then activate: new SVIDs come from the new authority and verify
	// against the bundle fetched before activation; old ones still verify.
	var active ferrypb.LocalAuthority
	e.cliJSON(&active, "authority", "x509", "activate", "--authority-id", prepared.Id)
	require.Equal(t, "active", active.Status)
	e.cli("authority", "jwt", "activate") // the only prepared one
	require.Equal(t, "old", byStatus(e.authorities("x509"), "old")[0].Status)
	require.Equal(t, oldX509, byStatus(e.authorities("x509"), "old")[0].Id)
	require.Equal(t, preparedJWT.Id, byStatus(e.authorities("jwt"), "active")[0].Id)

	svidB := e.mintX509("spiffe://example.org/ops/b")
	require.Equal(t, prepared.Id, hex.EncodeToString(svidB.leaf.AuthorityKeyId), "signed by the new authority")
	require.NoError(t, verifySVID(svidB, bundleBefore), "new SVIDs verify against the bundle from before activation")
	require.NoError(t, verifySVID(svidA, e.bundle()), "old SVIDs still verify after activation")
	require.NoError(t, verifySVID(svidB, e.bundle()))

	jwtB := e.mintJWT("spiffe://example.org/ops/b", "api://AzureADTokenExchange")
	require.Equal(t, preparedJWT.Id, jwtB.KeyId)
	_, err = verifyJWT(jwtB.Token, dBefore, keysBefore, "api://AzureADTokenExchange")
	require.NoError(t, err, "new JWT-SVIDs verify against the JWKS from before activation")
	dNow, keysNow := e.discover()
	_, err = verifyJWT(jwtA.Token, dNow, keysNow, "api://AzureADTokenExchange")
	require.NoError(t, err, "old JWT-SVIDs still verify after activation")

	// Taint: only an old authority; it stays in the bundle.
	_, err = e.srv.CLI("authority", "x509", "taint", "--authority-id", prepared.Id)
	require.Error(t, err, "the active authority cannot be tainted")
	_, err = e.srv.CLI("authority", "x509", "revoke", "--authority-id", oldX509)
	require.Error(t, err, "an untainted authority cannot be revoked")
	e.cli("authority", "x509", "taint", "--authority-id", oldX509)
	e.cli("authority", "jwt", "taint", "--authority-id", oldJWT)
	old := byStatus(e.authorities("x509"), "old")
	require.Len(t, old, 1)
	require.True(t, old[0].Tainted)
	require.NoError(t, verifySVID(svidA, e.bundle()), "a tainted authority still verifies")

	// Revoke: gone from the bundle and the JWKS; what it signed stops verifying.
	e.cli("authority", "x509", "revoke", "--authority-id", oldX509)
	e.cli("authority", "jwt", "revoke", "--authority-id", oldJWT)
	require.Len(t, e.authorities("x509"), 1)
	require.Len(t, e.authorities("jwt"), 1)
	require.Equal(t, 1, e.bundleSize())
	require.Error(t, verifySVID(svidA, e.bundle()), "an SVID of a revoked authority no longer verifies")
	require.NoError(t, verifySVID(svidB, e.bundle()))
	dNow, keysNow = e.discover()
	require.NotContains(t, keysNow, oldJWT)
	_, err = verifyJWT(jwtA.Token, dNow, keysNow, "api://AzureADTokenExchange")
	require.Error(t, err)
	_, err = verifyJWT(jwtB.Token, dNow, keysNow, "api://AzureADTokenExchange")
	require.NoError(t, err)

	// Without --write, mint prints the PEMs (or JSON).
	out := e.cli("x509", "mint", "--spiffe-id", "spiffe://example.org/ops/c")
	require.Contains(t, out, "BEGIN PRIVATE KEY")
	require.Equal(t, 2, strings.Count(out, "BEGIN CERTIFICATE"), "the SVID and the one root")
	var printed struct {
		SVIDPEM   string `json:"svid_pem"`
		KeyPEM    string `json:"key_pem"`
		BundlePEM string `json:"bundle_pem"`
	}
	out = e.cli("x509", "mint", "--spiffe-id", "spiffe://example.org/ops/c", "--output", "json")
	require.NoError(t, json.Unmarshal([]byte(out), &printed), out)
	_, err = tls.X509KeyPair([]byte(printed.SVIDPEM), []byte(printed.KeyPEM))
	require.NoError(t, err)
	require.Equal(t, "spiffe://example.org/ops/c", mustLeaf(t, printed.SVIDPEM).URIs[0].String())
	require.NoError(t, verifySVID(mintedX509{leaf: mustLeaf(t, printed.SVIDPEM), chain: []*x509.Certificate{mustLeaf(t, printed.SVIDPEM)}}, e.bundle()))
	tokenFile := filepath.Join(t.TempDir(), "token")
	e.cli("jwt", "mint", "--spiffe-id", "spiffe://example.org/ops/c", "--audience", "a", "--write", tokenFile)
	token, err := os.ReadFile(tokenFile)
	require.NoError(t, err)
	_, err = verifyJWT(string(token), dNow, keysNow, "a")
	require.NoError(t, err)

	// Minting refuses what is not ours to mint.
	out, err = e.srv.CLI("jwt", "mint", "--spiffe-id", "spiffe://other.org/x", "--audience", "a")
	require.Error(t, err)
	require.Contains(t, out, "InvalidArgument")
}

func TestFederatedBundleCLI(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a real server process")
	}
	c := testcluster.New(t, testcluster.Options{Nodes: 1})
	e := &authorityEnv{t: t, srv: c.Nodes[0]}
	require.Eventually(t, func() bool {
		out, err := e.srv.CLI("bundle", "show", "--trust-domain", "example.org", "--format", "spiffe")
		return err == nil && strings.Contains(out, "jwt-svid")
	}, 30*time.Second, 100*time.Millisecond)

	// PEM: a foreign CA.
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "other.org CA"},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		BasicConstraintsValid: true, IsCA: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	require.NoError(t, err)
	pemFile := filepath.Join(t.TempDir(), "other.pem")
	require.NoError(t, os.WriteFile(pemFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600))

	var got ferrypb.Bundle
	e.cliJSON(&got, "bundle", "set", "--trust-domain", "other.org", "--path", pemFile)
	require.Equal(t, "other.org", got.TrustDomain)
	require.Len(t, got.X509Authorities, 1)
	shown := e.cli("bundle", "show", "--trust-domain", "other.org")
	block, _ := pem.Decode([]byte(shown))
	require.NotNil(t, block, shown)
	require.Equal(t, der, block.Bytes)

	// Our own trust domain's bundle is the authorities' and is refused.
	out, err := e.srv.CLI("bundle", "set", "--trust-domain", "example.org", "--path", pemFile)
	require.Error(t, err)
	require.Contains(t, out, "own trust domain")
	out, err = e.srv.CLI("bundle", "delete", "--trust-domain", "example.org")
	require.Error(t, err, out)
	require.NotEmpty(t, e.cli("bundle", "show", "--trust-domain", "example.org"))

	// SPIFFE format: our own bundle document, as another domain would publish it.
	doc := e.cli("bundle", "show", "--trust-domain", "example.org", "--format", "spiffe")
	var own ferrypb.Bundle
	e.cliJSON(&own, "bundle", "show", "--trust-domain", "example.org")
	docFile := filepath.Join(t.TempDir(), "mirror.json")
	require.NoError(t, os.WriteFile(docFile, []byte(doc), 0o600))
	e.cliJSON(&got, "bundle", "set", "--trust-domain", "mirror.org", "--path", docFile, "--format", "spiffe")
	require.Equal(t, "mirror.org", got.TrustDomain)
	require.Len(t, got.X509Authorities, len(own.X509Authorities))
	require.Len(t, got.JwtAuthorities, len(own.JwtAuthorities))

	var list ferrypb.ListBundlesResponse
	e.cliJSON(&list, "bundle", "list")
	require.Len(t, list.Bundles, 3)

	e.cli("bundle", "delete", "--trust-domain", "other.org")
	_, err = e.srv.CLI("bundle", "show", "--trust-domain", "other.org")
	require.Error(t, err)
	out, err = e.srv.CLI("bundle", "delete", "--trust-domain", "other.org")
	require.Error(t, err)
	require.Contains(t, out, "NotFound")
}
