package main

// The directory commands, in az's vocabulary: tenants, managed identities and
// their federated credentials, resources (APIs with app roles) and role
// assignments. They talk to the server's Directory service on the admin socket.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/urfave/cli/v2"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/ferry-id/ferry/bridge/fic"
	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/api"
	"github.com/ferry-id/ferry/server/state"
)

// withDirectory dials the admin socket, like withAdmin, and runs fn with a
// Directory client.
func withDirectory(c *cli.Context, fn func(ctx context.Context, d ferrypb.DirectoryClient) error) error {
	conn, err := dialAdmin(c)
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(c.Context, c.Duration("timeout"))
	defer cancel()
	if err := fn(ctx, ferrypb.NewDirectoryClient(conn)); err != nil {
		if st, ok := status.FromError(err); ok {
			return fmt.Errorf("%s: %s", st.Code(), st.Message())
		}
		return err
	}
	return nil
}

var tenantFlag = &cli.StringFlag{Name: "tenant", Usage: "tenant ID, a GUID (default: the only tenant)", Action: checked("tenant", isGUID)}

// Tenants ----------------------------------------------------------------------

func tenantCommand() *cli.Command {
	return &cli.Command{
		Name:  "tenant",
		Usage: "manage the bridge's tenants",
		Subcommands: []*cli.Command{
			{
				Name: "create", Usage: "create a tenant",
				Flags: adminFlags(
					&cli.StringFlag{Name: "name", Usage: "display name", Required: true},
					&cli.StringFlag{Name: "tenant-id", Usage: "tenant ID, a GUID (default: a new one)", Action: checked("tenant-id", isGUID)},
				),
				Action: func(c *cli.Context) error {
					if err := state.ValidateDisplayName(c.String("name")); err != nil {
						return err
					}
					return withDirectory(c, func(ctx context.Context, d ferrypb.DirectoryClient) error {
						t, err := d.CreateTenant(ctx, &ferrypb.CreateTenantRequest{Id: c.String("tenant-id"), Name: c.String("name")})
						if err != nil {
							return err
						}
						return printRows(c, []*ferrypb.Tenant{t}, printTenant)
					})
				},
			},
			{
				Name: "list", Usage: "list tenants",
				Flags: adminFlags(),
				Action: func(c *cli.Context) error {
					return withDirectory(c, func(ctx context.Context, d ferrypb.DirectoryClient) error {
						resp, err := d.ListTenants(ctx, &ferrypb.ListTenantsRequest{})
						if err != nil {
							return err
						}
						if jsonOutput(c) {
							return printJSON(c.App.Writer, resp)
						}
						return printRows(c, resp.Tenants, printTenant)
					})
				},
			},
		},
	}
}

func printTenant(w io.Writer, t *ferrypb.Tenant) {
	printFields(w, "Tenant ID", t.Id, "Name", t.Name)
}

// Identities -------------------------------------------------------------------

// identityRefFlags name one identity.
func identityRefFlags(prefix string) []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: prefix + "name", Usage: "identity name"},
		&cli.StringFlag{Name: prefix + "object-id", Usage: "identity object (principal) ID, a GUID", Action: checked(prefix+"object-id", isGUID)},
		&cli.StringFlag{Name: prefix + "client-id", Usage: "identity client ID, a GUID", Action: checked(prefix+"client-id", isGUID)},
		tenantFlag,
	}
}

func identityRef(c *cli.Context, prefix string) (*ferrypb.IdentityRef, error) {
	ref := &ferrypb.IdentityRef{
		Name: c.String(prefix + "name"), ObjectId: c.String(prefix + "object-id"),
		ClientId: c.String(prefix + "client-id"), TenantId: c.String("tenant"),
	}
	n := 0
	for _, v := range []string{ref.Name, ref.ObjectId, ref.ClientId} {
		if v != "" {
			n++
		}
	}
	switch {
	case n == 0:
		return nil, fmt.Errorf("--%sname, --%sobject-id or --%sclient-id is required", prefix, prefix, prefix)
	case n > 1:
		return nil, fmt.Errorf("name the identity once: --%sname, --%sobject-id or --%sclient-id", prefix, prefix, prefix)
	}
	return ref, nil
}

func identityCommand() *cli.Command {
	return &cli.Command{
		Name:  "identity",
		Usage: "manage managed identities and their federated credentials",
		Subcommands: []*cli.Command{
			{
				Name: "create", Usage: "create a managed identity",
				Flags: adminFlags(
					&cli.StringFlag{Name: "name", Usage: "identity name (3-128 of A-Z a-z 0-9 - _)", Required: true},
					tenantFlag,
					&cli.StringFlag{Name: "kind", Value: state.KindUserAssigned, Usage: fmt.Sprintf("%s or %s (a %s identity is enabled on its entry or agent instead)", state.KindUserAssigned, state.KindApplication, state.KindSystemAssigned)},
					&cli.StringFlag{Name: "resource-id", Usage: "ARM-style resource ID clients may select it by (default: derived from tenant and name)"},
					&cli.StringFlag{Name: "request-id", Usage: "idempotency key: retrying with the same ID applies once"},
				),
				Action: func(c *cli.Context) error {
					if err := api.CheckCreateIdentity(c.String("name"), c.String("kind")); err != nil {
						return err
					}
					if err := state.ValidateIdentityContent(&ferrypb.Identity{Name: c.String("name"), Kind: c.String("kind"), ResourceId: c.String("resource-id")}); err != nil {
						return err
					}
					return withDirectory(c, func(ctx context.Context, d ferrypb.DirectoryClient) error {
						i, err := d.CreateIdentity(ctx, &ferrypb.CreateIdentityRequest{
							Name: c.String("name"), TenantId: c.String("tenant"), Kind: c.String("kind"),
							ResourceId: c.String("resource-id"), RequestId: c.String("request-id"),
						})
						if err != nil {
							return err
						}
						return printRows(c, []*ferrypb.Identity{i}, printIdentity)
					})
				},
			},
			{
				Name: "list", Usage: "list identities",
				Flags: adminFlags(tenantFlag),
				Action: func(c *cli.Context) error {
					return withDirectory(c, func(ctx context.Context, d ferrypb.DirectoryClient) error {
						resp, err := d.ListIdentities(ctx, &ferrypb.ListIdentitiesRequest{TenantId: c.String("tenant")})
						if err != nil {
							return err
						}
						if jsonOutput(c) {
							return printJSON(c.App.Writer, resp)
						}
						return printRows(c, resp.Identities, printIdentity)
					})
				},
			},
			{
				Name: "show", Usage: "show an identity, the workloads that can use it and why, and its role assignments",
				Flags: adminFlags(identityRefFlags("")...),
				Action: func(c *cli.Context) error {
					ref, err := identityRef(c, "")
					if err != nil {
						return err
					}
					return withDirectory(c, func(ctx context.Context, d ferrypb.DirectoryClient) error {
						u, err := d.ShowIdentity(ctx, &ferrypb.ShowIdentityRequest{Identity: ref})
						if err != nil {
							return err
						}
						if jsonOutput(c) {
							return printJSON(c.App.Writer, u)
						}
						printUsage(c.App.Writer, u)
						return nil
					})
				},
			},
			{
				Name: "delete", Usage: "delete an identity with its federated credentials and role assignments",
				Flags: adminFlags(identityRefFlags("")...),
				Action: func(c *cli.Context) error {
					ref, err := identityRef(c, "")
					if err != nil {
						return err
					}
					return withDirectory(c, func(ctx context.Context, d ferrypb.DirectoryClient) error {
						resp, err := d.DeleteIdentity(ctx, &ferrypb.DeleteIdentityRequest{Identity: ref})
						if err != nil {
							return err
						}
						if jsonOutput(c) {
							return printJSON(c.App.Writer, resp)
						}
						fmt.Fprintf(c.App.Writer, "Deleted identity %s (%s)\n", resp.Identity.GetName(), resp.Identity.GetObjectId())
						return nil
					})
				},
			},
			federatedCredentialCommand(),
		},
	}
}

func printIdentity(w io.Writer, i *ferrypb.Identity) {
	printFields(w,
		"Name", i.Name,
		"Principal ID", i.ObjectId,
		"Client ID", i.ClientId,
		"Tenant ID", i.TenantId,
		"Kind", i.Kind,
		"Resource ID", i.ResourceId,
		"Owner SPIFFE ID", i.OwnerSpiffeId,
		"Owner entry ID", i.OwnerEntryId,
	)
}

// printUsage prints an identity with who can use it, why, and its roles.
func printUsage(w io.Writer, u *ferrypb.IdentityUsage) {
	printIdentity(w, u.Identity)
	switch {
	case u.OwnerEntry != nil:
		fmt.Fprintf(w, "Owner: registration entry %s (%s); deleted with it\n\n", u.OwnerEntry.Id, u.OwnerEntry.SpiffeId)
	case u.OwnerAgent != nil:
		fmt.Fprintf(w, "Owner: agent %s; deleted when it is evicted\n\n", u.OwnerAgent.SpiffeId)
	case u.Identity.GetKind() == "system-assigned":
		fmt.Fprintf(w, "Owner: gone\n\n")
	}
	fmt.Fprintf(w, "Federated credentials (%d)\n", len(u.Credentials))
	for _, fc := range u.Credentials {
		match := fc.Subject
		if match == "" {
			match = fc.ClaimsMatchingExpression
		}
		fmt.Fprintf(w, "  %s: issuer %s, %s, audience %s\n", fc.Name, fc.Issuer, match, strings.Join(fc.Audiences, " "))
	}
	fmt.Fprintf(w, "\nWorkloads that can use it (%d)\n", len(u.Workloads))
	for _, wl := range u.Workloads {
		e := wl.Entry
		var sels []string
		for _, s := range e.Selectors {
			sels = append(sels, s.Type+":"+s.Value)
		}
		fmt.Fprintf(w, "  entry %s: %s\n    parent %s, selectors %s\n    via %s: %s\n", e.Id, e.SpiffeId, e.ParentId, strings.Join(sels, " "), wl.Credential, wl.Reason)
	}
	fmt.Fprintf(w, "\nRole assignments (%d)\n", len(u.RoleAssignments))
	for _, ra := range u.RoleAssignments {
		res := ra.ResourceName
		if len(ra.ResourceIdentifierUris) > 0 {
			res += " (" + strings.Join(ra.ResourceIdentifierUris, " ") + ")"
		}
		fmt.Fprintf(w, "  %s: role %s on %s\n", ra.Assignment.GetId(), ra.Role, res)
	}
}

// Federated credentials ----------------------------------------------------------

func ficFlags(required bool) []cli.Flag {
	flags := append(identityRefFlags("identity-"),
		&cli.StringFlag{Name: "name", Usage: "credential name (3-120 of A-Z a-z 0-9 - _; immutable)", Required: true},
		&cli.StringFlag{Name: "issuer", Usage: "issuer URL the assertion's iss must equal", Required: required},
		&cli.StringFlag{Name: "subject", Usage: "value the assertion's sub must equal"},
		&cli.StringFlag{Name: "claims-matching-expression", Usage: `instead of --subject, e.g. "claims['sub'] matches 'spiffe://td/ns/*'"`},
		&cli.StringSliceFlag{Name: "audiences", Usage: "audience the assertion's aud must hold (exactly one; default api://AzureADTokenExchange)"},
		&cli.StringFlag{Name: "description", Usage: "free text"},
		&cli.StringFlag{Name: "request-id", Usage: "idempotency key: retrying with the same ID applies once"},
	)
	return adminFlags(flags...)
}

func federatedCredentialCommand() *cli.Command {
	refOnly := adminFlags(append(identityRefFlags("identity-"), &cli.StringFlag{Name: "name", Usage: "credential name", Required: true})...)
	return &cli.Command{
		Name:  "federated-credential",
		Usage: "manage the federated identity credentials of an identity",
		Subcommands: []*cli.Command{
			{Name: "create", Usage: "create a federated credential", Flags: ficFlags(true), Action: ficWrite(false)},
			{Name: "update", Usage: "update a federated credential (flags not given keep their value)", Flags: ficFlags(false), Action: ficWrite(true)},
			{
				Name: "list", Usage: "list the federated credentials of an identity",
				Flags: adminFlags(identityRefFlags("identity-")...),
				Action: func(c *cli.Context) error {
					ref, err := identityRef(c, "identity-")
					if err != nil {
						return err
					}
					return withDirectory(c, func(ctx context.Context, d ferrypb.DirectoryClient) error {
						resp, err := d.ListFederatedCredentials(ctx, &ferrypb.ListFederatedCredentialsRequest{Identity: ref})
						if err != nil {
							return err
						}
						if jsonOutput(c) {
							return printJSON(c.App.Writer, resp)
						}
						return printRows(c, resp.Credentials, printCredential)
					})
				},
			},
			{
				Name: "show", Usage: "show one federated credential",
				Flags: refOnly,
				Action: func(c *cli.Context) error {
					ref, err := identityRef(c, "identity-")
					if err != nil {
						return err
					}
					return withDirectory(c, func(ctx context.Context, d ferrypb.DirectoryClient) error {
						fc, err := d.GetFederatedCredential(ctx, &ferrypb.GetFederatedCredentialRequest{Identity: ref, Name: c.String("name")})
						if err != nil {
							return err
						}
						return printRows(c, []*ferrypb.FederatedCredential{fc}, printCredential)
					})
				},
			},
			{
				Name: "delete", Usage: "delete a federated credential",
				Flags: refOnly,
				Action: func(c *cli.Context) error {
					ref, err := identityRef(c, "identity-")
					if err != nil {
						return err
					}
					return withDirectory(c, func(ctx context.Context, d ferrypb.DirectoryClient) error {
						resp, err := d.DeleteFederatedCredential(ctx, &ferrypb.DeleteFederatedCredentialRequest{Identity: ref, Name: c.String("name")})
						if err != nil {
							return err
						}
						if jsonOutput(c) {
							return printJSON(c.App.Writer, resp)
						}
						fmt.Fprintf(c.App.Writer, "Deleted federated credential %s\n", c.String("name"))
						return nil
					})
				},
			},
		},
	}
}

// ficWrite creates a credential from the flags, or updates one: the flags given
// replace the stored values, and the update applies only to the version read.
func ficWrite(update bool) cli.ActionFunc {
	return func(c *cli.Context) error {
		ref, err := identityRef(c, "identity-")
		if err != nil {
			return err
		}
		if c.IsSet("subject") && c.IsSet("claims-matching-expression") {
			return errors.New("--subject and --claims-matching-expression are mutually exclusive")
		}
		// apply sets what the flags give on fc (all of it on create).
		apply := func(fc *ferrypb.FederatedCredential) error {
			if c.IsSet("issuer") {
				fc.Issuer = c.String("issuer")
			}
			// Subject and expression exclude each other: setting one clears the other.
			if c.IsSet("subject") {
				fc.Subject, fc.ClaimsMatchingExpression = c.String("subject"), ""
			}
			if c.IsSet("claims-matching-expression") {
				fc.ClaimsMatchingExpression, fc.Subject = c.String("claims-matching-expression"), ""
			}
			if c.IsSet("audiences") {
				fc.Audiences = c.StringSlice("audiences")
			}
			if c.IsSet("description") {
				fc.Description = c.String("description")
			}
			// The server checks the same; checking here names the flag.
			probe := proto.Clone(fc).(*ferrypb.FederatedCredential)
			fic.Normalize(probe)
			return fic.ValidateContent(probe)
		}
		fc := &ferrypb.FederatedCredential{Name: c.String("name")}
		if !update {
			if err := apply(fc); err != nil {
				return err
			}
		}
		return withDirectory(c, func(ctx context.Context, d ferrypb.DirectoryClient) error {
			mode := ferrypb.PutMode_PUT_CREATE
			if update {
				mode = ferrypb.PutMode_PUT_UPDATE
				if fc, err = d.GetFederatedCredential(ctx, &ferrypb.GetFederatedCredentialRequest{Identity: ref, Name: c.String("name")}); err != nil {
					return err
				}
				if err := apply(fc); err != nil {
					return err
				}
			}
			out, err := d.PutFederatedCredential(ctx, &ferrypb.PutFederatedCredentialRequest{Identity: ref, Credential: fc, Mode: mode, RequestId: c.String("request-id")})
			if err != nil {
				return err
			}
			return printRows(c, []*ferrypb.FederatedCredential{out}, printCredential)
		})
	}
}

func printCredential(w io.Writer, fc *ferrypb.FederatedCredential) {
	printFields(w,
		"Name", fc.Name,
		"Identity principal ID", fc.IdentityObjectId,
		"Issuer", fc.Issuer,
		"Subject", fc.Subject,
		"Claims matching expression", fc.ClaimsMatchingExpression,
		"Audiences", strings.Join(fc.Audiences, ", "),
		"Description", fc.Description,
	)
}

// Resources and roles ------------------------------------------------------------

func resourceCommand() *cli.Command {
	return &cli.Command{
		Name:  "resource",
		Usage: "manage resources (APIs tokens are issued for) and their app roles",
		Subcommands: []*cli.Command{
			{
				Name: "create", Usage: "create a resource",
				Flags: adminFlags(
					&cli.StringFlag{Name: "name", Usage: "display name", Required: true},
					tenantFlag,
					&cli.StringSliceFlag{Name: "identifier-uri", Usage: "App ID URI: api://..., https://... or urn:... (repeatable)"},
					&cli.StringSliceFlag{Name: "app-role", Usage: "app role value, e.g. Orders.Read (repeatable)"},
					&cli.StringFlag{Name: "app-id", Usage: "app (client) ID, a GUID (default: a new one)", Action: checked("app-id", isGUID)},
					&cli.StringFlag{Name: "request-id", Usage: "idempotency key: retrying with the same ID applies once"},
				),
				Action: func(c *cli.Context) error {
					req := &ferrypb.CreateResourceRequest{
						Name: c.String("name"), TenantId: c.String("tenant"), IdentifierUris: c.StringSlice("identifier-uri"),
						AppId: c.String("app-id"), RequestId: c.String("request-id"),
					}
					for _, v := range c.StringSlice("app-role") {
						req.AppRoles = append(req.AppRoles, &ferrypb.AppRole{Value: v})
					}
					if err := state.ValidateResourceContent(&ferrypb.Resource{Name: req.Name, IdentifierUris: req.IdentifierUris, AppRoles: req.AppRoles}); err != nil {
						return err
					}
					return withDirectory(c, func(ctx context.Context, d ferrypb.DirectoryClient) error {
						r, err := d.CreateResource(ctx, req)
						if err != nil {
							return err
						}
						return printRows(c, []*ferrypb.Resource{r}, printResource)
					})
				},
			},
			{
				Name: "show", Usage: "show a resource",
				Flags: adminFlags(resourceRefFlag(), tenantFlag),
				Action: func(c *cli.Context) error {
					return withDirectory(c, func(ctx context.Context, d ferrypb.DirectoryClient) error {
						r, err := d.GetResource(ctx, &ferrypb.GetResourceRequest{Resource: c.String("resource"), TenantId: c.String("tenant")})
						if err != nil {
							return err
						}
						return printRows(c, []*ferrypb.Resource{r}, printResource)
					})
				},
			},
			{
				Name: "delete", Usage: "delete a resource with every role assignment of its app roles",
				Flags: adminFlags(resourceRefFlag(), tenantFlag, &cli.StringFlag{Name: "request-id", Usage: "idempotency key: retrying with the same ID applies once"}),
				Action: func(c *cli.Context) error {
					return withDirectory(c, func(ctx context.Context, d ferrypb.DirectoryClient) error {
						resp, err := d.DeleteResource(ctx, &ferrypb.DeleteResourceRequest{Resource: c.String("resource"), TenantId: c.String("tenant"), RequestId: c.String("request-id")})
						if err != nil {
							return err
						}
						if jsonOutput(c) {
							return printJSON(c.App.Writer, resp)
						}
						fmt.Fprintf(c.App.Writer, "Deleted resource %s (%s) and its role assignments\n", resp.Resource.GetName(), resp.Resource.GetObjectId())
						return nil
					})
				},
			},
			{
				Name: "list", Usage: "list resources",
				Flags: adminFlags(tenantFlag),
				Action: func(c *cli.Context) error {
					return withDirectory(c, func(ctx context.Context, d ferrypb.DirectoryClient) error {
						resp, err := d.ListResources(ctx, &ferrypb.ListResourcesRequest{TenantId: c.String("tenant")})
						if err != nil {
							return err
						}
						if jsonOutput(c) {
							return printJSON(c.App.Writer, resp)
						}
						return printRows(c, resp.Resources, printResource)
					})
				},
			},
		},
	}
}

// resourceRefFlag names one resource, as az does.
func resourceRefFlag() cli.Flag {
	return &cli.StringFlag{Name: "resource", Required: true, Usage: "identifier URI, app ID, object ID or name of the resource"}
}

func printResource(w io.Writer, r *ferrypb.Resource) {
	fields := []string{
		"Name", r.Name,
		"Object ID", r.ObjectId,
		"App ID", r.AppId,
		"Tenant ID", r.TenantId,
	}
	for _, u := range r.IdentifierUris {
		fields = append(fields, "Identifier URI", u)
	}
	for _, ar := range r.AppRoles {
		fields = append(fields, "App role", ar.Value+" ("+ar.Id+")")
	}
	printFields(w, fields...)
}

func roleCommand() *cli.Command {
	principal := identityRefFlags("identity-")
	return &cli.Command{
		Name:  "role",
		Usage: "grant identities the app roles of resources",
		Subcommands: []*cli.Command{
			{
				Name: "assign", Usage: "assign an app role of a resource to an identity",
				Flags: adminFlags(append(principal,
					&cli.StringFlag{Name: "resource", Usage: "identifier URI, app ID, object ID or name of the resource", Required: true},
					&cli.StringFlag{Name: "role", Usage: "app role value (or ID)", Required: true},
					&cli.StringFlag{Name: "request-id", Usage: "idempotency key: retrying with the same ID applies once"},
				)...),
				Action: func(c *cli.Context) error {
					ref, err := identityRef(c, "identity-")
					if err != nil {
						return err
					}
					return withDirectory(c, func(ctx context.Context, d ferrypb.DirectoryClient) error {
						ra, err := d.AssignRole(ctx, &ferrypb.AssignRoleRequest{Principal: ref, Resource: c.String("resource"), Role: c.String("role"), RequestId: c.String("request-id")})
						if err != nil {
							return err
						}
						return printRows(c, []*ferrypb.RoleAssignment{ra}, printAssignment)
					})
				},
			},
			{
				Name: "list", Usage: "list role assignments (of an identity, of a resource, or all)",
				Flags: adminFlags(append(principal, &cli.StringFlag{Name: "resource", Usage: "identifier URI, app ID, object ID or name of the resource"})...),
				Action: func(c *cli.Context) error {
					req := &ferrypb.ListRoleAssignmentsRequest{Resource: c.String("resource")}
					if c.IsSet("identity-name") || c.IsSet("identity-object-id") || c.IsSet("identity-client-id") {
						ref, err := identityRef(c, "identity-")
						if err != nil {
							return err
						}
						req.Principal = ref
					}
					return withDirectory(c, func(ctx context.Context, d ferrypb.DirectoryClient) error {
						resp, err := d.ListRoleAssignments(ctx, req)
						if err != nil {
							return err
						}
						if jsonOutput(c) {
							return printJSON(c.App.Writer, resp)
						}
						return printRows(c, resp.Assignments, printAssignment)
					})
				},
			},
			{
				Name: "delete", Usage: "delete a role assignment",
				Flags: adminFlags(&cli.StringFlag{Name: "id", Usage: "role assignment ID, a GUID", Required: true, Action: checked("id", isGUID)}),
				Action: func(c *cli.Context) error {
					return withDirectory(c, func(ctx context.Context, d ferrypb.DirectoryClient) error {
						resp, err := d.DeleteRoleAssignment(ctx, &ferrypb.DeleteRoleAssignmentRequest{Id: c.String("id")})
						if err != nil {
							return err
						}
						if jsonOutput(c) {
							return printJSON(c.App.Writer, resp)
						}
						fmt.Fprintf(c.App.Writer, "Deleted role assignment %s\n", c.String("id"))
						return nil
					})
				},
			},
		},
	}
}

func printAssignment(w io.Writer, ra *ferrypb.RoleAssignment) {
	printFields(w,
		"Assignment ID", ra.Id,
		"Principal ID", ra.PrincipalObjectId,
		"Resource ID", ra.ResourceObjectId,
		"App role ID", ra.AppRoleId,
	)
}

// Output -------------------------------------------------------------------------

// printRows prints rows as JSON (one document, a list when several) or as
// blocks of fields.
func printRows[T proto.Message](c *cli.Context, rows []T, pretty func(io.Writer, T)) error {
	if jsonOutput(c) {
		msgs := make([]proto.Message, len(rows))
		for i, r := range rows {
			msgs[i] = r
		}
		return printJSON(c.App.Writer, msgs...)
	}
	for _, r := range rows {
		pretty(c.App.Writer, r)
	}
	return nil
}

// printFields prints label/value pairs aligned, skipping empty values.
func printFields(w io.Writer, kv ...string) {
	tw := tabwriter.NewWriter(w, 0, 4, 1, ' ', 0)
	for i := 0; i+1 < len(kv); i += 2 {
		if kv[i+1] != "" {
			fmt.Fprintf(tw, "%s\t: %s\n", kv[i], kv[i+1])
		}
	}
	tw.Flush()
	fmt.Fprintln(w)
}
