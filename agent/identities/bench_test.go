package identities_test

import (
	"context"
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/ferry-id/ferry/agent/identities"
	"github.com/ferry-id/ferry/agent/imds"
	"github.com/ferry-id/ferry/agent/peer"
	"github.com/ferry-id/ferry/agent/workloadapi"
	"github.com/ferry-id/ferry/attestors/workload/unix"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

type kinds map[string]bool

func (k kinds) SelectorKinds() map[string]bool { return k }

// BenchmarkIdentityRealAttestation is the per-request authorization cost with
// the real unix attestor (uid and gid selectors, read from /proc) and the real
// liveness check on this process; the SVID cache and the servers are fakes.
func BenchmarkIdentityRealAttestation(b *testing.B) {
	ux, err := unix.New(unix.Config{})
	if err != nil {
		b.Fatal(err)
	}
	finder := peer.New(peer.Config{})
	self := int32(os.Getpid())
	sels := []*ferrypb.Selector{{Type: "unix", Value: "uid:" + strconv.Itoa(os.Getuid())}}
	w := &workloads{byPID: map[string][]*ferrypb.Entry{sels[0].Value: {{Id: "e-other", SpiffeId: other}}}}
	r, err := identities.New(identities.Config{
		Attestor:  workloadapi.WorkloadAttestors(kinds{"unix:uid": true, "unix:gid": true}, ux),
		Workloads: w,
		Directory: &directory{ids: []*ferrypb.AgentIdentity{otherUA}},
		Processes: finder,
	})
	if err != nil {
		b.Fatal(err)
	}
	st := startTime(b)
	c := imds.Caller{UID: uint32(os.Getuid()), GID: uint32(os.Getgid()), PID: self, StartTime: st}
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		if _, err := r.Identity(ctx, c, imds.Selector{}); err != nil {
			b.Fatal(err)
		}
	}
}

// startTime reads this process's start time (field 22 of /proc/self/stat).
func startTime(b *testing.B) uint64 {
	data, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		b.Fatal(err)
	}
	s := string(data)
	fields := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	v, err := strconv.ParseUint(fields[19], 10, 64)
	if err != nil {
		b.Fatal(err)
	}
	return v
}
