// Package ca is a ferry server node's certificate and JWT authority.
//
// Every server node owns its own X.509 CA key and JWT signing key. Both live
// only on the node's disk (files 0600 in a 0700 directory); only their public
// halves leave the node, through a Publisher that commits them into the
// replicated trust bundle before the key signs anything.
//
// Each kind of authority (X.509, JWT) moves through the same lifecycle as
// SPIRE's: a key is prepared (generated and published) when the active one
// reaches half of its lifetime, activated when a sixth of the active one's
// lifetime remains, and the retired key stays published until everything it
// signed has expired. Operators can force a rotation with Prepare, Activate,
// Taint and Revoke.
//
// SPIFFE IDs of the server and agents follow SPIRE's conventions so that
// SPIRE-aware tooling recognises them: the server is
// spiffe://<trust domain>/spire/server and agents live under
// spiffe://<trust domain>/spire/agent/. Workload SVIDs are never issued under
// /spire/.
package ca

import (
	"context"
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ferry-id/ferry/attestors/node"

	"github.com/ferry-id/ferry/proto/ferrypb"
)

// Defaults, chosen as SPIRE's.
const (
	DefaultCATTL          = 24 * time.Hour
	DefaultX509SVIDTTL    = time.Hour
	DefaultJWTSVIDTTL     = 5 * time.Minute
	DefaultRotateInterval = 10 * time.Second
	DefaultPruneAfter     = 24 * time.Hour
)

// Reserved SPIFFE ID paths.
const (
	// ServerPath is the path of every ferry server's own SVID.
	ServerPath = "/spire/server"
	// AgentPathPrefix starts the path of every agent SVID.
	AgentPathPrefix = node.AgentPathPrefix
	// reservedPathPrefix may not start a workload SVID's path.
	reservedPathPrefix = "/spire/"
)

// Sentinel errors. Callers match them with errors.Is.
var (
	// ErrNoAuthority means no active authority of the requested kind exists
	// yet (Rotate has not succeeded) or it has expired.
	ErrNoAuthority = errors.New("ca: no active authority")
	// ErrUnknownAuthority means no authority has the given ID.
	ErrUnknownAuthority = errors.New("ca: unknown authority")
	// ErrAuthorityState means the operation is not allowed in the
	// authority's current state (e.g. tainting the active authority).
	ErrAuthorityState = errors.New("ca: operation not allowed in authority state")
	// ErrUpstreamManaged means X.509 authorities are intermediates under an
	// upstream CA: the bundle holds the upstream roots, so local X.509
	// authorities cannot be tainted or revoked.
	ErrUpstreamManaged = errors.New("ca: x509 authority is managed by the upstream CA")
	// ErrInvalidCSR means a certificate signing request was malformed,
	// oversized, badly signed, or carried an unsupported key.
	ErrInvalidCSR = errors.New("ca: invalid CSR")
	// ErrUnsupportedKey means a public key is weak or of an unsupported type.
	ErrUnsupportedKey = errors.New("ca: unsupported public key")
	// ErrInvalidRequest means a signing request's parameters (SPIFFE ID,
	// DNS names, TTL, audience, claims) were refused.
	ErrInvalidRequest = errors.New("ca: invalid request")
)

// Publisher puts public halves of this node's authorities into the
// replicated trust bundle. Implementations must be safe for concurrent use
// and return only once the change is committed cluster-wide: the CA signs
// with a key only after its Publish call returned nil.
//
// Publish calls are upserts keyed by the DER certificate or the key ID, so
// calling them again (e.g. to set Tainted) is safe. Remove calls must succeed
// when the authority is already absent.
type Publisher interface {
	PublishX509Authority(ctx context.Context, a *ferrypb.X509Authority) error
	PublishJWTAuthority(ctx context.Context, a *ferrypb.JWTAuthority) error
	RemoveX509Authority(ctx context.Context, certificateDER []byte) error
	RemoveJWTAuthority(ctx context.Context, keyID string) error
}

// JWTAlgorithm is the signing algorithm of JWT-SVIDs.
type JWTAlgorithm string

// Supported JWT algorithms. RS256 is what Entra federation accepts.
const (
	ES256 JWTAlgorithm = "ES256" // ECDSA P-256
	RS256 JWTAlgorithm = "RS256" // RSA 2048
)

// KeyType is the type of the X.509 CA key.
type KeyType string

// Supported CA key types.
const (
	KeyECP256  KeyType = "ec-p256"
	KeyECP384  KeyType = "ec-p384"
	KeyRSA2048 KeyType = "rsa-2048"
	KeyRSA4096 KeyType = "rsa-4096"
)

// UpstreamConfig names the files of an upstream CA. When set, this node's
// X.509 authority is an intermediate signed by the upstream CA and the trust
// bundle holds the upstream roots.
type UpstreamConfig struct {
	// CertFile holds PEM certificates: the upstream signing certificate
	// first, then any intermediates up to (optionally) the root.
	CertFile string
	// KeyFile holds the PEM private key of the first certificate.
	KeyFile string
	// BundleFile optionally holds the PEM roots. Without it the last
	// certificate of CertFile must be a self-signed root.
	BundleFile string
}

// Config is what New needs. TrustDomain, DataDir and Publisher are required.
type Config struct {
	TrustDomain spiffeid.TrustDomain
	// DataDir holds keys and slot state; created 0700.
	DataDir string
	// NodeID names this server node in CA subjects and logs.
	NodeID    string
	Publisher Publisher
	Logger    *slog.Logger
	// Clock returns the current time; time.Now when nil.
	Clock func() time.Time

	// CATTL is the lifetime of X.509 CA certificates (default 24h).
	CATTL time.Duration
	// JWTKeyTTL is the lifetime of JWT signing keys (default CATTL).
	JWTKeyTTL time.Duration
	// CAKeyType is the X.509 CA key type (default ec-p256).
	CAKeyType KeyType
	// JWTAlgorithm is the JWT-SVID algorithm (default ES256).
	JWTAlgorithm JWTAlgorithm
	// X509SVIDTTL and JWTSVIDTTL are the defaults for a zero ttl argument.
	X509SVIDTTL time.Duration
	JWTSVIDTTL  time.Duration
	// JWTIssuer is the trust domain's OIDC issuer URL, put in `iss` when set.
	JWTIssuer string
	// Upstream optionally makes this node's CA an intermediate.
	Upstream *UpstreamConfig

	// RotateInterval is Run's tick (default 10s).
	RotateInterval time.Duration
	// PruneAfter is how long after expiry a retired authority is removed
	// from the bundle and its key deleted by Rotate (default 24h).
	PruneAfter time.Duration
}

// CA is one server node's authority. It is safe for concurrent use: signing
// never waits for rotation.
type CA struct {
	td        spiffeid.TrustDomain
	nodeID    string
	dir       string
	pub       Publisher
	log       *slog.Logger
	now       func() time.Time
	caTTL     time.Duration
	jwtKeyTTL time.Duration
	caKeyType KeyType
	jwtAlg    JWTAlgorithm
	x509TTL   time.Duration
	jwtTTL    time.Duration
	issuer    string
	upstream  *upstream
	interval  time.Duration
	prune     time.Duration

	// opMu serializes lifecycle operations (which may wait on the
	// Publisher); mu guards auths for readers such as List and Bundle.
	opMu  sync.Mutex
	mu    sync.RWMutex
	auths []*authority
	// upstreamPublished is set once the upstream roots were published.
	upstreamPublished bool

	x509Active atomic.Pointer[x509Signer]
	jwtActive  atomic.Pointer[jwtSigner]

	// signing is closed the first time both an X.509 and a JWT authority
	// are active and unexpired (see Signing).
	signing     chan struct{}
	signingOnce sync.Once
}

// New validates cfg, prepares the data directory and reloads any persisted
// authorities. It does not generate or publish keys: call Rotate (or Run)
// before signing.
func New(cfg Config) (*CA, error) {
	if cfg.TrustDomain.IsZero() {
		return nil, errors.New("ca: trust domain is required")
	}
	if cfg.DataDir == "" {
		return nil, errors.New("ca: data dir is required")
	}
	if cfg.Publisher == nil {
		return nil, errors.New("ca: publisher is required")
	}
	c := &CA{
		td:        cfg.TrustDomain,
		nodeID:    cfg.NodeID,
		dir:       cfg.DataDir,
		pub:       cfg.Publisher,
		log:       cfg.Logger,
		now:       cfg.Clock,
		caTTL:     orDefault(cfg.CATTL, DefaultCATTL),
		caKeyType: cfg.CAKeyType,
		jwtAlg:    cfg.JWTAlgorithm,
		x509TTL:   orDefault(cfg.X509SVIDTTL, DefaultX509SVIDTTL),
		jwtTTL:    orDefault(cfg.JWTSVIDTTL, DefaultJWTSVIDTTL),
		issuer:    cfg.JWTIssuer,
		interval:  orDefault(cfg.RotateInterval, DefaultRotateInterval),
		prune:     orDefault(cfg.PruneAfter, DefaultPruneAfter),
		signing:   make(chan struct{}),
	}
	c.jwtKeyTTL = orDefault(cfg.JWTKeyTTL, c.caTTL)
	if c.log == nil {
		c.log = slog.New(slog.DiscardHandler)
	}
	if c.now == nil {
		c.now = time.Now
	}
	if c.nodeID == "" {
		host, err := os.Hostname()
		if err != nil {
			return nil, fmt.Errorf("ca: node id not set and no hostname: %w", err)
		}
		c.nodeID = host
	}
	if c.caKeyType == "" {
		c.caKeyType = KeyECP256
	}
	if _, err := newKeyFunc(c.caKeyType); err != nil {
		return nil, err
	}
	if c.jwtAlg == "" {
		c.jwtAlg = ES256
	}
	if c.jwtAlg != ES256 && c.jwtAlg != RS256 {
		return nil, fmt.Errorf("ca: unsupported JWT algorithm %q (want ES256 or RS256)", c.jwtAlg)
	}
	for name, d := range map[string]time.Duration{
		"CA TTL": cfg.CATTL, "JWT key TTL": cfg.JWTKeyTTL, "X509-SVID TTL": cfg.X509SVIDTTL,
		"JWT-SVID TTL": cfg.JWTSVIDTTL, "rotate interval": cfg.RotateInterval, "prune after": cfg.PruneAfter,
	} {
		if d < 0 {
			return nil, fmt.Errorf("ca: negative %s", name)
		}
	}
	if cfg.Upstream != nil {
		up, err := loadUpstream(*cfg.Upstream, c.now())
		if err != nil {
			return nil, err
		}
		c.upstream = up
	}
	dir, err := filepath.Abs(c.dir)
	if err != nil {
		return nil, fmt.Errorf("ca: data dir: %w", err)
	}
	c.dir = dir
	if err := prepareDir(c.dir); err != nil {
		return nil, err
	}
	if err := c.load(); err != nil {
		return nil, err
	}
	return c, nil
}

// TrustDomain is the trust domain the CA issues for.
func (c *CA) TrustDomain() spiffeid.TrustDomain { return c.td }

// ServerID is the SPIFFE ID of ferry servers in the trust domain.
func (c *CA) ServerID() spiffeid.ID {
	id, _ := spiffeid.FromPath(c.td, ServerPath) // constant, valid path
	return id
}

// JWTAlgorithm is the algorithm of JWT-SVIDs this node mints.
func (c *CA) JWTAlgorithm() JWTAlgorithm { return c.jwtAlg }

// certPublicKey reports whether a certificate carries the key pub.
func certPublicKey(cert *x509.Certificate, pub crypto.PublicKey) bool {
	eq, ok := pub.(interface{ Equal(crypto.PublicKey) bool })
	return ok && eq.Equal(cert.PublicKey)
}

// earliest returns the earlier of two instants.
func earliest(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

func orDefault(d, def time.Duration) time.Duration {
	if d == 0 {
		return def
	}
	return d
}
