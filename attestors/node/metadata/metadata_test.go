package metadata_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/attestors/node/metadata"
)

func get(url string) func(context.Context) (*http.Request, error) {
	return func(ctx context.Context) (*http.Request, error) {
		return http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	}
}

func TestRetries(t *testing.T) {
	var calls atomic.Int32
	answers := []int{http.StatusGone, http.StatusTooManyRequests, http.StatusServiceUnavailable, http.StatusOK}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := calls.Add(1)
		w.WriteHeader(answers[n-1])
		_, _ = w.Write([]byte("body"))
	}))
	defer srv.Close()
	c := metadata.New(metadata.Options{FirstBackoff: time.Millisecond})
	body, err := c.Do(context.Background(), get(srv.URL), nil)
	require.NoError(t, err)
	require.Equal(t, "body", string(body))
	require.EqualValues(t, 4, calls.Load(), "410, 429 and 503 are retried")

	for _, final := range []int{http.StatusBadRequest, http.StatusUnauthorized, http.StatusForbidden, http.StatusNotFound, http.StatusNotImplemented} {
		require.False(t, metadata.Retryable(final), final)
	}
}

func TestFinalAndBudget(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("WWW-Authenticate", "Basic realm=/x.key")
		w.WriteHeader(http.StatusUnauthorized)
		_, _ = w.Write([]byte("{\"error\":\"no\"}\n\x1b[31m"))
	}))
	defer srv.Close()
	c := metadata.New(metadata.Options{FirstBackoff: time.Millisecond})
	_, err := c.Do(context.Background(), get(srv.URL), nil)
	var se *metadata.StatusError
	require.ErrorAs(t, err, &se)
	require.Equal(t, http.StatusUnauthorized, se.Status)
	require.Equal(t, "Basic realm=/x.key", se.Header.Get("WWW-Authenticate"), "the caller sees the challenge")
	require.NotContains(t, se.Error(), "\x1b", "control characters never reach a log")

	// A proxy in the environment is never used: the metadata service is
	// reached directly.
	t.Setenv("HTTP_PROXY", "http://127.0.0.1:1")
	_, err = c.Do(context.Background(), get(srv.URL), nil)
	require.ErrorAs(t, err, &se)

	// Nothing listening: retried until the budget runs out, then reported.
	os.Unsetenv("HTTP_PROXY")
	short := metadata.New(metadata.Options{FirstBackoff: time.Millisecond, Budget: 200 * time.Millisecond})
	_, err = short.Do(context.Background(), get("http://127.0.0.1:1/"), nil)
	require.ErrorContains(t, err, "gave up after")

	// A body larger than MaxBody is refused.
	big := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = w.Write(make([]byte, metadata.MaxBody+1))
	}))
	defer big.Close()
	_, err = c.Do(context.Background(), get(big.URL), nil)
	require.ErrorContains(t, err, "more than")
}
