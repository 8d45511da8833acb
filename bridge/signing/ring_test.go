package signing_test

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/bridge/signing"
)

func TestRingRotation(t *testing.T) {
	dir := t.TempDir()
	now := time.Unix(1_800_000_000, 0)
	clock := func() time.Time { return now }
	cfg := signing.RingConfig{Dir: dir, Owner: "r1", Lifetime: 60 * time.Minute, RetireAfter: 5 * time.Minute, Now: clock}
	ring, err := signing.OpenRing(cfg)
	require.NoError(t, err)
	first := ring.Current()
	require.Len(t, ring.Published(), 1)

	// Before half-life nothing happens. (Certificates start 5 minutes early,
	// a tenth of the hour: the key's life is 65 minutes, half of it 32.5.)
	now = now.Add(27 * time.Minute)
	rot, err := ring.Tick()
	require.NoError(t, err)
	require.Nil(t, rot.Prepared)
	require.Nil(t, rot.Activated)

	// At half-life the next key is made and published, but does not sign yet.
	now = now.Add(1 * time.Minute)
	rot, err = ring.Tick()
	require.NoError(t, err)
	require.NotNil(t, rot.Prepared)
	require.Equal(t, first.KID(), ring.Current().KID())
	require.Len(t, ring.Published(), 2)

	// A restart keeps both keys.
	ring, err = signing.OpenRing(cfg)
	require.NoError(t, err)
	require.Equal(t, first.KID(), ring.Current().KID())
	require.Len(t, ring.Published(), 2)

	// With a sixth of the life left (at 60 - 65/6 = 49.2 minutes) the next key
	// signs; the old one stays published.
	now = now.Add(22 * time.Minute)
	rot, err = ring.Tick()
	require.NoError(t, err)
	require.NotNil(t, rot.Activated)
	require.Equal(t, rot.Prepared, (*signing.Key)(nil))
	second := ring.Current()
	require.NotEqual(t, first.KID(), second.KID())
	pub := ring.Published()
	require.Len(t, pub, 2)
	require.ElementsMatch(t, []string{first.KID(), second.KID()}, []string{pub[0].Kid, pub[1].Kid})

	// RetireAfter later the old key is withdrawn.
	now = now.Add(6 * time.Minute)
	rot, err = ring.Tick()
	require.NoError(t, err)
	require.Equal(t, first.KID(), rot.Retired)
	require.NotContains(t, kids(ring), first.KID())
	require.Contains(t, kids(ring), second.KID())

	ring, err = signing.OpenRing(cfg)
	require.NoError(t, err)
	require.Equal(t, second.KID(), ring.Current().KID())
	require.NotContains(t, kids(ring), first.KID())
}

func kids(r *signing.Ring) []string {
	var out []string
	for _, k := range r.Published() {
		out = append(out, k.Kid)
	}
	return out
}
