package server

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/ca"
)

// OIDCConfig is the OIDC discovery part of Config: relying parties (Entra, AWS,
// the bridge) fetch the trust domain's JWT-SVID keys from it.
type OIDCConfig struct {
	// Addr is the HTTPS listen address; empty serves no discovery.
	Addr string
	// Issuer is the https URL relying parties know the trust domain by: the
	// discovery document's issuer and, unless ca.jwt_issuer says otherwise, the
	// `iss` of every JWT-SVID.
	Issuer string
	// CertFile and KeyFile are the PEM certificate chain and key to serve;
	// empty means the node's own server X509-SVID, with DNS names localhost and
	// the issuer's host, which clients trusting the bundle accept. The files are
	// re-read when they change.
	CertFile string
	KeyFile  string
}

func (c *OIDCConfig) validate() error {
	if c.Addr == "" && c.Issuer == "" && c.CertFile == "" && c.KeyFile == "" {
		return nil
	}
	if c.Issuer == "" {
		return errors.New("server: oidc.issuer is required")
	}
	if err := checkIssuer(c.Issuer); err != nil {
		return fmt.Errorf("server: oidc.issuer: %w", err)
	}
	if (c.CertFile == "") != (c.KeyFile == "") {
		return errors.New("server: oidc.cert_file and oidc.key_file go together")
	}
	return nil
}

func checkIssuer(iss string) error {
	u, err := url.Parse(iss)
	if err != nil {
		return err
	}
	if u.Scheme != "https" || u.Host == "" {
		return fmt.Errorf("%q is not an https URL", iss)
	}
	if u.RawQuery != "" || u.Fragment != "" || u.User != nil {
		return fmt.Errorf("%q has a query, fragment or user info", iss)
	}
	return nil
}

// OIDCHandlerConfig configures NewOIDCHandler.
type OIDCHandlerConfig struct {
	Issuer      string
	TrustDomain spiffeid.TrustDomain
	// Bundle returns the trust domain's current replicated bundle (nil when
	// there is none yet). It is called on every request.
	Bundle func() *ferrypb.Bundle
	Logger *slog.Logger
}

// oidcMaxAge is how long relying parties may cache the documents. New JWT
// keys are published hours before they sign, so a few minutes is plenty.
const oidcMaxAge = 5 * time.Minute

// NewOIDCHandler serves OIDC discovery for the trust domain's JWT-SVIDs at
// paths relative to the issuer's: GET {issuer}/.well-known/openid-configuration
// and GET {issuer}/keys (the JWKS of the bundle's JWT authorities).
func NewOIDCHandler(cfg OIDCHandlerConfig) (http.Handler, error) {
	if err := checkIssuer(cfg.Issuer); err != nil {
		return nil, fmt.Errorf("server: oidc issuer: %w", err)
	}
	if cfg.TrustDomain.IsZero() || cfg.Bundle == nil {
		return nil, errors.New("server: oidc handler needs a trust domain and a bundle source")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	u, _ := url.Parse(cfg.Issuer)
	prefix := strings.TrimSuffix(u.EscapedPath(), "/")
	h := &oidcHandler{cfg: cfg, jwksURI: strings.TrimSuffix(cfg.Issuer, "/") + "/keys"}
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+prefix+"/.well-known/openid-configuration", h.serveConfiguration)
	mux.HandleFunc("GET "+prefix+"/keys", h.serveKeys)
	return mux, nil
}

type oidcHandler struct {
	cfg     OIDCHandlerConfig
	jwksURI string

	mu     sync.Mutex
	rev    uint64
	cached *oidcKeys
}

// oidcKeys is the bundle's JWT authorities as JSON, computed once per bundle
// revision.
type oidcKeys struct {
	jwks []byte
	algs []string
}

type jsonWebKey struct {
	Kty string `json:"kty"`
	Use string `json:"use"`
	Kid string `json:"kid"`
	Alg string `json:"alg"`
	Crv string `json:"crv,omitempty"`
	X   string `json:"x,omitempty"`
	Y   string `json:"y,omitempty"`
	N   string `json:"n,omitempty"`
	E   string `json:"e,omitempty"`
}

func (h *oidcHandler) keys() (*oidcKeys, error) {
	b := h.cfg.Bundle()
	var rev uint64
	if b != nil {
		rev = b.Revision
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.cached != nil && h.rev == rev {
		return h.cached, nil
	}
	set := struct {
		Keys []jsonWebKey `json:"keys"`
	}{Keys: []jsonWebKey{}}
	algs := []string{}
	for _, a := range b.GetJwtAuthorities() {
		pub, err := x509.ParsePKIXPublicKey(a.PublicKey)
		if err != nil {
			h.cfg.Logger.Warn("oidc: JWT authority left out of the JWKS", "kid", a.KeyId, "error", err)
			continue
		}
		k, err := publicJWK(a.KeyId, pub)
		if err != nil {
			h.cfg.Logger.Warn("oidc: JWT authority left out of the JWKS", "kid", a.KeyId, "error", err)
			continue
		}
		set.Keys = append(set.Keys, k)
		if !slices.Contains(algs, k.Alg) {
			algs = append(algs, k.Alg)
		}
	}
	slices.Sort(algs)
	doc, err := json.Marshal(set)
	if err != nil {
		return nil, err
	}
	h.rev, h.cached = rev, &oidcKeys{jwks: doc, algs: algs}
	return h.cached, nil
}

// publicJWK encodes a JWT authority's public key (RFC 7517/7518) with the
// algorithm ferry's CA signs with for that key.
func publicJWK(kid string, pub crypto.PublicKey) (jsonWebKey, error) {
	enc := base64.RawURLEncoding.EncodeToString
	switch k := pub.(type) {
	case *rsa.PublicKey:
		return jsonWebKey{Kty: "RSA", Use: "sig", Kid: kid, Alg: "RS256",
			N: enc(k.N.Bytes()), E: enc(big.NewInt(int64(k.E)).Bytes())}, nil
	case *ecdsa.PublicKey:
		var crv, alg string
		switch k.Curve {
		case elliptic.P256():
			crv, alg = "P-256", "ES256"
		case elliptic.P384():
			crv, alg = "P-384", "ES384"
		case elliptic.P521():
			crv, alg = "P-521", "ES512"
		default:
			return jsonWebKey{}, fmt.Errorf("unsupported curve %s", k.Curve.Params().Name)
		}
		raw, err := k.Bytes() // 0x04 || X || Y, each padded to the curve size
		if err != nil {
			return jsonWebKey{}, err
		}
		n := (len(raw) - 1) / 2
		return jsonWebKey{Kty: "EC", Use: "sig", Kid: kid, Alg: alg, Crv: crv,
			X: enc(raw[1 : 1+n]), Y: enc(raw[1+n:])}, nil
	}
	return jsonWebKey{}, fmt.Errorf("unsupported key type %T", pub)
}

func (h *oidcHandler) serveConfiguration(w http.ResponseWriter, _ *http.Request) {
	k, err := h.keys()
	if err != nil {
		h.cfg.Logger.Error("oidc: build key set", "error", err)
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	doc, err := json.Marshal(map[string]any{
		"issuer":                                h.cfg.Issuer,
		"jwks_uri":                              h.jwksURI,
		"id_token_signing_alg_values_supported": k.algs,
		"response_types_supported":              []string{"id_token"},
		"subject_types_supported":               []string{"public"},
		"claims_supported":                      []string{"sub", "aud", "exp", "iat", "iss"},
	})
	if err != nil {
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	writeOIDC(w, doc)
}

func (h *oidcHandler) serveKeys(w http.ResponseWriter, _ *http.Request) {
	k, err := h.keys()
	if err != nil {
		h.cfg.Logger.Error("oidc: build key set", "error", err)
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	writeOIDC(w, k.jwks)
}

func writeOIDC(w http.ResponseWriter, body []byte) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", fmt.Sprintf("public, max-age=%d", int(oidcMaxAge/time.Second)))
	w.Header().Set("X-Content-Type-Options", "nosniff")
	_, _ = w.Write(body)
}

// startOIDC serves OIDC discovery over HTTPS when configured; Serve's error
// goes to errc. The caller closes the returned server (nil when not
// configured).
func (s *Server) startOIDC(authority *ca.CA, errc chan<- error) (*http.Server, error) {
	oc := s.cfg.OIDC
	if oc.Addr == "" {
		return nil, nil
	}
	td := s.cfg.TrustDomain.Name()
	h, err := NewOIDCHandler(OIDCHandlerConfig{
		Issuer: oc.Issuer, TrustDomain: s.cfg.TrustDomain,
		Bundle: func() *ferrypb.Bundle { return s.store.View().Bundle(td) },
		Logger: s.log.With("component", "oidc"),
	})
	if err != nil {
		return nil, err
	}
	var getCert func(*tls.ClientHelloInfo) (*tls.Certificate, error)
	if oc.CertFile != "" {
		getCert = (&fileCert{certFile: oc.CertFile, keyFile: oc.KeyFile}).get
		if _, err := getCert(nil); err != nil {
			return nil, fmt.Errorf("server: oidc: %w", err)
		}
	} else {
		u, _ := url.Parse(oc.Issuer)
		names := []string{"localhost"}
		if host := u.Hostname(); host != "localhost" && net.ParseIP(host) == nil {
			names = append(names, host)
		} else if net.ParseIP(host) != nil {
			s.log.Warn("oidc: the server SVID carries DNS names only; clients dialing the issuer's IP address will not verify it; set oidc.cert_file or use a host name", "issuer", oc.Issuer)
		}
		getCert = (&serverSVID{ca: authority, dnsNames: names, log: s.log.With("component", "oidc")}).get
	}
	lis, err := s.listen("tcp", oc.Addr)
	if err != nil {
		return nil, fmt.Errorf("server: oidc listener: %w", err)
	}
	hs := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      10 * time.Second,
		IdleTimeout:       time.Minute,
		MaxHeaderBytes:    16 << 10,
		TLSConfig:         &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: getCert},
		ErrorLog:          slog.NewLogLogger(s.log.With("component", "oidc").Handler(), slog.LevelDebug),
	}
	go func() {
		if err := hs.ServeTLS(gate(lis, s.signing), "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
			errc <- fmt.Errorf("oidc: %w", err)
		}
	}()
	s.log.Info("OIDC discovery", "addr", lis.Addr().String(), "issuer", oc.Issuer)
	return hs, nil
}

// fileCert serves a certificate from PEM files, reloading them when either
// file's modification time or size changes (e.g. after a renewal).
type fileCert struct {
	certFile, keyFile string

	mu    sync.Mutex
	stamp string
	cert  *tls.Certificate
}

func (f *fileCert) get(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	var stamp strings.Builder
	for _, p := range []string{f.certFile, f.keyFile} {
		fi, err := os.Stat(p)
		if err != nil {
			return f.fallback(fmt.Errorf("oidc certificate: %w", err))
		}
		fmt.Fprintf(&stamp, "%d/%d;", fi.ModTime().UnixNano(), fi.Size())
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.cert != nil && f.stamp == stamp.String() {
		return f.cert, nil
	}
	c, err := tls.LoadX509KeyPair(f.certFile, f.keyFile)
	if err != nil {
		if f.cert != nil {
			return f.cert, nil // a half-written renewal: keep the last good pair
		}
		return nil, fmt.Errorf("oidc certificate: %w", err)
	}
	f.cert, f.stamp = &c, stamp.String()
	return f.cert, nil
}

func (f *fileCert) fallback(err error) (*tls.Certificate, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.cert != nil {
		return f.cert, nil
	}
	return nil, err
}

// oidcShutdown closes the OIDC listener, letting requests in flight finish.
func oidcShutdown(hs *http.Server) {
	if hs == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := hs.Shutdown(ctx); err != nil {
		_ = hs.Close()
	}
}
