package workload

import (
	"context"
	"fmt"
	"io"
	"path/filepath"
	"sync"

	"github.com/ferry-id/ferry/proto/ferrypb"
)

// AttestFunc turns a PID into selectors: the agent's attestors, run
// together.
type AttestFunc func(ctx context.Context, pid int32) ([]*ferrypb.Selector, error)

// AttestCaller attests p, the pinned process of a caller that connected with
// the credentials peer, and returns its selectors only if it may have them.
// It is the one place where both of the agent's endpoints decide that:
//
//  1. attest runs with ctx carrying p (ProcessFrom) and this attestation
//     (CredsFrom), so attestors read the process through its pin;
//  2. the process's credentials are read from /proc/PID/status through the
//     pin once per call, by the first attestor that asks (the unix
//     attestor reads the executable first and the ids after), or here once
//     the attestors are done. The ids the selectors describe are the ids
//     checked, so a process cannot show one set of ids to the attestor and
//     another to the check;
//  3. p must still be the process pinned (CheckAlive: same start time, not
//     exited), else the error wraps ErrProcessChanged;
//  4. its credentials must pass peer.Check, else the error wraps
//     ErrCredentialsChanged.
//
// An attestor's error is returned only when both checks pass.
func AttestCaller(ctx context.Context, p *Process, peer Peer, attest AttestFunc) ([]*ferrypb.Selector, error) {
	a := &attestation{p: p}
	ctx = context.WithValue(WithProcess(ctx, p), attestationKey{}, a)
	sels, err := attest(ctx, p.pid)
	creds, credsErr := a.get(false)
	if aliveErr := p.CheckAlive(); aliveErr != nil {
		return nil, aliveErr
	}
	if credsErr != nil {
		return nil, fmt.Errorf("workload: pid %d: %w", p.pid, credsErr)
	}
	if cerr := peer.Check(creds, a.usedGroups()); cerr != nil {
		return nil, cerr
	}
	if err != nil {
		return nil, err
	}
	return sels, nil
}

type attestationKey struct{}

// attestation is one AttestCaller call: the process's credentials, read
// once, when first asked for.
type attestation struct {
	p *Process

	mu     sync.Mutex
	read   bool
	creds  Creds
	err    error
	groups bool // an attestor used the supplementary groups
}

func (a *attestation) get(groups bool) (Creds, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.groups = a.groups || groups
	if !a.read {
		a.creds, a.err = a.p.ReadCreds()
		a.read = true
	}
	return a.creds, a.err
}

func (a *attestation) usedGroups() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.groups
}

// CredsFrom returns the credentials of pid when ctx is an AttestCaller
// attestation of pid's pinned process under procRoot: read from its status
// once per attestation and checked by AttestCaller against those it
// connected with. groups says the caller uses the supplementary groups, which
// are then checked too. ok is false when ctx is no such attestation; the
// attestor then reads the process's status itself.
func CredsFrom(ctx context.Context, procRoot string, pid int32, groups bool) (c Creds, ok bool, err error) {
	a, _ := ctx.Value(attestationKey{}).(*attestation)
	if a == nil || a.p.pid != pid || filepath.Clean(a.p.root) != filepath.Clean(procRoot) {
		return Creds{}, false, nil
	}
	c, err = a.get(groups)
	return c, true, err
}

// ReadCreds reads the pinned process's credentials from its status file,
// through the pin (see ReadFile).
func (p *Process) ReadCreds() (Creds, error) {
	var c Creds
	var perr error
	err := p.ReadFile("status", func(r io.Reader) error {
		c, perr = ParseCreds(r)
		return nil
	})
	if err != nil {
		return Creds{}, err
	}
	return c, perr
}
