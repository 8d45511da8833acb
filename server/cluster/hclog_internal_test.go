package cluster

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"
)

func TestHCLogAdapter(t *testing.T) {
	var buf bytes.Buffer
	l := slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelInfo}))
	var h hclog.Logger = newHCLogAdapter(l, "raft")
	h = h.Named("transport").With("peer", "n2")

	h.Debug("hidden debug")
	h.Info("entering follower state", "term", 3, "node", "Node at 127.0.0.1:1 [Follower]")
	h.Warn("heartbeat timeout")
	h.Error("failed to append", "error", "EOF")
	h.StandardLogger(nil).Print("[WARN] from a std logger")
	h.Info("initial configuration", "servers", hclog.Fmt("%+v", []struct{ ID string }{{"n1"}}), "mask", hclog.Octal(0o700), "id", hclog.Hex(255))

	out := buf.String()
	for _, want := range []string{
		`level=INFO msg="entering follower state" subsystem=raft.transport peer=n2 term=3 raft-node="Node at 127.0.0.1:1 [Follower]"`,
		`level=WARN msg="heartbeat timeout" subsystem=raft.transport peer=n2`,
		`level=ERROR msg="failed to append" subsystem=raft.transport peer=n2 error=EOF`,
		`level=WARN msg="[WARN] from a std logger"`,
		`level=INFO msg="initial configuration" subsystem=raft.transport peer=n2 servers=[{ID:n1}] mask=0700 id=0xff`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("missing %q in:\n%s", want, out)
		}
	}
	if strings.Contains(out, "hidden debug") {
		t.Errorf("debug record passed an Info handler:\n%s", out)
	}
	if h.IsDebug() || !h.IsInfo() {
		t.Errorf("IsDebug=%v IsInfo=%v for an Info handler", h.IsDebug(), h.IsInfo())
	}
	if h.Name() != "raft.transport" {
		t.Errorf("Name() = %q", h.Name())
	}
	h.SetLevel(hclog.Error)
	buf.Reset()
	h.Warn("dropped")
	if buf.Len() != 0 {
		t.Errorf("SetLevel(Error) let a warning through: %s", buf.String())
	}
}
