package imds_test

import (
	"testing"
	"time"

	"github.com/ferry-id/ferry/agent/imds"
	"github.com/stretchr/testify/require"
)

func TestConcurrencyLimit(t *testing.T) {
	toks := newFakeTokens()
	toks.entered = make(chan struct{}, 1)
	toks.release = make(chan struct{})
	_, base := startServer(t, imds.Config{Mode: imds.ModeVM, Tokens: toks, MaxConcurrent: 1, QueueWait: 20 * time.Millisecond, RetryAfter: 3 * time.Second})

	first := make(chan response, 1)
	go func() { first <- get(t, tokenURL(base, mgmt), "Metadata", "true") }()
	<-toks.entered // the only slot is taken

	r := get(t, tokenURL(base, mgmt), "Metadata", "true")
	require.Equal(t, 429, r.Status)
	require.Equal(t, "3", r.Header.Get("Retry-After"))
	require.Equal(t, bodyTooMany, r.Body)
	// Invalid requests and the probe are answered without a slot.
	require.Equal(t, 400, get(t, base+imds.TokenPath).Status)

	close(toks.release)
	require.Equal(t, 200, (<-first).Status)
	toks.set(func(f *fakeTokens) { f.entered, f.release = nil, nil })
	require.Equal(t, 200, get(t, tokenURL(base, mgmt), "Metadata", "true").Status)
}

func TestQueuedRequestGetsSlot(t *testing.T) {
	toks := newFakeTokens()
	toks.entered = make(chan struct{}, 2)
	toks.release = make(chan struct{})
	queued := make(chan struct{}, 1)
	_, base := startServer(t, imds.WithQueuedHook(imds.Config{Mode: imds.ModeVM, Tokens: toks, MaxConcurrent: 1, QueueWait: time.Hour},
		func() { queued <- struct{}{} }))

	first := make(chan response, 1)
	go func() { first <- get(t, tokenURL(base, mgmt), "Metadata", "true") }()
	<-toks.entered
	second := make(chan response, 1)
	go func() { second <- get(t, tokenURL(base, mgmt), "Metadata", "true") }()
	// The second request waits at the limiter (without the queue it would
	// be refused at once) until the first one's slot is free.
	<-queued
	close(toks.release) // the first finishes; the queued one takes its slot
	require.Equal(t, 200, (<-first).Status)
	require.Equal(t, 200, (<-second).Status)
}

func TestRateLimitAndRetryAfterCap(t *testing.T) {
	toks := newFakeTokens()
	_, base := startServer(t, imds.Config{Mode: imds.ModeVM, Tokens: toks, RequestsPerSecond: 0.001, Burst: 2, RetryAfter: time.Hour})
	require.Equal(t, 200, get(t, tokenURL(base, mgmt), "Metadata", "true").Status)
	require.Equal(t, 200, get(t, tokenURL(base, mgmt), "Metadata", "true").Status)
	r := get(t, tokenURL(base, mgmt), "Metadata", "true")
	require.Equal(t, 429, r.Status)
	require.Equal(t, "25", r.Header.Get("Retry-After"), "Azure SDK clients stop retrying above 25 s")
	require.Len(t, toks.Calls(), 2)
}
