// Command h2attack runs one attack of package h2attack against a Workload
// API socket, as a process of its own (the hostile suites start it as
// another uid).
//
//	h2attack -socket /run/ferry/agent/public/api.sock -mode headers -conns 100 -streams 256 -header-bytes 3800 -refs 1
//	h2attack -socket ... -mode bodies -conns 100 -streams 4 -body-bytes 1048576
//	h2attack -socket ... -mode idle -conns 7000
//	h2attack -socket ... -mode flood -rounds 20000 -conns 300
//
// headers, bodies and idle print "ready" and a JSON report once their
// frames are written, then hold their connections until standard input is
// closed, and print the final report. flood prints its report when done.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/ferry-id/ferry/test/h2attack"
)

func main() {
	var o h2attack.Options
	mode := flag.String("mode", "", "headers, bodies, idle or flood")
	flag.StringVar(&o.Socket, "socket", "", "Workload API socket path")
	flag.IntVar(&o.Conns, "conns", 1, "connections")
	flag.IntVar(&o.Streams, "streams", 1, "calls per connection (headers, bodies)")
	flag.IntVar(&o.HeaderBytes, "header-bytes", 3800, "HPACK size of the -bin header (headers)")
	flag.IntVar(&o.Refs, "refs", 4, "times each call repeats the -bin header (headers)")
	flag.IntVar(&o.BodyBytes, "body-bytes", 1<<20, "declared request size (bodies)")
	flag.IntVar(&o.Rounds, "rounds", 1000, "calls opened and reset (flood)")
	flag.Parse()
	if o.Socket == "" {
		flag.Usage()
		os.Exit(2)
	}
	stats := &h2attack.Stats{}
	var (
		conns []*h2attack.Conn
		err   error
	)
	switch *mode {
	case "headers":
		conns, err = h2attack.HeadersFlood(o, stats)
	case "bodies":
		conns, err = h2attack.Bodies(o, stats)
	case "idle":
		conns, err = h2attack.Idle(o, stats)
	case "flood":
		err = h2attack.Flood(o, stats)
		report(stats)
		if err != nil {
			fmt.Fprintln(os.Stderr, "h2attack:", err)
			os.Exit(1)
		}
		return
	default:
		flag.Usage()
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "h2attack:", err)
		os.Exit(1)
	}
	fmt.Print("ready ")
	report(stats)
	_, _ = io.Copy(io.Discard, os.Stdin)
	report(stats)
	for _, c := range conns {
		c.Close()
	}
}

func report(stats *h2attack.Stats) {
	_ = json.NewEncoder(os.Stdout).Encode(stats.Report())
}
