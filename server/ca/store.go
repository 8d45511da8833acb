package ca

import (
	"crypto"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/ferry-id/ferry/internal/securedir"
)

// stateFileName holds the slot state; keys sit beside it, one file each.
const stateFileName = "authorities.json"

const stateVersion = 1

type stateFile struct {
	Version     int               `json:"version"`
	TrustDomain string            `json:"trust_domain"`
	Authorities []authorityRecord `json:"authorities"`
}

// authorityRecord is the persisted form of an authority. It never holds
// private key material: KeyFile names the 0600 file that does.
type authorityRecord struct {
	Kind        Kind      `json:"kind"`
	ID          string    `json:"id"`
	Status      Status    `json:"status"`
	Tainted     bool      `json:"tainted,omitempty"`
	Published   bool      `json:"published,omitempty"`
	IssuedAt    time.Time `json:"issued_at"`
	NotAfter    time.Time `json:"not_after"`
	KeyFile     string    `json:"key_file"`
	Certificate []byte    `json:"certificate,omitempty"`
}

// prepareDir creates dir 0700, or tightens an existing one to 0700, after
// making sure no other user can change it or any directory above it.
func prepareDir(dir string) error {
	if err := securedir.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("ca: data dir: %w", err)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("ca: data dir: %w", err)
	}
	if fi.Mode().Perm() != 0o700 {
		if err := os.Chmod(dir, 0o700); err != nil {
			return fmt.Errorf("ca: restrict data dir: %w", err)
		}
	}
	return nil
}

// readPrivateFile reads a file of the data dir, first tightening its
// permissions to 0600 if anyone else could read it.
func (c *CA) readPrivateFile(name string) ([]byte, error) {
	path := filepath.Join(c.dir, name)
	fi, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if fi.Mode().Perm()&0o077 != 0 {
		c.log.Warn("ca: tightening permissions of data file", "file", name, "mode", fi.Mode().Perm().String())
		if err := os.Chmod(path, 0o600); err != nil {
			return nil, fmt.Errorf("ca: restrict %s: %w", name, err)
		}
	}
	return os.ReadFile(path)
}

// writeFileAtomic replaces dir/name with data, mode 0600, durably.
func writeFileAtomic(dir, name string, data []byte) error {
	f, err := os.CreateTemp(dir, "."+name+".tmp-*") // created 0600
	if err != nil {
		return fmt.Errorf("ca: write %s: %w", name, err)
	}
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			_ = os.Remove(tmp)
		}
	}()
	if err := f.Chmod(0o600); err != nil {
		_ = f.Close()
		return fmt.Errorf("ca: write %s: %w", name, err)
	}
	if _, err := f.Write(data); err != nil {
		_ = f.Close()
		return fmt.Errorf("ca: write %s: %w", name, err)
	}
	if err := f.Sync(); err != nil {
		_ = f.Close()
		return fmt.Errorf("ca: sync %s: %w", name, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("ca: write %s: %w", name, err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
		return fmt.Errorf("ca: write %s: %w", name, err)
	}
	ok = true
	return syncDir(dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("ca: sync data dir: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("ca: sync data dir: %w", err)
	}
	return nil
}

// writeKey stores a new private key before anything refers to it.
func (c *CA) writeKey(name string, key crypto.Signer) error {
	data, err := encodeKey(key)
	if err != nil {
		return err
	}
	return writeFileAtomic(c.dir, name, data)
}

// saveLocked persists the slot state. The caller holds opMu.
func (c *CA) saveLocked() error {
	c.mu.RLock()
	st := stateFile{Version: stateVersion, TrustDomain: c.td.Name()}
	for _, a := range c.auths {
		st.Authorities = append(st.Authorities, a.record())
	}
	c.mu.RUnlock()
	data, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("ca: encode state: %w", err)
	}
	return writeFileAtomic(c.dir, stateFileName, data)
}

// load reloads persisted authorities, retires those that no longer fit the
// configuration (another upstream CA, another JWT algorithm), removes key
// files nothing refers to and installs the active signers.
func (c *CA) load() error {
	c.opMu.Lock()
	defer c.opMu.Unlock()
	data, err := c.readPrivateFile(stateFileName)
	var st stateFile
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return fmt.Errorf("ca: read state: %w", err)
	default:
		if err := json.Unmarshal(data, &st); err != nil {
			return fmt.Errorf("ca: decode state: %w", err)
		}
		if st.Version != stateVersion {
			return fmt.Errorf("ca: state version %d not supported", st.Version)
		}
		if st.TrustDomain != c.td.Name() {
			return fmt.Errorf("ca: data dir belongs to trust domain %q, not %q", st.TrustDomain, c.td.Name())
		}
	}
	changed := false
	referenced := map[string]bool{}
	for _, r := range st.Authorities {
		a, err := c.loadAuthority(r)
		if err != nil {
			return err
		}
		referenced[a.keyFile] = true
		if a.status != StatusOld {
			if why := c.misfit(a); why != "" {
				c.log.Warn("ca: retiring authority that no longer fits the configuration",
					"kind", a.kind, "authority_id", a.id, "reason", why)
				a.status = StatusOld
				changed = true
			}
		}
		c.auths = append(c.auths, a)
	}
	for _, k := range []Kind{KindX509, KindJWT} {
		if n := len(c.find(k, StatusActive)); n > 1 {
			return fmt.Errorf("ca: state holds %d active %s authorities", n, k)
		}
		if n := len(c.find(k, StatusPrepared)); n > 1 {
			return fmt.Errorf("ca: state holds %d prepared %s authorities", n, k)
		}
	}
	entries, err := os.ReadDir(c.dir)
	if err != nil {
		return fmt.Errorf("ca: read data dir: %w", err)
	}
	for _, e := range entries {
		n := e.Name()
		orphanKey := strings.HasSuffix(n, ".key") && !referenced[n]
		staleTmp := strings.HasPrefix(n, ".") && strings.Contains(n, ".tmp-")
		if e.Type().IsRegular() && (orphanKey || staleTmp) {
			c.log.Info("ca: removing unreferenced file from data dir", "file", n)
			if err := os.Remove(filepath.Join(c.dir, n)); err != nil {
				return fmt.Errorf("ca: remove %s: %w", n, err)
			}
		}
	}
	c.installSigners()
	if changed {
		return c.saveLocked()
	}
	return nil
}

func (c *CA) loadAuthority(r authorityRecord) (*authority, error) {
	if r.KeyFile == "" || filepath.Base(r.KeyFile) != r.KeyFile || !strings.HasSuffix(r.KeyFile, ".key") {
		return nil, fmt.Errorf("ca: state names bad key file %q", r.KeyFile)
	}
	switch r.Status {
	case StatusPrepared, StatusActive, StatusOld:
	default:
		return nil, fmt.Errorf("ca: authority %s has unknown status %q", r.ID, r.Status)
	}
	data, err := c.readPrivateFile(r.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("ca: read key of %s authority %s: %w", r.Kind, r.ID, err)
	}
	key, err := decodeKey(data)
	if err != nil {
		return nil, fmt.Errorf("ca: key of %s authority %s: %w", r.Kind, r.ID, err)
	}
	a := &authority{
		kind: r.Kind, id: r.ID, status: r.Status, tainted: r.Tainted, published: r.Published,
		issuedAt: r.IssuedAt, notAfter: r.NotAfter, key: key, keyFile: r.KeyFile,
	}
	switch r.Kind {
	case KindX509:
		cert, err := x509.ParseCertificate(r.Certificate)
		if err != nil {
			return nil, fmt.Errorf("ca: certificate of authority %s: %w", r.ID, err)
		}
		if !certPublicKey(cert, key.Public()) {
			return nil, fmt.Errorf("ca: key of authority %s does not match its certificate", r.ID)
		}
		a.cert = cert
		a.upstream = cert.CheckSignatureFrom(cert) != nil
	case KindJWT:
	default:
		return nil, fmt.Errorf("ca: authority %s has unknown kind %q", r.ID, r.Kind)
	}
	return a, nil
}

// misfit explains why a loaded authority cannot be used with the current
// configuration, or returns "".
func (c *CA) misfit(a *authority) string {
	switch a.kind {
	case KindJWT:
		if err := checkJWTKey(c.jwtAlg, a.key); err != nil {
			return "JWT algorithm changed"
		}
	case KindX509:
		if c.upstream == nil {
			if a.upstream {
				return "upstream CA removed"
			}
		} else if !a.upstream || a.cert.CheckSignatureFrom(c.upstream.cert) != nil {
			return "signed by another upstream CA"
		}
	}
	return ""
}
