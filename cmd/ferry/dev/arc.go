package dev

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// arcSetup is where the Arc-style endpoint writes its challenge files, and
// whether Azure SDKs will accept them there.
type arcSetup struct {
	dir string
	// why is empty when SDKs accept dir; otherwise it says why the stack
	// could not use the one directory they accept.
	why  string
	lock *os.File // held while the stack uses the system directory
}

func (a arcSetup) release() {
	if a.lock != nil {
		a.lock.Close()
	}
}

// chooseArc picks the challenge directory. Azure SDKs accept challenge files
// only under system (/var/opt/azcmagent/tokens), so the stack uses it when it
// can own it: running as root, no other agent serving himds's address (it
// would own the directory, and the stack removes stale files there at start),
// the directory absent or this user's, and no other ferry dev using it (an
// exclusive lock on the directory while the stack runs). Otherwise the
// challenge files go under the data dir (TokenDir) and why says what stood in
// the way.
func chooseArc(system, himdsAddr, dataDir string) (arcSetup, error) {
	why := systemTokenDirUnusable(system, himdsAddr)
	var lock *os.File
	if why == "" {
		var err error
		if lock, why, err = lockTokenDir(system); err != nil {
			return arcSetup{}, err
		}
	}
	if why == "" {
		return arcSetup{dir: system, lock: lock}, nil
	}
	dir, err := TokenDir(dataDir)
	if err != nil {
		return arcSetup{}, err
	}
	return arcSetup{dir: dir, why: why}, nil
}

// systemTokenDirUnusable says why the stack cannot own system, or "".
func systemTokenDirUnusable(system, himdsAddr string) string {
	if os.Geteuid() != 0 {
		return "only root may create it (ferry dev runs as uid " + fmt.Sprint(os.Geteuid()) + ")"
	}
	if c, err := net.DialTimeout("tcp", himdsAddr, time.Second); err == nil {
		c.Close()
		return "another agent serves " + himdsAddr + " and owns it"
	}
	fi, err := os.Lstat(system)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return ""
	case err != nil:
		return err.Error()
	case !fi.IsDir():
		return system + " is not a directory"
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != os.Geteuid() {
		return fmt.Sprintf("it belongs to uid %d (an Arc agent's?)", st.Uid)
	}
	return ""
}

// lockTokenDir creates system (0711, as the endpoint keeps it) and takes an
// exclusive lock on it for as long as the returned file stays open. why is
// set when another process holds the lock.
func lockTokenDir(system string) (*os.File, string, error) {
	if err := os.MkdirAll(filepath.Dir(system), 0o755); err != nil {
		return nil, "", fmt.Errorf("dev: %w", err)
	}
	if err := os.Mkdir(system, 0o711); err != nil && !errors.Is(err, os.ErrExist) {
		return nil, "", fmt.Errorf("dev: %w", err)
	}
	f, err := os.Open(system)
	if err != nil {
		return nil, "", fmt.Errorf("dev: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, "another ferry dev uses it", nil
		}
		return nil, "", fmt.Errorf("dev: lock %s: %w", system, err)
	}
	return f, "", nil
}
