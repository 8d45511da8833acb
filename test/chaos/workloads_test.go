package chaos_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/test/testcluster"
)

// The campaign's workloads: real `ferry agent run` processes, each serving a
// workload (this test process, by its uid) through the Workload API, and a
// real `ferry bridge run` that exchanges the workloads' JWT-SVIDs for access
// tokens. While the nemesis faults the servers, every workload keeps
// fetching its X509-SVID and exchanging a JWT-SVID at the bridge.

const (
	chaosIssuer   = "https://oidc.chaos.example"
	chaosTenant   = "7c0e7a3e-0000-4000-8000-00000000c4a0"
	chaosResource = "api://chaos"
	exchangeAud   = "api://AzureADTokenExchange"
	// A workload SVID lives 60 s and is renewed at half life: an outage of
	// every server shorter than 30 s must not leave a workload without one.
	workloadSVIDTTL = 60
)

var oidcBlock = fmt.Sprintf("  oidc {\n    issuer = %q\n  }\n", chaosIssuer)

type workload struct {
	agent    *testcluster.Agent
	spiffeID string
	clientID string
	client   *workloadapi.Client
}

// probe is one X509-SVID fetch by a workload.
type probe struct {
	at     time.Time
	ok     bool // an SVID valid at the time came back
	reason string
}

// exchange is one JWT-SVID fetch and token request at the bridge.
type exchange struct {
	start, end time.Time
	ok         bool
}

type workloads struct {
	h       *harness
	list    []*workload
	bridge  *exec.Cmd
	bridgeD string
	token   string // the bridge's v2 token endpoint
	https   *http.Client

	stop chan struct{}
	wg   sync.WaitGroup

	mu        sync.Mutex
	probes    map[string][]probe
	exchanges []exchange
	failures  map[string]int // exchange failures by cause
	rotations map[string]map[string]bool
}

func (h *harness) cli(args ...string) string {
	h.t.Helper()
	l := h.settle()
	out, err := l.CLI(args...)
	if err != nil {
		h.t.Fatalf("ferry %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// startWorkloads starts n agents, one workload entry on each, the bridge's
// directory (tenant, identity per workload, federated credential, resource,
// role) and a bridge process replicating it from the first node.
func startWorkloads(h *harness, n int) *workloads {
	t := h.t
	w := &workloads{h: h, stop: make(chan struct{}), probes: map[string][]probe{}, failures: map[string]int{}, rotations: map[string]map[string]bool{}}
	h.cli("tenant", "create", "--name", "chaos", "--tenant-id", chaosTenant)
	h.cli("resource", "create", "--name", "chaos", "--identifier-uri", chaosResource, "--app-role", "reader")
	for i := range n {
		a := h.c.StartAgent(fmt.Sprintf("a%d", i+1))
		wl := &workload{agent: a, spiffeID: fmt.Sprintf("spiffe://example.org/chaos-workload/%d", i+1)}
		l := h.settle()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_, err := l.Admin().BatchCreateEntry(ctx, &ferrypb.BatchCreateEntryRequest{Entries: []*ferrypb.Entry{{
			Id: fmt.Sprintf("workload-%d", i+1), SpiffeId: wl.spiffeID, ParentId: a.ID, X509SvidTtl: workloadSVIDTTL,
			Selectors: []*ferrypb.Selector{{Type: "unix", Value: fmt.Sprintf("uid:%d", os.Getuid())}},
		}}})
		cancel()
		if err != nil {
			t.Fatalf("workload entry: %v", err)
		}
		name := fmt.Sprintf("chaos-id-%d", i+1)
		var id struct {
			ClientID string `json:"client_id"`
		}
		if err := json.Unmarshal([]byte(h.cli("identity", "create", "--name", name, "--output", "json")), &id); err != nil {
			t.Fatal(err)
		}
		wl.clientID = id.ClientID
		h.cli("identity", "federated-credential", "create", "--identity-name", name, "--name", "spiffe",
			"--issuer", chaosIssuer, "--subject", wl.spiffeID)
		h.cli("role", "assign", "--identity-name", name, "--resource", chaosResource, "--role", "reader")
		cl, err := workloadapi.New(context.Background(), workloadapi.WithAddr(a.SocketAddr()))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cl.Close() })
		wl.client = cl
		w.list = append(w.list, wl)
	}
	w.startBridge()
	// Everything works before the first fault.
	deadline := time.Now().Add(60 * time.Second)
	for _, wl := range w.list {
		for {
			ok, why := w.exchangeOnce(wl)
			if ok {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("no token exchange for %s before the faults: %s\n%s", wl.spiffeID, why, w.bridgeLog(40))
			}
			time.Sleep(250 * time.Millisecond)
		}
	}
	return w
}

func (w *workloads) startBridge() {
	t := w.h.t
	w.bridgeD = filepath.Join(w.h.c.Dir, "bridge")
	if err := os.MkdirAll(w.bridgeD, 0o700); err != nil {
		t.Fatal(err)
	}
	addr := testcluster.FreeAddr(t)
	conf := filepath.Join(w.bridgeD, "bridge.conf")
	// The bridge follows the directory through every server's socket, so
	// it keeps following while the nemesis kills any of them.
	var sockets []string
	for _, n := range w.h.c.Nodes {
		sockets = append(sockets, strconv.Quote(n.Socket))
	}
	if err := os.WriteFile(conf, []byte(fmt.Sprintf(`bridge {
  listen_addr    = %q
  data_dir       = "data"
  server_sockets = [%s]
  name           = "chaos"
  log_level      = "info"
}
`, addr, strings.Join(sockets, ", "))), 0o600); err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(filepath.Join(w.bridgeD, "bridge.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(w.h.c.Bin, "bridge", "run", "--config", conf)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w.bridge = cmd
	t.Cleanup(func() {
		_ = cmd.Process.Signal(os.Interrupt)
		_ = cmd.Wait()
		logf.Close()
		if t.Failed() {
			t.Logf("==== bridge\n%s", w.bridgeLog(60))
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		pem, err := os.ReadFile(filepath.Join(w.bridgeD, "data", "tls-ca.pem"))
		if err == nil {
			pool := x509.NewCertPool()
			pool.AppendCertsFromPEM(pem)
			w.https = &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("bridge did not start:\n%s", w.bridgeLog(40))
		}
		time.Sleep(100 * time.Millisecond)
	}
	w.token = "https://" + addr + "/" + chaosTenant + "/oauth2/v2.0/token"
}

func (w *workloads) bridgeLog(lines int) string {
	data, _ := os.ReadFile(filepath.Join(w.bridgeD, "bridge.log"))
	all := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(all) > lines {
		all = all[len(all)-lines:]
	}
	return strings.Join(all, "\n")
}

// exchangeOnce fetches a JWT-SVID from the workload's agent and trades it at
// the bridge for an access token.
func (w *workloads) exchangeOnce(wl *workload) (bool, string) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	svid, err := wl.client.FetchJWTSVID(ctx, jwtsvid.Params{Audience: exchangeAud})
	if err != nil {
		return false, "JWT-SVID: " + status.Code(err).String()
	}
	form := url.Values{
		"grant_type":            {"client_credentials"},
		"client_id":             {wl.clientID},
		"client_assertion_type": {"urn:ietf:params:oauth:client-assertion-type:jwt-bearer"},
		"client_assertion":      {svid.Marshal()},
		"scope":                 {chaosResource + "/.default"},
	}
	resp, err := w.https.PostForm(w.token, form)
	if err != nil {
		return false, "bridge unreachable"
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
	var out struct {
		AccessToken string `json:"access_token"`
		Error       string `json:"error"`
		Codes       []int  `json:"error_codes"`
	}
	_ = json.Unmarshal(body, &out)
	if resp.StatusCode != http.StatusOK || out.AccessToken == "" {
		return false, fmt.Sprintf("bridge %d %s %v", resp.StatusCode, out.Error, out.Codes)
	}
	return true, ""
}

// run probes every workload's X509-SVID every 250 ms and exchanges a token
// for each every second, until finish.
func (w *workloads) run() {
	for _, wl := range w.list {
		w.wg.Add(2)
		go func() {
			defer w.wg.Done()
			tick := time.NewTicker(250 * time.Millisecond)
			defer tick.Stop()
			for {
				select {
				case <-w.stop:
					return
				case <-tick.C:
				}
				w.probe(wl)
			}
		}()
		go func() {
			defer w.wg.Done()
			tick := time.NewTicker(time.Second)
			defer tick.Stop()
			for {
				select {
				case <-w.stop:
					return
				case <-tick.C:
				}
				start := time.Now()
				ok, why := w.exchangeOnce(wl)
				w.mu.Lock()
				w.exchanges = append(w.exchanges, exchange{start, time.Now(), ok})
				if !ok {
					w.failures[why]++
				}
				w.mu.Unlock()
			}
		}()
	}
}

func (w *workloads) probe(wl *workload) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	now := time.Now()
	svid, err := wl.client.FetchX509SVID(ctx)
	p := probe{at: now, ok: true}
	switch {
	case err != nil:
		p.ok, p.reason = false, "fetch failed: "+status.Code(err).String()
	case svid.ID.String() != wl.spiffeID:
		p.ok, p.reason = false, "wrong SPIFFE ID "+svid.ID.String()
	case now.Before(svid.Certificates[0].NotBefore) || !now.Before(svid.Certificates[0].NotAfter):
		p.ok, p.reason = false, "expired"
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.probes[wl.spiffeID] = append(w.probes[wl.spiffeID], p)
	if p.ok {
		if w.rotations[wl.spiffeID] == nil {
			w.rotations[wl.spiffeID] = map[string]bool{}
		}
		w.rotations[wl.spiffeID][svid.Certificates[0].SerialNumber.String()] = true
	}
}

func (w *workloads) finish() {
	close(w.stop)
	w.wg.Wait()
}

// workloadReport is what the workloads saw.
type workloadReport struct {
	agents               int
	probes, probeFails   int
	failReasons          map[string]int
	maxGap               time.Duration // longest time a workload went without a valid SVID
	svids                int           // distinct SVIDs seen (renewals + 1 per workload)
	exchangesOK          int
	exchangesFailed      int
	exchangeFailures     map[string]int
	faults, recovered    int
	recovery             []time.Duration // fault -> first successful exchange begun after it
	refusedByAgent       int             // probes the agent answered with an error other than a timeout
	expired, wrongIDSeen int
}

func (w *workloads) report(faults []faultRecord) *workloadReport {
	w.mu.Lock()
	defer w.mu.Unlock()
	r := &workloadReport{agents: len(w.list), failReasons: map[string]int{}, exchangeFailures: w.failures}
	for _, ps := range w.probes {
		last := time.Time{}
		for _, p := range ps {
			r.probes++
			if !p.ok {
				r.probeFails++
				r.failReasons[p.reason]++
				switch {
				case p.reason == "expired":
					r.expired++
				case strings.HasPrefix(p.reason, "wrong"):
					r.wrongIDSeen++
				case p.reason != "fetch failed: "+codes.DeadlineExceeded.String():
					r.refusedByAgent++
				}
				continue
			}
			if !last.IsZero() {
				r.maxGap = max(r.maxGap, p.at.Sub(last))
			}
			last = p.at
		}
	}
	for _, s := range w.rotations {
		r.svids += len(s)
	}
	for _, e := range w.exchanges {
		if e.ok {
			r.exchangesOK++
		} else {
			r.exchangesFailed++
		}
	}
	for _, f := range faults {
		r.faults++
		var best time.Time
		for _, e := range w.exchanges {
			if e.ok && e.start.After(f.at) && (best.IsZero() || e.end.Before(best)) {
				best = e.end
			}
		}
		if !best.IsZero() {
			r.recovered++
			r.recovery = append(r.recovery, best.Sub(f.at))
		}
	}
	return r
}

func (r *workloadReport) print(out io.Writer) {
	var reasons []string
	for k, v := range r.failReasons {
		reasons = append(reasons, fmt.Sprintf("%s=%d", k, v))
	}
	sort.Strings(reasons)
	fmt.Fprintf(out, "chaos:   workloads: %d agents, %d X509-SVID fetches, %d failed (%s), %d expired, max gap without a valid SVID %s, %d SVIDs seen (renewals)\n",
		r.agents, r.probes, r.probeFails, strings.Join(reasons, " "), r.expired, r.maxGap.Round(time.Millisecond), r.svids)
	var causes []string
	for k, v := range r.exchangeFailures {
		causes = append(causes, fmt.Sprintf("%s=%d", k, v))
	}
	sort.Strings(causes)
	fmt.Fprintf(out, "chaos:   token exchanges at the bridge: %d ok, %d failed (%s); after %d of %d faults an exchange succeeded again, p50 %s p99 %s\n",
		r.exchangesOK, r.exchangesFailed, strings.Join(causes, " "), r.recovered, r.faults,
		percentile(r.recovery, .5).Round(time.Millisecond), percentile(r.recovery, .99).Round(time.Millisecond))
}
