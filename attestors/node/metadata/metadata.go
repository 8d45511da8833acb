// Package metadata is the HTTP client the agent halves of cloud node
// attestors use to call their platform's instance metadata service
// (Azure IMDS, AWS IMDSv2, GCP's metadata server): no proxy (those services
// must be reached directly, and a proxy would see the proof), a timeout per
// attempt, retries with exponential backoff on the answers each platform
// documents as transient, a cap on the body read, and errors that carry the
// service's own status and message.
package metadata

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"
)

// Defaults.
const (
	// DefaultAttemptTimeout bounds one request.
	DefaultAttemptTimeout = 5 * time.Second
	// DefaultBudget bounds all attempts of one call. Azure documents retrying
	// 410 for up to 70 s; AWS and GCP recover faster.
	DefaultBudget = 70 * time.Second
	// MaxBody is the most a response body may hold.
	MaxBody = 64 << 10
)

// Client calls one metadata service. The zero value is not usable: use New.
type Client struct {
	hc             *http.Client
	attemptTimeout time.Duration
	budget         time.Duration
	firstBackoff   time.Duration
}

// Options tune a Client; zero fields take the defaults.
type Options struct {
	AttemptTimeout time.Duration
	Budget         time.Duration
	// FirstBackoff is the wait after the first failure (default 250ms); it
	// doubles after each further one, up to 8 s.
	FirstBackoff time.Duration
}

// New returns a client that never uses a proxy and never follows redirects
// (a metadata service does not redirect; following one would send its
// headers elsewhere).
func New(o Options) *Client {
	c := &Client{attemptTimeout: o.AttemptTimeout, budget: o.Budget, firstBackoff: o.FirstBackoff}
	if c.attemptTimeout <= 0 {
		c.attemptTimeout = DefaultAttemptTimeout
	}
	if c.budget <= 0 {
		c.budget = DefaultBudget
	}
	if c.firstBackoff <= 0 {
		c.firstBackoff = 250 * time.Millisecond
	}
	c.hc = &http.Client{
		Transport: &http.Transport{
			Proxy:                 nil,
			DialContext:           (&net.Dialer{Timeout: c.attemptTimeout}).DialContext,
			ResponseHeaderTimeout: c.attemptTimeout,
			MaxIdleConns:          2,
			IdleConnTimeout:       30 * time.Second,
		},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	return c
}

// StatusError is a final answer other than 200 from the service.
type StatusError struct {
	Status int
	// Header is the answer's header (an Arc challenge is in it).
	Header http.Header
	// Body is the start of the service's answer (its own error message).
	Body string
}

func (e *StatusError) Error() string {
	if e.Body == "" {
		return fmt.Sprintf("metadata service answered %d %s", e.Status, http.StatusText(e.Status))
	}
	return fmt.Sprintf("metadata service answered %d %s: %s", e.Status, http.StatusText(e.Status), e.Body)
}

// Retryable reports whether an answer with this status may succeed later:
// 410 (Azure: "retry for up to 70 seconds"), 429, and 5xx but 501.
func Retryable(status int) bool {
	return status == http.StatusGone || status == http.StatusTooManyRequests ||
		(status >= 500 && status != http.StatusNotImplemented)
}

// Do sends the request build returns (called again for each attempt) until
// it gets 200, a final status, or the budget or ctx runs out, and returns the
// 200 body. check, when not nil, inspects a 200 answer; an error wrapping
// ErrRetry makes Do try again (Azure may answer from a cache made for an
// earlier nonce), any other error is final.
func (c *Client) Do(ctx context.Context, build func(ctx context.Context) (*http.Request, error), check func(header http.Header, body []byte) error) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, c.budget)
	defer cancel()
	wait := c.firstBackoff
	var last error
	for attempt := 1; ; attempt++ {
		header, body, err := c.once(ctx, build)
		if err == nil && check != nil {
			err = check(header, body)
		}
		if err == nil {
			return body, nil
		}
		var se *StatusError
		switch {
		case errors.As(err, &se) && Retryable(se.Status), isTransport(err), errors.Is(err, ErrRetry):
		default:
			return nil, err
		}
		last = err
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, fmt.Errorf("metadata: gave up after %d attempts: %w", attempt, last)
		case <-t.C:
		}
		wait = min(wait*2, 8*time.Second)
	}
}

// ErrRetry marks a check failure worth another request.
var ErrRetry = errors.New("metadata: answer not usable yet")

type transportError struct{ err error }

func (e transportError) Error() string { return e.err.Error() }
func (e transportError) Unwrap() error { return e.err }

func isTransport(err error) bool {
	var te transportError
	return errors.As(err, &te)
}

func (c *Client) once(ctx context.Context, build func(ctx context.Context) (*http.Request, error)) (http.Header, []byte, error) {
	actx, cancel := context.WithTimeout(ctx, c.attemptTimeout)
	defer cancel()
	req, err := build(actx)
	if err != nil {
		return nil, nil, err
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return nil, nil, transportError{fmt.Errorf("metadata: %s %s: %w", req.Method, req.URL.Path, err)}
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, MaxBody+1))
	if err != nil {
		return nil, nil, transportError{fmt.Errorf("metadata: reading %s: %w", req.URL.Path, err)}
	}
	if len(body) > MaxBody {
		return nil, nil, fmt.Errorf("metadata: %s answered more than %d bytes", req.URL.Path, MaxBody)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, nil, &StatusError{Status: resp.StatusCode, Header: resp.Header, Body: printable(body)}
	}
	return resp.Header, body, nil
}

// printable returns the start of b with control characters replaced, safe
// for an error message.
func printable(b []byte) string {
	if len(b) > 300 {
		b = b[:300]
	}
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return ' '
		}
		return r
	}, strings.TrimSpace(string(b)))
}
