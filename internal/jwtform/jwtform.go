// Package jwtform checks the form of a compact JWS (a JWT) before any key is
// looked up or any signature verified: a size bound, three canonical
// base64url parts, a header that names no keys (jku, x5u, x5c, jwk) and
// demands no extensions (crit), and header and claims objects in which no
// member appears twice (JSON parsers disagree on which one wins). What passes
// still has to be parsed and verified; what fails costs a scan of the input.
package jwtform

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
)

var strictB64 = base64.RawURLEncoding.Strict()

// Check screens raw, a compact JWS of at most maxSize bytes.
func Check(raw string, maxSize int) error {
	if len(raw) > maxSize {
		return fmt.Errorf("token is %d bytes, limit %d", len(raw), maxSize)
	}
	if strings.Count(raw, ".") != 2 {
		return errors.New("token must have three dot-separated parts")
	}
	h64, rest, _ := strings.Cut(raw, ".")
	b64, _, _ := strings.Cut(rest, ".")
	hdr, err := strictB64.DecodeString(h64)
	if err != nil {
		return errors.New("header is not base64url")
	}
	if err := UniqueMembers(hdr); err != nil {
		return fmt.Errorf("header: %w", err)
	}
	var h map[string]json.RawMessage
	if err := json.Unmarshal(hdr, &h); err != nil {
		return errors.New("header is not a JSON object")
	}
	for _, name := range []string{"jku", "x5u", "x5c", "jwk"} {
		if _, ok := h[name]; ok {
			return fmt.Errorf("header may not carry %s", name)
		}
	}
	if _, ok := h["crit"]; ok {
		return errors.New("header may not carry crit")
	}
	body, err := strictB64.DecodeString(b64)
	if err != nil {
		return errors.New("payload is not base64url")
	}
	if err := UniqueMembers(body); err != nil {
		return fmt.Errorf("claims: %w", err)
	}
	return nil
}

// UniqueMembers reports an error when data is a JSON object in which a member
// name appears twice at the top level. Anything that is not an object, or not
// valid JSON, is left for the caller's decoder to refuse.
func UniqueMembers(data []byte) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	tok, err := dec.Token()
	if err != nil {
		return nil
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return nil
	}
	seen := map[string]bool{}
	for dec.More() {
		k, err := dec.Token()
		if err != nil {
			return nil
		}
		name, ok := k.(string)
		if !ok {
			return nil
		}
		if seen[name] {
			return fmt.Errorf("member %q appears twice", truncate(name))
		}
		seen[name] = true
		var skip json.RawMessage
		if err := dec.Decode(&skip); err != nil {
			return nil
		}
	}
	return nil
}

func truncate(s string) string {
	if len(s) > 32 {
		return s[:32] + "…"
	}
	return s
}
