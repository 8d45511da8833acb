package server

import (
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestRefuseUntilCaughtUp: until the node has caught up, the agent API
// resets a connection as soon as it arrives (the agent moves on to another
// server instead of waiting in this one's backlog); then it serves them.
func TestRefuseUntilCaughtUp(t *testing.T) {
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	open := make(chan struct{})
	l := refuseUntil(raw, open)
	defer l.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := l.Accept()
		if err == nil {
			accepted <- c
		}
	}()

	for range 3 {
		c, err := net.Dial("tcp", raw.Addr().String())
		if err != nil {
			continue // reset before connect returned
		}
		require.NoError(t, c.SetReadDeadline(time.Now().Add(time.Minute)))
		_, err = c.Read(make([]byte, 1))
		require.Error(t, err, "a connection before the node caught up was not closed")
		require.False(t, errors.Is(err, os.ErrDeadlineExceeded), "the connection waited instead of being reset")
		c.Close()
	}
	select {
	case <-accepted:
		t.Fatal("a connection was handed to the server before the node caught up")
	default:
	}

	close(open)
	// The connection that arrives next (Accept may be holding one that
	// arrived as the gate opened) is served.
	c, err := net.Dial("tcp", raw.Addr().String())
	require.NoError(t, err)
	defer c.Close()
	s := <-accepted
	defer s.Close()
	_, err = c.Write([]byte("x"))
	require.NoError(t, err)
	b := make([]byte, 1)
	_, err = io.ReadFull(s, b)
	require.NoError(t, err)
	require.Equal(t, "x", string(b))
}
