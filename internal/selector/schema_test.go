package selector_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/internal/selector"
)

func testRegistry(t *testing.T) *selector.Registry {
	t.Helper()
	r, err := selector.NewRegistry(
		selector.Schema{Type: "proc", Class: selector.Workload, Kinds: []selector.Kind{
			{Name: "uid", Form: "<uid>", Help: "user ID", Check: selector.CheckUint32},
			{Name: "exe", Form: "<path>", Help: "executable", Check: selector.CheckAbsPath},
		}},
		selector.Schema{Type: "cloud", Class: selector.Node, Kinds: []selector.Kind{
			{Name: "tag", Form: "<key>:<value>", Help: "instance tag", Check: selector.CheckKeyValue},
		}},
		selector.Schema{Type: "token", Class: selector.Node},
	)
	require.NoError(t, err)
	return r
}

// TestRegistryCheck is the table of what the registry refuses and how it says so.
func TestRegistryCheck(t *testing.T) {
	r := testRegistry(t)
	tests := []struct {
		class selector.Class
		in    string
		want  string // "" = accepted
	}{
		{selector.Workload, "proc:uid:0", ""},
		{selector.Workload, "proc:uid:4294967295", ""},
		{selector.Workload, "proc:exe:/bin/sh", ""},
		{selector.Node, "cloud:tag:env:prod", ""},
		{selector.Workload, "uid:0", `"uid:0": unknown selector type; workload selectors are proc:uid:<uid>, proc:exe:<path>`},
		{selector.Workload, "bogus:thing:1", `"bogus:thing:1": unknown selector type; workload selectors are proc:uid:<uid>, proc:exe:<path>`},
		{selector.Workload, "proc:uid:abc", `"proc:uid:abc": want proc:uid:<uid> (user ID): not a decimal number from 0 to 4294967295`},
		{selector.Workload, "proc:uid:4294967296", `want proc:uid:<uid> (user ID): not a decimal number`},
		{selector.Workload, "proc:uid:-1", `not a decimal number`},
		{selector.Workload, "proc:uid:007", `no leading zeros`},
		{selector.Workload, "proc:uid", `"proc:uid": want proc:uid:<uid> (user ID)`},
		{selector.Workload, "proc:uid:", `"proc:uid:": want proc:uid:<uid> (user ID)`},
		{selector.Workload, "proc:gid:1", `"proc:gid:1": proc selectors are proc:uid:<uid>, proc:exe:<path>`},
		{selector.Workload, "proc:exe:bin/sh", `not an absolute path`},
		{selector.Workload, "cloud:tag:env:prod", `"cloud:tag:env:prod": cloud is a node selector type, not a workload one; workload selectors are proc:uid:<uid>, proc:exe:<path>`},
		{selector.Node, "proc:uid:0", `proc is a workload selector type, not a node one; node selectors are cloud:tag:<key>:<value>`},
		{selector.Node, "cloud:tag:env", `want cloud:tag:<key>:<value> (instance tag): want <key>:<value>`},
		{selector.Node, "token:x:y", `the token attestor produces no selectors; node selectors are cloud:tag:<key>:<value>`},
		{selector.Workload, "Proc:uid:0", `character 'P' not in [a-z0-9_-]`},
		{selector.Workload, "proc:uid:1\n", `control character`},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			sel, err := r.Parse(tt.class, tt.in)
			if tt.want == "" {
				require.NoError(t, err)
				assert.Equal(t, tt.in, selector.Format(sel))
				return
			}
			require.Error(t, err)
			assert.True(t, errors.Is(err, selector.ErrInvalid), "wraps ErrInvalid: %v", err)
			assert.Contains(t, err.Error(), tt.want)
			assert.NotContains(t, err.Error(), "\n", "one line")
		})
	}
}

func TestRegistryEnable(t *testing.T) {
	r := testRegistry(t).Enable(selector.Node, "token")
	_, err := r.Parse(selector.Node, "cloud:tag:env:prod")
	require.ErrorContains(t, err, `"cloud:tag:env:prod": the cloud attestor is not enabled here; no enabled attestor produces node selectors`)
	assert.Empty(t, r.Types(selector.Node)[1:])
	// Workload schemas are untouched.
	_, err = r.Parse(selector.Workload, "proc:uid:0")
	require.NoError(t, err)
	// The original is unchanged.
	_, err = testRegistry(t).Parse(selector.Node, "cloud:tag:env:prod")
	require.NoError(t, err)
}

func TestRegistryHelp(t *testing.T) {
	r := testRegistry(t)
	assert.Equal(t, []string{"proc:uid:<uid>", "proc:exe:<path>"}, r.Forms(selector.Workload))
	help := r.Help(selector.Workload)
	assert.Equal(t, "  proc:uid:<uid>   user ID\n  proc:exe:<path>  executable\n", help)
	assert.Equal(t, []string{"cloud", "token"}, r.Types(selector.Node))
}

func TestNewRegistryRefusesBadSchemas(t *testing.T) {
	for name, schemas := range map[string][]selector.Schema{
		"duplicate type": {{Type: "a", Class: selector.Node}, {Type: "a", Class: selector.Workload}},
		"bad type":       {{Type: "A", Class: selector.Node}},
		"no class":       {{Type: "a"}},
		"kind with ':'":  {{Type: "a", Class: selector.Node, Kinds: []selector.Kind{{Name: "x:y", Form: "<v>"}}}},
		"kind twice":     {{Type: "a", Class: selector.Node, Kinds: []selector.Kind{{Name: "x", Form: "<v>"}, {Name: "x", Form: "<v>"}}}},
		"no form":        {{Type: "a", Class: selector.Node, Kinds: []selector.Kind{{Name: "x"}}}},
	} {
		_, err := selector.NewRegistry(schemas...)
		assert.Error(t, err, name)
	}
}

func TestCheckHex(t *testing.T) {
	assert.NoError(t, selector.CheckHex(4)("0a1f"))
	assert.ErrorContains(t, selector.CheckHex(4)("0A1F"), "lower-case")
	assert.ErrorContains(t, selector.CheckHex(4)("0a1"), "want 4")
	assert.NoError(t, selector.CheckHex(0)("0a"))
	assert.ErrorContains(t, selector.CheckHex(0)("a"), "even")
	assert.True(t, strings.HasPrefix(selector.CheckName("a:b").Error(), "a user or group name"))
}
