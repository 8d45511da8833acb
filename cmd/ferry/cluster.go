package main

import (
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"text/tabwriter"

	"github.com/urfave/cli/v2"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/api"
	"github.com/ferry-id/ferry/server/ca"
	"github.com/ferry-id/ferry/server/cluster"
)

func clusterCommand() *cli.Command {
	return &cli.Command{
		Name:  "cluster",
		Usage: "manage the servers' Raft cluster",
		Subcommands: []*cli.Command{
			{
				Name:      "join",
				Usage:     "make this server join the cluster of the member at ADDR (its cluster address)",
				ArgsUsage: "ADDR",
				Flags:     adminFlags(),
				Action: func(c *cli.Context) error {
					if err := api.CheckClusterAddress(c.Args().First()); err != nil {
						return err
					}
					return withAdmin(c, func(ctx context.Context, a ferrypb.AdminClient) error {
						if _, err := a.ClusterJoin(ctx, &ferrypb.ClusterJoinRequest{Address: c.Args().First()}); err != nil {
							return err
						}
						fmt.Fprintln(c.App.Writer, "joined")
						return nil
					})
				},
			},
			{
				Name:  "list",
				Usage: "list the cluster's servers",
				Flags: adminFlags(),
				Action: func(c *cli.Context) error {
					return withAdmin(c, func(ctx context.Context, a ferrypb.AdminClient) error {
						resp, err := a.ClusterList(ctx, &ferrypb.ClusterListRequest{})
						if err != nil {
							return err
						}
						if jsonOutput(c) {
							return printJSON(c.App.Writer, resp)
						}
						tw := tabwriter.NewWriter(c.App.Writer, 0, 4, 2, ' ', 0)
						fmt.Fprintln(tw, "ID\tADDRESS\tVOTER\tLEADER\tLAST INDEX")
						for _, m := range resp.Members {
							fmt.Fprintf(tw, "%s\t%s\t%t\t%t\t%d\n", m.Id, m.Address, m.Voter, m.Leader, m.LastIndex)
						}
						fmt.Fprintf(tw, "\nterm %d, commit index %d, applied index %d\n", resp.Term, resp.CommitIndex, resp.AppliedIndex)
						return tw.Flush()
					})
				},
			},
			{
				Name:      "remove",
				Usage:     "remove server ID from the cluster",
				ArgsUsage: "ID",
				Flags:     adminFlags(),
				Action: func(c *cli.Context) error {
					return withAdmin(c, func(ctx context.Context, a ferrypb.AdminClient) error {
						if _, err := a.ClusterRemove(ctx, &ferrypb.ClusterRemoveRequest{Id: c.Args().First()}); err != nil {
							return err
						}
						fmt.Fprintln(c.App.Writer, "removed", c.Args().First())
						return nil
					})
				},
			},
			{
				Name:  "snapshot",
				Usage: "save or restore the whole cluster state",
				Subcommands: []*cli.Command{
					{
						Name:      "save",
						Usage:     "write a checksummed snapshot of the cluster state to FILE",
						ArgsUsage: "FILE",
						Flags:     adminFlags(),
						Action:    snapshotSave,
					},
					{
						Name:      "restore",
						Usage:     "replace the whole cluster state with the snapshot in FILE (disaster recovery)",
						ArgsUsage: "FILE",
						Flags:     adminFlags(),
						Action:    snapshotRestore,
					},
				},
			},
			{
				Name:  "tls",
				Usage: "create the certificates servers use to authenticate each other",
				Subcommands: []*cli.Command{
					{
						Name:  "ca",
						Usage: "cluster CA",
						Subcommands: []*cli.Command{{
							Name:  "create",
							Usage: "create a cluster CA (ca.pem, ca-key.pem) in --dir",
							Flags: []cli.Flag{
								&cli.StringFlag{Name: "dir", Value: ".", Usage: "output directory"},
								&cli.BoolFlag{Name: "force", Usage: "overwrite existing files"},
							},
							Action: func(c *cli.Context) error {
								files, err := cluster.CreateCA(cluster.CAOptions{Dir: c.String("dir"), Force: c.Bool("force")})
								if err != nil {
									return err
								}
								fmt.Fprintf(c.App.Writer, "wrote %s and %s (keep the key offline)\n", files.CertFile, files.KeyFile)
								return nil
							},
						}},
					},
					{
						Name:  "cert",
						Usage: "server node certificates",
						Subcommands: []*cli.Command{{
							Name:  "create",
							Usage: "create a certificate for server node --node, signed by the cluster CA",
							Flags: []cli.Flag{
								&cli.StringFlag{Name: "node", Required: true, Usage: "node ID (as node_id in server.conf)"},
								&cli.StringFlag{Name: "dir", Value: ".", Usage: "output directory"},
								&cli.StringFlag{Name: "ca", Value: "ca.pem", Usage: "cluster CA certificate"},
								&cli.StringFlag{Name: "ca-key", Value: "ca-key.pem", Usage: "cluster CA key"},
								&cli.StringSliceFlag{Name: "dns", Usage: "extra DNS name (repeatable)", Action: checkedSlice("dns", ca.CheckDNSNames)},
								&cli.StringSliceFlag{Name: "ip", Usage: "extra IP address (repeatable)"},
								&cli.BoolFlag{Name: "force", Usage: "overwrite existing files"},
							},
							Action: func(c *cli.Context) error {
								var ips []net.IP
								for _, s := range c.StringSlice("ip") {
									ip := net.ParseIP(s)
									if ip == nil {
										return fmt.Errorf("--ip %q is not an IP address", s)
									}
									ips = append(ips, ip)
								}
								files, err := cluster.CreateNodeCert(cluster.CertOptions{
									Dir: c.String("dir"), CACertFile: c.String("ca"), CAKeyFile: c.String("ca-key"),
									NodeID: c.String("node"), DNSNames: c.StringSlice("dns"), IPs: ips, Force: c.Bool("force"),
								})
								if err != nil {
									return err
								}
								fmt.Fprintf(c.App.Writer, "wrote %s and %s\n", files.CertFile, files.KeyFile)
								return nil
							},
						}},
					},
				},
			},
		},
	}
}

func snapshotSave(c *cli.Context) error {
	path := c.Args().First()
	return withAdmin(c, func(ctx context.Context, a ferrypb.AdminClient) error {
		stream, err := a.SnapshotSave(ctx, &ferrypb.SnapshotSaveRequest{})
		if err != nil {
			return err
		}
		tmp, err := os.CreateTemp(filepath.Dir(path), ".snapshot-*")
		if err != nil {
			return err
		}
		defer os.Remove(tmp.Name())
		h := sha256.New()
		w := io.MultiWriter(tmp, h)
		var n int64
		for {
			chunk, err := stream.Recv()
			if err == io.EOF {
				break
			}
			if err != nil {
				tmp.Close()
				return err
			}
			if _, err := w.Write(chunk.Data); err != nil {
				tmp.Close()
				return err
			}
			n += int64(len(chunk.Data))
		}
		if err := tmp.Chmod(0o600); err != nil {
			tmp.Close()
			return err
		}
		if err := tmp.Sync(); err != nil {
			tmp.Close()
			return err
		}
		if err := tmp.Close(); err != nil {
			return err
		}
		if err := os.Rename(tmp.Name(), path); err != nil {
			return err
		}
		fmt.Fprintf(c.App.Writer, "saved %s (%d bytes, sha256 %x)\n", path, n, h.Sum(nil))
		return nil
	})
}

func snapshotRestore(c *cli.Context) error {
	f, err := os.Open(c.Args().First())
	if err != nil {
		return err
	}
	defer f.Close()
	return withAdmin(c, func(ctx context.Context, a ferrypb.AdminClient) error {
		stream, err := a.SnapshotRestore(ctx)
		if err != nil {
			return err
		}
		buf := make([]byte, 1<<20)
		for {
			n, rerr := f.Read(buf)
			if n > 0 {
				if err := stream.Send(&ferrypb.SnapshotChunk{Data: append([]byte(nil), buf[:n]...)}); err != nil {
					if err == io.EOF {
						break // the server ended the stream; CloseAndRecv has its reason
					}
					return err
				}
			}
			if rerr == io.EOF {
				break
			}
			if rerr != nil {
				return rerr
			}
		}
		resp, err := stream.CloseAndRecv()
		if err != nil {
			return err
		}
		fmt.Fprintf(c.App.Writer, "restored; cluster state is now at index %d\n", resp.Index)
		return nil
	})
}
