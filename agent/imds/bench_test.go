package imds_test

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ferry-id/ferry/agent/imds"
	"github.com/ferry-id/ferry/agent/tokens"
)

type benchIdentities struct{}

func (benchIdentities) Identity(context.Context, imds.Caller, imds.Selector) (tokens.Identity, error) {
	return tokens.Identity{TenantID: "tenant", ClientID: "client", ObjectID: "object", SPIFFEID: "spiffe://td/bench"}, nil
}

type benchAssertions struct{}

func (benchAssertions) Assertion(context.Context, tokens.Identity) (string, error) {
	return "a.b.c", nil
}

type benchExchange struct{ calls atomic.Int64 }

func (e *benchExchange) Exchange(context.Context, tokens.ExchangeRequest) (*tokens.Token, error) {
	e.calls.Add(1)
	now := time.Now()
	return &tokens.Token{AccessToken: "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.bench.sig", Obtained: now, ExpiresOn: now.Add(24 * time.Hour)}, nil
}

// BenchmarkCachedToken measures cached-token responses over loopback HTTP at
// concurrency 16: a running Server (VM mode, real caller lookup) in front of
// the real token cache and a stand-in exchanger. It reports req/s and p99.
func BenchmarkCachedToken(b *testing.B) {
	const concurrency = 16
	exch := &benchExchange{}
	prov, err := tokens.New(tokens.Config{Identities: benchIdentities{}, Assertions: benchAssertions{}, Exchange: exch, Logger: discardLogger()})
	if err != nil {
		b.Fatal(err)
	}
	s, err := imds.New(imds.Config{Mode: imds.ModeVM, Address: "127.0.0.1:0", Tokens: prov, MaxConcurrent: 4 * concurrency, Logger: discardLogger()})
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	defer func() { cancel(); <-done }()

	// Each worker keeps one HTTP/1.1 connection and speaks to it directly:
	// net/http's client would cost more CPU than the server on a small host.
	addr := s.Addr().String()
	request := []byte("GET " + imds.TokenPath + "?" + mgmt + " HTTP/1.1\r\nHost: " + addr + "\r\nMetadata: true\r\n\r\n")
	type conn struct {
		c  net.Conn
		br *bufio.Reader
	}
	dial := func() (*conn, error) {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			return nil, err
		}
		return &conn{c, bufio.NewReader(c)}, nil
	}
	fetchOn := func(c *conn) error {
		if _, err := c.c.Write(request); err != nil {
			return err
		}
		resp, err := http.ReadResponse(c.br, nil)
		if err != nil {
			return err
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return &statusError{resp.StatusCode}
		}
		return nil
	}
	fetch := func() error {
		c, err := dial()
		if err != nil {
			return err
		}
		defer c.c.Close()
		return fetchOn(c)
	}
	if err := fetch(); err != nil { // fill the cache
		b.Fatal(err)
	}

	lat := make([][]time.Duration, concurrency)
	var next atomic.Int64
	var failed atomic.Value
	var wg sync.WaitGroup
	b.ResetTimer()
	start := time.Now()
	for i := range concurrency {
		wg.Go(func() {
			c, err := dial()
			if err != nil {
				failed.Store(err)
				return
			}
			defer c.c.Close()
			for next.Add(1) <= int64(b.N) {
				t0 := time.Now()
				if err := fetchOn(c); err != nil {
					failed.Store(err)
					return
				}
				lat[i] = append(lat[i], time.Since(t0))
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	if err, _ := failed.Load().(error); err != nil {
		b.Fatal(err)
	}
	all := slices.Concat(lat...)
	slices.Sort(all)
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "req/s")
	b.ReportMetric(float64(all[len(all)*99/100].Microseconds()), "p99-µs")
	if n := exch.calls.Load(); n != 1 {
		b.Fatalf("%d upstream exchanges, want 1", n)
	}
}

type statusError struct{ code int }

func (e *statusError) Error() string { return http.StatusText(e.code) }
