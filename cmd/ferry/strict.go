package main

// The CLI's input rules, applied to every command by strict:
//
//   - a command takes exactly the positional arguments its ArgsUsage names
//     ("" none, "FILE" one, "[ID]" zero or one, "ID..." one or more);
//   - a missing required flag, an unknown flag or a malformed flag value is
//     one line naming the command, with a hint to its --help, never the whole
//     help text;
//   - a flag given an empty value, or a value that is the name of another of
//     the command's flags (`--audience --role reader`, an unset shell variable
//     before it), is refused;
//   - flags with a fixed set of values (--output, --format, ...) refuse any
//     other;
//   - an unknown command is an error, not a help page.
//
// What a value must look like beyond that (SPIFFE IDs, selectors, TTLs, ...)
// is checked by the same functions the server's API uses, before the request
// is sent.

import (
	"fmt"
	"os"
	"reflect"
	"slices"
	"strings"

	"github.com/google/uuid"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/urfave/cli/v2"

	"github.com/ferry-id/ferry/internal/logging"
	"github.com/ferry-id/ferry/server/state"
)

// allowEmpty names the flags whose empty value means something: clearing a
// stored value on update.
var allowEmpty = map[string]bool{"description": true}

// strict applies the rules above to app and every command under it.
func strict(app *cli.App) {
	app.OnUsageError = usageError
	app.Action = unknownCommand
	for _, c := range app.Commands {
		strictCommand(c, "")
	}
}

// strictCommand applies the rules to c, whose parent commands are parent
// ("entry" for `ferry entry create`).
func strictCommand(c *cli.Command, parent string) {
	path := strings.TrimSpace(parent + " " + c.Name)
	c.OnUsageError = usageError
	if len(c.Subcommands) > 0 {
		if c.Action == nil {
			c.Action = unknownCommand
		}
		for _, s := range c.Subcommands {
			strictCommand(s, path)
		}
		return
	}
	var required []string
	for _, f := range c.Flags {
		if unrequire(f) {
			required = append(required, f.Names()[0])
		}
	}
	minArgs, maxArgs := argCounts(c.ArgsUsage)
	if action := c.Action; action != nil {
		// Every error names the command it comes from.
		c.Action = func(ctx *cli.Context) error {
			if err := action(ctx); err != nil {
				return fmt.Errorf("%s: %w", path, err)
			}
			return nil
		}
	}
	before := c.Before
	c.Before = func(ctx *cli.Context) error {
		if err := checkInput(ctx, path, required, minArgs, maxArgs); err != nil {
			return err
		}
		if before != nil {
			return before(ctx)
		}
		return nil
	}
}

// checkInput enforces the rules on one invocation.
func checkInput(ctx *cli.Context, path string, required []string, minArgs, maxArgs int) error {
	hint := fmt.Sprintf("see 'ferry %s --help'", path)
	names := map[string]bool{}
	for _, f := range ctx.Command.Flags {
		for _, n := range f.Names() {
			names["-"+n], names["--"+n] = true, true
		}
	}
	for _, f := range ctx.Command.Flags {
		name := f.Names()[0]
		if !ctx.IsSet(name) || allowEmpty[name] {
			continue
		}
		var values []string
		switch f.(type) {
		case *cli.StringFlag, *cli.PathFlag:
			values = []string{ctx.String(name)}
		case *cli.StringSliceFlag:
			values = ctx.StringSlice(name)
			if len(values) == 0 {
				values = []string{""}
			}
		default:
			continue
		}
		if values[0] == "" && emptyFromEnv(f) {
			continue // an empty environment variable is as good as none
		}
		for _, v := range values {
			if strings.TrimSpace(v) == "" {
				return fmt.Errorf("%s: --%s has an empty value (%s)", path, name, hint)
			}
			if names[v] {
				return fmt.Errorf("%s: --%s is missing its value (the next word, %s, is a flag) (%s)", path, name, v, hint)
			}
		}
	}
	// Flag values first: a flag that took the next flag for its value
	// leaves that flag's value as a stray argument, and the flag is the cause.
	args := ctx.Args().Slice()
	switch {
	case len(args) > maxArgs && strings.HasPrefix(args[maxArgs], "-"):
		return fmt.Errorf("%s: %q after the first argument is not read as a flag; put flags first (%s)", path, args[maxArgs], hint)
	case len(args) > maxArgs && maxArgs == 0:
		return fmt.Errorf("%s: unexpected argument %q: it takes no arguments (%s)", path, args[0], hint)
	case len(args) > maxArgs:
		return fmt.Errorf("%s: unexpected argument %q: it takes %s (%s)", path, args[maxArgs], ctx.Command.ArgsUsage, hint)
	case len(args) < minArgs:
		return fmt.Errorf("%s: missing %s (%s)", path, ctx.Command.ArgsUsage, hint)
	}
	for _, name := range required {
		if !ctx.IsSet(name) {
			return fmt.Errorf("%s: missing --%s (%s)", path, name, hint)
		}
	}
	return nil
}

// emptyFromEnv reports whether one of f's environment variables is set and
// empty.
func emptyFromEnv(f cli.Flag) bool {
	var envs []string
	switch f := f.(type) {
	case *cli.StringFlag:
		envs = f.EnvVars
	case *cli.PathFlag:
		envs = f.EnvVars
	case *cli.StringSliceFlag:
		envs = f.EnvVars
	}
	for _, e := range envs {
		if v, ok := os.LookupEnv(e); ok && v == "" {
			return true
		}
	}
	return false
}

// unrequire clears f's Required, reporting whether it was set, so that a
// missing flag is reported by checkInput in one line rather than by
// urfave/cli with the whole help text. Every urfave/cli flag type keeps it in
// a Required field.
func unrequire(f cli.Flag) bool {
	rf, ok := f.(cli.RequiredFlag)
	if !ok || !rf.IsRequired() {
		return false
	}
	reflect.ValueOf(f).Elem().FieldByName("Required").SetBool(false)
	return true
}

// argCounts reads a command's ArgsUsage: each word is one argument, "[X]" an
// optional one, "X..." any number (at least one unless bracketed).
func argCounts(usage string) (minArgs, maxArgs int) {
	for _, w := range strings.Fields(usage) {
		optional := strings.HasPrefix(w, "[")
		variadic := strings.HasSuffix(strings.TrimSuffix(w, "]"), "...")
		if !optional {
			minArgs++
		}
		if variadic {
			maxArgs = 1 << 20
		} else if maxArgs < 1<<20 {
			maxArgs++
		}
	}
	return minArgs, maxArgs
}

// usageError makes urfave/cli's flag errors one line with a hint.
func usageError(ctx *cli.Context, err error, _ bool) error {
	return fmt.Errorf("%s%v (see '%s --help')", commandPrefix(ctx), err, helpName(ctx))
}

// helpName is "ferry entry create" for the command ctx runs.
func helpName(ctx *cli.Context) string {
	if ctx.Command != nil && ctx.Command.HelpName != "" {
		return ctx.Command.HelpName
	}
	return "ferry"
}

// commandPrefix is "entry create: " for the command ctx runs, "" for ferry
// itself (main prefixes every error with "ferry: ").
func commandPrefix(ctx *cli.Context) string {
	if p := strings.TrimPrefix(helpName(ctx), "ferry"); p != "" {
		return strings.TrimSpace(p) + ": "
	}
	return ""
}

// unknownCommand is the action of the app and of every command that only
// groups others: with no argument it shows the help, else the argument is not
// one of its commands.
func unknownCommand(ctx *cli.Context) error {
	cmds := ctx.App.Commands
	if ctx.Command != nil && len(ctx.Command.Subcommands) > 0 {
		cmds = ctx.Command.Subcommands
	}
	if ctx.NArg() == 0 {
		if helpName(ctx) == ctx.App.HelpName {
			return cli.ShowAppHelp(ctx)
		}
		return cli.ShowSubcommandHelp(ctx)
	}
	var names []string
	for _, c := range cmds {
		if !c.Hidden && c.Name != "help" {
			names = append(names, c.Name)
		}
	}
	return fmt.Errorf("%sunknown command %q; commands: %s (see '%s --help')", commandPrefix(ctx), ctx.Args().First(), strings.Join(names, ", "), helpName(ctx))
}

// checked returns the action of flag name: it refuses a value check refuses,
// naming the command and the flag.
func checked(name string, check func(string) error) func(*cli.Context, string) error {
	return func(ctx *cli.Context, v string) error {
		if err := check(v); err != nil {
			return fmt.Errorf("%s--%s: %w (see '%s --help')", commandPrefix(ctx), name, err, helpName(ctx))
		}
		return nil
	}
}

// checkedSlice is checked for a repeatable flag: check sees every value.
func checkedSlice(name string, check func([]string) error) func(*cli.Context, []string) error {
	return func(ctx *cli.Context, vs []string) error {
		if err := check(vs); err != nil {
			return fmt.Errorf("%s--%s: %w (see '%s --help')", commandPrefix(ctx), name, err, helpName(ctx))
		}
		return nil
	}
}

// oneOf is a check accepting only choices.
func oneOf(choices ...string) func(string) error {
	return func(v string) error {
		if slices.Contains(choices, v) {
			return nil
		}
		return fmt.Errorf("%q: want %s", v, orList(choices))
	}
}

// choiceFlag is a string flag that takes one of choices (the first is the
// default), listed in its help.
func choiceFlag(name, usage string, choices ...string) *cli.StringFlag {
	return &cli.StringFlag{Name: name, Value: choices[0], Usage: usage + ": " + orList(choices), Action: checked(name, oneOf(choices...))}
}

// logLevelFlag is --log-level for commands that log to stderr.
func logLevelFlag() *cli.StringFlag {
	f := choiceFlag("log-level", "log level", logging.Levels...)
	f.Value = "info"
	return f
}

// requiredChoice is a required string flag that takes one of choices.
func requiredChoice(name, usage string, choices ...string) *cli.StringFlag {
	return &cli.StringFlag{Name: name, Required: true, Usage: usage + ": " + orList(choices), Action: checked(name, oneOf(choices...))}
}

// isGUID refuses what the server would not take as a GUID.
func isGUID(v string) error {
	if _, err := uuid.Parse(v); err != nil {
		return fmt.Errorf("%q is not a GUID", v)
	}
	return nil
}

// isTrustDomain refuses what is not a trust domain name (or spiffe://name).
func isTrustDomain(v string) error {
	if _, err := spiffeid.TrustDomainFromString(v); err != nil {
		return fmt.Errorf("%q is not a trust domain: %w", v, err)
	}
	return nil
}

// isSPIFFEID refuses what is not a SPIFFE ID in canonical form.
func isSPIFFEID(v string) error { return state.ValidateSPIFFEID(v) }

func orList(choices []string) string {
	switch len(choices) {
	case 0:
		return ""
	case 1:
		return choices[0]
	}
	return strings.Join(choices[:len(choices)-1], ", ") + " or " + choices[len(choices)-1]
}

func init() {
	outputFlag.Action = checked("output", oneOf("pretty", "json"))
}
