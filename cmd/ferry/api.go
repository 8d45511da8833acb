package main

import (
	"context"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"github.com/urfave/cli/v2"

	"github.com/ferry-id/ferry/internal/config"
)

// The workload-side commands talk to the agent's Workload API exactly as any
// go-spiffe client does.

var workloadSocketFlag = &cli.StringFlag{
	Name:    "socket",
	Usage:   "Workload API address (unix:///path)",
	EnvVars: []string{"SPIFFE_ENDPOINT_SOCKET"},
	Value:   "unix://" + config.WorkloadAPISocket,
}

func workloadClient(c *cli.Context) (*workloadapi.Client, error) {
	return workloadapi.New(c.Context, workloadapi.WithAddr(c.String("socket")))
}

// workloadTimeoutFlag bounds a call to the agent.
var workloadTimeoutFlag = &cli.DurationFlag{Name: "timeout", Value: 10 * time.Second, Usage: "how long to wait for the agent"}

func apiCommand() *cli.Command {
	timeout := workloadTimeoutFlag
	return &cli.Command{
		Name:  "api",
		Usage: "talk to the local agent's SPIFFE Workload API, as a workload",
		Subcommands: []*cli.Command{
			{
				Name:  "fetch",
				Usage: "fetch SVIDs and bundles",
				Subcommands: []*cli.Command{
					{
						Name:  "x509",
						Usage: "fetch this process's X509-SVIDs (--write DIR saves svid.N.pem, svid.N.key, bundle.N.pem)",
						Flags: []cli.Flag{workloadSocketFlag, timeout, &cli.StringFlag{Name: "write", Usage: "directory to write the SVIDs to"}},
						Action: func(c *cli.Context) error {
							client, err := workloadClient(c)
							if err != nil {
								return err
							}
							defer client.Close()
							ctx, cancel := context.WithTimeout(c.Context, c.Duration("timeout"))
							defer cancel()
							x, err := client.FetchX509Context(ctx)
							if err != nil {
								return err
							}
							for i, svid := range x.SVIDs {
								fmt.Fprintf(c.App.Writer, "SPIFFE ID:\t%s\nHint:\t\t%s\nExpires:\t%s\n\n", svid.ID, svid.Hint, svid.Certificates[0].NotAfter.UTC().Format(time.RFC3339))
								if dir := c.String("write"); dir != "" {
									certs, key, err := svid.Marshal()
									if err != nil {
										return err
									}
									if err := os.MkdirAll(dir, 0o700); err != nil {
										return err
									}
									if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("svid.%d.pem", i)), certs, 0o644); err != nil {
										return err
									}
									if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("svid.%d.key", i)), key, 0o600); err != nil {
										return err
									}
									b, err := x.Bundles.GetX509BundleForTrustDomain(svid.ID.TrustDomain())
									if err == nil {
										var out []byte
										for _, ca := range b.X509Authorities() {
											out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Raw})...)
										}
										if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("bundle.%d.pem", i)), out, 0o644); err != nil {
											return err
										}
									}
								}
							}
							return nil
						},
					},
					{
						Name:  "jwt",
						Usage: "fetch a JWT-SVID for --audience (--write FILE, and --watch to keep FILE fresh)",
						Flags: []cli.Flag{workloadSocketFlag, timeout,
							&cli.StringSliceFlag{Name: "audience", Required: true, Usage: "audience of the JWT-SVID (repeatable; the first is the main one)"},
							&cli.StringFlag{Name: "spiffe-id", Usage: "which of this process's identities", Action: checked("spiffe-id", isSPIFFEID)},
							&cli.StringFlag{Name: "write", Usage: "file to write the token to (0600)"},
							&cli.BoolFlag{Name: "watch", Usage: "with --write: keep renewing the file before the token expires"},
						},
						Action: fetchJWT,
					},
					{
						Name:  "bundles",
						Usage: "fetch the trust bundles (X.509 and JWT) this process may use",
						Flags: []cli.Flag{workloadSocketFlag, timeout},
						Action: func(c *cli.Context) error {
							client, err := workloadClient(c)
							if err != nil {
								return err
							}
							defer client.Close()
							ctx, cancel := context.WithTimeout(c.Context, c.Duration("timeout"))
							defer cancel()
							xb, err := client.FetchX509Bundles(ctx)
							if err != nil {
								return err
							}
							for _, b := range xb.Bundles() {
								fmt.Fprintf(c.App.Writer, "* %s: %d X.509 authorities\n", b.TrustDomain(), len(b.X509Authorities()))
								for _, ca := range b.X509Authorities() {
									_ = pem.Encode(c.App.Writer, &pem.Block{Type: "CERTIFICATE", Bytes: ca.Raw})
								}
							}
							jb, err := client.FetchJWTBundles(ctx)
							if err != nil {
								return err
							}
							for _, b := range jb.Bundles() {
								fmt.Fprintf(c.App.Writer, "* %s: %d JWT authorities\n", b.TrustDomain(), len(b.JWTAuthorities()))
								for kid := range b.JWTAuthorities() {
									fmt.Fprintf(c.App.Writer, "  kid %s\n", kid)
								}
							}
							return nil
						},
					},
				},
			},
			{
				Name:  "validate",
				Usage: "validate tokens",
				Subcommands: []*cli.Command{{
					Name:  "jwt",
					Usage: "validate a JWT-SVID (--svid TOKEN, or - for stdin) for --audience",
					Flags: []cli.Flag{workloadSocketFlag, timeout, &cli.StringFlag{Name: "audience", Required: true, Usage: "audience the JWT-SVID must hold"}, &cli.StringFlag{Name: "svid", Required: true, Usage: `the JWT-SVID ("-" reads it from stdin)`}},
					Action: func(c *cli.Context) error {
						token := c.String("svid")
						if token == "-" {
							data, err := readAllStdin(c)
							if err != nil {
								return err
							}
							token = data
						}
						client, err := workloadClient(c)
						if err != nil {
							return err
						}
						defer client.Close()
						ctx, cancel := context.WithTimeout(c.Context, c.Duration("timeout"))
						defer cancel()
						svid, err := client.ValidateJWTSVID(ctx, token, c.String("audience"))
						if err != nil {
							return err
						}
						fmt.Fprintf(c.App.Writer, "valid: %s (expires %s)\n", svid.ID, svid.Expiry.UTC().Format(time.RFC3339))
						return nil
					},
				}},
			},
			{
				Name:  "watch",
				Usage: "print every X509-SVID update the agent pushes, until interrupted",
				Flags: []cli.Flag{workloadSocketFlag},
				Action: func(c *cli.Context) error {
					client, err := workloadClient(c)
					if err != nil {
						return err
					}
					defer client.Close()
					return client.WatchX509Context(c.Context, &printWatcher{c: c})
				},
			},
		},
	}
}

type printWatcher struct{ c *cli.Context }

func (w *printWatcher) OnX509ContextUpdate(x *workloadapi.X509Context) {
	fmt.Fprintf(w.c.App.Writer, "%s update: %d SVIDs\n", time.Now().UTC().Format(time.RFC3339Nano), len(x.SVIDs))
	for _, s := range x.SVIDs {
		fmt.Fprintf(w.c.App.Writer, "  %s (expires %s)\n", s.ID, s.Certificates[0].NotAfter.UTC().Format(time.RFC3339))
	}
}

func (w *printWatcher) OnX509ContextWatchError(err error) {
	fmt.Fprintf(w.c.App.ErrWriter, "watch error: %v\n", err)
}

func fetchJWT(c *cli.Context) error {
	client, err := workloadClient(c)
	if err != nil {
		return err
	}
	defer client.Close()
	auds := c.StringSlice("audience")
	params := jwtsvid.Params{Audience: auds[0], ExtraAudiences: auds[1:]}
	if s := c.String("spiffe-id"); s != "" {
		id, err := spiffeid.FromString(s)
		if err != nil {
			return err
		}
		params.Subject = id
	}
	path := c.String("write")
	if c.Bool("watch") && path == "" {
		return errors.New("--watch needs --write FILE")
	}
	for {
		ctx, cancel := context.WithTimeout(c.Context, c.Duration("timeout"))
		svid, err := client.FetchJWTSVID(ctx, params)
		cancel()
		var next time.Duration
		if err != nil {
			if !c.Bool("watch") {
				return err
			}
			fmt.Fprintln(c.App.ErrWriter, "fetch:", err)
			next = 5 * time.Second
		} else {
			if path == "" {
				fmt.Fprintln(c.App.Writer, svid.Marshal())
				return nil
			}
			if err := writeAtomic(path, []byte(svid.Marshal()), 0o600); err != nil {
				return err
			}
			if !c.Bool("watch") {
				return nil
			}
			// Renew at half of the remaining life, like the agent's own cache.
			next = max(time.Until(svid.Expiry)/2, time.Second)
		}
		select {
		case <-c.Context.Done():
			return nil
		case <-time.After(next):
		}
	}
}

// writeAtomic replaces path with data at mode, never leaving a wider mode on
// an existing file nor a half-written one.
func writeAtomic(path string, data []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return err
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

func readAllStdin(c *cli.Context) (string, error) {
	var buf []byte
	tmp := make([]byte, 4096)
	for {
		n, err := c.App.Reader.Read(tmp)
		buf = append(buf, tmp[:n]...)
		if err != nil {
			break
		}
	}
	s := string(buf)
	for len(s) > 0 && (s[len(s)-1] == '\n' || s[len(s)-1] == '\r') {
		s = s[:len(s)-1]
	}
	return s, nil
}
