// Command oidcissuer runs the test OIDC issuer of package oidcissuer as a
// process, for trying federation by hand:
//
//	go run ./test/oidcissuer/cmd/oidcissuer --addr 127.0.0.1:9443 --ca-out /tmp/issuer-ca.pem
//	curl --cacert /tmp/issuer-ca.pem 'https://127.0.0.1:9443/mint?sub=repo:org/app:ref:refs/heads/main'
//
// The bridge trusts it when started with SSL_CERT_FILE naming the CA file.
package main

import (
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/ferry-id/ferry/test/oidcissuer"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:9443", "listen address")
	path := flag.String("path", "", `issuer path after https://host:port (e.g. "/tenant/")`)
	caOut := flag.String("ca-out", "oidcissuer-ca.pem", "where to write the CA certificate clients must trust")
	flag.Parse()
	iss, err := oidcissuer.Start(oidcissuer.Config{Addr: *addr, Path: *path, Mint: true})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	if err := iss.WriteCA(*caOut); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Printf("issuer %s\ndiscovery %s\nCA %s\nmint %s\n", iss.URL(), iss.DiscoveryURL(), *caOut, iss.MintURL("SUBJECT", oidcissuer.Exchange))
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	<-sig
	_ = iss.Close()
}
