// Package upgrade_test holds what makes upgrades safe: the previous release
// is built from this repository's own history, its wire and state formats
// are compared with the current ones (protocompat_test.go), and a 3-node
// cluster with agents and a bridge is upgraded one process at a time while
// writes and Workload API calls go on (upgrade_test.go). docs/upgrade.md is
// the policy these tests hold the code to.
package upgrade_test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// The previous release: its tag, and the commit the tag marks, for a clone
// that has the history but not the tags.
const (
	previousTag    = "v0.1.0"
	previousCommit = "47130b5"
)

// release is a ferry release built from the repository's history.
type release struct {
	commit string
	// bin is its ferry binary.
	bin string
	// descriptors is a serialized FileDescriptorSet of its ferry.v1 protos.
	descriptors string
}

var (
	prevOnce sync.Once
	prev     release
	prevErr  error
)

// descDump is a program added to the old tree to print its proto
// descriptors, as the current ones are read from this test's registry.
const descDump = `package main

import (
	"os"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/descriptorpb"

	_ "github.com/ferry-id/ferry/proto/ferrypb"
)

func main() {
	set := &descriptorpb.FileDescriptorSet{}
	protoregistry.GlobalFiles.RangeFiles(func(f protoreflect.FileDescriptor) bool {
		if f.Package() == "ferry.v1" {
			set.File = append(set.File, protodesc.ToFileDescriptorProto(f))
		}
		return true
	})
	b, err := proto.Marshal(set)
	if err != nil {
		panic(err)
	}
	os.Stdout.Write(b)
}
`

// previousRelease builds the previous release once per test process (and
// keeps it in the user's cache directory, by commit, for the next run). A
// clone without that history fails the test: an upgrade test that cannot
// find what it upgrades from must not pass.
func previousRelease(t *testing.T) release {
	t.Helper()
	prevOnce.Do(func() { prev, prevErr = buildPrevious() })
	if prevErr != nil {
		t.Fatalf("previous release: %v", prevErr)
	}
	return prev
}

func buildPrevious() (release, error) {
	root, err := filepath.Abs("../..")
	if err != nil {
		return release{}, err
	}
	var commit string
	for _, ref := range []string{previousTag, previousCommit} {
		out, err := exec.Command("git", "-C", root, "rev-parse", "--verify", "--quiet", ref+"^{commit}").Output()
		if err == nil {
			commit = strings.TrimSpace(string(out))
			break
		}
	}
	if commit == "" {
		return release{}, fmt.Errorf("neither %s nor commit %s is in this clone's history (git fetch --tags --unshallow)", previousTag, previousCommit)
	}
	cache, err := os.UserCacheDir()
	if err != nil {
		cache = os.TempDir()
	}
	dir := filepath.Join(cache, "ferry-releases", commit)
	r := release{commit: commit, bin: filepath.Join(dir, "ferry"), descriptors: filepath.Join(dir, "descriptors.pb")}
	if _, err := os.Stat(r.descriptors); err == nil {
		if _, err := os.Stat(r.bin); err == nil {
			return r, nil
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return release{}, err
	}
	src, err := os.MkdirTemp("", "ferry-release-src-")
	if err != nil {
		return release{}, err
	}
	defer os.RemoveAll(src)
	archive := exec.Command("sh", "-c", `git -C "$1" archive --format=tar "$2" | tar -x -C "$3"`, "sh", root, commit, src)
	if out, err := archive.CombinedOutput(); err != nil {
		return release{}, fmt.Errorf("git archive %s: %v\n%s", commit, err, out)
	}
	if err := os.MkdirAll(filepath.Join(src, "internal", "descdump"), 0o755); err != nil {
		return release{}, err
	}
	if err := os.WriteFile(filepath.Join(src, "internal", "descdump", "main.go"), []byte(descDump), 0o644); err != nil {
		return release{}, err
	}
	// Built as testcluster.Binary builds the current tree, so the two share
	// the build cache for every dependency the releases have in common.
	env := append(os.Environ(), "GOWORK=off", "GOFLAGS=-buildvcs=false")
	build := exec.Command("go", "build", "-o", r.bin+".tmp", "./cmd/ferry")
	build.Dir, build.Env = src, env
	if out, err := build.CombinedOutput(); err != nil {
		return release{}, fmt.Errorf("building %s: %v\n%s", commit, err, out)
	}
	dump := exec.Command("go", "run", "./internal/descdump")
	dump.Dir, dump.Env = src, env
	desc, err := dump.Output()
	if err != nil {
		return release{}, fmt.Errorf("dumping %s's descriptors: %v", commit, err)
	}
	if err := os.WriteFile(r.descriptors, desc, 0o600); err != nil {
		return release{}, err
	}
	if err := os.Rename(r.bin+".tmp", r.bin); err != nil {
		return release{}, err
	}
	return r, nil
}
