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
	require.ErrorContains(t, err, `"unix:uid:abc": want unix:uid:<uid> (user ID of the process (all four of its uids), decimal): not a decimal number`)
	_, err = r.Parse(selector.Workload, "systemd:id:web")
	require.ErrorContains(t, err, "not a systemd unit name")
	_, err = r.Parse(selector.Node, "x509pop:ca:fingerprint:ABC")
	require.ErrorContains(t, err, "want 40 lower-case hex digits")
	assert.Contains(t, r.Help(selector.Workload), "unix:uid:<uid>")

	// The cloud node attestors' selectors, as node-alias entries name them.
	for _, ok := range []string{
		"azure_imds:subscription-id:8d10da13-8125-4ba9-a717-bf7490507b3d", "azure_imds:sku:22_04-lts-gen2",
		"azure_msi:machine-type:arc", "azure_msi:resource-group:rg-web",
		"aws_iid:instance:type:m5.large", "aws_iid:account:id:123456789012", "aws_iid:image:id:ami-0123456789abcdef0",
		"gcp_iit:zone:europe-west1-b", "gcp_iit:sa:node@p.iam.gserviceaccount.com",
	} {
		_, err := r.Parse(selector.Node, ok)
		require.NoError(t, err, ok)
	}
	for bad, want := range map[string]string{
		"azure_imds:subscription-id:nope": "is not a GUID",
		"azure_msi:machine-type:lambda":   "want vm or arc",
		"aws_iid:instance:id:web-1":       "not an AWS instance ID",
		"aws_iid:tag:role:web":            "aws_iid",
		"gcp_iit:zone:Moon":               "not a GCP zone",
	} {
		_, err := r.Parse(selector.Node, bad)
		require.ErrorContains(t, err, want, bad)
	}
	assert.Contains(t, r.Help(selector.Node), "azure_imds:subscription-id:<subscription GUID>")
}
