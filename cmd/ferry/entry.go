package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"slices"
	"strconv"
	"text/tabwriter"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/urfave/cli/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/ferry-id/ferry/attestors/catalog"
	"github.com/ferry-id/ferry/internal/selector"
	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/api"
	"github.com/ferry-id/ferry/server/ca"
)

func entryFlags(update bool) []cli.Flag {
	flags := []cli.Flag{
		&cli.StringFlag{Name: "entry-id", Usage: "entry ID (default: a new random one)", Required: update},
		&cli.StringFlag{Name: "spiffe-id", Usage: "SPIFFE ID the entry issues, in the server's trust domain, not under /spire/"},
		&cli.StringFlag{Name: "parent-id", Usage: "SPIFFE ID of the agent (or node alias) the entry is for; spiffe://TD/spire/server makes the entry a node alias"},
		&cli.BoolFlag{Name: "node", Usage: "the entry is a node alias: agents whose node selectors all match get the entries parented on its SPIFFE ID (sets the parent to spiffe://TD/spire/server; instead of --parent-id)"},
		&cli.StringSliceFlag{Name: "selector", Usage: "selector type:value (repeatable; all must match; the forms are listed below)"},
		&cli.StringFlag{Name: "x509-ttl", Usage: "X509-SVID lifetime: a duration (1h) or seconds (default: the server's)"},
		&cli.StringFlag{Name: "jwt-ttl", Usage: "JWT-SVID lifetime: a duration (5m) or seconds (default: the server's)"},
		&cli.StringSliceFlag{Name: "dns", Usage: "DNS name for the X509-SVID (repeatable; the first is also its subject CN)"},
		&cli.StringSliceFlag{Name: "federates-with", Usage: "another trust domain whose bundle the workload receives (repeatable)"},
		&cli.StringFlag{Name: "hint", Usage: "hint to tell apart several SVIDs of one workload"},
		&cli.BoolFlag{Name: "admin", Usage: "the workload may use the admin API"},
		&cli.BoolFlag{Name: "downstream", Usage: "the workload is a downstream server"},
		&cli.Int64Flag{Name: "expires-at", Usage: "unix time after which the entry is no longer served"},
		&cli.BoolFlag{Name: "system-assigned-identity", Usage: "give the entry a system-assigned managed identity, created and deleted with it (update: =false deletes it with its role assignments; not given keeps it)"},
		&cli.StringFlag{Name: "identity-tenant", Usage: "tenant of the system-assigned identity (default: the only tenant)"},
		&cli.Int64Flag{Name: "revision", Usage: "update only if the entry still has this revision"},
		&cli.StringFlag{Name: "data", Usage: `JSON file {"entries":[...]} to create or update many entries at once ("-" for stdin), instead of the entry flags`},
		&cli.StringFlag{Name: "request-id", Usage: "idempotency key: retrying with the same ID applies once"},
	}
	return adminFlags(flags...)
}

// selectorHelp lists the selector forms, for the help of the entry commands.
func selectorHelp() string {
	reg := catalog.Selectors()
	return "Workload selectors (entries parented on an agent, or on a node alias's SPIFFE ID):\n" +
		reg.Help(selector.Workload) +
		"\nNode selectors (node aliases: entries parented on spiffe://TD/spire/server),\n" +
		"each accepted when the server runs its node attestor:\n" +
		reg.Help(selector.Node)
}

func entryCommand() *cli.Command {
	return &cli.Command{
		Name:  "entry",
		Usage: "manage registration entries",
		Subcommands: []*cli.Command{
			{Name: "create", Usage: "create registration entries", Flags: entryFlags(false), Action: entryWrite(false), Description: selectorHelp()},
			{Name: "update", Usage: "replace registration entries by ID", Flags: entryFlags(true), Action: entryWrite(true), Description: selectorHelp()},
			{
				Name: "delete", Usage: "delete registration entries",
				Flags: adminFlags(
					&cli.StringSliceFlag{Name: "entry-id", Usage: "entry ID (repeatable)", Required: true},
					&cli.StringFlag{Name: "request-id", Usage: "idempotency key: retrying with the same ID applies once"},
				),
				Action: func(c *cli.Context) error {
					ids := c.StringSlice("entry-id")
					return withAdmin(c, func(ctx context.Context, a ferrypb.AdminClient) error {
						resp, err := a.BatchDeleteEntry(ctx, &ferrypb.BatchDeleteEntryRequest{Ids: ids, RequestId: c.String("request-id")})
						if err != nil {
							return err
						}
						return printBatch(c, resp, ids)
					})
				},
			},
			{
				Name: "show", Usage: "show one entry",
				Flags: adminFlags(&cli.StringFlag{Name: "entry-id", Required: true, Usage: "ID of the entry"}, consistentFlag),
				Action: func(c *cli.Context) error {
					return withAdmin(c, func(ctx context.Context, a ferrypb.AdminClient) error {
						e, err := a.GetEntry(ctx, &ferrypb.GetEntryRequest{Id: c.String("entry-id"), Consistency: consistency(c)})
						if err != nil {
							return err
						}
						if jsonOutput(c) {
							return printJSON(c.App.Writer, e)
						}
						printEntry(c.App.Writer, e)
						return nil
					})
				},
			},
			{
				Name: "list", Usage: "list entries", Description: selectorHelp(),
				Flags: adminFlags(
					&cli.StringFlag{Name: "spiffe-id", Usage: "only entries issuing this SPIFFE ID"},
					&cli.StringFlag{Name: "parent-id", Usage: "only entries parented on this SPIFFE ID"},
					&cli.StringFlag{Name: "hint", Usage: "only entries with this hint"},
					&cli.StringSliceFlag{Name: "selector", Usage: "only entries having all of these selectors (type:value, repeatable)"},
					&cli.IntFlag{Name: "page-size", Value: 1000, Usage: fmt.Sprintf("entries per request to the server (1 to %d)", api.MaxPageSize)},
					consistentFlag,
				),
				Action: entryList,
			},
			{
				Name: "count", Usage: "count entries",
				Flags: adminFlags(consistentFlag),
				Action: func(c *cli.Context) error {
					return withAdmin(c, func(ctx context.Context, a ferrypb.AdminClient) error {
						resp, err := a.CountEntries(ctx, &ferrypb.CountEntriesRequest{Consistency: consistency(c)})
						if err != nil {
							return err
						}
						if jsonOutput(c) {
							return printJSON(c.App.Writer, resp)
						}
						fmt.Fprintf(c.App.Writer, "%d registration entries\n", resp.Count)
						return nil
					})
				},
			},
		},
	}
}

var consistentFlag = &cli.BoolFlag{Name: "consistent", Usage: "linearizable read: see every write acknowledged before the command (a round trip to the leader)"}

func consistency(c *cli.Context) ferrypb.ReadConsistency {
	if c.Bool("consistent") {
		return ferrypb.ReadConsistency_READ_LINEARIZABLE
	}
	return ferrypb.ReadConsistency_READ_LOCAL
}

func entryWrite(update bool) cli.ActionFunc {
	return func(c *cli.Context) error {
		var entries []*ferrypb.Entry
		if path := c.String("data"); path != "" {
			for _, f := range entryFlags(update) {
				if n := f.Names()[0]; c.IsSet(n) && !slices.Contains([]string{"data", "request-id", "identity-tenant", "socket", "output", "timeout"}, n) {
					return fmt.Errorf("--data and --%s do not go together: the file holds the entries", n)
				}
			}
			var err error
			if entries, err = readEntries(path, c.App.Reader); err != nil {
				return err
			}
		} else {
			e, err := entryFromFlags(c)
			if err != nil {
				return err
			}
			entries = []*ferrypb.Entry{e}
		}
		// The server checks the same (and the trust domain, which only it
		// knows); checking here first names the flag at fault.
		for i, e := range entries {
			if update && e.GetId() == "" {
				return fmt.Errorf("entry %d: an update needs the entry ID", i)
			}
			if err := (api.EntryRules{}).Check(e); err != nil {
				if len(entries) == 1 {
					return fmt.Errorf("invalid entry: %w", err)
				}
				return fmt.Errorf("entry %d %s: invalid entry: %w", i, e.GetId(), err)
			}
		}
		keep := update && c.String("data") == "" && !c.IsSet("system-assigned-identity")
		tenant := c.String("identity-tenant")
		return withAdmin(c, func(ctx context.Context, a ferrypb.AdminClient) error {
			if keep {
				// An update from flags keeps the entry's identity unless the
				// flag says otherwise: replacing it would delete its roles.
				old, err := a.GetEntry(ctx, &ferrypb.GetEntryRequest{Id: entries[0].Id})
				if err != nil {
					return err
				}
				entries[0].SystemAssignedIdentity = old.SystemAssignedIdentity
			}
			var resp *ferrypb.BatchEntryResponse
			var err error
			if update {
				resp, err = a.BatchUpdateEntry(ctx, &ferrypb.BatchUpdateEntryRequest{Entries: entries, RequestId: c.String("request-id"), IdentityTenantId: tenant})
			} else {
				resp, err = a.BatchCreateEntry(ctx, &ferrypb.BatchCreateEntryRequest{Entries: entries, RequestId: c.String("request-id"), IdentityTenantId: tenant})
			}
			if err != nil {
				return err
			}
			ids := make([]string, len(entries))
			for i, e := range entries {
				ids[i] = e.Id
			}
			return printBatch(c, resp, ids)
		})
	}
}

func readEntries(path string, stdin io.Reader) ([]*ferrypb.Entry, error) {
	var data []byte
	var err error
	if path == "-" {
		data, err = io.ReadAll(stdin)
	} else {
		data, err = os.ReadFile(path)
	}
	if err != nil {
		return nil, err
	}
	var req ferrypb.BatchCreateEntryRequest
	if err := (protojson.UnmarshalOptions{}).Unmarshal(data, &req); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if len(req.Entries) == 0 {
		return nil, fmt.Errorf(`%s: no entries (want {"entries":[...]})`, path)
	}
	return req.Entries, nil
}

func entryFromFlags(c *cli.Context) (*ferrypb.Entry, error) {
	if c.Bool("node") && c.IsSet("parent-id") {
		return nil, errors.New("--node and --parent-id are exclusive: a node alias's parent is the trust domain's server ID")
	}
	if !c.IsSet("spiffe-id") || !(c.IsSet("parent-id") || c.Bool("node")) || !c.IsSet("selector") {
		return nil, errors.New("--spiffe-id, --parent-id (or --node) and --selector are required (or --data FILE)")
	}
	parent := c.String("parent-id")
	if c.Bool("node") {
		id, err := spiffeid.FromString(c.String("spiffe-id"))
		if err != nil {
			return nil, fmt.Errorf("--spiffe-id: %w", err)
		}
		parent = spiffeid.RequireFromPath(id.TrustDomain(), ca.ServerPath).String()
	}
	if c.Int64("revision") < 0 {
		return nil, errors.New("--revision must not be negative")
	}
	e := &ferrypb.Entry{
		Id:            c.String("entry-id"),
		SpiffeId:      c.String("spiffe-id"),
		ParentId:      parent,
		DnsNames:      c.StringSlice("dns"),
		FederatesWith: c.StringSlice("federates-with"),
		Hint:          c.String("hint"),
		Admin:         c.Bool("admin"),
		Downstream:    c.Bool("downstream"),
		ExpiresAt:     c.Int64("expires-at"),
		Revision:      uint64(c.Int64("revision")),

		SystemAssignedIdentity: c.Bool("system-assigned-identity"),
	}
	for _, s := range c.StringSlice("selector") {
		sel, err := selector.Parse(s)
		if err != nil {
			return nil, fmt.Errorf("--selector: %w", err)
		}
		e.Selectors = append(e.Selectors, sel)
	}
	var err error
	if e.X509SvidTtl, err = seconds(c.String("x509-ttl")); err != nil {
		return nil, fmt.Errorf("--x509-ttl: %w", err)
	}
	if e.JwtSvidTtl, err = seconds(c.String("jwt-ttl")); err != nil {
		return nil, fmt.Errorf("--jwt-ttl: %w", err)
	}
	return e, nil
}

// seconds reads a lifetime written as a Go duration ("1h30m") or in whole
// seconds; "" is 0, the server's default.
func seconds(s string) (int32, error) {
	if s == "" {
		return 0, nil
	}
	d, err := time.ParseDuration(s)
	if n, nerr := strconv.ParseInt(s, 10, 64); nerr == nil {
		d, err = time.Duration(n)*time.Second, nil
		if n > math.MaxInt32 || n < math.MinInt32 {
			d = math.MaxInt64
		}
	}
	switch {
	case err != nil:
		return 0, fmt.Errorf("%q is not a duration (1h30m) or a number of seconds", s)
	case d <= 0:
		return 0, fmt.Errorf("%q: a lifetime must be positive (leave it out for the server's default)", s)
	case d/time.Second > math.MaxInt32:
		return 0, fmt.Errorf("%q: at most %d seconds", s, math.MaxInt32)
	case d%time.Second != 0:
		return 0, fmt.Errorf("%q: whole seconds only", s)
	}
	return int32(d / time.Second), nil
}

func printBatch(c *cli.Context, resp *ferrypb.BatchEntryResponse, ids []string) error {
	if jsonOutput(c) {
		return printJSON(c.App.Writer, resp)
	}
	if len(resp.Results) == 1 && codes.Code(resp.Results[0].GetCode()) != codes.OK {
		// One entry: its refusal is the command's error.
		st := resp.Results[0]
		return fmt.Errorf("%s: %s", codes.Code(st.GetCode()), st.GetMessage())
	}
	failed := 0
	for i, st := range resp.Results {
		if codes.Code(st.GetCode()) != codes.OK {
			failed++
			id := ""
			if i < len(ids) {
				id = ids[i]
			}
			fmt.Fprintf(c.App.ErrWriter, "entry %d %s: %s: %s\n", i, id, codes.Code(st.GetCode()), st.GetMessage())
			continue
		}
		if len(resp.Results) <= 20 && i < len(resp.Entries) && resp.Entries[i] != nil {
			printEntry(c.App.Writer, resp.Entries[i])
		}
	}
	if len(resp.Results) > 20 {
		fmt.Fprintf(c.App.Writer, "%d succeeded, %d failed (index %d)\n", len(resp.Results)-failed, failed, resp.Index)
	}
	for _, i := range resp.Identities {
		fmt.Fprintf(c.App.Writer, "System-assigned identity %s of entry %s: principal ID %s, client ID %s\n", i.Name, i.OwnerEntryId, i.ObjectId, i.ClientId)
	}
	if failed > 0 {
		return fmt.Errorf("%d of %d failed", failed, len(resp.Results))
	}
	return nil
}

func printEntry(w io.Writer, e *ferrypb.Entry) {
	tw := tabwriter.NewWriter(w, 0, 4, 1, ' ', 0)
	fmt.Fprintf(tw, "Entry ID\t: %s\n", e.Id)
	fmt.Fprintf(tw, "SPIFFE ID\t: %s\n", e.SpiffeId)
	fmt.Fprintf(tw, "Parent ID\t: %s\n", e.ParentId)
	fmt.Fprintf(tw, "Revision\t: %d\n", e.Revision)
	if e.X509SvidTtl != 0 {
		fmt.Fprintf(tw, "X509-SVID TTL\t: %s\n", time.Duration(e.X509SvidTtl)*time.Second)
	}
	if e.JwtSvidTtl != 0 {
		fmt.Fprintf(tw, "JWT-SVID TTL\t: %s\n", time.Duration(e.JwtSvidTtl)*time.Second)
	}
	for _, s := range e.Selectors {
		fmt.Fprintf(tw, "Selector\t: %s:%s\n", s.Type, s.Value)
	}
	for _, d := range e.DnsNames {
		fmt.Fprintf(tw, "DNS name\t: %s\n", d)
	}
	for _, td := range e.FederatesWith {
		fmt.Fprintf(tw, "FederatesWith\t: %s\n", td)
	}
	if e.Hint != "" {
		fmt.Fprintf(tw, "Hint\t: %s\n", e.Hint)
	}
	if e.Admin {
		fmt.Fprintf(tw, "Admin\t: true\n")
	}
	if e.Downstream {
		fmt.Fprintf(tw, "Downstream\t: true\n")
	}
	if e.SystemAssignedIdentity {
		fmt.Fprintf(tw, "System-assigned identity\t: enabled\n")
	}
	if e.ExpiresAt != 0 {
		fmt.Fprintf(tw, "Expires at\t: %s\n", time.Unix(e.ExpiresAt, 0).UTC().Format(time.RFC3339))
	}
	tw.Flush()
	fmt.Fprintln(w)
}

func entryList(c *cli.Context) error {
	var sels []*ferrypb.Selector
	for _, s := range c.StringSlice("selector") {
		sel, err := selector.Parse(s)
		if err != nil {
			return fmt.Errorf("--selector: %w", err)
		}
		sels = append(sels, sel)
	}
	if n := c.Int("page-size"); n < 1 || n > api.MaxPageSize {
		return fmt.Errorf("--page-size %d: want 1 to %d", n, api.MaxPageSize)
	}
	if err := (api.EntryRules{}).CheckFilter(c.String("spiffe-id"), c.String("parent-id"), sels); err != nil {
		return err
	}
	return withAdmin(c, func(ctx context.Context, a ferrypb.AdminClient) error {
		req := &ferrypb.ListEntriesRequest{
			BySpiffeId: c.String("spiffe-id"), ByParentId: c.String("parent-id"), ByHint: c.String("hint"),
			BySelectors: sels, PageSize: int32(c.Int("page-size")), Consistency: consistency(c),
		}
		var all []*ferrypb.Entry
		for {
			resp, err := a.ListEntries(ctx, req)
			if err != nil {
				return err
			}
			all = append(all, resp.Entries...)
			if resp.NextPageToken == "" {
				break
			}
			req.PageToken = resp.NextPageToken
			// Later pages must come from the same node state: reading them
			// linearizably again would be wasted round trips.
			req.Consistency = ferrypb.ReadConsistency_READ_LOCAL
		}
		if jsonOutput(c) {
			return printJSON(c.App.Writer, &ferrypb.ListEntriesResponse{Entries: all})
		}
		fmt.Fprintf(c.App.Writer, "Found %d entries\n", len(all))
		for _, e := range all {
			printEntry(c.App.Writer, e)
		}
		return nil
	})
}
