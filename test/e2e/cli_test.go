package e2e

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/test/testcluster"
)

// refusedBy runs `ferry args` against n and checks that it fails with one
// line naming the command and containing want.
func refusedBy(t *testing.T, n *testcluster.Node, want string, args ...string) {
	t.Helper()
	out, err := n.CLI(args...)
	require.Error(t, err, "ferry %s succeeded:\n%s", strings.Join(args, " "), out)
	out = strings.TrimSuffix(out, "\n")
	assert.NotContains(t, out, "\n", "one line: ferry %s", strings.Join(args, " "))
	cmd := strings.Join(args[:min(2, len(args))], " ")
	assert.True(t, strings.HasPrefix(out, "ferry: "+cmd+": "), "names the command: %q", out)
	assert.Contains(t, out, want, "ferry %s", strings.Join(args, " "))
}

// TestCLIRefusalsByServer is the table of what only the server can refuse
// (its trust domain, its attestors, what exists), through the real binary
// against a real server, and how the refusal reads. TestCLIRefusals (cmd/ferry)
// has what the CLI refuses on its own.
func TestCLIRefusalsByServer(t *testing.T) {
	if testing.Short() {
		t.Skip("real processes")
	}
	c := testcluster.New(t, testcluster.Options{Nodes: 1, LogLevel: "info"})
	s := c.WaitLeader(30*time.Second, nil)
	for _, args := range [][]string{
		{"identity", "create", "--name", "web-id"},
		{"resource", "create", "--name", "demo", "--identifier-uri", "api://demo", "--app-role", "reader"},
	} {
		out, err := s.CLI(args...)
		require.NoError(t, err, out)
	}
	const agent = "spiffe://example.org/spire/agent/n1"
	for _, r := range []struct {
		want string
		args []string
	}{
		{`InvalidArgument: invalid entry: spiffe_id: "spiffe://other.org/web" is not a member of trust domain "example.org"`,
			[]string{"entry", "create", "--spiffe-id", "spiffe://other.org/web", "--parent-id", "spiffe://other.org/spire/agent/n1", "--selector", "unix:uid:1000"}},
		{`InvalidArgument: invalid entry: selector: invalid selector "x509pop:subject:cn:node-1": the x509pop attestor is not enabled here; no enabled attestor produces node selectors`,
			[]string{"entry", "create", "--spiffe-id", "spiffe://example.org/alias", "--parent-id", "spiffe://example.org/spire/server", "--selector", "x509pop:subject:cn:node-1"}},
		{`NotFound: entry "nope" not found`, []string{"entry", "show", "--entry-id", "nope"}},
		{`InvalidArgument: spiffe_id: "spiffe://other.org/spire/agent/x" is not a member of trust domain "example.org"`,
			[]string{"token", "generate", "--spiffe-id", "spiffe://other.org/spire/agent/x"}},
		{"NotFound: ", []string{"agent", "show", "--spiffe-id", agent}},
		{`InvalidArgument: spiffe_id: "spiffe://other.org/x" is not a member of trust domain "example.org"`,
			[]string{"x509", "mint", "--spiffe-id", "spiffe://other.org/x"}},
		{`InvalidArgument: spiffe_id: "spiffe://other.org/x" is not a member of trust domain "example.org"`,
			[]string{"jwt", "mint", "--spiffe-id", "spiffe://other.org/x", "--audience", "a"}},
		{"InvalidArgument: example.org is this server's own trust domain", []string{"bundle", "delete", "--trust-domain", "example.org"}},
		{"NotFound: no identity with name nobody", []string{"identity", "show", "--name", "nobody"}},
		{`NotFound: no resource "api://none"`, []string{"resource", "show", "--resource", "api://none"}},
		{`NotFound: no resource "api://none"`, []string{"resource", "delete", "--resource", "api://none"}},
		{`NotFound: resource demo has no app role "writer"`, []string{"role", "assign", "--identity-name", "web-id", "--resource", "api://demo", "--role", "writer"}},
		{"NotFound: ", []string{"federation", "show", "--trust-domain", "other.org"}},
	} {
		refusedBy(t, s, r.want, r.args...)
	}
}

// TestAPIRefusesBadInput: the server is the authority. A client that does not
// go through the CLI gets the same refusals, as InvalidArgument with the same
// words.
func TestAPIRefusesBadInput(t *testing.T) {
	if testing.Short() {
		t.Skip("real processes")
	}
	c := testcluster.New(t, testcluster.Options{Nodes: 1, LogLevel: "info"})
	s := c.WaitLeader(30*time.Second, nil)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	admin := s.Admin()
	const agent = "spiffe://example.org/spire/agent/n1"
	sel := func(t, v string) []*ferrypb.Selector { return []*ferrypb.Selector{{Type: t, Value: v}} }

	entries := []struct {
		e    *ferrypb.Entry
		want string
	}{
		{&ferrypb.Entry{SpiffeId: "spiffe://other.org/x", ParentId: "spiffe://other.org/spire/agent/n1", Selectors: sel("unix", "uid:1")},
			`spiffe_id: "spiffe://other.org/x" is not a member of trust domain "example.org"`},
		{&ferrypb.Entry{SpiffeId: "spiffe://example.org/x", ParentId: "spiffe://other.org/spire/agent/n1", Selectors: sel("unix", "uid:1")},
			`parent_id: "spiffe://other.org/spire/agent/n1" is not a member of trust domain "example.org"`},
		{&ferrypb.Entry{SpiffeId: "spiffe://example.org/spire/agent/x", ParentId: agent, Selectors: sel("unix", "uid:1")},
			"paths under /spire/ are reserved for servers and agents"},
		{&ferrypb.Entry{SpiffeId: "spiffe://example.org/x", ParentId: agent, Selectors: sel("uid", "0")},
			`invalid selector "uid:0": unknown selector type; workload selectors are unix:uid:<uid>`},
		{&ferrypb.Entry{SpiffeId: "spiffe://example.org/x", ParentId: agent, Selectors: sel("unix", "uid:abc")},
			`invalid selector "unix:uid:abc": want unix:uid:<uid> (user ID of the process (all four of its uids), decimal)`},
		{&ferrypb.Entry{SpiffeId: "spiffe://example.org/x", ParentId: agent, Selectors: sel("Unix", "uid:1")},
			`type "Unix": character 'U' not in [a-z0-9_-]`},
		{&ferrypb.Entry{SpiffeId: "spiffe://example.org/x", ParentId: "spiffe://example.org/spire/server", Selectors: sel("unix", "uid:1")},
			"unix is a workload selector type, not a node one"},
		{&ferrypb.Entry{SpiffeId: "spiffe://example.org/x", ParentId: agent, Selectors: sel("unix", "uid:1"), DnsNames: []string{"a..b"}},
			`dns_names: "a..b" is not a DNS name`},
		{&ferrypb.Entry{SpiffeId: "spiffe://example.org/x", ParentId: agent, Selectors: sel("unix", "uid:1"), X509SvidTtl: -1},
			"ttl must not be negative"},
	}
	for _, tt := range entries {
		resp, err := admin.BatchCreateEntry(ctx, &ferrypb.BatchCreateEntryRequest{Entries: []*ferrypb.Entry{tt.e}})
		require.NoError(t, err)
		st := resp.Results[0]
		assert.Equal(t, codes.InvalidArgument.String(), codes.Code(st.GetCode()).String(), st.GetMessage())
		assert.Contains(t, st.GetMessage(), tt.want)
	}
	count, err := admin.CountEntries(ctx, &ferrypb.CountEntriesRequest{})
	require.NoError(t, err)
	assert.Zero(t, count.Count, "nothing was written")

	dir := ferrypb.NewDirectoryClient(dialAdmin(t, s))
	calls := []struct {
		name string
		call func() error
		want string
	}{
		{"list filter", func() error {
			_, err := admin.ListEntries(ctx, &ferrypb.ListEntriesRequest{BySpiffeId: "web"})
			return err
		}, "filter spiffe_id: scheme is missing or invalid"},
		{"list selector", func() error {
			_, err := admin.ListEntries(ctx, &ferrypb.ListEntriesRequest{BySelectors: sel("bogus", "thing:1")})
			return err
		}, `filter: selector: invalid selector "bogus:thing:1": unknown selector type`},
		{"page size", func() error {
			_, err := admin.ListEntries(ctx, &ferrypb.ListEntriesRequest{PageSize: -1})
			return err
		}, "page_size must be from 1 to 10000"},
		{"join token ID", func() error {
			_, err := admin.CreateJoinToken(ctx, &ferrypb.CreateJoinTokenRequest{SpiffeId: "spiffe://example.org/agent/node1", TtlSeconds: 60})
			return err
		}, `"spiffe://example.org/agent/node1" is not an agent ID: agent IDs are under spiffe://example.org/spire/agent/`},
		{"join token TTL", func() error {
			_, err := admin.CreateJoinToken(ctx, &ferrypb.CreateJoinTokenRequest{TtlSeconds: 0})
			return err
		}, "ttl must be between 1s and 168h0m0s"},
		{"log level", func() error {
			_, err := admin.SetLogLevel(ctx, &ferrypb.SetLogLevelRequest{Level: "loud"})
			return err
		}, `unknown level "loud" (want debug, info, warn or error)`},
		{"cluster address", func() error {
			_, err := admin.ClusterJoin(ctx, &ferrypb.ClusterJoinRequest{Address: "10.0.0.1"})
			return err
		}, `address "10.0.0.1": want host:port`},
		{"mint reserved ID", func() error {
			_, err := admin.MintJWTSVID(ctx, &ferrypb.MintJWTSVIDRequest{SpiffeId: "spiffe://example.org/spire/server", Audience: []string{"a"}})
			return err
		}, "paths under /spire/ are reserved"},
		{"identity kind", func() error {
			_, err := dir.CreateIdentity(ctx, &ferrypb.CreateIdentityRequest{Name: "web-id", Kind: "robot"})
			return err
		}, `identity kind "robot": want user-assigned or application`},
	}
	for _, tt := range calls {
		st := status.Convert(tt.call())
		assert.Equal(t, codes.InvalidArgument.String(), st.Code().String(), "%s: %s", tt.name, st.Message())
		assert.Contains(t, st.Message(), tt.want, tt.name)
	}
}

func dialAdmin(t *testing.T, n *testcluster.Node) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+n.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	return conn
}

// TestOperatorCommands drives the commands SPIRE's CLI has and ferry's gained
// (server info|validate|healthcheck, logger, agent and bundle counts, agent
// purge, agent validate|healthcheck, resource show|delete) against real
// processes.
func TestOperatorCommands(t *testing.T) {
	if testing.Short() {
		t.Skip("real processes")
	}
	c := testcluster.New(t, testcluster.Options{Nodes: 1, LogLevel: "info"})
	s := c.WaitLeader(30*time.Second, nil)
	cli := func(args ...string) string {
		t.Helper()
		out, err := s.CLI(args...)
		require.NoError(t, err, "ferry %s:\n%s", strings.Join(args, " "), out)
		return out
	}
	jsonOf := func(v any, args ...string) {
		t.Helper()
		out := cli(append(args, "--output", "json")...)
		require.NoError(t, json.Unmarshal([]byte(out), v), out)
	}

	t.Run("server", func(t *testing.T) {
		assert.Equal(t, s.Config+": valid\n", cli("server", "validate", "--config", s.Config))
		bad := filepath.Join(t.TempDir(), "server.conf")
		conf, err := os.ReadFile(s.Config)
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(bad, []byte(strings.Replace(string(conf), "node_id", "nodeid", 1)), 0o600))
		out, err := s.CLI("server", "validate", "--config", bad)
		require.Error(t, err)
		assert.Contains(t, out, "nodeid")

		assert.Equal(t, "server is healthy\n", cli("server", "healthcheck"))
		var info struct {
			NodeID      string   `json:"node_id"`
			TrustDomain string   `json:"trust_domain"`
			Version     string   `json:"version"`
			GoVersion   string   `json:"go_version"`
			RaftState   string   `json:"raft_state"`
			Leader      string   `json:"leader_id"`
			Ready       bool     `json:"ready"`
			Attestors   []string `json:"node_attestors"`
			Bundles     string   `json:"bundles"`
		}
		jsonOf(&info, "server", "info")
		assert.Equal(t, "s1", info.NodeID)
		assert.Equal(t, "example.org", info.TrustDomain)
		assert.Equal(t, "Leader", info.RaftState)
		assert.Equal(t, "s1", info.Leader)
		assert.True(t, info.Ready)
		assert.Equal(t, []string{"join_token"}, info.Attestors)
		assert.Equal(t, "1", info.Bundles)
		assert.NotEmpty(t, info.Version)
		assert.True(t, strings.HasPrefix(info.GoVersion, "go"), info.GoVersion)
		assert.Contains(t, cli("server", "info"), "Ready")
	})

	t.Run("logger", func(t *testing.T) {
		var l struct {
			Current string `json:"current_level"`
			Launch  string `json:"launch_level"`
		}
		jsonOf(&l, "logger", "get")
		assert.Equal(t, "info", l.Current)
		assert.Equal(t, "info", l.Launch)

		// At error, the Info line a mint writes is gone; reset brings it back.
		jsonOf(&l, "logger", "set", "--level", "error")
		assert.Equal(t, "error", l.Current)
		cli("jwt", "mint", "--spiffe-id", "spiffe://example.org/quiet", "--audience", "a")
		jsonOf(&l, "logger", "reset")
		assert.Equal(t, "info", l.Current)
		cli("jwt", "mint", "--spiffe-id", "spiffe://example.org/loud", "--audience", "a")
		logs := s.LogTail(200)
		assert.NotContains(t, logs, "spiffe://example.org/quiet")
		assert.Contains(t, logs, "spiffe://example.org/loud")
		assert.Contains(t, logs, `msg="log level changed"`)
		assert.Contains(t, logs, `from=info to=error`)
	})

	t.Run("counts and purge", func(t *testing.T) {
		a := c.StartAgent("ops")
		assert.Equal(t, "1 attested agents\n", cli("agent", "count"))
		assert.Equal(t, "1 bundles\n", cli("bundle", "count", "--consistent"))
		assert.Equal(t, "0 registration entries\n", cli("entry", "count"))
		// The agent's SVID is valid: nothing to purge, even with no grace.
		out := cli("agent", "purge", "--expired-for", "0s", "--dry-run")
		assert.Contains(t, out, "Would evict 0 agents")

		// The agent serves, with a valid SVID: healthy; stopped: not.
		out, err := s.CLI("agent", "healthcheck", "--socket", a.SocketAddr())
		require.NoError(t, err, out)
		assert.Equal(t, "agent is healthy\n", out)
		assert.Equal(t, a.Config+": valid\n", cli("agent", "validate", "--config", a.Config))
		a.Stop()
		out, err = s.CLI("agent", "healthcheck", "--socket", a.SocketAddr(), "--timeout", "2s")
		require.Error(t, err)
		assert.Contains(t, out, "ferry: agent healthcheck: agent is unhealthy: Unavailable")
	})

	t.Run("resource show and delete", func(t *testing.T) {
		cli("identity", "create", "--name", "web-id")
		cli("resource", "create", "--name", "demo", "--identifier-uri", "api://demo", "--app-role", "reader")
		cli("role", "assign", "--identity-name", "web-id", "--resource", "api://demo", "--role", "reader")
		var r struct {
			Name   string `json:"name"`
			AppID  string `json:"app_id"`
			ObjID  string `json:"object_id"`
			Values []struct {
				Value string `json:"value"`
			} `json:"app_roles"`
		}
		jsonOf(&r, "resource", "show", "--resource", "api://demo")
		assert.Equal(t, "demo", r.Name)
		require.Len(t, r.Values, 1)
		assert.Equal(t, "reader", r.Values[0].Value)
		assert.Contains(t, cli("resource", "show", "--resource", r.AppID), "api://demo", "by app ID too")

		assert.Contains(t, cli("resource", "delete", "--resource", "demo"), "Deleted resource demo ("+r.ObjID+") and its role assignments")
		out, err := s.CLI("resource", "show", "--resource", "api://demo")
		require.Error(t, err)
		assert.Contains(t, out, "NotFound")
		var roles struct {
			Assignments []any `json:"assignments"`
		}
		jsonOf(&roles, "role", "list", "--identity-name", "web-id")
		assert.Empty(t, roles.Assignments, "the resource's role assignments went with it")
	})

	t.Run("server healthcheck of a stopped server", func(t *testing.T) {
		s.Stop()
		out, err := s.CLI("server", "healthcheck", "--timeout", "2s")
		require.Error(t, err)
		assert.Contains(t, out, "ferry: server healthcheck: server is unhealthy: admin socket")
	})
}
