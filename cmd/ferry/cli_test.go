package main

import (
	"bytes"
	"os"
	"runtime"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/urfave/cli/v2"

	"github.com/ferry-id/ferry/internal/buildinfo"
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

// refusal is one invocation the CLI must refuse before talking to anything,
// and words its refusal this way.
type refusal struct {
	args []string
	want string
}

// TestCLIRefusals is the table of what each command refuses on its own (the
// server's refusals are in test/e2e TestCLIRefusalsByServer) and how it says
// so: one line, naming the command, without contacting a server (there is
// none at FERRY_ADMIN_SOCKET).
func TestCLIRefusals(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("FERRY_ADMIN_SOCKET", dir+"/no-server.sock")
	t.Setenv("SPIFFE_ENDPOINT_SOCKET", "unix://"+dir+"/no-agent.sock")
	entryFile := dir + "/entries.json"
	require.NoError(t, os.WriteFile(entryFile, []byte(`{"entries":[{"spiffe_id":"spiffe://example.org/a","parent_id":"spiffe://example.org/spire/agent/n","selectors":[{"type":"unix","value":"uid:x"}]}]}`), 0o600))
	const (
		agent = "spiffe://example.org/spire/agent/n1"
		web   = "spiffe://example.org/web"
	)
	entry := func(extra ...string) []string {
		return append([]string{"entry", "create", "--spiffe-id", web, "--parent-id", agent}, extra...)
	}
	tables := map[string][]refusal{
		"ferry": {
			{[]string{"bogus"}, `unknown command "bogus"; commands: server, cluster, entry,`},
			{[]string{"--bogus"}, "flag provided but not defined: -bogus (see 'ferry --help')"},
		},
		"entry create": {
			{[]string{"entry", "create"}, "entry create: --spiffe-id, --parent-id (or --node) and --selector are required (or --data FILE)"},
			{[]string{"entry", "create", "--spiffe-id", web, "--node", "--parent-id", agent, "--selector", "x509pop:subject:cn:n1"},
				"entry create: --node and --parent-id are exclusive: a node alias's parent is the trust domain's server ID"},
			{[]string{"entry", "create", "--spiffe-id", web, "--node", "--selector", "unix:uid:0"},
				`unix is a workload selector type, not a node one; node selectors are x509pop:subject:cn:<common name>`},
			{entry("--selector", "uid:0"), `entry create: invalid entry: selector: invalid selector "uid:0": unknown selector type; workload selectors are unix:uid:<uid>, unix:user:<name>,`},
			{entry("--selector", "bogus:thing:1"), `invalid selector "bogus:thing:1": unknown selector type; workload selectors are unix:uid:<uid>`},
			{entry("--selector", "unix:uid:abc"), `invalid selector "unix:uid:abc": want unix:uid:<uid> (user ID of the process (all four of its uids), decimal): not a decimal number from 0 to 4294967295`},
			{entry("--selector", "unix:sha256:ABC"), `want unix:sha256:<hex> (SHA-256 of the executable, 64 lower-case hex digits): want 64 lower-case hex digits`},
			{entry("--selector", "systemd:id:web"), `want systemd:id:<unit> (unit the process runs in, e.g. nginx.service): not a systemd unit name`},
			{entry("--selector", "x509pop:subject:cn:n1"), `x509pop is a node selector type, not a workload one; workload selectors are unix:uid:<uid>`},
			{entry("--selector", "unix"), `selector: invalid selector: "unix": want type:value`},
			{[]string{"entry", "create", "--spiffe-id", web, "--parent-id", "spiffe://example.org/spire/server", "--selector", "unix:uid:0"},
				`unix is a workload selector type, not a node one; node selectors are x509pop:subject:cn:<common name>, x509pop:ca:fingerprint:<sha1 hex>,`},
			{[]string{"entry", "create", "--spiffe-id", web, "--parent-id", "spiffe://example.org/spire/server", "--selector", "unix:uid:0"},
				`sshpop:ca:<sha256 hex> (an entry parented on spiffe://example.org/spire/server is a node alias, keyed on node selectors)`},
			{[]string{"entry", "create", "--spiffe-id", "spiffe://example.org/spire/x", "--parent-id", agent, "--selector", "unix:uid:0"},
				`spiffe_id: "spiffe://example.org/spire/x" is not a workload ID: paths under /spire/ are reserved for servers and agents`},
			{[]string{"entry", "create", "--spiffe-id", "spiffe://other.org/x", "--parent-id", agent, "--selector", "unix:uid:0"},
				`parent_id "spiffe://example.org/spire/agent/n1" is not in the trust domain of spiffe_id "spiffe://other.org/x"`},
			{[]string{"entry", "create", "--spiffe-id", "web", "--parent-id", agent, "--selector", "unix:uid:0"}, "spiffe_id: scheme is missing or invalid"},
			{entry("--selector", "unix:uid:0", "--x509-ttl", "500ms"), `entry create: --x509-ttl: "500ms": whole seconds only`},
			{entry("--selector", "unix:uid:0", "--x509-ttl", "-5"), `--x509-ttl: "-5": a lifetime must be positive`},
			{entry("--selector", "unix:uid:0", "--jwt-ttl", "soon"), `--jwt-ttl: "soon" is not a duration (1h30m) or a number of seconds`},
			{entry("--selector", "unix:uid:0", "--jwt-ttl", "3000000000"), `--jwt-ttl: "3000000000": at most 2147483647 seconds`},
			{entry("--selector", "unix:uid:0", "--dns", "-bad.example.org"), `dns_names: "-bad.example.org" is not a DNS name`},
			{entry("--selector", "unix:uid:0", "--federates-with", "Other.Org"), `federates_with "Other.Org": trust domain characters are limited`},
			{entry("--selector", "unix:uid:0", "--federates-with", "example.org"), `federates_with "example.org": an entry always receives its own trust domain's bundle`},
			{entry("--selector", "unix:uid:0", "--revision", "-1"), "--revision must not be negative"},
			{entry("--selector", "unix:uid:0", "--hint", ""), "entry create: --hint has an empty value (see 'ferry entry create --help')"},
			{entry("--selector", "unix:uid:0", "--output", "yaml"), `entry create: --output: "yaml": want pretty or json (see 'ferry entry create --help')`},
			{entry("--selector", "unix:uid:0", "extra"), `entry create: unexpected argument "extra": it takes no arguments`},
			{entry("--selector"), "entry create: flag needs an argument: -selector (see 'ferry entry create --help')"},
			{entry("--selector", "--hint"), "entry create: --selector is missing its value (the next word, --hint, is a flag)"},
			{[]string{"entry", "create", "--data", entryFile, "--spiffe-id", web}, "--data and --spiffe-id do not go together"},
			{[]string{"entry", "create", "--data", entryFile}, `invalid selector "unix:uid:x": want unix:uid:<uid>`},
		},
		"entry update": {
			{[]string{"entry", "update", "--spiffe-id", web}, "entry update: missing --entry-id (see 'ferry entry update --help')"},
		},
		"entry delete": {
			{[]string{"entry", "delete"}, "entry delete: missing --entry-id (see 'ferry entry delete --help')"},
		},
		"entry show": {
			{[]string{"entry", "show"}, "entry show: missing --entry-id"},
			{[]string{"entry", "show", "e1"}, `entry show: unexpected argument "e1": it takes no arguments`},
			{[]string{"entry", "show", "e1", "--entry-id", "e1"}, `entry show: unexpected argument "e1"`},
		},
		"entry list": {
			{[]string{"entry", "list", "--selector", "uid:0"}, `filter: selector: invalid selector "uid:0": unknown selector type`},
			{[]string{"entry", "list", "--spiffe-id", "web"}, "filter spiffe_id: scheme is missing or invalid"},
			{[]string{"entry", "list", "--page-size", "0"}, "--page-size 0: want 1 to 10000"},
			{[]string{"entry", "list", "--page-size", "many"}, `entry list: invalid value "many" for flag -page-size`},
		},
		"entry count": {
			{[]string{"entry", "count", "all"}, `entry count: unexpected argument "all"`},
		},
		"token generate": {
			{[]string{"token", "generate", "--spiffe-id", "spiffe://example.org/agent/node1"},
				`token generate: spiffe_id: "spiffe://example.org/agent/node1" is not an agent ID: agent IDs are under spiffe://example.org/spire/agent/, e.g. spiffe://example.org/spire/agent/node1`},
			{[]string{"token", "generate", "--spiffe-id", "spiffe://example.org/spire/server"}, "is not an agent ID"},
			{[]string{"token", "generate", "--ttl", "0s"}, "token generate: --ttl 0s: want whole seconds from 1s to 168h0m0s"},
			{[]string{"token", "generate", "--ttl", "200h"}, "--ttl 200h0m0s: want whole seconds from 1s to 168h0m0s"},
		},
		"agent": {
			{[]string{"agent", "show"}, "agent show: missing --spiffe-id"},
			{[]string{"agent", "evict", "--spiffe-id", "node1"}, "agent evict: --spiffe-id: scheme is missing or invalid"},
			{[]string{"agent", "ban", "--spiffe-id", agent, "--unban=maybe"}, `agent ban: invalid boolean value "maybe" for -unban`},
			{[]string{"agent", "purge", "--expired-for", "-1h"}, "agent purge: --expired-for must not be negative"},
			{[]string{"agent", "count", "--consistent", "x"}, `agent count: unexpected argument "x"`},
			{[]string{"agent", "identity", "enable", agent, "--spiffe-id", agent}, `agent identity enable: "--spiffe-id" after the first argument is not read as a flag`},
			{[]string{"agent", "identity", "enable", agent, "extra"}, `agent identity enable: unexpected argument "extra": it takes [SPIFFE_ID]`},
			{[]string{"agent", "healthcheck", "--socket", "/run/api.sock"}, `agent healthcheck: --socket "/run/api.sock": want unix:///path`},
			{[]string{"agent", "validate", "--config", dir + "/none.conf"}, "agent validate: "},
		},
		"bundle": {
			{[]string{"bundle", "show", "--format", "der"}, `bundle show: --format: "der": want pem or spiffe`},
			{[]string{"bundle", "set", "--path", "b.pem"}, "bundle set: missing --trust-domain"},
			{[]string{"bundle", "delete", "--trust-domain", "Other Org"}, `bundle delete: --trust-domain: "Other Org" is not a trust domain`},
			{[]string{"bundle", "count", "extra"}, `bundle count: unexpected argument "extra"`},
		},
		"mint": {
			{[]string{"x509", "mint", "--spiffe-id", "spiffe://example.org/spire/agent/x"}, `x509 mint: spiffe_id: "spiffe://example.org/spire/agent/x" is not a workload ID`},
			{[]string{"x509", "mint", "--spiffe-id", web, "--ttl", "1500ms"}, "x509 mint: --ttl 1.5s: whole seconds only"},
			{[]string{"x509", "mint", "--spiffe-id", web, "--ttl", "800h"}, "x509 mint: ttl must be between 0 (the default) and 720h0m0s"},
			{[]string{"x509", "mint", "--spiffe-id", web, "--dns", "a..b"}, `x509 mint: --dns: "a..b" is not a DNS name`},
			{[]string{"jwt", "mint", "--spiffe-id", web}, "jwt mint: missing --audience"},
			{[]string{"jwt", "mint", "--spiffe-id", web, "--audience", "a\tb"}, `jwt mint: --audience: audience "a\tb" has a control character`},
		},
		"identity": {
			{[]string{"identity", "create", "--name", "ab"}, `identity create: identity name "ab" must be 3-128 characters`},
			{[]string{"identity", "create", "--name", "web", "--kind", "system-assigned"}, "identity create: a system-assigned identity is enabled on its owner, not created"},
			{[]string{"identity", "create", "--name", "web", "--kind", "robot"}, `identity create: identity kind "robot": want user-assigned or application`},
			{[]string{"identity", "create", "--name", "web", "--resource-id", "subscriptions/x"}, "resource_id must be an ARM-style path"},
			{[]string{"identity", "list", "--tenant", "t1"}, `identity list: --tenant: "t1" is not a GUID (see 'ferry identity list --help')`},
			{[]string{"identity", "show"}, "identity show: --name, --object-id or --client-id is required"},
			{[]string{"identity", "show", "--name", "web", "--client-id", "3f0b3a4e-8a0c-4a62-9a4e-1c1c4b2f9e10"}, "identity show: name the identity once"},
			{[]string{"identity", "federated-credential", "create", "--identity-name", "web", "--name", "cred-1", "--issuer", "http://oidc.example.org", "--subject", "s"},
				"identity federated-credential create: fic: invalid federated identity credential: issuer must be an https URL"},
			{[]string{"identity", "federated-credential", "create", "--identity-name", "web", "--name", "cred-1", "--issuer", "https://oidc.example.org"},
				"either subject or claims-matching expression is required"},
			{[]string{"identity", "federated-credential", "create", "--identity-name", "web", "--name", "cred-1", "--issuer", "https://oidc.example.org", "--subject", "s", "--audiences", "a", "--audiences", "b"},
				"exactly one audience, got 2"},
			{[]string{"identity", "federated-credential", "create", "--identity-name", "web", "--name", "cred-1", "--issuer", "https://oidc.example.org", "--claims-matching-expression", "claims['sub'] ~ 'x'"},
				"identity federated-credential create: fic: invalid federated identity credential: invalid claims-matching expression: fic: expression: offset 14: expected operator 'eq' or 'matches'"},
		},
		"tenant": {
			{[]string{"tenant", "create", "--name", " padded"}, "tenant create: name has leading or trailing whitespace"},
			{[]string{"tenant", "create", "--name", "t", "--tenant-id", "7"}, `tenant create: --tenant-id: "7" is not a GUID`},
		},
		"resource": {
			{[]string{"resource", "create", "--name", "api", "--identifier-uri", "ftp://x"}, `resource create: identifier URI "ftp://x": scheme must be api, https or urn`},
			{[]string{"resource", "create", "--name", "api", "--app-role", ".reader"}, `resource create: app role value ".reader" must be 1-120 printable ASCII characters`},
			{[]string{"resource", "create", "--name", "api", "--app-role", "r", "--app-role", "r"}, `app role value "r" is listed twice`},
			{[]string{"resource", "show"}, "resource show: missing --resource"},
			{[]string{"resource", "delete", "--resource", "api://x", "api://y"}, `resource delete: unexpected argument "api://y"`},
		},
		"role": {
			{[]string{"role", "assign", "--identity-name", "web", "--resource", "api://x"}, "role assign: missing --role"},
			{[]string{"role", "delete", "--id", "ra-1"}, `role delete: --id: "ra-1" is not a GUID`},
			{[]string{"role", "list", "--identity-name", "web", "--identity-object-id", "3f0b3a4e-8a0c-4a62-9a4e-1c1c4b2f9e10"}, "role list: name the identity once"},
		},
		"federation": {
			{[]string{"federation", "create", "--trust-domain", "other.org", "--bundle-endpoint-url", "http://other.org/bundle"}, `federation create: bundle_endpoint_url: "http://other.org/bundle" is not an https URL`},
			{[]string{"federation", "create", "--trust-domain", "other.org", "--bundle-endpoint-url", "https://other.org/bundle", "--bundle-endpoint-profile", "web"}, `federation create: --bundle-endpoint-profile: "web": want https_spiffe or https_web`},
			{[]string{"federation", "show", "--trust-domain", "Other"}, `federation show: --trust-domain: "Other" is not a trust domain`},
		},
		"cluster": {
			{[]string{"cluster", "join"}, "cluster join: missing ADDR (see 'ferry cluster join --help')"},
			{[]string{"cluster", "join", "10.0.0.1"}, `cluster join: address "10.0.0.1": want host:port`},
			{[]string{"cluster", "join", "10.0.0.1:0"}, `cluster join: address "10.0.0.1:0": want host:port with a port from 1 to 65535`},
			{[]string{"cluster", "remove"}, "cluster remove: missing ID"},
			{[]string{"cluster", "snapshot", "save"}, "cluster snapshot save: missing FILE"},
			{[]string{"cluster", "tls", "cert", "create", "--dns", "bad name"}, "cluster tls cert create: missing --node"},
			{[]string{"cluster", "tls", "cert", "create", "--node", "s1", "--dns", "bad name", "--dir", dir}, `cluster tls cert create: --dns: "bad name" is not a DNS name`},
		},
		"logger": {
			{[]string{"logger", "set"}, "logger set: missing --level"},
			{[]string{"logger", "set", "--level", "loud"}, `logger set: --level: "loud": want debug, info, warn or error`},
		},
		"server": {
			{[]string{"server", "validate", "--config", dir + "/none.conf"}, "server validate: "},
			{[]string{"server", "healthcheck", "now"}, `server healthcheck: unexpected argument "now"`},
			{[]string{"server", "bogus"}, `server: unknown command "bogus"; commands: run, validate, healthcheck, info`},
		},
		"api": {
			{[]string{"api", "fetch", "jwt"}, "api fetch jwt: missing --audience"},
			{[]string{"api", "fetch", "jwt", "--audience", "a", "--spiffe-id", "web"}, "api fetch jwt: --spiffe-id: scheme is missing or invalid"},
			{[]string{"api", "validate", "jwt", "--audience", "a"}, "api validate jwt: missing --svid"},
		},
		"demo-api": {
			{[]string{"demo-api", "--audience", "--role", "reader"}, "demo-api: --audience is missing its value (the next word, --role, is a flag)"},
			{[]string{"demo-api", "--log-level", "loud"}, `demo-api: --log-level: "loud": want debug, info, warn or error`},
		},
		"dev": {
			{[]string{"dev", "--trust-domain", ""}, "dev: --trust-domain has an empty value"},
		},
		"version": {
			{[]string{"version", "--short"}, "version: flag provided but not defined: -short"},
		},
	}
	for name, table := range tables {
		t.Run(name, func(t *testing.T) {
			for _, r := range table {
				out, errOut, err := run(t, r.args...)
				require.Error(t, err, "ferry %s", strings.Join(r.args, " "))
				msg := err.Error()
				assert.Contains(t, msg, r.want, "ferry %s", strings.Join(r.args, " "))
				assert.NotContains(t, msg, "\n", "one line: ferry %s", strings.Join(r.args, " "))
				assert.NotContains(t, msg, "is the server running", "refused before dialing: ferry %s", strings.Join(r.args, " "))
				assert.NotContains(t, out+errOut, "USAGE:", "no help page: ferry %s", strings.Join(r.args, " "))
			}
		})
	}
}

// TestVersion: ferry --version and ferry version print the build.
func TestVersion(t *testing.T) {
	out, _, err := run(t, "--version")
	require.NoError(t, err)
	assert.Equal(t, "ferry version "+buildinfo.Get().String()+"\n", out)
	assert.Contains(t, out, runtime.Version())
	out, _, err = run(t, "version")
	require.NoError(t, err)
	assert.Equal(t, buildinfo.Get().Lines(), out)
}

// TestEveryCommandRefusesStrayInput: every command, without exception,
// refuses an argument it does not take and an --output it cannot print, in
// one line naming it.
func TestEveryCommandRefusesStrayInput(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("FERRY_ADMIN_SOCKET", dir+"/no-server.sock")
	n := 0
	walk(newApp().Commands, "", func(name string, c *cli.Command) {
		if len(c.Subcommands) > 0 {
			return
		}
		n++
		path := strings.Fields(name)
		_, maxArgs := argCounts(c.ArgsUsage)
		args := append(path, make([]string, maxArgs+1)...)
		for i := len(path); i < len(args); i++ {
			args[i] = "stray"
		}
		_, _, err := run(t, args...)
		require.Error(t, err, "ferry %s", strings.Join(args, " "))
		assert.Contains(t, err.Error(), name+`: unexpected argument "stray"`)
		assert.NotContains(t, err.Error(), "\n")

		for _, f := range c.Flags {
			if f.Names()[0] != "output" {
				continue
			}
			_, _, err := run(t, append(path, "--output", "yaml")...)
			require.Error(t, err, "ferry %s --output yaml", name)
			// Required flags are checked first; either refusal will do, as
			// long as nothing is printed in the wrong format.
			if !strings.Contains(err.Error(), name+": missing ") {
				assert.Contains(t, err.Error(), name+`: --output: "yaml": want pretty or json`)
			}
		}
	})
	assert.Greater(t, n, 80, "every command was tried")
}
