package signing

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/ferry-id/ferry/proto/ferrypb"
)

// RingConfig configures a Ring.
type RingConfig struct {
	// Dir holds the key files (0600) and the ring's state.
	Dir   string
	Owner string
	// Lifetime of each key's certificate (DefaultLifetime when zero).
	Lifetime time.Duration
	// RetireAfter is how long a replaced key stays published after it stops
	// signing: longer than any token it signed lives (default 2 h; tokens live
	// at most 90 minutes).
	RetireAfter time.Duration
	// Now is the clock (time.Now when nil).
	Now func() time.Time
}

// Ring holds a replica's signing keys through rotation, as SPIRE rotates its
// authorities: the next key is made (and published, so every replica's JWKS
// lists it) at half of the current key's life, takes over signing when a sixth
// of that life remains, and the old key stays published for RetireAfter so the
// tokens it signed still verify. Keys and the ring's state live in Dir, so a
// restart carries on. A Ring is safe for concurrent use.
type Ring struct {
	cfg RingConfig

	mu       sync.Mutex
	current  *Key
	next     *Key
	previous *Key
	state    ringState
}

// ringState is what the key files do not say by themselves.
type ringState struct {
	// RetirePreviousAt is when the previous key is to be withdrawn.
	RetirePreviousAt time.Time `json:"retire_previous_at"`
}

// Key file names in Dir.
const (
	currentFile  = "signing-key.pem"
	nextFile     = "signing-key.next.pem"
	previousFile = "signing-key.previous.pem"
	stateFile    = "signing-ring.json"
)

// OpenRing loads the ring from cfg.Dir, making the first key when there is none.
func OpenRing(cfg RingConfig) (*Ring, error) {
	if cfg.Dir == "" {
		return nil, errors.New("signing: ring dir is required")
	}
	if cfg.Lifetime <= 0 {
		cfg.Lifetime = DefaultLifetime
	}
	if cfg.RetireAfter <= 0 {
		cfg.RetireAfter = 2 * time.Hour
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("signing: %w", err)
	}
	r := &Ring{cfg: cfg}
	var err error
	if r.current, err = r.load(currentFile); err != nil {
		return nil, err
	}
	if r.current == nil {
		if r.current, err = r.create(currentFile); err != nil {
			return nil, err
		}
	}
	if r.next, err = r.load(nextFile); err != nil {
		return nil, err
	}
	if r.previous, err = r.load(previousFile); err != nil {
		return nil, err
	}
	if data, err := os.ReadFile(filepath.Join(cfg.Dir, stateFile)); err == nil {
		if err := json.Unmarshal(data, &r.state); err != nil {
			return nil, fmt.Errorf("signing: %s: %w", stateFile, err)
		}
	}
	return r, nil
}

func (r *Ring) load(name string) (*Key, error) {
	path := filepath.Join(r.cfg.Dir, name)
	if _, err := os.Stat(path); errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	return LoadOrCreate(path, r.cfg.Owner, r.cfg.Now())
}

func (r *Ring) create(name string) (*Key, error) {
	k, err := Generate(r.cfg.Owner, r.cfg.Now(), r.cfg.Lifetime)
	if err != nil {
		return nil, err
	}
	if err := k.write(filepath.Join(r.cfg.Dir, name)); err != nil {
		return nil, err
	}
	return k, nil
}

// Current is the key that signs now.
func (r *Ring) Current() *Key {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.current
}

// Published are the public halves that must be listed in every JWKS: the
// current key, the next one (before it signs) and the previous one (while
// tokens it signed live).
func (r *Ring) Published() []*ferrypb.SigningKey {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := []*ferrypb.SigningKey{r.current.Public()}
	if r.next != nil {
		out = append(out, r.next.Public())
	}
	if r.previous != nil {
		out = append(out, r.previous.Public())
	}
	return out
}

// Rotation is what one Tick changed.
type Rotation struct {
	Prepared  *Key   // a new next key, to publish
	Activated *Key   // the key that now signs
	Retired   string // the key ID to withdraw from the directory
}

// Tick applies the rotation schedule at the current time.
func (r *Ring) Tick() (Rotation, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := r.cfg.Now()
	var out Rotation
	life := r.current.cert.NotAfter.Sub(r.current.cert.NotBefore)
	if r.previous != nil && !r.state.RetirePreviousAt.IsZero() && !now.Before(r.state.RetirePreviousAt) {
		out.Retired = r.previous.KID()
		if err := os.Remove(filepath.Join(r.cfg.Dir, previousFile)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return out, fmt.Errorf("signing: %w", err)
		}
		r.previous = nil
		r.state.RetirePreviousAt = time.Time{}
		if err := r.saveState(); err != nil {
			return out, err
		}
	}
	if r.next == nil && !now.Before(r.current.cert.NotBefore.Add(life/2)) {
		k, err := r.create(nextFile)
		if err != nil {
			return out, err
		}
		r.next = k
		out.Prepared = k
	}
	if r.next != nil && r.previous == nil && !now.Before(r.current.cert.NotAfter.Add(-life/6)) {
		// previous <- current <- next, on disk first.
		dir := r.cfg.Dir
		if err := os.Rename(filepath.Join(dir, currentFile), filepath.Join(dir, previousFile)); err != nil {
			return out, fmt.Errorf("signing: %w", err)
		}
		if err := os.Rename(filepath.Join(dir, nextFile), filepath.Join(dir, currentFile)); err != nil {
			return out, fmt.Errorf("signing: %w", err)
		}
		r.previous, r.current, r.next = r.current, r.next, nil
		r.state.RetirePreviousAt = now.Add(r.cfg.RetireAfter)
		if err := r.saveState(); err != nil {
			return out, err
		}
		out.Activated = r.current
	}
	return out, nil
}

func (r *Ring) saveState() error {
	data, _ := json.Marshal(r.state)
	tmp := filepath.Join(r.cfg.Dir, stateFile+".tmp")
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return fmt.Errorf("signing: %w", err)
	}
	return os.Rename(tmp, filepath.Join(r.cfg.Dir, stateFile))
}
