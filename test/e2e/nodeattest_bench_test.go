package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/workloadapi"

	"github.com/ferry-id/ferry/proto/ferrypb"
	aws "github.com/ferry-id/ferry/test/metadata/aws"
	azure "github.com/ferry-id/ferry/test/metadata/azure"
	gcp "github.com/ferry-id/ferry/test/metadata/gcp"
	"github.com/ferry-id/ferry/test/metadata/testpki"
	"github.com/ferry-id/ferry/test/swtpm"
	"github.com/ferry-id/ferry/test/testcluster"
)

// BenchmarkAgentFirstSVID starts one agent per node attestor against one
// server that runs them all, and reports the time from `ferry agent run` to
// the first X509-SVID a workload receives (its process start, the metadata
// or TPM work, attestation, the entry stream, a signed SVID). join_token is
// the reference. azure_msi needs a second stack and is measured by its test
// (TestNodeAttestAzureMSI): it is left out here. aws_iid and gcp_iit allow
// re-attestation, so rounds after the first attest the same instances again.
//
//	go test -run '^$' -bench AgentFirstSVID -benchtime 1x ./test/e2e/
func BenchmarkAgentFirstSVID(b *testing.B) {
	dir := b.TempDir()
	azPKI := azure.NewPKI(b, "metadata.azure.com")
	awsSigner := aws.NewSigner(b, "us-east-1")
	google := gcp.NewGoogle(b)
	sw := swtpm.Start(b)
	rootA := sha256.Sum256(sw.CAs[0].Raw)
	sshCA := filepath.Join(dir, "host_ca")
	sshKeygen(b, "-q", "-t", "ed25519", "-N", "", "-f", sshCA)
	const tenant, sub = "72f988bf-86f1-41af-91ab-2d7cd011db47", "11111111-1111-4111-8111-111111111111"
	server := fmt.Sprintf(`  azure_imds {
    ca_bundle_file     = %q
    intermediates_file = %q
    tenants            = { %q = [%q] }
  }
  aws_iid {
    region_certificates = { "us-east-1" = %q }
    account_ids         = ["123456789012"]
    allow_reattestation = true
  }
  gcp_iit {
    project_ids  = ["ferry-prod"]
    jwks_url     = %q
    jwks_ca_file = %q
    allow_reattestation = true
  }
  tpm {
    manufacturer_ca_file = %q
    intermediates_file   = %q
  }
  sshpop {
    cert_authorities_file = %q
  }
`, testpki.WritePEM(b, dir, "az-root.pem", azPKI.Root.Cert), testpki.WritePEM(b, dir, "az-inter.pem", azPKI.Intermediate.Cert), tenant, sub,
		testpki.WritePEM(b, dir, "aws.pem", awsSigner.Cert), google.JWKSURL(), testpki.WritePEM(b, dir, "google.pem", google.CA),
		testpki.WritePEM(b, dir, "tpm-root.pem", sw.CAs[0]), testpki.WritePEM(b, dir, "tpm-inter.pem", sw.CAs[1]), sshCA+".pub")
	c := testcluster.New(b, testcluster.Options{Nodes: 1, ExtraServerConfig: server})
	srv := c.Nodes[0]

	azIMDS := azure.Start(b, azPKI, azure.VM{VMID: "aaaaaaaa-0000-4000-8000-000000000001", SubscriptionID: sub, SKU: "web"})
	awsIMDS := aws.Start(b, awsSigner, aws.Instance{AccountID: "123456789012", Region: "us-east-1", AvailabilityZone: "us-east-1a",
		InstanceID: "i-0aaaaaaaaaaaaaaa1", InstanceType: "m5.large", ImageID: "ami-0123456789abcdef0", PendingTime: "2026-12-01T10:00:00Z", PrivateIP: "10.0.0.5"})
	gce := gcp.Start(b, google, gcp.Instance{ProjectID: "ferry-prod", ProjectNumber: 1, Zone: "europe-west1-b", InstanceID: "1001", InstanceName: "web-1", ServiceAccount: "n@ferry-prod.iam.gserviceaccount.com"})
	sshBlock := hostKey(b, filepath.Join(dir, "ssh"), sshCA, "web-1.example.org")

	// One alias per attestor: the workload entry under it is what the
	// agent's workload receives first.
	uid := fmt.Sprintf("uid:%d", os.Getuid())
	for name, sel := range map[string]*ferrypb.Selector{
		"azure_imds": {Type: "azure_imds", Value: "sku:web"},
		"aws_iid":    {Type: "aws_iid", Value: "instance:type:m5.large"},
		"gcp_iit":    {Type: "gcp_iit", Value: "zone:europe-west1-b"},
		"tpm":        {Type: "tpm", Value: "ek-ca:" + hex.EncodeToString(rootA[:])},
		"sshpop":     {Type: "sshpop", Value: "principal:web-1.example.org"},
	} {
		alias := "spiffe://example.org/nodes/" + name
		_, err := srv.Admin().BatchCreateEntry(context.Background(), &ferrypb.BatchCreateEntryRequest{Entries: []*ferrypb.Entry{
			{Id: "alias-" + name, SpiffeId: alias, ParentId: "spiffe://example.org/spire/server", Selectors: []*ferrypb.Selector{sel}},
			{Id: "wl-" + name, SpiffeId: "spiffe://example.org/wl/" + name, ParentId: alias, Selectors: []*ferrypb.Selector{{Type: "unix", Value: uid}}},
		}})
		if err != nil {
			b.Fatal(err)
		}
	}
	cases := []struct{ name, block string }{
		{"azure_imds", fmt.Sprintf("  azure_imds {\n    metadata_url = %q\n  }\n", azIMDS.URL())},
		{"aws_iid", fmt.Sprintf("  aws_iid {\n    metadata_url = %q\n  }\n", awsIMDS.URL())},
		{"gcp_iit", fmt.Sprintf("  gcp_iit {\n    metadata_url = %q\n  }\n", gce.URL())},
		{"tpm", fmt.Sprintf("  tpm {\n    device = %q\n  }\n", sw.Socket)},
		{"sshpop", sshBlock},
	}
	for i := 0; i < b.N; i++ {
		// join_token, the reference (its time includes no platform call).
		start := time.Now()
		ref := c.StartAgentWith(fmt.Sprintf("jt-%d", i), "")
		b.ReportMetric(ms(time.Since(start)), "join_token-start-ms")
		ref.Stop()
		for _, tc := range cases {
			a := c.NewAgentAttested(fmt.Sprintf("%s-%d", tc.name, i), tc.block)
			start := time.Now()
			a.Start()
			firstSVID(b, a, "spiffe://example.org/wl/"+tc.name)
			b.ReportMetric(ms(time.Since(start)), tc.name+"-first-svid-ms")
			a.Stop()
		}
	}
}

// firstSVID waits until the agent's Workload API hands this process id.
func firstSVID(b *testing.B, a *testcluster.Agent, id string) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for {
		x, err := workloadapi.FetchX509Context(ctx, workloadapi.WithAddr(a.SocketAddr()))
		if err == nil {
			for _, s := range x.SVIDs {
				if s.ID.String() == id {
					return
				}
			}
		}
		if ctx.Err() != nil {
			b.Fatalf("agent %s: no SVID %s: %v", a.Name, id, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
