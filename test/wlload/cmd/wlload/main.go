// Command wlload runs wlload.Run in its own process and prints one JSON
// object: the calls made, their p50 and p99 latency, and the CPU time this
// process used.
//
//	wlload -addr unix:///run/ferry/public/api.sock -call x509 -mode reused -c 16 -seconds 3 [-client grpc]
//	wlload -addr unix:///run/ferry/agent/public/api.sock -replay-on $XDG_RUNTIME_DIR/replay.sock
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/ferry-id/ferry/test/wlload"
)

func main() {
	addr := flag.String("addr", "", "Workload API address (unix:///path)")
	call := flag.String("call", "x509", "x509 or jwt")
	mode := flag.String("mode", "reused", "reused (one client per goroutine) or new (a client per call)")
	conc := flag.Int("c", 1, "concurrent callers")
	seconds := flag.Float64("seconds", 3, "duration")
	audience := flag.String("audience", "spiffe://example.org/bench", "JWT-SVID audience")
	client := flag.String("client", "go-spiffe", "go-spiffe (workloadapi.Client) or grpc (bare generated stubs)")
	replay := flag.String("replay-on", "", "record one answer of each kind from -addr, then serve them on this unix socket path until killed (see wlload.Replayer)")
	flag.Parse()
	if *replay != "" {
		serveReplay(*addr, *replay, *audience)
		return
	}
	if *addr == "" || *conc < 1 || (*call != "x509" && *call != "jwt") || (*mode != "reused" && *mode != "new") {
		flag.Usage()
		os.Exit(2)
	}
	res := wlload.Run(*addr, *client, *call, *mode, *conc, time.Duration(*seconds*float64(time.Second)), *audience)
	if err := json.NewEncoder(os.Stdout).Encode(res); err != nil {
		os.Exit(1)
	}
}

func serveReplay(addr, path, audience string) {
	fail := func(err error) {
		fmt.Fprintln(os.Stderr, "wlload:", err)
		os.Exit(1)
	}
	r, err := wlload.Record(context.Background(), addr, audience)
	if err != nil {
		fail(err)
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		fail(err)
	}
	fmt.Println("serving")
	fail(r.Serve(l))
}
