//go:build !linux

package unix

import (
	"errors"
	"io"
	"os"
)

type procFile struct{ f *os.File }

func openProcFile(path string) (procFile, error) {
	f, err := os.Open(path)
	if err != nil {
		return procFile{}, err
	}
	return procFile{f}, nil
}

// Read returns 0, nil at end of file.
func (p procFile) Read(b []byte) (int, error) {
	n, err := p.f.Read(b)
	if errors.Is(err, io.EOF) {
		return n, nil
	}
	return n, err
}

func (p procFile) Close() error { return p.f.Close() }
