package session

import (
	"crypto/x509"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
)

// TestRenewAt: the half-way point counts from when the SVID was received
// when its NotBefore is backdated, so a short-lived SVID is not renewed
// again at once.
func TestRenewAt(t *testing.T) {
	received := time.Date(2026, 12, 2, 12, 0, 0, 0, time.UTC)
	// An 8 s SVID backdated by 10 s: NotBefore+life/2 is a second ago.
	leaf := &x509.Certificate{NotBefore: received.Add(-10 * time.Second), NotAfter: received.Add(8 * time.Second)}
	assert.Equal(t, received.Add(4*time.Second), renewAt(leaf, received))
	// Loaded from disk (received unknown): half its stated life.
	assert.Equal(t, received.Add(-time.Second), renewAt(leaf, time.Time{}))
	// A day-long SVID received just after NotBefore: half-way, as before.
	day := &x509.Certificate{NotBefore: received.Add(-10 * time.Second), NotAfter: received.Add(24 * time.Hour)}
	assert.Equal(t, received.Add(12*time.Hour), renewAt(day, received))
	// A received time past NotAfter (clock jump) is ignored.
	assert.Equal(t, leaf.NotBefore.Add(9*time.Second), renewAt(leaf, received.Add(time.Minute)))
}
