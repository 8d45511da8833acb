package state_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/state"
)

// harness feeds commands to a store as raft would: encoded, with rising indexes.
type harness struct {
	t     *testing.T
	s     *state.Store
	index uint64
	now   time.Time
}

func newHarness(t *testing.T, cfg state.Config) *harness {
	s, err := state.New(cfg)
	require.NoError(t, err)
	return &harness{t: t, s: s, now: time.Unix(1_700_000_000, 0)}
}

func (h *harness) log(cmd *ferrypb.Command) *raft.Log {
	h.t.Helper()
	if cmd.TimeUnixNano == 0 {
		cmd.TimeUnixNano = h.now.UnixNano()
	}
	data, err := state.EncodeCommand(cmd)
	require.NoError(h.t, err)
	h.index++
	return &raft.Log{Index: h.index, Term: 1, Type: raft.LogCommand, Data: data}
}

func (h *harness) apply(cmd *ferrypb.Command) *ferrypb.CommandResult {
	h.t.Helper()
	res, ok := h.s.Apply(h.log(cmd)).(*ferrypb.CommandResult)
	require.True(h.t, ok)
	return res
}

func entry(id, spiffeID string, sel ...string) *ferrypb.Entry {
	e := &ferrypb.Entry{Id: id, SpiffeId: spiffeID, ParentId: "spiffe://example.org/agent/a"}
	for _, s := range sel {
		e.Selectors = append(e.Selectors, &ferrypb.Selector{Type: "unix", Value: s})
	}
	return e
}

func create(reqID string, es ...*ferrypb.Entry) *ferrypb.Command {
	return &ferrypb.Command{RequestId: reqID, Op: &ferrypb.Command_EntriesCreate{EntriesCreate: &ferrypb.EntriesCreate{Entries: es}}}
}

func codeOf(st *ferrypb.Status) codes.Code { return codes.Code(st.GetCode()) }

func TestEntriesLifecycle(t *testing.T) {
	h := newHarness(t, state.Config{})
	res := h.apply(create("r1",
		entry("e1", "spiffe://example.org/web", "uid:1000"),
		entry("e2", "spiffe://example.org/db", "uid:1001", "gid:5"),
	))
	require.Equal(t, uint64(1), res.Index)
	require.Len(t, res.Items, 2)
	for _, st := range res.Items {
		require.Equal(t, codes.OK, codeOf(st), st.GetMessage())
	}
	require.Equal(t, uint64(1), res.Entries[0].Revision)
	require.Equal(t, h.now.Unix(), res.Entries[0].CreatedAt)

	v := h.s.View()
	require.Equal(t, uint64(1), v.Index())
	require.Equal(t, 2, v.CountEntries())
	got := v.Entry("e2")
	require.NotNil(t, got)
	require.Equal(t, "gid:5", got.Selectors[0].Value, "selectors are stored sorted")

	// Update with a stale revision is refused; with the current one it applies.
	upd := proto.Clone(got).(*ferrypb.Entry)
	upd.Hint = "db"
	upd.Revision = 99
	res = h.apply(&ferrypb.Command{RequestId: "r2", Op: &ferrypb.Command_EntriesUpdate{EntriesUpdate: &ferrypb.EntriesUpdate{Entries: []*ferrypb.Entry{upd}}}})
	require.Equal(t, codes.Aborted, codeOf(res.Items[0]))
	upd.Revision = 1
	res = h.apply(&ferrypb.Command{RequestId: "r3", Op: &ferrypb.Command_EntriesUpdate{EntriesUpdate: &ferrypb.EntriesUpdate{Entries: []*ferrypb.Entry{upd}}}})
	require.Equal(t, codes.OK, codeOf(res.Items[0]))
	require.Equal(t, uint64(3), res.Entries[0].Revision)
	require.Equal(t, uint64(1), res.Entries[0].CreatedIndex)
	require.Equal(t, "db", h.s.View().Entry("e2").Hint)
	require.Empty(t, v.Entry("e2").Hint, "an old view does not change")

	res = h.apply(&ferrypb.Command{RequestId: "r4", Op: &ferrypb.Command_EntriesDelete{EntriesDelete: &ferrypb.EntriesDelete{Ids: []string{"e1", "nope"}}}})
	require.Equal(t, codes.OK, codeOf(res.Items[0]))
	require.Equal(t, codes.NotFound, codeOf(res.Items[1]))
	require.Nil(t, h.s.View().Entry("e1"))
	require.Equal(t, 1, h.s.View().CountEntries())
}

func TestEntryRejections(t *testing.T) {
	h := newHarness(t, state.Config{})
	require.Equal(t, codes.OK, codeOf(h.apply(create("a", entry("e1", "spiffe://example.org/web", "uid:1"))).Items[0]))
	cases := map[string]*ferrypb.Entry{
		"duplicate id":          entry("e1", "spiffe://example.org/other", "uid:1"),
		"same id, parent, sels": entry("e9", "spiffe://example.org/web", "uid:1"),
		"no selectors":          entry("e2", "spiffe://example.org/web"),
		"dot segment":           entry("e3", "spiffe://example.org/a/../b", "uid:1"),
		"percent encoding":      entry("e4", "spiffe://example.org/a%2Fb", "uid:1"),
		"empty segment":         entry("e5", "spiffe://example.org/a//b", "uid:1"),
		"upper-case domain":     entry("e6", "spiffe://Example.org/a", "uid:1"),
		"not spiffe":            entry("e7", "https://example.org/a", "uid:1"),
		"no id":                 entry("", "spiffe://example.org/x", "uid:1"),
	}
	want := map[string]codes.Code{"duplicate id": codes.AlreadyExists, "same id, parent, sels": codes.AlreadyExists}
	for name, e := range cases {
		t.Run(name, func(t *testing.T) {
			res := h.apply(create("req-"+name, e))
			code := want[name]
			if code == codes.OK {
				code = codes.InvalidArgument
			}
			require.Equal(t, code, codeOf(res.Items[0]), res.Items[0].GetMessage())
		})
	}
	require.Equal(t, 1, h.s.View().CountEntries())
}

func TestRetriedRequestAppliesOnce(t *testing.T) {
	h := newHarness(t, state.Config{DedupWindow: time.Minute})
	cmd := create("same-id", entry("e1", "spiffe://example.org/web", "uid:1"))
	first := h.apply(cmd)
	// The retry is a new log entry carrying the same bytes (raft may have
	// committed the first one although the caller saw ErrLeadershipLost).
	again := h.apply(create("same-id", entry("e1", "spiffe://example.org/web", "uid:1")))
	require.Equal(t, codes.OK, codeOf(again.Items[0]), "the retry gets the first result, not AlreadyExists")
	require.Equal(t, first.Index, again.Index)
	require.Equal(t, 1, h.s.View().CountEntries())

	// Past the window the request ID is forgotten and the command applies again
	// (here: refused as a duplicate entry, proving it ran).
	h.now = h.now.Add(2 * time.Minute)
	h.apply(&ferrypb.Command{RequestId: "tick", Op: &ferrypb.Command_EntriesDelete{EntriesDelete: &ferrypb.EntriesDelete{}}})
	late := h.apply(create("same-id", entry("e1", "spiffe://example.org/web", "uid:1")))
	require.Equal(t, codes.AlreadyExists, codeOf(late.Items[0]))
}

// A retry is answered with the entries of the first answer while they are
// unchanged, and with their ID and revision once changed or deleted; the
// requests table does not keep deleted rows (nor carry them in snapshots).
func TestRetriedRequestEntries(t *testing.T) {
	h := newHarness(t, state.Config{})
	first := h.apply(create("c", entry("e1", "spiffe://example.org/gone", "uid:1"), entry("e2", "spiffe://example.org/b", "uid:2"),
		entry("bad", "not-spiffe", "uid:3")))
	require.Len(t, first.Entries, 3)
	require.Nil(t, first.Entries[2])
	retry := func(cmd *ferrypb.Command) *ferrypb.CommandResult { return h.apply(cmd) }
	again := retry(create("c", entry("e1", "spiffe://example.org/gone", "uid:1")))
	require.Len(t, again.Entries, 3)
	require.Same(t, first.Entries[0], again.Entries[0], "the live row itself")
	require.Same(t, first.Entries[1], again.Entries[1])
	require.Nil(t, again.Entries[2])
	require.Len(t, again.Items, len(first.Items))
	for i := range first.Items {
		require.True(t, proto.Equal(first.Items[i], again.Items[i]), "item %d: %v, first %v", i, again.Items[i], first.Items[i])
	}

	del := h.apply(&ferrypb.Command{RequestId: "d", Op: &ferrypb.Command_EntriesDelete{EntriesDelete: &ferrypb.EntriesDelete{Ids: []string{"e1"}}}})
	require.Equal(t, "spiffe://example.org/gone", del.Entries[0].SpiffeId, "the first answer carries the deleted row")
	again = retry(create("c"))
	require.True(t, proto.Equal(&ferrypb.Entry{Id: "e1", Revision: first.Entries[0].Revision}, again.Entries[0]), "deleted since: ID and revision only, got %v", again.Entries[0])
	require.Same(t, first.Entries[1], again.Entries[1])
	againDel := retry(&ferrypb.Command{RequestId: "d", Op: &ferrypb.Command_EntriesDelete{EntriesDelete: &ferrypb.EntriesDelete{Ids: []string{"e1"}}}})
	require.Equal(t, codes.OK, codeOf(againDel.Items[0]))
	require.True(t, proto.Equal(&ferrypb.Entry{Id: "e1", Revision: first.Entries[0].Revision}, againDel.Entries[0]))

	var buf bytes.Buffer
	require.NoError(t, h.s.WriteSnapshot(&buf))
	require.NotContains(t, buf.String(), "spiffe://example.org/gone", "a deleted row in the snapshot")
}

// A snapshot written by a release that kept a request's entry rows in its
// result restores to the state this release holds after applying the same
// log, so the nodes of a cluster upgraded one by one agree whichever snapshot
// each started from.
func TestRestoreRequestsOfEarlierRelease(t *testing.T) {
	h := newHarness(t, state.Config{})
	res := h.apply(create("c", entry("e1", "spiffe://example.org/a", "uid:1"), entry("e2", "spiffe://example.org/b", "uid:2")))
	_, live, err := h.s.StateHash()
	require.NoError(t, err)

	var buf bytes.Buffer
	require.NoError(t, h.s.WriteSnapshot(&buf))
	before := strings.Count(buf.String(), "spiffe://example.org/a")
	h.s.RewriteRequestAsBefore("c", res)
	buf.Reset()
	require.NoError(t, h.s.WriteSnapshot(&buf))
	require.Greater(t, strings.Count(buf.String(), "spiffe://example.org/a"), before, "the request row holds the entry rows")
	restored, err := state.New(state.Config{})
	require.NoError(t, err)
	require.NoError(t, restored.Restore(io.NopCloser(&buf)))
	_, got, err := restored.StateHash()
	require.NoError(t, err)
	require.Equal(t, live, got, "restored from the earlier release's snapshot")

	h2 := &harness{t: t, s: restored, index: h.index, now: h.now}
	again := h2.apply(create("c", entry("e1", "spiffe://example.org/a", "uid:1")))
	require.Len(t, again.Entries, 2)
	require.True(t, proto.Equal(res.Entries[1], again.Entries[1]), "a retry is answered with the rows")
}

func TestBatchApplyDedupsWithinBatch(t *testing.T) {
	h := newHarness(t, state.Config{})
	logs := []*raft.Log{
		h.log(create("x", entry("e1", "spiffe://example.org/a", "uid:1"))),
		h.log(create("x", entry("e1", "spiffe://example.org/a", "uid:1"))),
		{Index: 3, Type: raft.LogConfiguration},
		h.log(create("y", entry("e2", "spiffe://example.org/b", "uid:2"))),
	}
	logs[3].Index = 4
	out := h.s.ApplyBatch(logs)
	require.Len(t, out, 4)
	require.Equal(t, out[0].(*ferrypb.CommandResult).Index, out[1].(*ferrypb.CommandResult).Index)
	require.Nil(t, out[2])
	require.Equal(t, uint64(4), h.s.AppliedIndex())
	require.Equal(t, 2, h.s.View().CountEntries())
}

func TestChangeFeed(t *testing.T) {
	h := newHarness(t, state.Config{FeedWindow: 4})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	// A watcher blocks until a change arrives.
	got := make(chan []state.Change, 1)
	go func() {
		cs, err := h.s.ChangesSince(ctx, 0, state.TableEntries)
		if err != nil {
			t.Error(err)
		}
		got <- cs
	}()
	require.Eventually(t, func() bool { return h.s.FeedWaiters() == 1 }, time.Minute, time.Millisecond, "the watcher never waited")
	select {
	case <-got:
		t.Fatal("watcher returned before any change")
	default:
	}
	h.apply(create("a", entry("e1", "spiffe://example.org/a", "uid:1")))
	cs := <-got
	require.Len(t, cs, 1)
	require.Equal(t, state.OpUpsert, cs[0].Op)
	require.Equal(t, "e1", cs[0].Key)
	require.Equal(t, uint64(1), cs[0].Index)

	h.apply(&ferrypb.Command{RequestId: "d", Op: &ferrypb.Command_EntriesDelete{EntriesDelete: &ferrypb.EntriesDelete{Ids: []string{"e1"}}}})
	cs, err := h.s.ChangesSince(ctx, 1)
	require.NoError(t, err)
	require.Len(t, cs, 1)
	require.Equal(t, state.OpDelete, cs[0].Op)
	require.Equal(t, "e1", cs[0].Row.(*ferrypb.Entry).Id)

	// Fall out of the window: the watcher is told to reload.
	for i := 0; i < 6; i++ {
		h.apply(create(fmt.Sprint("w", i), entry(fmt.Sprint("w", i), "spiffe://example.org/w", fmt.Sprint("uid:", i))))
	}
	_, err = h.s.ChangesSince(ctx, 1)
	require.ErrorIs(t, err, state.ErrCompacted)
	v := h.s.View()
	require.Equal(t, 6, v.CountEntries())
	// From the view's index it is served again.
	h.apply(create("z", entry("z", "spiffe://example.org/z", "uid:99")))
	cs, err = h.s.ChangesSince(ctx, v.Index())
	require.NoError(t, err)
	require.Len(t, cs, 1)
	require.Equal(t, "z", cs[0].Key)
}

// The feed keeps no more bytes of rows than the state holds (or FeedBytes):
// after the state shrank, deleted rows leave it, and a watcher that far
// behind is told to reload.
func TestChangeFeedByteBudget(t *testing.T) {
	h := newHarness(t, state.Config{FeedBytes: 1})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var ids []string
	for i := range 20 {
		id := fmt.Sprintf("e%02d", i)
		ids = append(ids, id)
		h.apply(&ferrypb.Command{Op: &ferrypb.Command_EntriesCreate{EntriesCreate: &ferrypb.EntriesCreate{Entries: []*ferrypb.Entry{
			entry(id, "spiffe://example.org/w"+id, "uid:1")}}}})
	}
	// Twenty creates of a state that holds twenty rows: all in the feed.
	cs, err := h.s.ChangesSince(ctx, 0)
	require.NoError(t, err)
	require.Len(t, cs, 20)
	// Deleting half leaves ten rows: the ten deletes fit, the creates before
	// them not.
	h.apply(&ferrypb.Command{Op: &ferrypb.Command_EntriesDelete{EntriesDelete: &ferrypb.EntriesDelete{Ids: ids[:10]}}})
	_, err = h.s.ChangesSince(ctx, 0)
	require.ErrorIs(t, err, state.ErrCompacted)
	cs, err = h.s.ChangesSince(ctx, 20)
	require.NoError(t, err)
	require.Len(t, cs, 10)
	require.Equal(t, state.OpDelete, cs[0].Op)
	// Deleting the rest leaves no rows: the newest command, over budget on
	// its own, goes too.
	h.apply(&ferrypb.Command{Op: &ferrypb.Command_EntriesDelete{EntriesDelete: &ferrypb.EntriesDelete{Ids: ids[10:]}}})
	require.Zero(t, h.s.StateBytes())
	_, err = h.s.ChangesSince(ctx, 0)
	require.ErrorIs(t, err, state.ErrCompacted)
	_, err = h.s.ChangesSince(ctx, h.s.AppliedIndex()-1)
	require.ErrorIs(t, err, state.ErrCompacted)
	// A watcher at the newest index waits for what comes next.
	v := h.s.View()
	h.apply(create("new", entry("new", "spiffe://example.org/new", "uid:2")))
	cs, err = h.s.ChangesSince(ctx, v.Index(), state.TableEntries)
	require.NoError(t, err)
	require.Len(t, cs, 1)
}

// StateBytes follows the rows: it grows and shrinks with them and a restored
// store reports what the original did.
func TestStateBytes(t *testing.T) {
	h := newHarness(t, state.Config{})
	require.Zero(t, h.s.StateBytes())
	e := entry("e1", "spiffe://example.org/a", "uid:1")
	h.apply(create("", e))
	one := h.s.StateBytes()
	require.Equal(t, int64(proto.Size(h.s.View().Entry("e1"))), one)
	upd := proto.Clone(h.s.View().Entry("e1")).(*ferrypb.Entry)
	upd.Hint = strings.Repeat("h", 100)
	h.apply(&ferrypb.Command{Op: &ferrypb.Command_EntriesUpdate{EntriesUpdate: &ferrypb.EntriesUpdate{Entries: []*ferrypb.Entry{upd}}}})
	require.Equal(t, int64(proto.Size(h.s.View().Entry("e1"))), h.s.StateBytes())
	h.apply(create("r2", entry("e2", "spiffe://example.org/b", "uid:2")))
	var buf bytes.Buffer
	require.NoError(t, h.s.WriteSnapshot(&buf))
	other, err := state.New(state.Config{})
	require.NoError(t, err)
	require.NoError(t, other.Restore(io.NopCloser(bytes.NewReader(buf.Bytes()))))
	require.Equal(t, h.s.StateBytes(), other.StateBytes())
	h.apply(&ferrypb.Command{Op: &ferrypb.Command_EntriesDelete{EntriesDelete: &ferrypb.EntriesDelete{Ids: []string{"e1", "e2"}}}})
	reqs := h.s.StateBytes()
	require.Positive(t, reqs, "the request ID r2 is remembered")
	require.Less(t, reqs, one)
}

func TestSnapshotRoundTrip(t *testing.T) {
	h := newHarness(t, state.Config{})
	for i := 0; i < 50; i++ {
		h.apply(create(fmt.Sprint("r", i), entry(fmt.Sprint("e", i), fmt.Sprint("spiffe://example.org/w", i), "uid:1")))
	}
	var buf bytes.Buffer
	require.NoError(t, h.s.WriteSnapshot(&buf))

	other, err := state.New(state.Config{})
	require.NoError(t, err)
	require.NoError(t, other.Restore(io.NopCloser(bytes.NewReader(buf.Bytes()))))
	require.Equal(t, h.s.AppliedIndex(), other.AppliedIndex())
	require.Equal(t, 50, other.View().CountEntries())
	require.True(t, proto.Equal(h.s.View().Entry("e7"), other.View().Entry("e7")))

	// Same state, same bytes: snapshots double as a state hash.
	var again bytes.Buffer
	require.NoError(t, other.WriteSnapshot(&again))
	require.Equal(t, buf.Bytes(), again.Bytes())

	// Dedup rows travel with the snapshot: a retry after restore applies once.
	oh := &harness{t: t, s: other, index: other.AppliedIndex(), now: h.now}
	res := oh.apply(create("r3", entry("e3", "spiffe://example.org/w3", "uid:1")))
	require.Equal(t, codes.OK, codeOf(res.Items[0]))
	require.Equal(t, uint64(4), res.Index)
}

func TestRestoreRefusesDamage(t *testing.T) {
	h := newHarness(t, state.Config{})
	h.apply(create("r", entry("e1", "spiffe://example.org/a", "uid:1")))
	var buf bytes.Buffer
	require.NoError(t, h.s.WriteSnapshot(&buf))
	good := buf.Bytes()

	target := newHarness(t, state.Config{})
	target.apply(create("t", entry("keep", "spiffe://example.org/keep", "uid:1")))

	damaged := map[string][]byte{
		"flipped byte":   flip(good, len(good)/2),
		"truncated":      good[:len(good)-10],
		"bad magic":      flip(good, 0),
		"trailing bytes": append(append([]byte{}, good...), 0),
		"empty":          nil,
	}
	for name, data := range damaged {
		t.Run(name, func(t *testing.T) {
			err := target.s.Restore(io.NopCloser(bytes.NewReader(data)))
			require.ErrorIs(t, err, state.ErrBadSnapshot)
			require.NotNil(t, target.s.View().Entry("keep"), "state untouched")
		})
	}
}

func flip(b []byte, i int) []byte {
	c := append([]byte{}, b...)
	c[i] ^= 0xff
	return c
}

func TestRestoreCompactsWatchers(t *testing.T) {
	h := newHarness(t, state.Config{})
	h.apply(create("r", entry("e1", "spiffe://example.org/a", "uid:1")))
	var buf bytes.Buffer
	require.NoError(t, h.s.WriteSnapshot(&buf))

	w := newHarness(t, state.Config{})
	for i := 0; i < 3; i++ {
		w.apply(create(fmt.Sprint(i), entry(fmt.Sprint(i), "spiffe://example.org/x", fmt.Sprint("uid:", i))))
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	errc := make(chan error, 1)
	go func() { _, err := w.s.ChangesSince(ctx, 3); errc <- err }()
	// The watcher must be blocked for a change when the restore comes: one
	// arriving after it would be refused without waiting.
	require.Eventually(t, func() bool { return w.s.FeedWaiters() == 1 }, time.Minute, time.Millisecond, "the watcher never waited")
	require.NoError(t, w.s.Restore(io.NopCloser(&buf)))
	require.ErrorIs(t, <-errc, state.ErrCompacted, "a watcher from the replaced history reloads")
}

func TestUnknownCommand(t *testing.T) {
	h := newHarness(t, state.Config{})
	res := h.apply(&ferrypb.Command{RequestId: "u", IgnoreUnknown: true})
	require.Equal(t, codes.OK, codeOf(res.Status))
	require.Panics(t, func() { h.apply(&ferrypb.Command{RequestId: "v"}) })
}

func TestCommandSizeLimit(t *testing.T) {
	big := entry("big", "spiffe://example.org/a", "uid:1")
	big.Hint = string(make([]byte, state.MaxCommandSize))
	_, err := state.EncodeCommand(create("x", big))
	require.ErrorIs(t, err, state.ErrCommandTooLarge)
}

func TestListEntries(t *testing.T) {
	h := newHarness(t, state.Config{})
	for i := 0; i < 25; i++ {
		e := entry(fmt.Sprintf("e%02d", i), fmt.Sprintf("spiffe://example.org/w%d", i%5), fmt.Sprint("uid:", i%3), "gid:7", fmt.Sprint("n:", i))
		h.apply(create(fmt.Sprint(i), e))
	}
	v := h.s.View()
	var all []*ferrypb.Entry
	after := ""
	for {
		page, next := v.ListEntries(state.EntryFilter{}, after, 10)
		all = append(all, page...)
		if next == "" {
			break
		}
		after = next
	}
	require.Len(t, all, 25)
	for i := 1; i < len(all); i++ {
		require.Less(t, all[i-1].Id, all[i].Id)
	}
	bySpiffe, _ := v.ListEntries(state.EntryFilter{SpiffeID: "spiffe://example.org/w1"}, "", 0)
	require.Len(t, bySpiffe, 5)
	bySel, _ := v.ListEntries(state.EntryFilter{Selectors: []*ferrypb.Selector{{Type: "unix", Value: "gid:7"}, {Type: "unix", Value: "uid:0"}}}, "", 0)
	require.Len(t, bySel, 9)
}
