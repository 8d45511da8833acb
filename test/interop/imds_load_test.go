package interop

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// The load generator for the managed-identity endpoint runs in a process of
// its own, so that the agent's figures are not flattered by sharing its
// address space with the client: this test binary re-executed with
// FERRY_IMDS_LOAD set (see loadMain), and wrk when it is installed
// (apt-get install wrk). Both keep one HTTP/1.1 keep-alive connection per
// worker and check every answer.

// loadResult is what a load child prints.
type loadResult struct {
	Requests int64   `json:"requests"`
	Seconds  float64 `json:"seconds"`
	P50us    float64 `json:"p50_us"`
	P99us    float64 `json:"p99_us"`
	Err      string  `json:"err,omitempty"`
}

func init() {
	if addr := os.Getenv("FERRY_IMDS_REFERENCE"); addr != "" {
		referenceMain(addr)
		os.Exit(0)
	}
	if os.Getenv("FERRY_IMDS_LOAD") == "" {
		return
	}
	r := loadMain()
	_ = json.NewEncoder(os.Stdout).Encode(r)
	os.Exit(0)
}

// loadMain sends FERRY_IMDS_LOAD_REQUEST to FERRY_IMDS_LOAD (host:port) from
// FERRY_IMDS_LOAD_CONC connections for FERRY_IMDS_LOAD_DURATION, each
// connection one request at a time; every answer must be a 200 with a body.
func loadMain() loadResult {
	addr := os.Getenv("FERRY_IMDS_LOAD")
	request := []byte(os.Getenv("FERRY_IMDS_LOAD_REQUEST"))
	conc, err1 := strconv.Atoi(os.Getenv("FERRY_IMDS_LOAD_CONC"))
	dur, err2 := time.ParseDuration(os.Getenv("FERRY_IMDS_LOAD_DURATION"))
	if err := errors.Join(err1, err2); err != nil || conc < 1 {
		return loadResult{Err: fmt.Sprintf("bad load parameters: %v", err)}
	}
	lat := make([][]time.Duration, conc)
	errs := make([]error, conc)
	var wg sync.WaitGroup
	start := time.Now()
	stop := start.Add(dur)
	for w := range conc {
		lat[w] = make([]time.Duration, 0, 1<<16)
		wg.Go(func() {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				errs[w] = err
				return
			}
			defer c.Close()
			br := bufio.NewReaderSize(c, 8192)
			for {
				t0 := time.Now()
				if !t0.Before(stop) {
					return
				}
				if _, err := c.Write(request); err != nil {
					errs[w] = err
					return
				}
				if err := readOK(br); err != nil {
					errs[w] = err
					return
				}
				lat[w] = append(lat[w], time.Since(t0))
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	if err := errors.Join(errs...); err != nil {
		return loadResult{Err: err.Error()}
	}
	all := slices.Concat(lat...)
	slices.Sort(all)
	if len(all) == 0 {
		return loadResult{Err: "no responses"}
	}
	q := func(p float64) float64 {
		return float64(all[min(len(all)-1, int(p*float64(len(all))))].Nanoseconds()) / 1e3
	}
	return loadResult{Requests: int64(len(all)), Seconds: elapsed.Seconds(), P50us: q(0.50), P99us: q(0.99)}
}

// readOK reads one response, which must be a 200 with a Content-Length body
// holding an access token. It parses only what it needs, so the driver
// spends its CPU on sending requests.
func readOK(br *bufio.Reader) error {
	line, err := br.ReadSlice('\n')
	if err != nil {
		return err
	}
	if !bytes.HasPrefix(line, []byte("HTTP/1.1 200 ")) {
		return fmt.Errorf("status line %q", bytes.TrimSpace(line))
	}
	n := -1
	for {
		line, err := br.ReadSlice('\n')
		if err != nil {
			return err
		}
		if len(line) <= 2 {
			break
		}
		if len(line) > 16 && bytes.EqualFold(line[:15], []byte("Content-Length:")) {
			n, err = strconv.Atoi(string(bytes.TrimSpace(line[15:])))
			if err != nil {
				return fmt.Errorf("content length %q", line)
			}
		}
	}
	if n <= 0 {
		return errors.New("response without a body length")
	}
	body, err := br.Peek(min(n, br.Size()))
	if err != nil {
		return err
	}
	if !bytes.Contains(body, []byte(`"access_token":"ey`)) {
		return fmt.Errorf("body without an access token: %.200s", body)
	}
	_, err = br.Discard(n)
	return err
}

// referenceMain serves a fixed token response with net/http and nothing
// else, until stdin closes: the ceiling of any net/http endpoint on this
// machine, measured alongside the agent.
func referenceMain(addr string) {
	body := []byte(`{"access_token":"ey` + strings.Repeat("x", 900) + `","client_id":"00000000-0000-0000-0000-000000000000",` +
		`"expires_in":"86399","expires_on":"1900000000","ext_expires_in":"86399","not_before":"1800000000",` +
		`"resource":"api://imds-demo","token_type":"Bearer","refresh_token":""}`)
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return
	}
	go func() { _, _ = io.Copy(io.Discard, os.Stdin); ln.Close() }()
	_ = http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Metadata") != "true" {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Type", "application/json; charset=utf-8")
		_, _ = w.Write(body)
	}))
}

// cpuTicks is the user and system CPU time of a process, in clock ticks.
func cpuTicks(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	// utime and stime are fields 14 and 15; f[0] is field 3.
	u, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	return u + st, errors.Join(err1, err2)
}

// clockTicks is USER_HZ, 100 on every Linux architecture Go supports.
const clockTicks = 100

// loadConcurrencies are the connection counts the load benchmarks use.
var loadConcurrencies = []int{1, 16, 64}

// loadDuration is how long each load run lasts (FERRY_IMDS_LOAD_SECONDS).
func loadDuration() time.Duration {
	if s, err := strconv.Atoi(os.Getenv("FERRY_IMDS_LOAD_SECONDS")); err == nil && s > 0 {
		return time.Duration(s) * time.Second
	}
	return 5 * time.Second
}

// BenchmarkIMDSAgentLoad measures the agent process's managed-identity
// endpoint under a load generator in another process: cached-token
// responses (VM style, a named user-assigned identity; caller lookup,
// attestation and identity selection included) at 1, 16 and 64 keep-alive
// connections, from the Go driver and from wrk when installed; then the
// cold path (attestation, JWT-SVID, exchange at the bridge) one request at a
// time. Each sub-benchmark runs once (b.N is ignored): use -benchtime 1x.
func BenchmarkIMDSAgentLoad(b *testing.B) {
	ag := startIMDSAgent(b)
	require := func(err error) {
		if err != nil {
			b.Fatal(err)
		}
	}
	require(ag.vmGet(&http.Client{}, imdsRes))
	target := "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=" + url.QueryEscape(imdsRes) +
		"&client_id=" + ag.ids["imds-a"].clientID
	request := "GET " + target + " HTTP/1.1\r\nHost: " + ag.vm + "\r\nMetadata: true\r\n\r\n"
	dur := loadDuration()
	// The CPU the agent spends per response does not depend on what else
	// the machine runs; requests/s does.
	perResponse := func(b *testing.B, run func() (int64, error)) {
		t0, err := cpuTicks(ag.pid)
		require(err)
		n, err := run()
		require(err)
		t1, err := cpuTicks(ag.pid)
		require(err)
		if n > 0 {
			b.ReportMetric(float64(t1-t0)/clockTicks*1e6/float64(n), "agent-cpu-µs/resp")
		}
	}
	for _, conc := range loadConcurrencies {
		b.Run(fmt.Sprintf("driver=go/conns=%d", conc), func(b *testing.B) {
			perResponse(b, func() (int64, error) {
				r, err := goLoad(ag.vm, request, conc, dur)
				if err != nil {
					return 0, err
				}
				r.report(b)
				return r.Requests, nil
			})
		})
	}
	if _, err := exec.LookPath("wrk"); err == nil {
		for _, conc := range loadConcurrencies {
			b.Run(fmt.Sprintf("driver=wrk/conns=%d", conc), func(b *testing.B) {
				perResponse(b, func() (int64, error) {
					r, err := runWrk("http://"+ag.vm+target, conc, dur)
					if err != nil {
						return 0, err
					}
					b.ReportMetric(r.rps, "req/s")
					b.ReportMetric(r.p50, "p50-µs")
					b.ReportMetric(r.p99, "p99-µs")
					return int64(r.rps * dur.Seconds()), nil
				})
			})
		}
	} else {
		b.Log("wrk is not installed (apt-get install wrk): only the Go driver ran")
	}
	// The same driver against a bare net/http server in another process.
	b.Run("reference=net-http/driver=go/conns=64", func(b *testing.B) {
		addr := fmt.Sprintf("127.0.0.1:%d", freePort(b))
		srv := exec.Command(filepath.Join(filepath.Dir(dev.bin), "interop.test"), "-test.run", "^$")
		srv.Env = append(os.Environ(), "FERRY_IMDS_REFERENCE="+addr)
		stdin, err := srv.StdinPipe()
		require(err)
		require(srv.Start())
		defer func() { stdin.Close(); _ = srv.Wait() }()
		for range 50 {
			if c, err := net.Dial("tcp", addr); err == nil {
				c.Close()
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		req := strings.Replace(request, "Host: "+ag.vm, "Host: "+addr, 1)
		t0, err := cpuTicks(srv.Process.Pid)
		require(err)
		r, err := goLoad(addr, req, 64, dur)
		require(err)
		t1, err := cpuTicks(srv.Process.Pid)
		require(err)
		r.report(b)
		b.ReportMetric(float64(t1-t0)/clockTicks*1e6/float64(r.Requests), "server-cpu-µs/resp")
	})
	b.Run("cold", func(b *testing.B) {
		c := &http.Client{}
		var lat []time.Duration
		start := time.Now()
		for range 20 {
			i := int(coldNext.Add(1)) - 1
			if i >= len(ag.coldURIs) {
				b.Skip("no uncached resources left")
			}
			t0 := time.Now()
			require(ag.vmGet(c, ag.coldURIs[i]))
			lat = append(lat, time.Since(t0))
		}
		reportLatency(b, lat, time.Since(start))
	})
}

// goLoad runs the Go driver in a child process.
func goLoad(addr, request string, conns int, dur time.Duration) (loadResult, error) {
	cmd := exec.Command(filepath.Join(filepath.Dir(dev.bin), "interop.test"), "-test.run", "^$")
	cmd.Env = append(os.Environ(), "FERRY_IMDS_LOAD="+addr, "FERRY_IMDS_LOAD_REQUEST="+request,
		"FERRY_IMDS_LOAD_CONC="+strconv.Itoa(conns), "FERRY_IMDS_LOAD_DURATION="+dur.String())
	out, err := cmd.Output()
	if err != nil {
		return loadResult{}, fmt.Errorf("load driver: %w", err)
	}
	var r loadResult
	if err := json.Unmarshal(out, &r); err != nil {
		return loadResult{}, fmt.Errorf("load driver output %q: %w", out, err)
	}
	if r.Err != "" {
		return loadResult{}, errors.New(r.Err)
	}
	return r, nil
}

func (r loadResult) report(b *testing.B) {
	b.ReportMetric(float64(r.Requests)/r.Seconds, "req/s")
	b.ReportMetric(r.P50us, "p50-µs")
	b.ReportMetric(r.P99us, "p99-µs")
}

type wrkResult struct{ rps, p50, p99 float64 }

// runWrk runs wrk against u with conns connections and reports its
// requests/s and latency percentiles. wrk reports answers other than 2xx
// and 3xx, and socket errors; either fails the run.
func runWrk(u string, conns int, dur time.Duration) (wrkResult, error) {
	threads := min(conns, 2)
	out, err := exec.Command("wrk", "-t", strconv.Itoa(threads), "-c", strconv.Itoa(conns), "-d", dur.String(),
		"--latency", "-H", "Metadata: true", u).CombinedOutput()
	if err != nil {
		return wrkResult{}, fmt.Errorf("wrk: %w\n%s", err, out)
	}
	s := string(out)
	if strings.Contains(s, "Non-2xx or 3xx responses") || strings.Contains(s, "Socket errors") {
		return wrkResult{}, fmt.Errorf("wrk saw failures:\n%s", s)
	}
	var r wrkResult
	if m := regexp.MustCompile(`Requests/sec:\s+([0-9.]+)`).FindStringSubmatch(s); m != nil {
		r.rps, _ = strconv.ParseFloat(m[1], 64)
	}
	for _, p := range []struct {
		name string
		dst  *float64
	}{{"50", &r.p50}, {"99", &r.p99}} {
		m := regexp.MustCompile(`\n\s+` + p.name + `%\s+([0-9.]+)(us|ms|s)`).FindStringSubmatch(s)
		if m == nil {
			return wrkResult{}, fmt.Errorf("wrk output without a %s%% latency:\n%s", p.name, s)
		}
		v, _ := strconv.ParseFloat(m[1], 64)
		switch m[2] {
		case "ms":
			v *= 1e3
		case "s":
			v *= 1e6
		}
		*p.dst = v
	}
	if r.rps == 0 {
		return wrkResult{}, fmt.Errorf("wrk output without requests/s:\n%s", s)
	}
	return r, nil
}
