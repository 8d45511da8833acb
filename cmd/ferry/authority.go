package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/urfave/cli/v2"
	"google.golang.org/grpc"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/api"
	"github.com/ferry-id/ferry/server/ca"
)

// authorityCommand is `ferry authority x509|jwt list|prepare|activate|taint|revoke`:
// the lifecycle of the signing authorities of the node whose admin socket it
// talks to (each server node has its own keys).
func authorityCommand() *cli.Command {
	kindCommand := func(kind, what string) *cli.Command {
		idFlag := func(required bool, usage string) cli.Flag {
			return &cli.StringFlag{Name: "authority-id", Required: required, Usage: usage}
		}
		return &cli.Command{
			Name:  kind,
			Usage: "this node's " + what + " authorities",
			Subcommands: []*cli.Command{
				{
					Name: "list", Usage: "list this node's " + what + " authorities: prepared, active and old",
					Flags: adminFlags(),
					Action: func(c *cli.Context) error {
						return withAdmin(c, func(ctx context.Context, a ferrypb.AdminClient) error {
							resp, err := a.ListLocalAuthorities(ctx, &ferrypb.ListLocalAuthoritiesRequest{Kind: kind})
							if err != nil {
								return err
							}
							if jsonOutput(c) {
								return printJSON(c.App.Writer, resp)
							}
							printAuthorities(c.App.Writer, resp.Authorities)
							return nil
						})
					},
				},
				authorityOp(kind, "prepare", "create and publish the next "+what+" authority (a previously prepared one is retired)",
					nil, (ferrypb.AdminClient).PrepareLocalAuthority),
				authorityOp(kind, "activate", "make the prepared "+what+" authority sign; the active one becomes old",
					idFlag(false, "the prepared authority (default: the only one)"), (ferrypb.AdminClient).ActivateLocalAuthority),
				authorityOp(kind, "taint", "mark an old "+what+" authority tainted: agents replace what it signed",
					idFlag(true, "the old authority to taint"), (ferrypb.AdminClient).TaintLocalAuthority),
				authorityOp(kind, "revoke", "remove a tainted old "+what+" authority from the bundle and delete its key",
					idFlag(true, "the tainted authority to revoke"), (ferrypb.AdminClient).RevokeLocalAuthority),
			},
		}
	}
	return &cli.Command{
		Name:  "authority",
		Usage: "this server node's signing authorities (X.509 CA and JWT keys)",
		Subcommands: []*cli.Command{
			kindCommand("x509", "X.509 CA"),
			kindCommand("jwt", "JWT signing"),
		},
	}
}

type authorityRPC func(ferrypb.AdminClient, context.Context, *ferrypb.LocalAuthorityRequest, ...grpc.CallOption) (*ferrypb.LocalAuthority, error)

func authorityOp(kind, name, usage string, id cli.Flag, rpc authorityRPC) *cli.Command {
	var flags []cli.Flag
	if id != nil {
		flags = append(flags, id)
	}
	return &cli.Command{
		Name: name, Usage: usage, Flags: adminFlags(flags...),
		Action: func(c *cli.Context) error {
			return withAdmin(c, func(ctx context.Context, a ferrypb.AdminClient) error {
				la, err := rpc(a, ctx, &ferrypb.LocalAuthorityRequest{Kind: kind, AuthorityId: c.String("authority-id")})
				if err != nil {
					return err
				}
				if jsonOutput(c) {
					return printJSON(c.App.Writer, la)
				}
				printAuthorities(c.App.Writer, []*ferrypb.LocalAuthority{la})
				return nil
			})
		},
	}
}

func printAuthorities(w io.Writer, as []*ferrypb.LocalAuthority) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "KIND\tAUTHORITY ID\tSTATUS\tTAINTED\tPUBLISHED\tNOT AFTER")
	for _, a := range as {
		status := a.Status
		if a.Upstream {
			status += " (upstream)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%t\t%t\t%s\n", a.Kind, a.Id, status, a.Tainted, a.Published,
			time.Unix(a.NotAfter, 0).UTC().Format(time.RFC3339))
	}
	tw.Flush()
}

// x509Command is `ferry x509 mint`: an X509-SVID for a key generated here;
// the server never sees the private key.
func x509Command() *cli.Command {
	return &cli.Command{
		Name:  "x509",
		Usage: "X509-SVIDs signed by the server's active X.509 authority",
		Subcommands: []*cli.Command{{
			Name:  "mint",
			Usage: "mint an X509-SVID for a key generated locally (--write DIR saves svid.pem, key.pem, bundle.pem)",
			Flags: adminFlags(
				&cli.StringFlag{Name: "spiffe-id", Required: true, Usage: "SPIFFE ID of the SVID, in the server's trust domain, not under /spire/"},
				&cli.DurationFlag{Name: "ttl", Usage: "lifetime in whole seconds, at most 720h (default: the server's X509-SVID TTL)"},
				&cli.StringSliceFlag{Name: "dns", Usage: "DNS name (repeatable; the first is also the subject CN)"},
				&cli.StringFlag{Name: "write", Usage: "directory to write svid.pem, key.pem (0600) and bundle.pem to"},
			),
			Action: x509Mint,
		}},
	}
}

func x509Mint(c *cli.Context) error {
	ttl, err := mintChecks(c)
	if err != nil {
		return err
	}
	if err := ca.CheckDNSNames(c.StringSlice("dns")); err != nil {
		return fmt.Errorf("--dns: %w", err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		return err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	return withAdmin(c, func(ctx context.Context, a ferrypb.AdminClient) error {
		resp, err := a.MintX509SVID(ctx, &ferrypb.MintX509SVIDRequest{
			Csr: csr, SpiffeId: c.String("spiffe-id"), TtlSeconds: ttl, DnsNames: c.StringSlice("dns"),
		})
		if err != nil {
			return err
		}
		svidPEM, bundlePEM := pemCertificates(resp.SvidChain), pemCertificates(resp.RootCas)
		keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
		expires := time.Unix(resp.ExpiresAt, 0).UTC().Format(time.RFC3339)
		if dir := c.String("write"); dir != "" {
			if err := os.MkdirAll(dir, 0o700); err != nil {
				return err
			}
			files := []struct {
				name string
				data []byte
				mode os.FileMode
			}{{"key.pem", keyPEM, 0o600}, {"svid.pem", svidPEM, 0o644}, {"bundle.pem", bundlePEM, 0o644}}
			paths := map[string]string{}
			for _, f := range files {
				p := filepath.Join(dir, f.name)
				if err := writeAtomic(p, f.data, f.mode); err != nil {
					return err
				}
				paths[strings.TrimSuffix(f.name, ".pem")+"_file"] = p
			}
			if jsonOutput(c) {
				paths["spiffe_id"], paths["expires_at"] = c.String("spiffe-id"), expires
				return printMapJSON(c.App.Writer, paths)
			}
			fmt.Fprintf(c.App.Writer, "X509-SVID for %s (expires %s) written to %s\n", c.String("spiffe-id"), expires, dir)
			return nil
		}
		if jsonOutput(c) {
			return printMapJSON(c.App.Writer, map[string]string{
				"spiffe_id": c.String("spiffe-id"), "expires_at": expires,
				"svid_pem": string(svidPEM), "key_pem": string(keyPEM), "bundle_pem": string(bundlePEM),
			})
		}
		fmt.Fprintf(c.App.Writer, "X509-SVID:\n%s\nPrivate key:\n%s\nRoot CAs:\n%s", svidPEM, keyPEM, bundlePEM)
		return nil
	})
}

// jwtCommand is `ferry jwt mint`.
func jwtCommand() *cli.Command {
	return &cli.Command{
		Name:  "jwt",
		Usage: "JWT-SVIDs signed by the server's active JWT authority",
		Subcommands: []*cli.Command{{
			Name:  "mint",
			Usage: "mint a JWT-SVID",
			Flags: adminFlags(
				&cli.StringFlag{Name: "spiffe-id", Required: true, Usage: "SPIFFE ID of the SVID (the sub claim), in the server's trust domain, not under /spire/"},
				&cli.StringSliceFlag{Name: "audience", Required: true, Usage: "audience (repeatable)"},
				&cli.DurationFlag{Name: "ttl", Usage: "lifetime in whole seconds, at most 720h (default: the server's JWT-SVID TTL)"},
				&cli.StringFlag{Name: "write", Usage: "file to write the token to (0600)"},
			),
			Action: func(c *cli.Context) error {
				ttl, err := mintChecks(c)
				if err != nil {
					return err
				}
				if err := ca.CheckAudiences(c.StringSlice("audience")); err != nil {
					return fmt.Errorf("--audience: %w", err)
				}
				return withAdmin(c, func(ctx context.Context, a ferrypb.AdminClient) error {
					resp, err := a.MintJWTSVID(ctx, &ferrypb.MintJWTSVIDRequest{
						SpiffeId: c.String("spiffe-id"), Audience: c.StringSlice("audience"), TtlSeconds: ttl,
					})
					if err != nil {
						return err
					}
					if p := c.String("write"); p != "" {
						if err := writeAtomic(p, []byte(resp.Token), 0o600); err != nil {
							return err
						}
					}
					if jsonOutput(c) {
						return printJSON(c.App.Writer, resp)
					}
					if c.String("write") != "" {
						fmt.Fprintf(c.App.Writer, "JWT-SVID for %s (expires %s) written to %s\n", c.String("spiffe-id"),
							time.Unix(resp.ExpiresAt, 0).UTC().Format(time.RFC3339), c.String("write"))
						return nil
					}
					fmt.Fprintln(c.App.Writer, resp.Token)
					return nil
				})
			},
		}},
	}
}

// mintChecks checks --spiffe-id and --ttl of a mint command as the server
// will, and returns the lifetime in seconds.
func mintChecks(c *cli.Context) (int64, error) {
	ttl := c.Duration("ttl")
	if ttl%time.Second != 0 {
		return 0, fmt.Errorf("--ttl %s: whole seconds only", ttl)
	}
	if err := api.CheckMint(spiffeid.TrustDomain{}, c.String("spiffe-id"), int64(ttl/time.Second)); err != nil {
		return 0, err
	}
	return int64(ttl / time.Second), nil
}

// withBundleEdits adds `set` and `delete` for federated trust domains to the
// bundle command.
func withBundleEdits(bundle *cli.Command) *cli.Command {
	tdFlag := &cli.StringFlag{Name: "trust-domain", Required: true, Usage: "the federated trust domain", Action: checked("trust-domain", isTrustDomain)}
	bundle.Subcommands = append(bundle.Subcommands,
		&cli.Command{
			Name:  "set",
			Usage: "create or replace a federated trust domain's bundle (never our own)",
			Flags: adminFlags(tdFlag,
				&cli.StringFlag{Name: "path", Required: true, Usage: `bundle file ("-" for stdin)`},
				choiceFlag("format", "bundle format (pem: X.509 authorities; spiffe: SPIFFE bundle JWKS)", "pem", "spiffe")),
			Action: func(c *cli.Context) error {
				td, err := spiffeid.TrustDomainFromString(c.String("trust-domain"))
				if err != nil {
					return fmt.Errorf("--trust-domain: %w", err)
				}
				data, err := readBundleFile(c.String("path"), c.App.Reader)
				if err != nil {
					return err
				}
				b, err := parseBundle(td, data, c.String("format"))
				if err != nil {
					return err
				}
				return withAdmin(c, func(ctx context.Context, a ferrypb.AdminClient) error {
					got, err := a.SetFederatedBundle(ctx, &ferrypb.SetFederatedBundleRequest{Bundle: b})
					if err != nil {
						return err
					}
					if jsonOutput(c) {
						return printJSON(c.App.Writer, got)
					}
					fmt.Fprintf(c.App.Writer, "bundle of %s set: %d X.509 and %d JWT authorities\n",
						got.TrustDomain, len(got.X509Authorities), len(got.JwtAuthorities))
					return nil
				})
			},
		},
		&cli.Command{
			Name:  "delete",
			Usage: "delete a federated trust domain's bundle",
			Flags: adminFlags(tdFlag),
			Action: func(c *cli.Context) error {
				return withAdmin(c, func(ctx context.Context, a ferrypb.AdminClient) error {
					got, err := a.DeleteFederatedBundle(ctx, &ferrypb.DeleteFederatedBundleRequest{TrustDomain: c.String("trust-domain")})
					if err != nil {
						return err
					}
					if jsonOutput(c) {
						return printJSON(c.App.Writer, got)
					}
					fmt.Fprintf(c.App.Writer, "bundle of %s deleted\n", got.TrustDomain)
					return nil
				})
			},
		},
	)
	return bundle
}

// parseBundle reads a PEM list of CA certificates or a SPIFFE bundle (JWKS).
func parseBundle(td spiffeid.TrustDomain, data []byte, format string) (*ferrypb.Bundle, error) {
	switch format {
	case "pem":
		b := &ferrypb.Bundle{TrustDomain: td.Name()}
		for rest := data; ; {
			var block *pem.Block
			block, rest = pem.Decode(rest)
			if block == nil {
				if len(strings.TrimSpace(string(rest))) > 0 {
					return nil, errors.New("bundle: trailing data that is not PEM")
				}
				break
			}
			if block.Type != "CERTIFICATE" {
				return nil, fmt.Errorf("bundle: unexpected PEM block %q", block.Type)
			}
			if _, err := x509.ParseCertificate(block.Bytes); err != nil {
				return nil, fmt.Errorf("bundle: %w", err)
			}
			b.X509Authorities = append(b.X509Authorities, &ferrypb.X509Authority{Certificate: block.Bytes})
		}
		if len(b.X509Authorities) == 0 {
			return nil, errors.New("bundle: no certificates in the PEM input")
		}
		return b, nil
	case "spiffe":
		sb, err := spiffebundle.Parse(td, data)
		if err != nil {
			return nil, fmt.Errorf("bundle: %w", err)
		}
		return ca.FromSPIFFEBundle(sb)
	}
	return nil, fmt.Errorf("--format %q: want pem or spiffe", format)
}

func readBundleFile(path string, stdin io.Reader) ([]byte, error) {
	if path == "-" {
		return io.ReadAll(io.LimitReader(stdin, 16<<20))
	}
	return os.ReadFile(path)
}

func pemCertificates(ders [][]byte) []byte {
	var out []byte
	for _, der := range ders {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
	}
	return out
}

func printMapJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
