package imds

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/ferry-id/ferry/internal/securedir"
)

var (
	errSecretInvalid     = errors.New("imds: unknown, used or expired secret")
	errSecretWrongCaller = errors.New("imds: secret presented by another caller")
	errTooManyChallenges = errors.New("imds: too many outstanding challenges")
)

// challenges issues and redeems Arc challenge secrets.
//
// Each secret lives in its own file, <dir>/<32 hex>.key, mode 0600, owned by
// the caller's uid, holding 64 hex characters (no newline). The directory is
// 0711 and owned by the agent: any user may traverse it to open a file whose
// name it was told, nobody but the agent may list or create entries, and only
// the file's owner may read it. A secret is redeemable once, only by the
// caller it was issued to, within the TTL; the file is removed when it is
// redeemed or expires.
type challenges struct {
	dir       string
	ttl       time.Duration
	maxTotal  int
	maxPerUID int
	log       *slog.Logger

	mu     sync.Mutex
	byHash map[[sha256.Size]byte]*challenge
	perUID map[uint32]int // issued or being written, per uid
	total  int            // sum of perUID
}

type challenge struct {
	path    string
	secret  []byte
	caller  Caller
	expires time.Time
	timer   *time.Timer
}

func newChallenges(dir string, ttl time.Duration, maxTotal, maxPerUID int, log *slog.Logger) (*challenges, error) {
	if dir == "" {
		dir = DefaultTokenDir
	}
	if ttl <= 0 {
		ttl = 30 * time.Second
	}
	if maxTotal <= 0 {
		maxTotal = 1024
	}
	if maxPerUID <= 0 {
		maxPerUID = 32
	}
	dir = filepath.Clean(dir)
	if err := prepareTokenDir(dir); err != nil {
		return nil, err
	}
	return &challenges{
		dir: dir, ttl: ttl, maxTotal: maxTotal, maxPerUID: maxPerUID, log: log,
		byHash: make(map[[sha256.Size]byte]*challenge),
		perUID: make(map[uint32]int),
	}, nil
}

// prepareTokenDir creates dir 0711, insists it is a real directory owned by
// this process's uid below directories no other user can change (securedir),
// tightens it to 0711, and removes *.key files left by an earlier run (their
// secrets died with it).
func prepareTokenDir(dir string) error {
	if err := securedir.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return fmt.Errorf("imds: token dir: %w", err)
	}
	if err := os.Mkdir(dir, 0o711); err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("imds: token dir: %w", err)
	}
	fi, err := os.Lstat(dir)
	if err != nil {
		return fmt.Errorf("imds: token dir: %w", err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("imds: token dir %s is not a directory", dir)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != os.Geteuid() {
		return fmt.Errorf("imds: token dir %s is owned by uid %d, not by the agent (uid %d)", dir, st.Uid, os.Geteuid())
	}
	if err := os.Chmod(dir, 0o711); err != nil {
		return fmt.Errorf("imds: token dir: %w", err)
	}
	stale, _ := filepath.Glob(filepath.Join(dir, "*.key"))
	for _, p := range stale {
		_ = os.Remove(p)
	}
	return nil
}

// issue writes a new secret file readable only by c and returns its path.
func (s *challenges) issue(c Caller) (string, error) {
	s.mu.Lock()
	if s.total >= s.maxTotal || s.perUID[c.UID] >= s.maxPerUID {
		s.mu.Unlock()
		return "", errTooManyChallenges
	}
	s.perUID[c.UID]++ // reserve
	s.total++
	s.mu.Unlock()

	ch, err := s.write(c)
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		s.release(c.UID)
		return "", err
	}
	h := sha256.Sum256(ch.secret)
	s.byHash[h] = ch
	ch.timer = time.AfterFunc(s.ttl, func() { s.expire(h, ch) })
	return ch.path, nil
}

func (s *challenges) write(c Caller) (*challenge, error) {
	var name [16]byte
	var raw [32]byte
	_, _ = rand.Read(name[:])
	_, _ = rand.Read(raw[:])
	secret := []byte(hex.EncodeToString(raw[:]))
	path := filepath.Join(s.dir, hex.EncodeToString(name[:])+".key")
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, fmt.Errorf("imds: challenge file: %w", err)
	}
	err = func() error {
		gid := -1
		if c.GID != NoGID {
			gid = int(c.GID)
		}
		if int(c.UID) != os.Geteuid() || gid != -1 {
			if err := f.Chown(int(c.UID), gid); err != nil {
				return err
			}
		}
		if err := f.Chmod(0o600); err != nil {
			return err
		}
		_, err := f.Write(secret)
		return err
	}()
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		_ = os.Remove(path)
		return nil, fmt.Errorf("imds: challenge file: %w", err)
	}
	return &challenge{path: path, secret: secret, caller: c, expires: time.Now().Add(s.ttl)}, nil
}

// redeem consumes the secret presented by c. Any presentation of a known
// secret consumes it, so a secret that reached another caller is burnt.
func (s *challenges) redeem(secret string, c Caller) error {
	if len(secret) == 0 || len(secret) > 4096 {
		return errSecretInvalid
	}
	h := sha256.Sum256([]byte(secret))
	s.mu.Lock()
	ch, ok := s.byHash[h]
	if ok {
		s.removeLocked(h, ch)
	}
	s.mu.Unlock()
	if !ok || subtle.ConstantTimeCompare(ch.secret, []byte(secret)) != 1 {
		return errSecretInvalid
	}
	if time.Now().After(ch.expires) {
		return errSecretInvalid
	}
	if ch.caller.UID != c.UID || (ch.caller.PID != 0 && (ch.caller.PID != c.PID || ch.caller.StartTime != c.StartTime)) {
		s.log.Warn("challenge secret presented by another caller; secret revoked",
			"issued_uid", ch.caller.UID, "issued_pid", ch.caller.PID, "caller_uid", c.UID, "caller_pid", c.PID)
		return errSecretWrongCaller
	}
	return nil
}

func (s *challenges) expire(h [sha256.Size]byte, ch *challenge) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.byHash[h] == ch {
		s.removeLocked(h, ch)
	}
}

func (s *challenges) removeLocked(h [sha256.Size]byte, ch *challenge) {
	delete(s.byHash, h)
	s.release(ch.caller.UID)
	if ch.timer != nil {
		ch.timer.Stop()
	}
	if err := os.Remove(ch.path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		s.log.Warn("removing challenge file", "path", ch.path, "error", err)
	}
}

func (s *challenges) release(uid uint32) {
	s.total--
	if s.perUID[uid]--; s.perUID[uid] <= 0 {
		delete(s.perUID, uid)
	}
}

// closeAll removes every outstanding challenge.
func (s *challenges) closeAll() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for h, ch := range s.byHash {
		s.removeLocked(h, ch)
	}
}

// basicSecret extracts the secret from "Basic <secret>".
func basicSecret(h string) (string, bool) {
	scheme, secret, ok := strings.Cut(h, " ")
	if !ok || !strings.EqualFold(scheme, "Basic") {
		return "", false
	}
	return strings.TrimLeft(secret, " "), true
}
