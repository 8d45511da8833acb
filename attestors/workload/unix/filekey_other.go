//go:build !linux

package unix

import "os"

// fileKeyOf disables digest caching where ctime is not portable to read.
func fileKeyOf(os.FileInfo) (fileKey, bool) { return fileKey{}, false }
