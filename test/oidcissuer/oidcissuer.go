// Package oidcissuer is an external OpenID Connect issuer for tests: an HTTPS
// server with its own CA that serves OIDC discovery and a JWKS, and mints
// RS256 tokens shaped like those of the workload identity providers Entra
// federates with (GitHub Actions, Kubernetes service accounts, Google, AWS).
//
// It is used in-process by tests (Start) and as a small program
// (test/oidcissuer/cmd/oidcissuer) whose /mint endpoint hands out tokens.
// Nothing here is for production: keys live in memory and anyone who can
// reach /mint gets a token.
package oidcissuer

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// Config configures an Issuer.
type Config struct {
	// Addr is the listen address; default 127.0.0.1:0.
	Addr string
	// Path is appended to https://host:port to form the issuer URL, e.g. ""
	// (GitHub: https://token.actions.githubusercontent.com) or "/<guid>/"
	// (an AKS issuer, trailing slash included). It must be "" or start with "/".
	Path string
	// Mint serves GET /mint (see ServeMint) when set.
	Mint bool
}

// Issuer is a running test OIDC issuer. It is safe for concurrent use.
type Issuer struct {
	url   string // issuer URL (iss)
	base  string // https://host:port
	caPEM []byte
	srv   *http.Server
	ln    net.Listener

	mu       sync.Mutex
	keys     []*signingKey // published; keys[len-1] signs
	requests map[string]int
}

type signingKey struct {
	kid  string
	priv *rsa.PrivateKey
}

// Start listens, generates a CA, a serving certificate for 127.0.0.1 and
// localhost, and one signing key, and serves until Close.
func Start(cfg Config) (*Issuer, error) {
	if cfg.Addr == "" {
		cfg.Addr = "127.0.0.1:0"
	}
	if cfg.Path != "" && !strings.HasPrefix(cfg.Path, "/") {
		return nil, fmt.Errorf("oidcissuer: path %q must start with /", cfg.Path)
	}
	ln, err := net.Listen("tcp", cfg.Addr)
	if err != nil {
		return nil, fmt.Errorf("oidcissuer: %w", err)
	}
	caPEM, cert, err := selfCA()
	if err != nil {
		ln.Close()
		return nil, err
	}
	port := ln.Addr().(*net.TCPAddr).Port
	i := &Issuer{
		base:     fmt.Sprintf("https://127.0.0.1:%d", port),
		caPEM:    caPEM,
		ln:       ln,
		requests: map[string]int{},
	}
	i.url = i.base + cfg.Path
	if _, err := i.Rotate(); err != nil {
		ln.Close()
		return nil, err
	}
	mux := http.NewServeMux()
	prefix := strings.TrimSuffix(cfg.Path, "/")
	mux.HandleFunc("GET "+prefix+"/.well-known/openid-configuration", i.serveDiscovery)
	mux.HandleFunc("GET "+prefix+"/keys", i.serveJWKS)
	if cfg.Mint {
		mux.HandleFunc("GET /mint", i.ServeMint)
	}
	i.srv = &http.Server{
		Handler:           i.count(mux),
		ReadHeaderTimeout: 10 * time.Second,
		TLSConfig:         &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12},
	}
	go func() { _ = i.srv.ServeTLS(ln, "", "") }()
	return i, nil
}

// URL is the issuer URL: the iss of its tokens, the issuer of a federated
// credential that trusts it.
func (i *Issuer) URL() string { return i.url }

// DiscoveryURL is where its OpenID configuration is served.
func (i *Issuer) DiscoveryURL() string {
	return strings.TrimSuffix(i.url, "/") + "/.well-known/openid-configuration"
}

// CAPEM is the PEM certificate of the CA that signed the serving
// certificate; a client trusts the issuer with it (SSL_CERT_FILE).
func (i *Issuer) CAPEM() []byte { return i.caPEM }

// WriteCA writes CAPEM to path (mode 0644: it is public).
func (i *Issuer) WriteCA(path string) error { return os.WriteFile(path, i.caPEM, 0o644) }

// Client is an HTTP client that trusts the issuer.
func (i *Issuer) Client() *http.Client {
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(i.caPEM)
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
}

// Close stops serving.
func (i *Issuer) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return i.srv.Shutdown(ctx)
}

// Requests returns how many requests each path has received.
func (i *Issuer) Requests(path string) int {
	i.mu.Lock()
	defer i.mu.Unlock()
	return i.requests[path]
}

func (i *Issuer) count(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		i.mu.Lock()
		i.requests[r.URL.Path]++
		i.mu.Unlock()
		h.ServeHTTP(w, r)
	})
}

// Rotate adds a new signing key, publishes it next to the old ones and signs
// with it from now on. It returns the new kid.
func (i *Issuer) Rotate() (string, error) {
	priv, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return "", fmt.Errorf("oidcissuer: %w", err)
	}
	var b [9]byte
	_, _ = rand.Read(b[:])
	k := &signingKey{kid: base64.RawURLEncoding.EncodeToString(b[:]), priv: priv}
	i.mu.Lock()
	i.keys = append(i.keys, k)
	i.mu.Unlock()
	return k.kid, nil
}

// KID is the kid of the key that signs now.
func (i *Issuer) KID() string {
	i.mu.Lock()
	defer i.mu.Unlock()
	return i.keys[len(i.keys)-1].kid
}

func (i *Issuer) serveDiscovery(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, map[string]any{
		"issuer":                                i.url,
		"jwks_uri":                              strings.TrimSuffix(i.url, "/") + "/keys",
		"response_types_supported":              []string{"id_token"},
		"subject_types_supported":               []string{"public", "pairwise"},
		"id_token_signing_alg_values_supported": []string{"RS256"},
		"claims_supported":                      []string{"sub", "aud", "exp", "iat", "iss", "jti", "nbf"},
	})
}

func (i *Issuer) serveJWKS(w http.ResponseWriter, r *http.Request) {
	i.mu.Lock()
	keys := make([]map[string]string, 0, len(i.keys))
	for _, k := range i.keys {
		keys = append(keys, map[string]string{
			"kty": "RSA", "use": "sig", "alg": "RS256", "kid": k.kid,
			"n": base64.RawURLEncoding.EncodeToString(k.priv.N.Bytes()),
			"e": base64.RawURLEncoding.EncodeToString(big.NewInt(int64(k.priv.E)).Bytes()),
		})
	}
	i.mu.Unlock()
	writeJSON(w, map[string]any{"keys": keys})
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}

// Token describes a token to mint. Zero fields take the defaults noted.
type Token struct {
	// Issuer overrides iss (default: the issuer's URL).
	Issuer  string
	Subject string
	// Audience is the aud, a single string as the providers send it
	// (default api://AzureADTokenExchange).
	Audience string
	// Lifetime from now (default 10 min); IssuedAt defaults to now.
	Lifetime time.Duration
	IssuedAt time.Time
	// KID overrides the header's kid (e.g. a key the JWKS does not list);
	// the token is still signed with the current key.
	KID string
	// Claims are added to (and override) the registered claims.
	Claims map[string]any
}

// Exchange is the audience Entra expects on federated assertions.
const Exchange = "api://AzureADTokenExchange"

// Mint signs t with the current key.
func (i *Issuer) Mint(t Token) (string, error) {
	i.mu.Lock()
	k := i.keys[len(i.keys)-1]
	i.mu.Unlock()
	now := t.IssuedAt
	if now.IsZero() {
		now = time.Now()
	}
	if t.Lifetime == 0 {
		t.Lifetime = 10 * time.Minute
	}
	if t.Audience == "" {
		t.Audience = Exchange
	}
	if t.Issuer == "" {
		t.Issuer = i.url
	}
	var jti [12]byte
	_, _ = rand.Read(jti[:])
	claims := jwt.MapClaims{
		"iss": t.Issuer, "sub": t.Subject, "aud": t.Audience,
		"iat": now.Unix(), "nbf": now.Unix(), "exp": now.Add(t.Lifetime).Unix(),
		"jti": base64.RawURLEncoding.EncodeToString(jti[:]),
	}
	for name, v := range t.Claims {
		claims[name] = v
	}
	tok := jwt.NewWithClaims(jwt.SigningMethodRS256, claims)
	tok.Header["kid"] = k.kid
	if t.KID != "" {
		tok.Header["kid"] = t.KID
	}
	s, err := tok.SignedString(k.priv)
	if err != nil {
		return "", fmt.Errorf("oidcissuer: %w", err)
	}
	return s, nil
}

// GitHubActions is a token as GitHub Actions issues to a workflow job of
// repo (org/name) on ref (refs/heads/main): sub
// "repo:org/name:ref:refs/heads/main", and the claims Entra's flexible
// credentials may match (job_workflow_ref).
func GitHubActions(repo, ref string) Token {
	owner, _, _ := strings.Cut(repo, "/")
	return Token{
		Subject: "repo:" + repo + ":ref:" + ref,
		Claims: map[string]any{
			"repository":         repo,
			"repository_owner":   owner,
			"ref":                ref,
			"ref_type":           "branch",
			"workflow":           "ci",
			"job_workflow_ref":   repo + "/.github/workflows/ci.yml@" + ref,
			"event_name":         "push",
			"runner_environment": "github-hosted",
		},
	}
}

// KubernetesServiceAccount is a projected service account token of
// namespace/name: sub "system:serviceaccount:<ns>:<name>" and the
// kubernetes.io claim.
func KubernetesServiceAccount(namespace, name string) Token {
	return Token{
		Subject: "system:serviceaccount:" + namespace + ":" + name,
		Claims: map[string]any{
			"kubernetes.io": map[string]any{
				"namespace":      namespace,
				"serviceaccount": map[string]any{"name": name, "uid": "5a1b3b8c-6f5e-4d3a-9f6e-0c1d2e3f4a5b"},
				"pod":            map[string]any{"name": name + "-7d4b9c8f6-x2l9q", "uid": "0b1c2d3e-4f5a-4b6c-8d7e-9f0a1b2c3d4e"},
			},
		},
	}
}

// Google is a Google-signed ID token of a service account: sub is its
// numeric unique ID, with email and azp.
func Google(uniqueID, email string) Token {
	return Token{Subject: uniqueID, Claims: map[string]any{"email": email, "email_verified": true, "azp": uniqueID}}
}

// AWS is a token of AWS IAM outbound identity federation for a role: sub is
// the role's ARN.
func AWS(account, role string) Token {
	return Token{Subject: "arn:aws:iam::" + account + ":role/" + role, Claims: map[string]any{
		"https://sts.amazonaws.com/": map[string]any{"aws_account": account, "source_region": "us-east-1"},
	}}
}

// ServeMint answers GET /mint?sub=S[&aud=A][&lifetime=10m][&kid=K][&iss=I]
// [&claim=name=value ...] with a token as text.
func (i *Issuer) ServeMint(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	t := Token{Subject: q.Get("sub"), Audience: q.Get("aud"), KID: q.Get("kid"), Issuer: q.Get("iss")}
	if t.Subject == "" {
		http.Error(w, "sub is required", http.StatusBadRequest)
		return
	}
	if l := q.Get("lifetime"); l != "" {
		d, err := time.ParseDuration(l)
		if err != nil {
			http.Error(w, "lifetime: "+err.Error(), http.StatusBadRequest)
			return
		}
		t.Lifetime = d
	}
	for _, c := range q["claim"] {
		name, v, ok := strings.Cut(c, "=")
		if !ok || name == "" {
			http.Error(w, "claim must be name=value", http.StatusBadRequest)
			return
		}
		if t.Claims == nil {
			t.Claims = map[string]any{}
		}
		t.Claims[name] = v
	}
	s, err := i.Mint(t)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/plain")
	fmt.Fprintln(w, s)
}

// MintURL is the /mint URL for a subject and audience.
func (i *Issuer) MintURL(sub, aud string) string {
	return i.base + "/mint?" + url.Values{"sub": {sub}, "aud": {aud}}.Encode()
}

// selfCA returns a CA certificate (PEM) and a serving certificate it signed.
func selfCA() ([]byte, tls.Certificate, error) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, tls.Certificate{}, err
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "oidcissuer test CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(7 * 24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, tls.Certificate{}, err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, tls.Certificate{}, err
	}
	leafKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, tls.Certificate{}, err
	}
	leafTmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: "127.0.0.1"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(7 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		DNSNames:     []string{"localhost"},
	}
	leafDER, err := x509.CreateCertificate(rand.Reader, leafTmpl, ca, &leafKey.PublicKey, caKey)
	if err != nil {
		return nil, tls.Certificate{}, err
	}
	caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
	return caPEM, tls.Certificate{Certificate: [][]byte{leafDER}, PrivateKey: leafKey}, nil
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(errors.New("oidcissuer: no randomness"))
	}
	return n.Add(n, big.NewInt(1))
}
