package main

import (
	"bytes"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/urfave/cli/v2"
)

// walk calls fn for every command of app with its full name.
func walk(cmds []*cli.Command, parent string, fn func(name string, c *cli.Command)) {
	for _, c := range cmds {
		if c.Name == "help" {
			continue
		}
		name := strings.TrimSpace(parent + " " + c.Name)
		fn(name, c)
		walk(c.Subcommands, name, fn)
	}
}

// TestEveryFlagHasHelp: every command and every flag says what it is for, and
// no flag is left to urfave/cli's required-flag handling (which prints the
// whole help instead of one line).
func TestEveryFlagHasHelp(t *testing.T) {
	walk(newApp().Commands, "", func(name string, c *cli.Command) {
		assert.NotEmpty(t, c.Usage, "ferry %s has no usage line", name)
		for _, f := range c.Flags {
			df, ok := f.(cli.DocGenerationFlag)
			require.True(t, ok, "ferry %s --%s", name, f.Names()[0])
			assert.NotEmpty(t, df.GetUsage(), "ferry %s --%s has no help text", name, f.Names()[0])
			if rf, ok := f.(cli.RequiredFlag); ok {
				assert.False(t, rf.IsRequired(), "ferry %s --%s: strict handles required flags", name, f.Names()[0])
			}
		}
	})
}

// run runs the CLI in-process and returns stdout, stderr and the error.
func run(t *testing.T, args ...string) (string, string, error) {
	t.Helper()
	app := newApp()
	var out, errOut bytes.Buffer
	app.Writer, app.ErrWriter = &out, &errOut
	err := app.Run(append([]string{"ferry"}, args...))
	return out.String(), errOut.String(), err
}
