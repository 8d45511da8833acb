package x509pop

import (
	"errors"
	"strings"

	"github.com/ferry-id/ferry/internal/selector"
)

// Selectors declares the node selectors this attestor produces (see the
// package comment), for the catalog's registry: node-alias entries are checked
// against it.
func Selectors() selector.Schema {
	return selector.Schema{Type: Name, Class: selector.Node, Kinds: []selector.Kind{
		{Name: "subject", Form: "cn:<common name>", Help: "common name of the node certificate", Check: checkSubject},
		{Name: "ca", Form: "fingerprint:<sha1 hex>", Help: "SHA-1 of a CA certificate above the node certificate", Check: checkCA},
		{Name: "serialnumber", Form: "<hex>", Help: "serial number of the node certificate, lower-case hex, even length", Check: selector.CheckHex(0)},
		{Name: "san", Form: "<key>:<value>", Help: "from a URI SAN x509pop://<trust domain>/<key>/<value>", Check: selector.CheckKeyValue},
	}}
}

func checkSubject(s string) error {
	if cn, ok := strings.CutPrefix(s, "cn:"); !ok || cn == "" {
		return errors.New("want cn:<common name>")
	}
	return nil
}

func checkCA(s string) error {
	fp, ok := strings.CutPrefix(s, "fingerprint:")
	if !ok {
		return errors.New("want fingerprint:<40 lower-case hex digits>")
	}
	return selector.CheckHex(40)(fp)
}
