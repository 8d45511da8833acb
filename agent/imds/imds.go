// Package imds serves the agent's managed-identity token endpoint in the wire
// format of Azure's Instance Metadata Service (VM style, 169.254.169.254:80)
// and of Azure Arc's himds (Arc style, 127.0.0.1:40342), so that unmodified
// Azure SDK clients obtain access tokens from ferry.
//
// The endpoint identifies every caller from the kernel's view of the loopback
// TCP connection, never from anything the request says: the client socket
// must be ESTABLISHED, held by a live process (its inode found in that
// process's descriptors), and the caller is the uid owning it. A socket the
// client has closed (FIN_WAIT or TIME_WAIT, inode 0, listed as uid 0) is
// nobody's, never root's. The process must pass the agent's credential rule
// (workload.Peer.Check, the rule the Workload API applies): all its uids are
// the socket's owner and its gids agree with each other, so a process running
// a setuid or setgid program is refused (403). In Arc mode the first request
// is answered with a challenge file that only the caller's uid can read; the
// second request proves possession of its content.
//
// The caller of a connection is found once, when its first request arrives
// (the client socket's owner cannot change while the connection lives), and
// every request checks again that the same process still holds the ids it
// had then (Peers.Verify), before anything is done and once more before a
// token is sent. With AllowedGroups set, only root and members of those
// groups are served at all, as Arc serves only its himds group.
//
// Token issuance itself (attesting the caller, choosing the identity, fetching
// and caching access tokens) is delegated to a Tokens implementation. One that
// also implements CachedTokens answers a known caller's repeated VM-style
// request from memory, outside the concurrency limit.
package imds

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"time"

	"github.com/ferry-id/ferry/agent/peer"
)

// Mode selects the flavour of the endpoint.
type Mode int

const (
	// ModeArc serves Azure Arc's himds protocol: a 401 challenge naming a
	// secret file, then the token request with the file's content.
	ModeArc Mode = iota
	// ModeVM serves the Azure VM IMDS protocol: no challenge.
	ModeVM
)

func (m Mode) String() string {
	switch m {
	case ModeArc:
		return "arc"
	case ModeVM:
		return "vm"
	}
	return fmt.Sprintf("Mode(%d)", int(m))
}

// Default listen addresses and challenge directory.
const (
	DefaultArcAddress = "127.0.0.1:40342"
	DefaultVMAddress  = "169.254.169.254:80"
	DefaultTokenDir   = "/var/opt/azcmagent/tokens"
)

// NoGID is Caller.GID when the caller's group is unknown.
const NoGID = ^uint32(0)

// Caller is the local process on the other end of a loopback TCP connection.
type Caller struct {
	// UID owns the client socket.
	UID uint32
	// GID is the effective gid of the process, or NoGID when PID is 0.
	GID uint32
	// PID is the process holding the client socket; 0 when unknown
	// (Config.ResolvePID unset).
	PID int32
	// StartTime is the process start time in clock ticks after boot; with PID
	// it tells a process from a later one that reuses its PID.
	StartTime uint64
}

// SelectorKind names the query parameter that selects a user-assigned identity.
type SelectorKind string

// Selector parameters accepted on the token endpoint.
const (
	SelectorNone        SelectorKind = ""
	SelectorClientID    SelectorKind = "client_id"
	SelectorObjectID    SelectorKind = "object_id"
	SelectorMSIResID    SelectorKind = "msi_res_id"
	SelectorMIResID     SelectorKind = "mi_res_id"
	SelectorPrincipalID SelectorKind = "principal_id"
)

var selectorKinds = []SelectorKind{SelectorClientID, SelectorObjectID, SelectorMSIResID, SelectorMIResID, SelectorPrincipalID}

// Selector picks one identity among those the caller may use. The zero value
// asks for the caller's only (or system-assigned) identity.
type Selector struct {
	Kind  SelectorKind
	Value string
}

// Request is a validated token request.
type Request struct {
	// Resource is the audience asked for, without a trailing "/.default".
	Resource string
	Selector Selector
	// APIVersion is the api-version the client sent.
	APIVersion string
}

// Token is an access token for one identity and resource.
type Token struct {
	AccessToken string
	// ClientID is the client (application) ID of the identity.
	ClientID  string
	ExpiresOn time.Time
	// NotBefore is the token's nbf (the response's not_before); only a token
	// that carries none gets the time of the response.
	NotBefore time.Time
	// ExtExpiresOn defaults to ExpiresOn when zero.
	ExtExpiresOn time.Time
}

// Tokens turns a caller and a request into an access token. Implementations
// must be safe for concurrent use; Token is called once per accepted request,
// so it should answer from a cache when it can.
//
// Errors are mapped to IMDS responses: ErrIdentityNotFound and
// ErrAmbiguousIdentity to 400, ErrForbidden to 403, an UpstreamError to the
// authority's error (429 kept, other 4xx as 400, 5xx as 500), anything else
// to 500.
type Tokens interface {
	Token(ctx context.Context, c Caller, r Request) (*Token, error)
}

// CachedTokens is implemented by a Tokens that can answer some requests
// from memory, without blocking: a caller already authorized on this
// connection asking for a token already held. The endpoint asks it first,
// outside the concurrency limit (MaxConcurrent bounds the work that waits on
// attestation, the servers or the authority, not answers from memory); a
// miss goes the usual way through Token. It must apply the same
// authorization as Token: a hit is a decision Token made for this caller.
type CachedTokens interface {
	CachedToken(ctx context.Context, c Caller, r Request) (*Token, bool)
}

// Errors a Tokens implementation returns (wrapped or not).
var (
	// ErrIdentityNotFound: no identity matches the caller and selector.
	ErrIdentityNotFound = errors.New("imds: identity not found")
	// ErrAmbiguousIdentity: several identities match and no selector was given.
	ErrAmbiguousIdentity = errors.New("imds: multiple identities match")
	// ErrForbidden: the identity exists but the caller may not use it.
	ErrForbidden = errors.New("imds: caller may not use this identity")
)

// UpstreamError is an error answered by the token authority. Implemented by
// the exchange client; the endpoint passes code and description through.
type UpstreamError interface {
	error
	// Upstream returns the authority's HTTP status, its OAuth error code and
	// description, and the wait it asked for (0 when none).
	Upstream() (status int, code, description string, retryAfter time.Duration)
}

// Peers finds the local process at the client end of a loopback TCP
// connection. *peer.Finder implements it.
type Peers interface {
	// Lookup returns the client socket; only an ESTABLISHED socket with an
	// inode, else an error.
	Lookup(local, remote netip.AddrPort) (peer.Socket, error)
	// FindProcess returns a live process holding the socket inode, with its
	// credentials.
	FindProcess(inode uint64) (peer.Process, error)
	// Verify returns nil if p still runs as the same process with the
	// credentials it had when found.
	Verify(p peer.Process) error
}

// Config configures a Server.
type Config struct {
	// Mode is ModeArc (default) or ModeVM.
	Mode Mode
	// Address to listen on; default DefaultArcAddress or DefaultVMAddress.
	Address string
	// Listener, when set, is used instead of listening on Address.
	Listener net.Listener
	// AddLoopbackAddress adds Address's IP as a /32 to "lo" before
	// listening (VM mode on a real host; needs CAP_NET_ADMIN).
	AddLoopbackAddress bool

	// Tokens issues the tokens. Required.
	Tokens Tokens
	// Peers identifies callers; default peer.New(peer.Config{}).
	Peers Peers
	// ResolvePID passes the calling process (its PID, gid and start time) to
	// Tokens in Caller, not only its uid, and in Arc mode binds the
	// challenge secret to that process. The process is found either way
	// (ProcessFrom gives it to Tokens): a caller is always a live process.
	ResolvePID bool

	// AllowedGroups, when not empty, admits only callers running as root or
	// whose gid or supplementary groups hold one of these gids (Arc admits
	// the himds group); others get 403 before any challenge or attestation.
	AllowedGroups []uint32

	// TokenDir holds Arc challenge files; default DefaultTokenDir. Clients
	// accept only the default; other values are for tests.
	TokenDir string
	// ChallengeTTL is how long a challenge secret stays usable; default 30 s.
	ChallengeTTL time.Duration
	// MaxChallenges bounds outstanding challenges, in all (default 1024) and
	// per uid (MaxChallengesPerUID, default 32).
	MaxChallenges       int
	MaxChallengesPerUID int

	// MaxConcurrent bounds requests being served that wait on attestation,
	// the servers or the authority; default 32. Answers from memory
	// (CachedTokens, VM mode) are not counted.
	MaxConcurrent int
	// QueueWait is how long a request may wait for a free slot before 429;
	// default 50 ms.
	QueueWait time.Duration
	// RequestsPerSecond, when > 0, rate-limits requests (token bucket with
	// Burst, default equal to the rate).
	RequestsPerSecond float64
	Burst             int
	// RetryAfter is sent with 429; default 1 s, at most 25 s (Azure SDK
	// clients give up on longer waits).
	RetryAfter time.Duration
	// RequestTimeout bounds a Tokens call; default 30 s.
	RequestTimeout time.Duration

	// Logger; default slog.Default().
	Logger *slog.Logger

	// queued, when set, is called each time a request starts waiting for
	// a slot (tests use it to know a request is queued).
	queued func()
}

// Server is the managed-identity endpoint.
type Server struct {
	mode       Mode
	tokens     Tokens
	cached     CachedTokens // nil unless Tokens implements it
	peers      Peers
	resolvePID bool
	groups     map[uint32]bool // AllowedGroups; nil when off
	limit      *limiter
	challenges *challenges
	retryAfter time.Duration
	timeout    time.Duration
	log        *slog.Logger
	ln         net.Listener
	http       *http.Server
}

// New validates c, prepares the challenge directory (Arc mode) and starts
// listening. The listener is closed when Run returns.
func New(c Config) (*Server, error) {
	if c.Tokens == nil {
		return nil, errors.New("imds: Config.Tokens is required")
	}
	if c.Mode != ModeArc && c.Mode != ModeVM {
		return nil, fmt.Errorf("imds: unknown mode %v", c.Mode)
	}
	if c.Peers == nil {
		c.Peers = peer.New(peer.Config{})
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.MaxConcurrent <= 0 {
		c.MaxConcurrent = 32
	}
	if c.QueueWait <= 0 {
		c.QueueWait = 50 * time.Millisecond
	}
	if c.RetryAfter <= 0 {
		c.RetryAfter = time.Second
	}
	c.RetryAfter = min(max(c.RetryAfter.Round(time.Second), time.Second), 25*time.Second)
	if c.RequestTimeout <= 0 {
		c.RequestTimeout = 30 * time.Second
	}
	cached, _ := c.Tokens.(CachedTokens)
	s := &Server{
		mode:       c.Mode,
		tokens:     c.Tokens,
		cached:     cached,
		peers:      c.Peers,
		resolvePID: c.ResolvePID,
		limit:      newLimiter(c.MaxConcurrent, c.QueueWait, c.RequestsPerSecond, c.Burst, c.queued),
		retryAfter: c.RetryAfter,
		timeout:    c.RequestTimeout,
		log:        c.Logger.With("component", "imds", "mode", c.Mode.String()),
	}
	if len(c.AllowedGroups) > 0 {
		s.groups = map[uint32]bool{}
		for _, g := range c.AllowedGroups {
			s.groups[g] = true
		}
	}
	if c.Mode == ModeArc {
		ch, err := newChallenges(c.TokenDir, c.ChallengeTTL, c.MaxChallenges, c.MaxChallengesPerUID, s.log)
		if err != nil {
			return nil, err
		}
		s.challenges = ch
	}
	ln := c.Listener
	if ln == nil {
		addr := c.Address
		if addr == "" {
			addr = DefaultArcAddress
			if c.Mode == ModeVM {
				addr = DefaultVMAddress
			}
		}
		if c.AddLoopbackAddress {
			ap, err := netip.ParseAddrPort(addr)
			if err != nil {
				return nil, fmt.Errorf("imds: address %q: %w", addr, err)
			}
			if err := AddLoopbackAddress(ap.Addr()); err != nil {
				return nil, err
			}
		}
		var err error
		ln, err = net.Listen("tcp", addr)
		if err != nil {
			if s.challenges != nil {
				s.challenges.closeAll()
			}
			return nil, fmt.Errorf("imds: %w", err)
		}
	}
	s.ln = ln
	s.http = &http.Server{
		Handler:           s,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      c.RequestTimeout + 10*time.Second,
		IdleTimeout:       90 * time.Second,
		MaxHeaderBytes:    16 << 10,
		ConnContext:       connContext,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	return s, nil
}

// Addr is the address the server listens on.
func (s *Server) Addr() net.Addr { return s.ln.Addr() }

// Run serves until ctx is done, then shuts down gracefully and removes any
// outstanding challenge files.
func (s *Server) Run(ctx context.Context) error {
	s.log.Info("serving managed-identity endpoint", "address", s.ln.Addr().String())
	errc := make(chan error, 1)
	go func() { errc <- s.http.Serve(s.ln) }()
	var err error
	select {
	case err = <-errc:
		err = fmt.Errorf("imds: %w", err)
	case <-ctx.Done():
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		if serr := s.http.Shutdown(sctx); serr != nil {
			_ = s.http.Close()
		}
		<-errc
	}
	if s.challenges != nil {
		s.challenges.closeAll()
	}
	return err
}
