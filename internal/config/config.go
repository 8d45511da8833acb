// Package config loads ferry's HCL configuration files (the format SPIRE users know)
// and refuses keys it does not know, so a typo is an error rather than a silently
// ignored setting.
package config

import (
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"

	"github.com/hashicorp/hcl"
	"github.com/hashicorp/hcl/hcl/token"
)

// Decode reads the HCL file at path into v, a pointer to a struct tagged with
// `hcl:"name"`. Every struct in v that has a field
// `UnusedKeys map[string][]token.Pos `hcl:",unusedKeyPositions"“ reports the keys
// nobody asked for; any such key is an error.
func Decode(path string, v any) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("config: %w", err)
	}
	return DecodeString(filepath.Base(path), string(data), v)
}

// DecodeString decodes HCL text into v; name labels errors.
func DecodeString(name, text string, v any) error {
	if err := hcl.Decode(v, text); err != nil {
		return fmt.Errorf("config: %s: %w", name, err)
	}
	var unknown []string
	collectUnused(reflect.ValueOf(v), "", &unknown)
	if len(unknown) > 0 {
		sort.Strings(unknown)
		return fmt.Errorf("config: %s: unknown setting(s): %s", name, strings.Join(unknown, ", "))
	}
	return nil
}

func collectUnused(v reflect.Value, path string, out *[]string) {
	for v.Kind() == reflect.Pointer || v.Kind() == reflect.Interface {
		if v.IsNil() {
			return
		}
		v = v.Elem()
	}
	switch v.Kind() {
	case reflect.Slice:
		for i := 0; i < v.Len(); i++ {
			collectUnused(v.Index(i), path, out)
		}
	case reflect.Struct:
		t := v.Type()
		for i := 0; i < t.NumField(); i++ {
			f := t.Field(i)
			if !f.IsExported() {
				continue
			}
			tag := f.Tag.Get("hcl")
			if tag == ",unusedKeyPositions" {
				for k, pos := range v.Field(i).Interface().(map[string][]token.Pos) {
					where := join(path, k)
					if len(pos) > 0 {
						where = fmt.Sprintf("%s (line %d)", where, pos[0].Line)
					}
					*out = append(*out, where)
				}
				continue
			}
			name, _, _ := strings.Cut(tag, ",")
			if name == "" {
				continue
			}
			collectUnused(v.Field(i), join(path, name), out)
		}
	}
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

// Resolve makes a relative path in a config file relative to the file's own
// directory, so a config works wherever it is started from. Empty stays empty.
func Resolve(configFile, p string) string {
	if p == "" || filepath.IsAbs(p) || configFile == "" {
		return p
	}
	return filepath.Join(filepath.Dir(configFile), p)
}

// Keys lists every setting a config struct accepts, as dotted paths of its
// hcl tags ("server.cluster.bind_addr"), sorted: what the reference in
// docs/config.md is checked against. Blocks (struct fields, pointers to
// structs, slices of structs) are listed themselves and their keys below them.
func Keys(v any) []string {
	var out []string
	keysOf(reflect.TypeOf(v), "", &out)
	sort.Strings(out)
	return out
}

func keysOf(t reflect.Type, prefix string, out *[]string) {
	for t.Kind() == reflect.Pointer || t.Kind() == reflect.Slice {
		t = t.Elem()
	}
	if t.Kind() != reflect.Struct {
		return
	}
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("hcl"), ",")
		if name == "" {
			continue
		}
		key := prefix + name
		*out = append(*out, key)
		keysOf(f.Type, key+".", out)
	}
}
