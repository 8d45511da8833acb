// Package buildinfo says which build of ferry is running: the version it was
// released as, the VCS revision it was built from and the Go toolchain, read
// from the binary's embedded build information.
//
// Version is, in order: what the build stamped with
// -ldflags "-X github.com/ferry-id/ferry/internal/buildinfo.version=..."
// (make build uses `git describe`, and stamps revision too), the main
// module's version (set by
// `go install module@version`), or "devel". Revision comes from the vcs.*
// settings Go embeds when building inside a checkout; a build with
// -buildvcs=false, or outside one, has none, and says so.
package buildinfo

import (
	"fmt"
	"runtime"
	"runtime/debug"
	"strings"
	"sync"
)

// version and revision are set at link time (see the package comment);
// revision stands in for the VCS information a -buildvcs=false build lacks.
var version, revision string

// Info is one build's identity.
type Info struct {
	// Version is the release version, e.g. "v0.3.0-4-g1a2b3c4"; "devel" when
	// unknown.
	Version string
	// Revision is the VCS commit the binary was built from; empty when the
	// build did not record one (-buildvcs=false, or not a checkout).
	Revision string
	// Time is the commit time (RFC 3339), when recorded.
	Time string
	// Modified says the working tree had uncommitted changes.
	Modified bool
	// GoVersion is the toolchain that built the binary.
	GoVersion string
}

var (
	once sync.Once
	info Info
)

// Get returns the running binary's build information.
func Get() Info {
	once.Do(func() { info = read(debug.ReadBuildInfo()) })
	return info
}

func read(bi *debug.BuildInfo, ok bool) Info {
	out := Info{Version: version, Revision: revision, GoVersion: runtime.Version()}
	if !ok {
		if out.Version == "" {
			out.Version = "devel"
		}
		return out
	}
	if bi.GoVersion != "" {
		out.GoVersion = bi.GoVersion
	}
	if out.Version == "" && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		out.Version = bi.Main.Version
	}
	if out.Version == "" {
		out.Version = "devel"
	}
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			out.Revision = s.Value // what Go recorded wins over a stamp
		case "vcs.time":
			out.Time = s.Value
		case "vcs.modified":
			out.Modified = s.Value == "true"
		}
	}
	return out
}

// String is the one-line form `ferry --version` prints.
func (i Info) String() string {
	rev := "unknown (built without VCS information)"
	if i.Revision != "" {
		rev = i.Revision
		if i.Modified {
			rev += " (modified)"
		}
	}
	return fmt.Sprintf("%s, revision %s, %s", i.Version, rev, i.GoVersion)
}

// Lines is the multi-line form `ferry version` prints.
func (i Info) Lines() string {
	var b strings.Builder
	fmt.Fprintf(&b, "Version:    %s\n", i.Version)
	if i.Revision != "" {
		mod := ""
		if i.Modified {
			mod = " (modified)"
		}
		fmt.Fprintf(&b, "Revision:   %s%s\n", i.Revision, mod)
		if i.Time != "" {
			fmt.Fprintf(&b, "Committed:  %s\n", i.Time)
		}
	} else {
		fmt.Fprintf(&b, "Revision:   unknown (built without VCS information)\n")
	}
	fmt.Fprintf(&b, "Go version: %s\n", i.GoVersion)
	return b.String()
}
