package systemd

import (
	"errors"

	"github.com/ferry-id/ferry/internal/selector"
)

// Selectors declares the selectors this attestor produces (see the package
// comment), for the catalog's registry: entries are checked against it.
func Selectors() selector.Schema {
	return selector.Schema{Type: Name, Class: selector.Workload, Kinds: []selector.Kind{
		{Name: "id", Form: "<unit>", Help: "unit the process runs in, e.g. nginx.service", Check: checkUnitName},
		{Name: "fragment_path", Form: "<path>", Help: "absolute path of that unit's file", Check: selector.CheckAbsPath},
	}}
}

func checkUnitName(s string) error {
	if !ValidUnitName(s) {
		return errors.New("not a systemd unit name (name.service, name@instance.service, .socket, .scope, ...)")
	}
	return nil
}
