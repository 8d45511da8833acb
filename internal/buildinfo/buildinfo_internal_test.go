package buildinfo

import (
	"runtime/debug"
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestRead(t *testing.T) {
	bi := &debug.BuildInfo{GoVersion: "go1.99", Main: debug.Module{Version: "(devel)"}, Settings: []debug.BuildSetting{
		{Key: "vcs.revision", Value: "0123abcd"}, {Key: "vcs.time", Value: "2026-01-02T03:04:05Z"}, {Key: "vcs.modified", Value: "true"},
	}}
	got := read(bi, true)
	assert.Equal(t, Info{Version: "devel", Revision: "0123abcd", Time: "2026-01-02T03:04:05Z", Modified: true, GoVersion: "go1.99"}, got)
	assert.Equal(t, "devel, revision 0123abcd (modified), go1.99", got.String())

	// go install module@version, built with -buildvcs=false: no revision.
	got = read(&debug.BuildInfo{GoVersion: "go1.99", Main: debug.Module{Version: "v1.2.3"}}, true)
	assert.Equal(t, "v1.2.3", got.Version)
	assert.Equal(t, "v1.2.3, revision unknown (built without VCS information), go1.99", got.String())
	assert.Contains(t, got.Lines(), "Revision:   unknown (built without VCS information)\n")

	// A stamped version wins.
	version = "v0.3.0-4-g1a2b3c4"
	t.Cleanup(func() { version = "" })
	assert.Equal(t, "v0.3.0-4-g1a2b3c4", read(&debug.BuildInfo{Main: debug.Module{Version: "v1.2.3"}}, true).Version)
	assert.Equal(t, "v0.3.0-4-g1a2b3c4", read(nil, false).Version)
}
