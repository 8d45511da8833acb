package server

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"math/big"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/internal/cpuslots"
)

// handshakeServer serves TLS handshakes through withHandshakeSlots on a
// loopback listener; each accepted connection's handshake result is sent
// on the returned channel.
func handshakeServer(t *testing.T, slots *cpuslots.Slots) (addr string, done <-chan error) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), DNSNames: []string{"localhost"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	require.NoError(t, err)
	cert := tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
	creds := withHandshakeSlots(&tls.Config{GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
		return &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"h2"}}, nil
	}}, slots)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { l.Close() })
	results := make(chan error, 16)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				conn, _, err := creds.ServerHandshake(c)
				if err == nil {
					t.Cleanup(func() { conn.Close() })
				}
				results <- err
			}()
		}
	}()
	return l.Addr().String(), results
}

func dialTLS(addr string) error {
	c, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}}) // a throwaway test certificate
	if err == nil {
		c.Close()
	}
	return err
}

// TestHandshakeWaitsForWorkSlot: a handshake computes its share only
// holding a work slot, and gives it back once its flight is written.
func TestHandshakeWaitsForWorkSlot(t *testing.T) {
	slots := cpuslots.New(1)
	addr, done := handshakeServer(t, slots)
	require.NoError(t, slots.Acquire(context.Background()))
	dialed := make(chan error, 1)
	go func() { dialed <- dialTLS(addr) }()
	require.Eventually(t, func() bool { return slots.Waiting() == 1 }, 30*time.Second, time.Millisecond,
		"the handshake never waited for a work slot")
	select {
	case err := <-done:
		t.Fatalf("the handshake finished without a slot: %v", err)
	default:
	}
	slots.Release()
	require.NoError(t, <-dialed)
	require.NoError(t, <-done)
	// Every slot is free again: a second handshake needs one too.
	require.NoError(t, dialTLS(addr))
	require.NoError(t, <-done)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	require.NoError(t, slots.Acquire(ctx), "a slot is still held after the handshakes")
}

// TestSilentClientHoldsNoSlot: a client that connects and says nothing
// must not hold a slot while others handshake.
func TestSilentClientHoldsNoSlot(t *testing.T) {
	slots := cpuslots.New(1)
	addr, done := handshakeServer(t, slots)
	silent, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	defer silent.Close()
	for range 3 {
		require.NoError(t, dialTLS(addr))
		require.NoError(t, <-done)
	}
	// A client that sends half a hello and stops holds none either.
	half, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	defer half.Close()
	_, err = half.Write([]byte{0x16, 0x03, 0x01, 0x02, 0x00, 0x01})
	require.NoError(t, err)
	require.NoError(t, dialTLS(addr))
	require.NoError(t, <-done)
}
