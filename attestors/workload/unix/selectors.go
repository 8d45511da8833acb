package unix

import "github.com/ferry-id/ferry/internal/selector"

// Selectors declares the selectors this attestor produces (see the package
// comment), for the catalog's registry: entries are checked against it.
func Selectors() selector.Schema {
	return selector.Schema{Type: Name, Class: selector.Workload, Kinds: []selector.Kind{
		{Name: "uid", Form: "<uid>", Help: "user ID of the process (all four of its uids), decimal", Check: selector.CheckUint32},
		{Name: "user", Form: "<name>", Help: "name of that user", Check: selector.CheckName},
		{Name: "gid", Form: "<gid>", Help: "group ID of the process (all four of its gids), decimal", Check: selector.CheckUint32},
		{Name: "group", Form: "<name>", Help: "name of that group", Check: selector.CheckName},
		{Name: "supplementary_gid", Form: "<gid>", Help: "a supplementary group ID, decimal", Check: selector.CheckUint32},
		{Name: "supplementary_group", Form: "<name>", Help: "name of a supplementary group", Check: selector.CheckName},
		{Name: "path", Form: "<path>", Help: "absolute path of the executable", Check: selector.CheckAbsPath},
		{Name: "sha256", Form: "<hex>", Help: "SHA-256 of the executable, 64 lower-case hex digits", Check: selector.CheckHex(64)},
	}}
}
