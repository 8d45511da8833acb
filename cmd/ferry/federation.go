package main

import (
	"context"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/urfave/cli/v2"
	"google.golang.org/grpc/status"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/state"
)

// federationCommand is `ferry federation create|list|show|update|delete|refresh`:
// SPIFFE federation relationships with foreign trust domains (SPIRE's flags).
func federationCommand() *cli.Command {
	td := func() cli.Flag {
		return &cli.StringFlag{Name: "trust-domain", Required: true, Usage: "the federated trust domain", Action: checked("trust-domain", isTrustDomain)}
	}
	relFlags := func() []cli.Flag {
		return adminFlags(td(),
			&cli.StringFlag{Name: "bundle-endpoint-url", Required: true, Usage: "https URL of the trust domain's bundle endpoint"},
			choiceFlag("bundle-endpoint-profile", "how the bundle endpoint authenticates", state.ProfileHTTPSSPIFFE, state.ProfileHTTPSWeb),
			&cli.StringFlag{Name: "endpoint-spiffe-id", Usage: "SPIFFE ID of the https_spiffe endpoint (default spiffe://TD/spire/server)"},
			&cli.StringFlag{Name: "trust-domain-bundle-path", Usage: `initial bundle of the trust domain ("-" for stdin); https_spiffe needs one`},
			choiceFlag("trust-domain-bundle-format", "format of --trust-domain-bundle-path", "pem", "spiffe"))
	}
	return &cli.Command{
		Name:  "federation",
		Usage: "SPIFFE federation relationships with other trust domains",
		Subcommands: []*cli.Command{
			{Name: "create", Usage: "federate with a trust domain", Flags: relFlags(), Action: federationPut(true)},
			{Name: "update", Usage: "change a relationship's bundle endpoint", Flags: relFlags(), Action: federationPut(false)},
			{
				Name: "list", Usage: "list relationships", Flags: adminFlags(),
				Action: func(c *cli.Context) error {
					return withFederation(c, func(ctx context.Context, f ferrypb.FederationClient) error {
						resp, err := f.ListFederationRelationships(ctx, &ferrypb.ListFederationRelationshipsRequest{})
						if err != nil {
							return err
						}
						if jsonOutput(c) {
							return printJSON(c.App.Writer, resp)
						}
						tw := tabwriter.NewWriter(c.App.Writer, 0, 4, 2, ' ', 0)
						fmt.Fprintln(tw, "TRUST DOMAIN\tPROFILE\tBUNDLE ENDPOINT\tSEQUENCE\tLAST REFRESH\tSTATUS")
						for _, r := range resp.Relationships {
							rel := r.Relationship
							fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", rel.TrustDomain, rel.Profile, rel.BundleEndpointUrl,
								sequence(r.Bundle), lastRefresh(rel), refreshStatus(rel))
						}
						return tw.Flush()
					})
				},
			},
			{
				Name: "show", Usage: "show a relationship and its bundle's state", Flags: adminFlags(td()),
				Action: func(c *cli.Context) error {
					return withFederation(c, func(ctx context.Context, f ferrypb.FederationClient) error {
						r, err := f.GetFederationRelationship(ctx, &ferrypb.GetFederationRelationshipRequest{TrustDomain: c.String("trust-domain")})
						if err != nil {
							return err
						}
						return printRelationship(c, r)
					})
				},
			},
			{
				Name: "delete", Usage: "end a relationship (the bundle stays until `ferry bundle delete`)", Flags: adminFlags(td()),
				Action: func(c *cli.Context) error {
					return withFederation(c, func(ctx context.Context, f ferrypb.FederationClient) error {
						if _, err := f.DeleteFederationRelationship(ctx, &ferrypb.DeleteFederationRelationshipRequest{TrustDomain: c.String("trust-domain")}); err != nil {
							return err
						}
						fmt.Fprintf(c.App.Writer, "federation relationship with %s deleted\n", c.String("trust-domain"))
						return nil
					})
				},
			},
			{
				Name: "refresh", Usage: "fetch the trust domain's bundle now (the leader fetches it; run it on any server)", Flags: adminFlags(td()),
				Action: func(c *cli.Context) error {
					return withFederation(c, func(ctx context.Context, f ferrypb.FederationClient) error {
						r, err := f.RefreshBundle(ctx, &ferrypb.RefreshBundleRequest{TrustDomain: c.String("trust-domain")})
						if err != nil {
							return err
						}
						return printRelationship(c, r)
					})
				},
			},
		},
	}
}

func federationPut(create bool) cli.ActionFunc {
	return func(c *cli.Context) error {
		td, err := spiffeid.TrustDomainFromString(c.String("trust-domain"))
		if err != nil {
			return fmt.Errorf("--trust-domain: %w", err)
		}
		rel := &ferrypb.FederationRelationship{TrustDomain: td.Name(), BundleEndpointUrl: c.String("bundle-endpoint-url"),
			Profile: c.String("bundle-endpoint-profile"), EndpointSpiffeId: c.String("endpoint-spiffe-id")}
		if rel.Profile == "https_spiffe" && rel.EndpointSpiffeId == "" {
			rel.EndpointSpiffeId = "spiffe://" + td.Name() + "/spire/server"
		}
		if err := state.ValidateFederationRelationship(rel); err != nil {
			return err
		}
		req := &ferrypb.PutFederationRelationshipRequest{Relationship: rel}
		if p := c.String("trust-domain-bundle-path"); p != "" {
			data, err := readBundleFile(p, c.App.Reader)
			if err != nil {
				return err
			}
			if req.TrustDomainBundle, err = parseBundle(td, data, c.String("trust-domain-bundle-format")); err != nil {
				return err
			}
		}
		return withFederation(c, func(ctx context.Context, f ferrypb.FederationClient) error {
			call := f.UpdateFederationRelationship
			if create {
				call = f.CreateFederationRelationship
			}
			r, err := call(ctx, req)
			if err != nil {
				return err
			}
			return printRelationship(c, r)
		})
	}
}

func printRelationship(c *cli.Context, r *ferrypb.FederationRelationshipStatus) error {
	if jsonOutput(c) {
		return printJSON(c.App.Writer, r)
	}
	rel := r.Relationship
	w := c.App.Writer
	fmt.Fprintf(w, "Trust domain:\t\t%s\nBundle endpoint URL:\t%s\nProfile:\t\t%s\n", rel.TrustDomain, rel.BundleEndpointUrl, rel.Profile)
	if rel.EndpointSpiffeId != "" {
		fmt.Fprintf(w, "Endpoint SPIFFE ID:\t%s\n", rel.EndpointSpiffeId)
	}
	fmt.Fprintf(w, "Last refresh:\t\t%s\nStatus:\t\t\t%s\n", lastRefresh(rel), refreshStatus(rel))
	printBundleSummary(w, r.Bundle)
	return nil
}

func printBundleSummary(w io.Writer, b *ferrypb.Bundle) {
	if b == nil {
		fmt.Fprintf(w, "Bundle:\t\t\tnone yet\n")
		return
	}
	fmt.Fprintf(w, "Bundle sequence:\t%d\nX.509 authorities:\t%d\nJWT authorities:\t%d\n", b.SequenceNumber, len(b.X509Authorities), len(b.JwtAuthorities))
	if b.RefreshHintSeconds > 0 {
		fmt.Fprintf(w, "Refresh hint:\t\t%s\n", time.Duration(b.RefreshHintSeconds)*time.Second)
	}
}

func sequence(b *ferrypb.Bundle) string {
	if b == nil {
		return "-"
	}
	return fmt.Sprint(b.SequenceNumber)
}

func lastRefresh(rel *ferrypb.FederationRelationship) string {
	if rel.LastRefresh == 0 {
		return "never"
	}
	return time.Unix(rel.LastRefresh, 0).UTC().Format(time.RFC3339)
}

func refreshStatus(rel *ferrypb.FederationRelationship) string {
	switch {
	case rel.LastError != "":
		return "failing (last good bundle kept): " + rel.LastError
	case rel.LastRefresh == 0:
		return "pending"
	}
	return "ok"
}

// withFederation dials the admin socket, like withAdmin, and runs fn with a
// Federation client.
func withFederation(c *cli.Context, fn func(ctx context.Context, f ferrypb.FederationClient) error) error {
	conn, err := dialAdmin(c)
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(c.Context, c.Duration("timeout"))
	defer cancel()
	if err := fn(ctx, ferrypb.NewFederationClient(conn)); err != nil {
		if st, ok := status.FromError(err); ok {
			return fmt.Errorf("%s: %s", st.Code(), st.Message())
		}
		return err
	}
	return nil
}
