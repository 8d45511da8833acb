package catalog_test

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/attestors/catalog"
	"github.com/ferry-id/ferry/internal/selector"
)

func TestCatalog(t *testing.T) {
	r := catalog.Selectors()
	assert.Equal(t, []string{"unix", "systemd"}, r.Types(selector.Workload))
	assert.Subset(t, r.Types(selector.Node), []string{"join_token", "x509pop"})
	for _, ok := range []string{"unix:uid:1000", "unix:sha256:" + "ab01" + "00000000000000000000000000000000000000000000000000000000000000"[:60], "systemd:id:web.service"} {
		_, err := r.Parse(selector.Workload, ok)
		require.NoError(t, err, ok)
	}
	_, err := r.Parse(selector.Workload, "unix:uid:abc")
	require.ErrorContains(t, err, `"unix:uid:abc": want unix:uid:<uid> (effective user ID, decimal): not a decimal number`)
	_, err = r.Parse(selector.Workload, "systemd:id:web")
	require.ErrorContains(t, err, "not a systemd unit name")
	_, err = r.Parse(selector.Node, "x509pop:ca:fingerprint:ABC")
	require.ErrorContains(t, err, "want 40 lower-case hex digits")
	assert.Contains(t, r.Help(selector.Workload), "unix:uid:<uid>")
}
