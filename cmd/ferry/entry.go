package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/ferry-id/ferry/proto/ferrypb"
)

func entryFlags(update bool) []cli.Flag {
	flags := []cli.Flag{
		&cli.StringFlag{Name: "entry-id", Usage: "entry ID (default: a new random one)", Required: update},
		&cli.StringFlag{Name: "spiffe-id", Usage: "SPIFFE ID the entry issues"},
		&cli.StringFlag{Name: "parent-id", Usage: "SPIFFE ID of the agent (or node alias) the entry is for"},
		&cli.StringSliceFlag{Name: "selector", Usage: "selector type:value (repeatable; all must match)"},
		&cli.StringFlag{Name: "x509-ttl", Usage: "X509-SVID lifetime (e.g. 1h, or seconds)"},
		&cli.StringFlag{Name: "jwt-ttl", Usage: "JWT-SVID lifetime (e.g. 5m, or seconds)"},
		&cli.StringSliceFlag{Name: "dns", Usage: "DNS name for the X509-SVID (repeatable)"},
		&cli.StringSliceFlag{Name: "federates-with", Usage: "trust domain whose bundle the workload receives (repeatable)"},
		&cli.StringFlag{Name: "hint", Usage: "hint to tell apart several SVIDs of one workload"},
		&cli.BoolFlag{Name: "admin", Usage: "the workload may use the admin API"},
		&cli.BoolFlag{Name: "downstream", Usage: "the workload is a downstream server"},
		&cli.Int64Flag{Name: "expires-at", Usage: "unix time after which the entry is no longer served"},
		&cli.BoolFlag{Name: "system-assigned-identity", Usage: "give the entry a system-assigned managed identity, created and deleted with it (update: =false deletes it with its role assignments; not given keeps it)"},
		&cli.StringFlag{Name: "identity-tenant", Usage: "tenant of the system-assigned identity (default: the only tenant)"},
		&cli.Int64Flag{Name: "revision", Usage: "update only if the entry still has this revision"},
		&cli.StringFlag{Name: "data", Usage: `JSON file {"entries":[...]} to create or update many entries at once ("-" for stdin)`},
		&cli.StringFlag{Name: "request-id", Usage: "idempotency key: retrying with the same ID applies once"},
	}
	return adminFlags(flags...)
}

func entryCommand() *cli.Command {
	return &cli.Command{
		Name:  "entry",
		Usage: "manage registration entries",
		Subcommands: []*cli.Command{
			{Name: "create", Usage: "create registration entries", Flags: entryFlags(false), Action: entryWrite(false)},
			{Name: "update", Usage: "replace registration entries by ID", Flags: entryFlags(true), Action: entryWrite(true)},
			{
				Name: "delete", Usage: "delete registration entries",
				Flags: adminFlags(
					&cli.StringSliceFlag{Name: "entry-id", Usage: "entry ID (repeatable)"},
					&cli.StringFlag{Name: "request-id", Usage: "idempotency key"},
				),
				Action: func(c *cli.Context) error {
					ids := c.StringSlice("entry-id")
					if len(ids) == 0 {
						return errors.New("--entry-id is required")
					}
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
				Flags: adminFlags(&cli.StringFlag{Name: "entry-id", Required: true}, &cli.BoolFlag{Name: "consistent", Usage: "linearizable read"}),
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
				Name: "list", Usage: "list entries",
				Flags: adminFlags(
					&cli.StringFlag{Name: "spiffe-id"}, &cli.StringFlag{Name: "parent-id"}, &cli.StringFlag{Name: "hint"},
					&cli.StringSliceFlag{Name: "selector", Usage: "entries having all of these selectors"},
					&cli.IntFlag{Name: "page-size", Value: 1000},
					&cli.BoolFlag{Name: "consistent", Usage: "linearizable read"},
				),
				Action: entryList,
			},
			{
				Name: "count", Usage: "count entries",
				Flags: adminFlags(&cli.BoolFlag{Name: "consistent", Usage: "linearizable read"}),
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
	return req.Entries, nil
}

func entryFromFlags(c *cli.Context) (*ferrypb.Entry, error) {
	e := &ferrypb.Entry{
		Id:            c.String("entry-id"),
		SpiffeId:      c.String("spiffe-id"),
		ParentId:      c.String("parent-id"),
		DnsNames:      c.StringSlice("dns"),
		FederatesWith: c.StringSlice("federates-with"),
		Hint:          c.String("hint"),
		Admin:         c.Bool("admin"),
		Downstream:    c.Bool("downstream"),
		ExpiresAt:     c.Int64("expires-at"),
		Revision:      uint64(c.Int64("revision")),

		SystemAssignedIdentity: c.Bool("system-assigned-identity"),
	}
	if e.SpiffeId == "" || e.ParentId == "" {
		return nil, errors.New("--spiffe-id and --parent-id are required (or --data FILE)")
	}
	for _, s := range c.StringSlice("selector") {
		typ, val, ok := strings.Cut(s, ":")
		if !ok || typ == "" || val == "" {
			return nil, fmt.Errorf("--selector %q: want type:value", s)
		}
		e.Selectors = append(e.Selectors, &ferrypb.Selector{Type: typ, Value: val})
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

// seconds reads a lifetime written as a Go duration ("1h30m") or in seconds.
func seconds(s string) (int32, error) {
	if s == "" {
		return 0, nil
	}
	if n, err := strconv.ParseInt(s, 10, 32); err == nil {
		return int32(n), nil
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		return 0, err
	}
	return int32(d / time.Second), nil
}

func printBatch(c *cli.Context, resp *ferrypb.BatchEntryResponse, ids []string) error {
	if jsonOutput(c) {
		return printJSON(c.App.Writer, resp)
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
		typ, val, ok := strings.Cut(s, ":")
		if !ok {
			return fmt.Errorf("--selector %q: want type:value", s)
		}
		sels = append(sels, &ferrypb.Selector{Type: typ, Value: val})
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
