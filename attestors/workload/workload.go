// Package workload defines workload attestation: turning the PID of a local
// caller into selectors (unix:uid:1000, systemd:id:web.service, …) that the
// agent matches against its registration entries.
//
// Attestor is the interface each workload attestor package implements.
// Process pins a PID against reuse for the duration of an attestation, the way
// SPIRE's peertracker does: the selectors of a process that exited while it was
// being attested are discarded, because its PID may already name another
// process.
//
// AttestCaller is where the agent's two endpoints (the Workload API and the
// managed-identity endpoint) decide whether a caller may have the selectors
// its pinned process is attested with: its credentials are read once per call
// (Creds, from /proc/PID/status, shared with the attestors through
// CredsFrom) and must pass Peer.Check against what the kernel recorded when
// it connected: every uid (real, effective, saved, filesystem) the uid it
// connected as, every gid likewise (or, for a loopback TCP caller, whose
// connection carries no gid, the same as each other), and the supplementary
// groups it connected with when an attestor uses them. A caller whose ids
// changed since it connected, or that runs a setuid or setgid program, is
// refused (ErrCredentialsChanged), never attested as its effective ids.
package workload

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/ferry-id/ferry/internal/selector"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

// Attestor turns a PID into selectors. Implementations must be safe for
// concurrent use: the agent attests many callers at once.
type Attestor interface {
	// Name returns the selector type this attestor produces, e.g. "unix".
	Name() string
	// Attest returns selectors for pid. kinds says which selector kinds some
	// entry on this node actually uses, so expensive ones (hashing a binary)
	// are skipped when unused; nil means all. A process the attestor has
	// nothing to say about yields no selectors and no error.
	Attest(ctx context.Context, pid int32, kinds Kinds) ([]*ferrypb.Selector, error)
}

// Kinds is the set of selector kinds in use, keyed "type:kind", where the kind
// of a selector is its value up to the first ':' ("unix:uid:1000" has kind
// "uid", "systemd:id:a.service" has kind "id"). A nil Kinds means every kind is
// in use; an empty non-nil Kinds means none is.
type Kinds map[string]struct{}

// KindsOf returns the kinds used by sels, typically every selector of every
// entry the agent holds.
func KindsOf(sels ...[]*ferrypb.Selector) Kinds {
	k := Kinds{}
	for _, list := range sels {
		for _, s := range list {
			k[s.GetType()+":"+Kind(s)] = struct{}{}
		}
	}
	return k
}

// Kind returns the kind of s: its value up to the first ':'.
func Kind(s *ferrypb.Selector) string {
	kind, _, _ := strings.Cut(s.GetValue(), ":")
	return kind
}

// Has reports whether selectors of type typ and kind kind are in use.
func (k Kinds) Has(typ, kind string) bool {
	if k == nil {
		return true
	}
	_, ok := k[typ+":"+kind]
	return ok
}

// Attest pins pid, runs every attestor against it and returns the union of
// their selectors in canonical order. If the process is gone or its PID was
// reused by the time the attestors finish, the selectors are discarded and the
// error wraps ErrProcessChanged. An attestor error fails the whole
// attestation rather than returning the other attestors' selectors, so an
// operator sees the fault instead of a workload silently getting fewer (or
// different) identities.
func Attest(ctx context.Context, pid int32, attestors []Attestor, kinds Kinds) ([]*ferrypb.Selector, error) {
	p, err := OpenProcess(pid)
	if err != nil {
		return nil, err
	}
	defer p.Close()
	return p.Attest(ctx, attestors, kinds)
}

// Attest runs every attestor against p and returns the union of their
// selectors, after checking that p is still the process it was when opened.
func (p *Process) Attest(ctx context.Context, attestors []Attestor, kinds Kinds) ([]*ferrypb.Selector, error) {
	ctx = WithProcess(ctx, p)
	var all selector.Set
	for _, a := range attestors {
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("workload: attest pid %d: %w", p.pid, err)
		}
		sels, err := a.Attest(ctx, p.pid, kinds)
		if err != nil {
			// A failure caused by the process exiting mid-way is reported as
			// such, not as an attestor fault.
			if aliveErr := p.CheckAlive(); aliveErr != nil {
				return nil, aliveErr
			}
			return nil, fmt.Errorf("workload: attestor %q: %w", a.Name(), err)
		}
		for _, s := range sels {
			if s.GetType() != a.Name() {
				return nil, fmt.Errorf("workload: attestor %q returned selector of type %q", a.Name(), s.GetType())
			}
		}
		all = all.Union(selector.NewSet(sels...))
	}
	if err := p.CheckAlive(); err != nil {
		return nil, err
	}
	return all.Selectors(), nil
}

// ErrProcessChanged is wrapped by errors reporting that a pinned process exited
// or that its PID now names a different process.
var ErrProcessChanged = errors.New("workload: process exited or pid reused during attestation")
