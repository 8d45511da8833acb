// Package catalog lists the attestors compiled into ferry and collects the
// selector schemas each one declares into the registry that registration
// entries are checked against, at the server's API and, for early and
// identical errors, in the CLI.
//
// Adding an attestor: give its package a Selectors() function returning its
// selector.Schema (type = attestor name, class, and each kind of value with
// its form, a few words of help and a check), and add that function to
// schemas below. Help texts, error messages and entry validation follow from
// the declaration; nothing else lists selector types.
package catalog

import (
	"github.com/ferry-id/ferry/attestors/node/awsiid"
	"github.com/ferry-id/ferry/attestors/node/azureimds"
	"github.com/ferry-id/ferry/attestors/node/azuremsi"
	"github.com/ferry-id/ferry/attestors/node/gcpiit"
	"github.com/ferry-id/ferry/attestors/node/jointoken"
	"github.com/ferry-id/ferry/attestors/node/sshpop"
	"github.com/ferry-id/ferry/attestors/node/tpm"
	"github.com/ferry-id/ferry/attestors/node/x509pop"
	"github.com/ferry-id/ferry/attestors/workload/systemd"
	"github.com/ferry-id/ferry/attestors/workload/unix"
	"github.com/ferry-id/ferry/internal/selector"
)

// schemas are the declarations of every attestor compiled in: workload
// attestors, then node attestors.
var schemas = []func() selector.Schema{
	unix.Selectors,
	systemd.Selectors,
	jointoken.Selectors,
	x509pop.Selectors,
	azureimds.Selectors,
	azuremsi.Selectors,
	awsiid.Selectors,
	gcpiit.Selectors,
	tpm.Selectors,
	sshpop.Selectors,
}

var registry = func() *selector.Registry {
	s := make([]selector.Schema, len(schemas))
	for i, f := range schemas {
		s[i] = f()
	}
	return selector.MustRegistry(s...)
}()

// Selectors returns the registry of every compiled-in attestor's selectors,
// all enabled. A server narrows the node class to the node attestors it runs
// with Registry.Enable.
func Selectors() *selector.Registry { return registry }
