package unix

import (
	"errors"
	"os"
	"syscall"
)

// procFile reads a /proc file through a bare descriptor: os.File would also
// try to register it with the network poller (one more syscall, always
// refused for /proc) and allocate a finalizer, on every attestation.
type procFile int

func openProcFile(path string) (procFile, error) {
	for {
		fd, err := syscall.Open(path, syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
		if errors.Is(err, syscall.EINTR) {
			continue
		}
		if err != nil {
			return -1, &os.PathError{Op: "open", Path: path, Err: err}
		}
		return procFile(fd), nil
	}
}

// Read returns 0, nil at end of file.
func (f procFile) Read(p []byte) (int, error) {
	for {
		n, err := syscall.Read(int(f), p)
		if errors.Is(err, syscall.EINTR) {
			continue
		}
		if err != nil {
			return 0, err
		}
		return n, nil
	}
}

func (f procFile) Close() error { return syscall.Close(int(f)) }
