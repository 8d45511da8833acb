package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/test/testcluster"
)

// watcher records every X509 context the agent pushes.
type watcher struct {
	mu      sync.Mutex
	updates []watchUpdate
	changed chan struct{}
}

type watchUpdate struct {
	at  time.Time
	ids []string
}

func newWatcher() *watcher { return &watcher{changed: make(chan struct{}, 1)} }

func (w *watcher) OnX509ContextUpdate(x *workloadapi.X509Context) {
	var ids []string
	for _, s := range x.SVIDs {
		ids = append(ids, s.ID.String())
	}
	sort.Strings(ids)
	w.mu.Lock()
	w.updates = append(w.updates, watchUpdate{at: time.Now(), ids: ids})
	w.mu.Unlock()
	select {
	case w.changed <- struct{}{}:
	default:
	}
}

func (w *watcher) OnX509ContextWatchError(error) {}

// waitFor returns when an update satisfying ok arrives, and when it arrived.
func (w *watcher) waitFor(t *testing.T, ok func([]string) bool) time.Time {
	t.Helper()
	deadline := time.After(30 * time.Second)
	for {
		w.mu.Lock()
		for _, u := range w.updates {
			if ok(u.ids) {
				w.mu.Unlock()
				return u.at
			}
		}
		w.updates = w.updates[:0]
		w.mu.Unlock()
		select {
		case <-w.changed:
		case <-deadline:
			t.Fatal("no matching update in 30s")
		}
	}
}

func has(ids []string, id string) bool {
	for _, x := range ids {
		if x == id {
			return true
		}
	}
	return false
}

func TestAgentServesWorkloads(t *testing.T) {
	if testing.Short() {
		t.Skip("starts real server and agent processes")
	}
	c := testcluster.New(t, testcluster.Options{Nodes: 1})
	a := c.StartAgent("node1")
	srv := c.Nodes[0]
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	create := func(name string) {
		t.Helper()
		out, err := srv.CLI("entry", "create", "--entry-id", name, "--spiffe-id", "spiffe://example.org/"+name,
			"--parent-id", a.ID, "--selector", fmt.Sprintf("unix:uid:%d", os.Getuid()))
		require.NoError(t, err, out)
	}
	create("first")

	w := newWatcher()
	client, err := workloadapi.New(ctx, workloadapi.WithAddr(a.SocketAddr()))
	require.NoError(t, err)
	defer client.Close()
	go func() { _ = client.WatchX509Context(ctx, w) }()
	w.waitFor(t, func(ids []string) bool { return has(ids, "spiffe://example.org/first") })

	// An entry created with the CLI reaches the watching workload, pushed.
	start := time.Now()
	create("second")
	created := time.Now()
	at := w.waitFor(t, func(ids []string) bool { return has(ids, "spiffe://example.org/second") })
	t.Logf("entry create returned after %s; SVID pushed %s after that", created.Sub(start).Round(time.Millisecond), at.Sub(created).Round(time.Millisecond))

	// The SVID is a real X509-SVID chaining to the bundle the workload gets.
	x, err := client.FetchX509Context(ctx)
	require.NoError(t, err)
	for _, svid := range x.SVIDs {
		_, _, err := x509svid.Verify(svid.Certificates, x.Bundles)
		require.NoError(t, err, svid.ID)
	}

	// JWT-SVIDs round-trip through ValidateJWTSVID.
	jwt, err := client.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "spiffe://example.org/db", Subject: x.SVIDs[0].ID})
	require.NoError(t, err)
	got, err := client.ValidateJWTSVID(ctx, jwt.Marshal(), "spiffe://example.org/db")
	require.NoError(t, err)
	require.Equal(t, x.SVIDs[0].ID, got.ID)

	// A deleted entry disappears from the stream.
	out, err := srv.CLI("entry", "delete", "--entry-id", "second")
	require.NoError(t, err, out)
	w.waitFor(t, func(ids []string) bool {
		return has(ids, "spiffe://example.org/first") && !has(ids, "spiffe://example.org/second")
	})

	// Another user on the machine, matching no entry, gets nothing.
	cmd := exec.Command(c.Bin, "api", "fetch", "x509", "--socket", a.SocketAddr(), "--timeout", "5s")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	cmd.Dir = "/"
	outb, err := cmd.CombinedOutput()
	require.Error(t, err, string(outb))
	require.Contains(t, string(outb), "PermissionDenied", string(outb))

	// With every server down, cached SVIDs are still served.
	srv.Kill()
	fresh, err := workloadapi.New(ctx, workloadapi.WithAddr(a.SocketAddr()))
	require.NoError(t, err)
	defer fresh.Close()
	fctx, fcancel := context.WithTimeout(ctx, 10*time.Second)
	defer fcancel()
	svid, err := fresh.FetchX509SVID(fctx)
	require.NoError(t, err)
	require.Equal(t, "spiffe://example.org/first", svid.ID.String())
	require.True(t, strings.HasPrefix(svid.ID.String(), "spiffe://example.org/"))
}
