package main

import (
	"context"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/urfave/cli/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/api"
	"github.com/ferry-id/ferry/server/ca"
)

func tokenCommand() *cli.Command {
	return &cli.Command{
		Name:  "token",
		Usage: "join tokens for agent attestation",
		Subcommands: []*cli.Command{{
			Name:  "generate",
			Usage: "create a one-time join token",
			Flags: adminFlags(
				&cli.StringFlag{Name: "spiffe-id", Usage: "agent SPIFFE ID the token attests to, under spiffe://TD/spire/agent/ (default: spiffe://TD/spire/agent/join_token/<token hash>)"},
				&cli.DurationFlag{Name: "ttl", Value: 10 * time.Minute, Usage: "how long the token stays usable (1s to 168h)"},
			),
			Action: func(c *cli.Context) error {
				if id := c.String("spiffe-id"); id != "" {
					if err := api.CheckJoinTokenID(spiffeid.TrustDomain{}, id); err != nil {
						return err
					}
				}
				if ttl := c.Duration("ttl"); ttl < time.Second || ttl%time.Second != 0 || ttl > api.MaxJoinTokenTTL {
					return fmt.Errorf("--ttl %s: want whole seconds from 1s to %s", ttl, api.MaxJoinTokenTTL)
				}
				return withAdmin(c, func(ctx context.Context, a ferrypb.AdminClient) error {
					resp, err := a.CreateJoinToken(ctx, &ferrypb.CreateJoinTokenRequest{SpiffeId: c.String("spiffe-id"), TtlSeconds: int64(c.Duration("ttl") / time.Second)})
					if err != nil {
						return err
					}
					if jsonOutput(c) {
						return printJSON(c.App.Writer, resp)
					}
					fmt.Fprintf(c.App.Writer, "Token: %s\nExpires: %s\n", resp.Token, time.Unix(resp.ExpiresAt, 0).UTC().Format(time.RFC3339))
					return nil
				})
			},
		}},
	}
}

func agentIDFlag() cli.Flag {
	return &cli.StringFlag{Name: "spiffe-id", Required: true, Usage: "the agent's SPIFFE ID", Action: checked("spiffe-id", isSPIFFEID)}
}

func agentAdminCommands() []*cli.Command {
	printNode := func(c *cli.Context, n *ferrypb.AttestedNode) error {
		if jsonOutput(c) {
			return printJSON(c.App.Writer, n)
		}
		tw := tabwriter.NewWriter(c.App.Writer, 0, 4, 1, ' ', 0)
		fmt.Fprintf(tw, "SPIFFE ID\t: %s\n", n.SpiffeId)
		fmt.Fprintf(tw, "Attestation type\t: %s\n", n.AttestationType)
		fmt.Fprintf(tw, "Serial\t: %s\n", n.CertSerial)
		if n.CertNotAfter != 0 {
			fmt.Fprintf(tw, "SVID expires\t: %s\n", time.Unix(n.CertNotAfter, 0).UTC().Format(time.RFC3339))
		}
		fmt.Fprintf(tw, "Banned\t: %t\n", n.Banned)
		if n.SystemAssignedIdentity {
			fmt.Fprintf(tw, "System-assigned identity\t: enabled\n")
		}
		for _, s := range n.Selectors {
			fmt.Fprintf(tw, "Selector\t: %s:%s\n", s.Type, s.Value)
		}
		tw.Flush()
		fmt.Fprintln(c.App.Writer)
		return nil
	}
	return []*cli.Command{
		agentIdentityCommand(),
		{
			Name: "list", Usage: "list attested agents", Flags: adminFlags(),
			Action: func(c *cli.Context) error {
				return withAdmin(c, func(ctx context.Context, a ferrypb.AdminClient) error {
					resp, err := a.ListAgents(ctx, &ferrypb.ListAgentsRequest{})
					if err != nil {
						return err
					}
					if jsonOutput(c) {
						return printJSON(c.App.Writer, resp)
					}
					fmt.Fprintf(c.App.Writer, "Found %d attested agents\n\n", len(resp.Agents))
					for _, n := range resp.Agents {
						if err := printNode(c, n); err != nil {
							return err
						}
					}
					return nil
				})
			},
		},
		{
			Name: "count", Usage: "count attested agents", Flags: adminFlags(consistentFlag),
			Action: func(c *cli.Context) error {
				return withAdmin(c, func(ctx context.Context, a ferrypb.AdminClient) error {
					resp, err := a.CountAgents(ctx, &ferrypb.CountAgentsRequest{Consistency: consistency(c)})
					if err != nil {
						return err
					}
					if jsonOutput(c) {
						return printJSON(c.App.Writer, resp)
					}
					fmt.Fprintf(c.App.Writer, "%d attested agents\n", resp.Count)
					return nil
				})
			},
		},
		{
			Name:  "purge",
			Usage: "evict agents whose SVID expired more than --expired-for ago (banned agents stay banned)",
			Flags: adminFlags(
				&cli.DurationFlag{Name: "expired-for", Value: 30 * 24 * time.Hour, Usage: "how long an agent's SVID must have been expired"},
				&cli.BoolFlag{Name: "dry-run", Usage: "list the agents that would be evicted, evict none"},
			),
			Action: agentPurge,
		},
		{
			Name: "show", Usage: "show one agent", Flags: adminFlags(agentIDFlag()),
			Action: func(c *cli.Context) error {
				return withAdmin(c, func(ctx context.Context, a ferrypb.AdminClient) error {
					n, err := a.GetAgent(ctx, &ferrypb.GetAgentRequest{SpiffeId: c.String("spiffe-id")})
					if err != nil {
						return err
					}
					return printNode(c, n)
				})
			},
		},
		{
			Name: "evict", Usage: "forget an agent: its SVID stops working and it must attest again", Flags: adminFlags(agentIDFlag()),
			Action: func(c *cli.Context) error {
				return withAdmin(c, func(ctx context.Context, a ferrypb.AdminClient) error {
					n, err := a.EvictAgent(ctx, &ferrypb.EvictAgentRequest{SpiffeId: c.String("spiffe-id")})
					if err != nil {
						return err
					}
					if jsonOutput(c) {
						return printJSON(c.App.Writer, n)
					}
					fmt.Fprintln(c.App.Writer, "evicted", c.String("spiffe-id"))
					return nil
				})
			},
		},
		{
			Name: "ban", Usage: "refuse an agent's SVID and any new attestation (--unban lifts it)",
			Flags: adminFlags(agentIDFlag(), &cli.BoolFlag{Name: "unban", Usage: "lift the ban instead"}),
			Action: func(c *cli.Context) error {
				return withAdmin(c, func(ctx context.Context, a ferrypb.AdminClient) error {
					n, err := a.BanAgent(ctx, &ferrypb.BanAgentRequest{SpiffeId: c.String("spiffe-id"), Unban: c.Bool("unban")})
					if err != nil {
						return err
					}
					if jsonOutput(c) {
						return printJSON(c.App.Writer, n)
					}
					if c.Bool("unban") {
						fmt.Fprintln(c.App.Writer, "unbanned", c.String("spiffe-id"))
					} else {
						fmt.Fprintln(c.App.Writer, "banned", c.String("spiffe-id"))
					}
					return nil
				})
			},
		},
	}
}

// agentPurge evicts the agents whose SVIDs expired long ago (as SPIRE's
// agent purge): they can only come back by attesting again.
func agentPurge(c *cli.Context) error {
	if c.Duration("expired-for") < 0 {
		return errors.New("--expired-for must not be negative")
	}
	cutoff := time.Now().Add(-c.Duration("expired-for"))
	return withAdmin(c, func(ctx context.Context, a ferrypb.AdminClient) error {
		resp, err := a.ListAgents(ctx, &ferrypb.ListAgentsRequest{})
		if err != nil {
			return err
		}
		var purged []*ferrypb.AttestedNode
		for _, n := range resp.Agents {
			notAfter := max(n.CertNotAfter, n.NewCertNotAfter)
			if n.Banned || notAfter == 0 || !time.Unix(notAfter, 0).Before(cutoff) {
				continue
			}
			if !c.Bool("dry-run") {
				if _, err := a.EvictAgent(ctx, &ferrypb.EvictAgentRequest{SpiffeId: n.SpiffeId}); err != nil && status.Code(err) != codes.NotFound {
					return fmt.Errorf("evict %s: %w", n.SpiffeId, err)
				}
			}
			purged = append(purged, n)
		}
		if jsonOutput(c) {
			return printJSON(c.App.Writer, &ferrypb.ListAgentsResponse{Agents: purged})
		}
		verb := "Evicted"
		if c.Bool("dry-run") {
			verb = "Would evict"
		}
		fmt.Fprintf(c.App.Writer, "%s %d agents whose SVID expired before %s\n", verb, len(purged), cutoff.UTC().Format(time.RFC3339))
		for _, n := range purged {
			fmt.Fprintf(c.App.Writer, "  %s (expired %s)\n", n.SpiffeId, time.Unix(max(n.CertNotAfter, n.NewCertNotAfter), 0).UTC().Format(time.RFC3339))
		}
		return nil
	})
}

func bundleCommand() *cli.Command {
	format := choiceFlag("format", "bundle format (spiffe: the SPIFFE bundle JWKS)", "pem", "spiffe")
	show := func(c *cli.Context, b *ferrypb.Bundle) error {
		if jsonOutput(c) {
			return printJSON(c.App.Writer, b)
		}
		switch c.String("format") {
		case "pem":
			for _, a := range b.X509Authorities {
				if err := pem.Encode(c.App.Writer, &pem.Block{Type: "CERTIFICATE", Bytes: a.Certificate}); err != nil {
					return err
				}
			}
			return nil
		case "spiffe":
			sb, err := ca.ToSPIFFEBundle(b)
			if err != nil {
				return err
			}
			doc, err := sb.Marshal()
			if err != nil {
				return err
			}
			var pretty any
			if err := json.Unmarshal(doc, &pretty); err != nil {
				return err
			}
			out, _ := json.MarshalIndent(pretty, "", "  ")
			fmt.Fprintln(c.App.Writer, string(out))
			return nil
		}
		return fmt.Errorf("--format %q: want pem or spiffe", c.String("format"))
	}
	return &cli.Command{
		Name:  "bundle",
		Usage: "trust bundles",
		Subcommands: []*cli.Command{
			{
				Name: "show", Usage: "show this trust domain's bundle (or --trust-domain's)",
				Flags: adminFlags(format, &cli.StringFlag{Name: "trust-domain", EnvVars: []string{"FERRY_TRUST_DOMAIN"}, Usage: "trust domain (default: the server's)"}),
				Action: func(c *cli.Context) error {
					return withAdmin(c, func(ctx context.Context, a ferrypb.AdminClient) error {
						resp, err := a.ListBundles(ctx, &ferrypb.ListBundlesRequest{})
						if err != nil {
							return err
						}
						td := c.String("trust-domain")
						if td == "" && len(resp.Bundles) > 1 {
							return errors.New("the server holds several trust domains' bundles: pass --trust-domain (or set FERRY_TRUST_DOMAIN)")
						}
						for _, b := range resp.Bundles {
							if td == "" || b.TrustDomain == td {
								return show(c, b)
							}
						}
						return errors.New("no such bundle")
					})
				},
			},
			{
				Name: "count", Usage: "count the bundles the server holds (this trust domain's and federated ones)", Flags: adminFlags(consistentFlag),
				Action: func(c *cli.Context) error {
					return withAdmin(c, func(ctx context.Context, a ferrypb.AdminClient) error {
						resp, err := a.CountBundles(ctx, &ferrypb.CountBundlesRequest{Consistency: consistency(c)})
						if err != nil {
							return err
						}
						if jsonOutput(c) {
							return printJSON(c.App.Writer, resp)
						}
						fmt.Fprintf(c.App.Writer, "%d bundles\n", resp.Count)
						return nil
					})
				},
			},
			{
				Name: "list", Usage: "list every bundle the server holds", Flags: adminFlags(format),
				Action: func(c *cli.Context) error {
					return withAdmin(c, func(ctx context.Context, a ferrypb.AdminClient) error {
						resp, err := a.ListBundles(ctx, &ferrypb.ListBundlesRequest{})
						if err != nil {
							return err
						}
						if jsonOutput(c) {
							return printJSON(c.App.Writer, resp)
						}
						for _, b := range resp.Bundles {
							fmt.Fprintf(c.App.Writer, "* %s (sequence %d)\n", b.TrustDomain, b.SequenceNumber)
							if err := show(c, b); err != nil {
								return err
							}
						}
						return nil
					})
				},
			},
		},
	}
}

// agentIdentityCommand enables and disables an agent's system-assigned identity.
func agentIdentityCommand() *cli.Command {
	set := func(enabled bool) cli.ActionFunc {
		return func(c *cli.Context) error {
			id := c.String("spiffe-id")
			if id == "" {
				id = c.Args().First()
			}
			if id == "" || c.String("spiffe-id") != "" && c.Args().Len() > 0 {
				return errors.New("name the agent once: SPIFFE_ID or --spiffe-id")
			}
			return withAdmin(c, func(ctx context.Context, a ferrypb.AdminClient) error {
				resp, err := a.SetAgentIdentity(ctx, &ferrypb.SetAgentIdentityRequest{SpiffeId: id, Enabled: enabled, TenantId: c.String("tenant"), RequestId: c.String("request-id")})
				if err != nil {
					return err
				}
				if jsonOutput(c) {
					return printJSON(c.App.Writer, resp)
				}
				switch i := resp.Identity; {
				case enabled && i != nil:
					fmt.Fprintf(c.App.Writer, "System-assigned identity %s of agent %s: principal ID %s, client ID %s\n", i.Name, id, i.ObjectId, i.ClientId)
				case i != nil:
					fmt.Fprintf(c.App.Writer, "Deleted the system-assigned identity %s of agent %s (principal ID %s) with its role assignments\n", i.Name, id, i.ObjectId)
				default:
					fmt.Fprintf(c.App.Writer, "Agent %s has no system-assigned identity\n", id)
				}
				return nil
			})
		}
	}
	flags := func() []cli.Flag {
		return adminFlags(
			&cli.StringFlag{Name: "spiffe-id", Usage: "the agent's SPIFFE ID (or as the argument)"},
			&cli.StringFlag{Name: "request-id", Usage: "idempotency key: retrying with the same ID applies once"},
		)
	}
	return &cli.Command{
		Name:  "identity",
		Usage: "an attested agent's system-assigned managed identity",
		Subcommands: []*cli.Command{
			{
				Name: "enable", Usage: "give the agent a system-assigned identity, deleted when it is evicted", ArgsUsage: "[SPIFFE_ID]",
				Flags:  append(flags(), &cli.StringFlag{Name: "tenant", Usage: "tenant of the identity (default: the only tenant)"}),
				Action: set(true),
			},
			{
				Name: "disable", Usage: "delete the agent's system-assigned identity with its role assignments", ArgsUsage: "[SPIFFE_ID]",
				Flags: flags(), Action: set(false),
			},
		},
	}
}
