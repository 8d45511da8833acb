package workloadapi

import (
	"context"
	"fmt"

	"github.com/ferry-id/ferry/attestors/workload"
	"github.com/ferry-id/ferry/internal/selector"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

// Attestor turns the PID of a caller into its selectors. The server pins the
// process when the caller connects and, after Attest returns, discards the
// selectors unless that same process is still alive, so implementations need
// not guard against PID reuse themselves. Implementations must be safe for
// concurrent use.
type Attestor interface {
	Attest(ctx context.Context, pid int32) ([]*ferrypb.Selector, error)
}

// AttestorFunc adapts a function to Attestor.
type AttestorFunc func(ctx context.Context, pid int32) ([]*ferrypb.Selector, error)

// Attest calls f.
func (f AttestorFunc) Attest(ctx context.Context, pid int32) ([]*ferrypb.Selector, error) {
	return f(ctx, pid)
}

// KindsSource reports which selector kinds ("unix:uid", "systemd:id", ...)
// some entry uses, nil when that is not known (every kind may be);
// cache.Manager implements it.
type KindsSource interface {
	SelectorKinds() map[string]bool
}

// WorkloadAttestors returns an Attestor that runs every attestor in list
// against the PID and returns the union of their selectors in canonical order.
// If kinds is not nil, attestors are asked only for the selector kinds it
// reports in use, so costly ones (hashing an executable) are skipped when no
// entry needs them. Any attestor error fails the attestation.
func WorkloadAttestors(kinds KindsSource, list ...workload.Attestor) Attestor {
	return AttestorFunc(func(ctx context.Context, pid int32) ([]*ferrypb.Selector, error) {
		var k workload.Kinds // nil: every kind
		if used := kindsOf(kinds); used != nil {
			k = make(workload.Kinds, len(used))
			for kind, ok := range used {
				if ok {
					k[kind] = struct{}{}
				}
			}
		}
		var all selector.Set
		for _, a := range list {
			sels, err := a.Attest(ctx, pid, k)
			if err != nil {
				return nil, fmt.Errorf("workloadapi: attestor %q: %w", a.Name(), err)
			}
			for _, s := range sels {
				// An attestor speaks only for its own selector type.
				if s.GetType() != a.Name() {
					return nil, fmt.Errorf("workloadapi: attestor %q returned a selector of type %q", a.Name(), s.GetType())
				}
			}
			all = all.Union(selector.NewSet(sels...))
		}
		return all.Selectors(), nil
	})
}

// kindsOf returns the kinds src reports, nil when src is nil or does not know
// them yet: then every attestor runs, since a caller attested before the agent
// knows its entries must get all its selectors (the entries that arrive next
// may use any).
func kindsOf(src KindsSource) map[string]bool {
	if src == nil {
		return nil
	}
	return src.SelectorKinds()
}
