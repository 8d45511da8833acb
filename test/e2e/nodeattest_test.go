package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-attestation/attest"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"github.com/stretchr/testify/require"
	"golang.org/x/crypto/ssh"

	"github.com/ferry-id/ferry/attestors/node/sshpop"
	"github.com/ferry-id/ferry/attestors/node/tpm"
	"github.com/ferry-id/ferry/proto/ferrypb"
	aws "github.com/ferry-id/ferry/test/metadata/aws"
	azure "github.com/ferry-id/ferry/test/metadata/azure"
	gcp "github.com/ferry-id/ferry/test/metadata/gcp"
	"github.com/ferry-id/ferry/test/metadata/testpki"
	"github.com/ferry-id/ferry/test/swtpm"
	"github.com/ferry-id/ferry/test/testcluster"
)

// nodeAttestEnv is a one-node cluster whose node attestors trust stand-in
// metadata services, and the helpers its tests share.
type nodeAttestEnv struct {
	t   *testing.T
	c   *testcluster.Cluster
	srv *testcluster.Node
	uid string
}

func newNodeAttestEnv(t *testing.T, serverConfig string) *nodeAttestEnv {
	c := testcluster.New(t, testcluster.Options{Nodes: 1, ExtraServerConfig: serverConfig})
	return &nodeAttestEnv{t: t, c: c, srv: c.Nodes[0], uid: fmt.Sprintf("uid:%d", os.Getuid())}
}

// alias creates a node-alias entry keyed on node selectors, as an operator
// does (`ferry entry create --node`), and a workload entry for this test's
// uid under it.
func (e *nodeAttestEnv) alias(name string, nodeSelectors ...string) {
	e.t.Helper()
	aliasID := "spiffe://example.org/nodes/" + name
	args := []string{"entry", "create", "--entry-id", "alias-" + name, "--spiffe-id", aliasID, "--node"}
	for _, s := range nodeSelectors {
		args = append(args, "--selector", s)
	}
	out, err := e.srv.CLI(args...)
	require.NoError(e.t, err, out)
	wl := &ferrypb.Entry{Id: name, SpiffeId: "spiffe://example.org/" + name, ParentId: aliasID,
		Selectors: []*ferrypb.Selector{{Type: "unix", Value: e.uid}}}
	createEntries(e.t, e.srv, wl)
}

// marker creates an entry parented on the agent itself. Streams carry the
// full state, so once a workload sees it, every entry created before it that
// the agent is authorized for is there too, and any other is not.
func (e *nodeAttestEnv) marker(a *testcluster.Agent) string {
	e.t.Helper()
	id := "spiffe://example.org/marker/" + a.Name
	_, err := e.srv.Admin().BatchCreateEntry(context.Background(), &ferrypb.BatchCreateEntryRequest{Entries: []*ferrypb.Entry{{
		Id: "marker-" + a.Name, SpiffeId: id, ParentId: a.ID, Selectors: []*ferrypb.Selector{{Type: "unix", Value: e.uid}},
	}}})
	require.NoError(e.t, err)
	return id
}

// svids returns the SPIFFE IDs this test process gets from agent a, once
// the agent's marker entry is among them.
func (e *nodeAttestEnv) svids(a *testcluster.Agent) []string {
	e.t.Helper()
	marker := "spiffe://example.org/marker/" + a.Name
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	w := newWatcher()
	client, err := workloadapi.New(ctx, workloadapi.WithAddr(a.SocketAddr()))
	require.NoError(e.t, err)
	defer client.Close()
	go func() { _ = client.WatchX509Context(ctx, w) }()
	var got []string
	w.waitFor(e.t, func(ids []string) bool {
		got = ids
		return has(ids, marker)
	})
	return got
}

// requireSVIDs checks the workload on a gets exactly the wanted entries
// (plus the agent's marker).
func (e *nodeAttestEnv) requireSVIDs(a *testcluster.Agent, want ...string) {
	e.t.Helper()
	exp := []string{"spiffe://example.org/marker/" + a.Name}
	for _, w := range want {
		exp = append(exp, "spiffe://example.org/"+w)
	}
	require.ElementsMatch(e.t, exp, e.svids(a), "agent %s", a.Name)
}

func (e *nodeAttestEnv) requireServerLog(substr string) {
	e.t.Helper()
	require.Contains(e.t, e.srv.LogTail(400), substr)
}

func TestNodeAttestAzureIMDS(t *testing.T) {
	if testing.Short() {
		t.Skip("starts real server and agent processes")
	}
	const (
		tenant = "72f988bf-86f1-41af-91ab-2d7cd011db47"
		sub1   = "11111111-1111-4111-8111-111111111111"
		sub2   = "22222222-2222-4222-8222-222222222222"
		sub3   = "33333333-3333-4333-8333-333333333333"
	)
	pki := azure.NewPKI(t, "eastus.metadata.azure.com")
	dir := t.TempDir()
	roots := testpki.WritePEM(t, dir, "azure-roots.pem", pki.Root.Cert)
	inter := testpki.WritePEM(t, dir, "azure-intermediates.pem", pki.Intermediate.Cert)
	e := newNodeAttestEnv(t, fmt.Sprintf(`  azure_imds {
    ca_bundle_file     = %q
    intermediates_file = %q
    tenants = {
      %q = [%q, %q]
    }
  }
`, roots, inter, tenant, sub1, sub2))

	vmA := azure.VM{VMID: "aaaaaaaa-0000-4000-8000-000000000001", SubscriptionID: sub1, SKU: "web"}
	vmB := azure.VM{VMID: "bbbbbbbb-0000-4000-8000-000000000002", SubscriptionID: sub2, SKU: "db"}
	imdsA, imdsB := azure.Start(t, pki, vmA), azure.Start(t, pki, vmB)
	idOf := func(vm azure.VM) string {
		return "spiffe://example.org/spire/agent/azure_imds/" + tenant + "/" + vm.SubscriptionID + "/" + vm.VMID
	}
	block := func(url string) string { return fmt.Sprintf("  azure_imds {\n    metadata_url = %q\n  }\n", url) }

	// Node aliases keyed on what the signed documents say.
	e.alias("sub1app", "azure_imds:subscription-id:"+sub1)
	e.alias("webapp", "azure_imds:sku:web", "azure_imds:tenant-id:"+tenant)
	e.alias("dbapp", "azure_imds:sku:db")

	a := e.c.NewAgentAttested("vm-a", block(imdsA.URL()))
	a.ID = idOf(vmA)
	b := e.c.NewAgentAttested("vm-b", block(imdsB.URL()))
	b.ID = idOf(vmB)
	a.Start()
	b.Start()
	e.marker(a)
	e.marker(b)
	e.requireSVIDs(a, "sub1app", "webapp")
	e.requireSVIDs(b, "dbapp")
	shown := agentShow(t, e.srv, a.ID)
	require.Equal(t, "azure_imds", shown["attestation_type"], shown)

	// A reinstalled VM (data dir wiped, nothing stored) attests again and is
	// the same agent; its image changed, so its aliases follow its selectors.
	a.Stop()
	a.WipeData()
	vmA.SKU = "db"
	imdsA.SetVM(vmA)
	before := imdsA.Requests()
	a.Start()
	require.Greater(t, imdsA.Requests(), before, "the agent attested again")
	e.requireSVIDs(a, "sub1app", "dbapp")

	// A VM of a subscription the server does not list is refused, with the
	// reason on both sides.
	imdsC := azure.Start(t, pki, azure.VM{VMID: "cccccccc-0000-4000-8000-000000000003", SubscriptionID: sub3})
	c := e.c.NewAgentAttested("vm-c", block(imdsC.URL()))
	out, err := c.RunToExit(2 * time.Minute)
	require.Error(t, err, out)
	require.Contains(t, out, "PermissionDenied", out)
	require.Contains(t, out, "subscription "+sub3+" is not allowed", out)
	e.requireServerLog("subscription " + sub3 + " is not allowed")

	// A document signed outside the configured roots is refused.
	imdsD := azure.Start(t, azure.NewPKI(t, "metadata.azure.com"), azure.VM{VMID: "dddddddd-0000-4000-8000-000000000004", SubscriptionID: sub1})
	d := e.c.NewAgentAttested("vm-d", block(imdsD.URL()))
	out, err = d.RunToExit(2 * time.Minute)
	require.Error(t, err, out)
	require.Contains(t, out, "does not chain to a configured root", out)
}

func TestNodeAttestAWSIID(t *testing.T) {
	if testing.Short() {
		t.Skip("starts real server and agent processes")
	}
	signer := aws.NewSigner(t, "us-east-1")
	cert := testpki.WritePEM(t, t.TempDir(), "us-east-1.pem", signer.Cert)
	e := newNodeAttestEnv(t, fmt.Sprintf(`  aws_iid {
    region_certificates = { "us-east-1" = %q }
    account_ids         = ["123456789012"]
  }
`, cert))
	inst := func(id, typ string) aws.Instance {
		return aws.Instance{AccountID: "123456789012", Region: "us-east-1", AvailabilityZone: "us-east-1a", InstanceID: id,
			InstanceType: typ, ImageID: "ami-0123456789abcdef0", PendingTime: "2026-12-01T10:00:00Z", PrivateIP: "10.0.0.5"}
	}
	instA, instB := inst("i-0aaaaaaaaaaaaaaa1", "m5.large"), inst("i-0bbbbbbbbbbbbbbb2", "t3.micro")
	imdsA, imdsB := aws.Start(t, signer, instA), aws.Start(t, signer, instB)
	block := func(url string) string { return fmt.Sprintf("  aws_iid {\n    metadata_url = %q\n  }\n", url) }
	idOf := func(i aws.Instance) string {
		return "spiffe://example.org/spire/agent/aws_iid/123456789012/us-east-1/" + i.InstanceID
	}
	e.alias("bigapp", "aws_iid:instance:type:m5.large")
	e.alias("acctapp", "aws_iid:account:id:123456789012", "aws_iid:region:us-east-1")

	a := e.c.NewAgentAttested("ec2-a", block(imdsA.URL()))
	a.ID = idOf(instA)
	b := e.c.NewAgentAttested("ec2-b", block(imdsB.URL()))
	b.ID = idOf(instB)
	a.Start()
	b.Start()
	e.marker(a)
	e.marker(b)
	e.requireSVIDs(a, "bigapp", "acctapp")
	e.requireSVIDs(b, "acctapp")

	// The document is static: a second agent for the instance (a wiped data
	// dir, or someone replaying a copy) is refused while the first is active.
	a.Stop()
	a.WipeData()
	out, err := a.RunToExit(2 * time.Minute)
	require.Error(t, err, out)
	require.Contains(t, out, "is already attested", out)
	e.requireServerLog("instance already has an active agent")

	// Evicted, the instance attests again as the same agent, with its new
	// selectors.
	out, err = e.srv.CLI("agent", "evict", "--spiffe-id", a.ID)
	require.NoError(t, err, out)
	instA.InstanceType = "t3.micro"
	imdsA.SetInstance(instA)
	a.Start()
	e.requireSVIDs(a, "acctapp")

	// An account the server does not list is refused on both sides.
	other := inst("i-0ccccccccccccccc3", "m5.large")
	other.AccountID = "210987654321"
	c := e.c.NewAgentAttested("ec2-c", block(aws.Start(t, signer, other).URL()))
	out, err = c.RunToExit(2 * time.Minute)
	require.Error(t, err, out)
	require.Contains(t, out, "account 210987654321 is not allowed", out)
	e.requireServerLog("account 210987654321 is not allowed")
}

func TestNodeAttestGCPIIT(t *testing.T) {
	if testing.Short() {
		t.Skip("starts real server and agent processes")
	}
	google := gcp.NewGoogle(t)
	ca := testpki.WritePEM(t, t.TempDir(), "google-ca.pem", google.CA)
	e := newNodeAttestEnv(t, fmt.Sprintf(`  gcp_iit {
    project_ids         = ["ferry-prod"]
    jwks_url            = %q
    jwks_ca_file        = %q
    allow_reattestation = true
  }
`, google.JWKSURL(), ca))
	inst := func(id, zone, name string) gcp.Instance {
		return gcp.Instance{ProjectID: "ferry-prod", ProjectNumber: 123456789012, Zone: zone, InstanceID: id,
			InstanceName: name, ServiceAccount: "node@ferry-prod.iam.gserviceaccount.com"}
	}
	instA, instB := inst("1001", "europe-west1-b", "web-1"), inst("1002", "us-central1-a", "db-1")
	mdA, mdB := gcp.Start(t, google, instA), gcp.Start(t, google, instB)
	block := func(url, extra string) string {
		return fmt.Sprintf("  gcp_iit {\n    metadata_url = %q\n%s  }\n", url, extra)
	}
	e.alias("euapp", "gcp_iit:zone:europe-west1-b")
	e.alias("projapp", "gcp_iit:project-id:ferry-prod", "gcp_iit:sa:node@ferry-prod.iam.gserviceaccount.com")
	e.alias("web1app", "gcp_iit:instance-name:web-1")

	a := e.c.NewAgentAttested("gce-a", block(mdA.URL(), ""))
	a.ID = "spiffe://example.org/spire/agent/gcp_iit/ferry-prod/1001"
	b := e.c.NewAgentAttested("gce-b", block(mdB.URL(), ""))
	b.ID = "spiffe://example.org/spire/agent/gcp_iit/ferry-prod/1002"
	a.Start()
	b.Start()
	e.marker(a)
	e.marker(b)
	e.requireSVIDs(a, "euapp", "projapp", "web1app")
	e.requireSVIDs(b, "projapp")

	// allow_reattestation: a wiped instance rejoins at once as the same
	// agent, renamed, so it loses the alias keyed on its old name.
	a.Stop()
	a.WipeData()
	instA.InstanceName = "web-2"
	mdA.SetInstance(instA)
	a.Start()
	e.requireSVIDs(a, "euapp", "projapp")

	// A token for another audience is refused on both sides.
	c := e.c.NewAgentAttested("gce-c", block(gcp.Start(t, google, inst("1003", "europe-west1-b", "x")).URL(), "    audience = \"https://someone-else.example\"\n"))
	out, err := c.RunToExit(2 * time.Minute)
	require.Error(t, err, out)
	require.Contains(t, out, "token has invalid audience", out)
	e.requireServerLog("token has invalid audience")
}

// azureHost is a ferry agent of the stack that plays Azure: it serves the
// managed-identity endpoint VM style (vmURL) and Arc style (arcURL, its
// challenge files in tokenDir), trading at the stack's bridge, the tenant
// authority.
type azureHost struct {
	id, vmURL, arcURL, tokenDir, socket string
}

func (s *flowStack) azureHost(name string) *azureHost {
	s.t.Helper()
	h := &azureHost{id: "spiffe://example.org/spire/agent/" + name}
	var tok struct {
		Token string `json:"token"`
	}
	s.cliJSON(&tok, "token", "generate", "--spiffe-id", h.id, "--ttl", "10m")
	dir := filepath.Join(s.dir, "host-"+name)
	require.NoError(s.t, os.MkdirAll(dir, 0o755))
	require.NoError(s.t, os.WriteFile(filepath.Join(dir, "bundle.pem"), []byte(s.cli("bundle", "show")), 0o644))
	arcAddr, vmAddr := testcluster.FreeAddr(s.t), testcluster.FreeAddr(s.t)
	h.arcURL = "http://" + arcAddr + "/metadata/identity/oauth2/token"
	h.vmURL = "http://" + vmAddr
	h.tokenDir = filepath.Join(dir, "tokens")
	h.socket = filepath.Join(dir, "public", "api.sock")
	conf := filepath.Join(dir, "agent.conf")
	require.NoError(s.t, os.WriteFile(conf, []byte(fmt.Sprintf(`agent {
  trust_domain      = "example.org"
  server_addresses  = [%q]
  trust_bundle_file = "bundle.pem"
  data_dir          = "data"
  socket_path       = %q
  log_level         = "debug"
  join_token        = %q
  imds {
    arc_addr          = %q
    vm                = true
    vm_addr           = %q
    token_dir         = %q
    authority         = %q
    authority_ca_file = %q
  }
}
`, s.c.Nodes[0].AgentAddr, h.socket, tok.Token, arcAddr, vmAddr, h.tokenDir, s.bridge, s.bridgeCA)), 0o600))
	startProcess(s.t, "azure-host", dir, nil, s.c.Bin, "agent", "run", "--config", conf)
	require.Eventually(s.t, func() bool {
		for _, addr := range []string{arcAddr, vmAddr} {
			conn, err := net.Dial("tcp", addr)
			if err != nil {
				return false
			}
			conn.Close()
		}
		return true
	}, 30*time.Second, 50*time.Millisecond, "the Azure host serves both managed-identity endpoints")
	return h
}

// TestNodeAttestAzureMSI attests agents with managed-identity tokens from a
// second ferry stack playing Azure: its agent serves the tokens (VM style
// and Arc style, challenge file and all) and its bridge is the tenant
// authority whose OIDC metadata and keys the attesting server fetches.
func TestNodeAttestAzureMSI(t *testing.T) {
	az := newFlowStack(t)
	host := az.azureHost("azure-host")
	appID := az.resource("ferry-attest", "api://ferry-node-attestation")
	az.resource("arm", "https://management.azure.com")
	const sub = "8d10da13-8125-4ba9-a717-bf7490507b3d"
	// The machines' identities, each naming its machine as Azure's
	// system-assigned identities do (xms_mirid), federated to the SPIFFE ID
	// the attesting agents' processes have on the Azure host.
	machine := fmt.Sprintf("spiffe://example.org/machines/uid-%d", os.Getuid())
	az.cli("entry", "create", "--spiffe-id", machine, "--parent-id", host.id, "--selector", fmt.Sprintf("unix:uid:%d", os.Getuid()))
	ident := func(name, resourceID string) flowIdentity {
		var id flowIdentity
		az.cliJSON(&id, "identity", "create", "--name", name, "--resource-id", resourceID)
		az.cli("identity", "federated-credential", "create", "--identity-name", name, "--name", name+"-fic", "--issuer", az.jwtIss, "--subject", machine)
		return id
	}
	vm1 := ident("vm1", "/subscriptions/"+sub+"/resourceGroups/rg-web/providers/Microsoft.Compute/virtualMachines/vm1")
	arc1 := ident("arc1", "/subscriptions/"+sub+"/resourceGroups/rg-edge/providers/Microsoft.HybridCompute/machines/arc1")

	e := newNodeAttestEnv(t, fmt.Sprintf(`  azure_msi {
    tenants  = [%q]
    audience = %q
    issuers  = [%q]
    ca_file  = %q
  }
`, az.tenant, appID, az.bridge+"/{tenant}/v2.0", az.bridgeCA))
	e.alias("vmapp", "azure_msi:machine-type:vm")
	e.alias("arcapp", "azure_msi:machine-type:arc", "azure_msi:resource-group:rg-edge")
	e.alias("subapp", "azure_msi:subscription-id:"+sub, "azure_msi:tenant-id:"+az.tenant)

	a := e.c.NewAgentAttested("vm1", fmt.Sprintf(`  azure_msi {
    resource     = "api://ferry-node-attestation"
    endpoint     = "vm"
    metadata_url = %q
    client_id    = %q
  }
`, host.vmURL, vm1.ClientID))
	a.ID = "spiffe://example.org/spire/agent/azure_msi/" + az.tenant + "/" + vm1.ObjectID
	b := e.c.NewAgentAttested("arc1", fmt.Sprintf(`  azure_msi {
    resource          = "api://ferry-node-attestation"
    endpoint          = "arc"
    identity_endpoint = %q
    arc_token_dir     = %q
    client_id         = %q
  }
`, host.arcURL, host.tokenDir, arc1.ClientID))
	b.ID = "spiffe://example.org/spire/agent/azure_msi/" + az.tenant + "/" + arc1.ObjectID
	a.Start()
	b.Start()
	e.marker(a)
	e.marker(b)
	e.requireSVIDs(a, "vmapp", "subapp")
	e.requireSVIDs(b, "arcapp", "subapp")

	// The token is a bearer credential: a second agent for the principal is
	// refused while the first is active, on both sides.
	a.Stop()
	a.WipeData()
	out, err := a.RunToExit(2 * time.Minute)
	require.Error(t, err, out)
	require.Contains(t, out, "is already attested", out)
	e.requireServerLog("instance already has an active agent")
	// Evicted, the machine rejoins as the same agent.
	out, err = e.srv.CLI("agent", "evict", "--spiffe-id", a.ID)
	require.NoError(t, err, out)
	a.Start()
	e.requireSVIDs(a, "vmapp", "subapp")

	// A token for another resource (a real Entra token for Azure Resource
	// Manager, say) is refused.
	c := e.c.NewAgentAttested("vm1-arm", fmt.Sprintf(`  azure_msi {
    resource     = "https://management.azure.com"
    endpoint     = "vm"
    metadata_url = %q
    client_id    = %q
  }
`, host.vmURL, vm1.ClientID))
	out, err = c.RunToExit(2 * time.Minute)
	require.Error(t, err, out)
	require.Contains(t, out, "token has invalid audience", out)
	e.requireServerLog("token has invalid audience")
}

// ekHash reads a TPM's EK certificate as the agent would and returns the
// hash naming its agent.
func ekHash(t *testing.T, sw *swtpm.TPM) string {
	t.Helper()
	a, err := tpm.NewAgent(tpm.AgentConfig{Device: sw.Socket})
	require.NoError(t, err)
	p, err := a.Payload(context.Background())
	require.NoError(t, err)
	var pl struct {
		EKCert []byte `json:"ek_cert"`
	}
	require.NoError(t, json.Unmarshal(p, &pl))
	cert, err := attest.ParseEKCertificate(pl.EKCert)
	require.NoError(t, err)
	h, err := tpm.PublicKeyHash(cert.PublicKey)
	require.NoError(t, err)
	return h
}

func TestNodeAttestTPM(t *testing.T) {
	if testing.Short() {
		t.Skip("starts real server, agent and swtpm processes")
	}
	swA, swB, swC := swtpm.Start(t), swtpm.Start(t), swtpm.Start(t)
	dir := t.TempDir()
	roots := testpki.WritePEM(t, dir, "tpm-roots.pem", swA.CAs[0], swB.CAs[0])
	inter := testpki.WritePEM(t, dir, "tpm-inter.pem", swA.CAs[1], swB.CAs[1])
	e := newNodeAttestEnv(t, fmt.Sprintf(`  tpm {
    manufacturer_ca_file = %q
    intermediates_file   = %q
  }
`, roots, inter))
	hashA, hashB := ekHash(t, swA), ekHash(t, swB)
	rootA := sha256.Sum256(swA.CAs[0].Raw)
	e.alias("ca-a", "tpm:ek-ca:"+hex.EncodeToString(rootA[:]))
	e.alias("tpm-b", "tpm:ek-hash:"+hashB)

	block := func(sock string) string { return fmt.Sprintf("  tpm {\n    device = %q\n  }\n", sock) }
	a := e.c.NewAgentAttested("tpm-a", block(swA.Socket))
	a.ID = "spiffe://example.org/spire/agent/tpm/" + hashA
	b := e.c.NewAgentAttested("tpm-b", block(swB.Socket))
	b.ID = "spiffe://example.org/spire/agent/tpm/" + hashB
	a.Start()
	b.Start()
	e.marker(a)
	e.marker(b)
	e.requireSVIDs(a, "ca-a")
	e.requireSVIDs(b, "tpm-b")

	// Wiped, the machine proves its TPM again and is the same agent, at once.
	a.Stop()
	a.WipeData()
	a.Start()
	e.requireSVIDs(a, "ca-a")

	// A TPM from a manufacturer the server does not trust is refused.
	c := e.c.NewAgentAttested("tpm-c", block(swC.Socket))
	out, err := c.RunToExit(2 * time.Minute)
	require.Error(t, err, out)
	require.Contains(t, out, "does not chain to a configured manufacturer CA", out)
	e.requireServerLog("tpm attestation rejected")
}

// sshKeygen runs ssh-keygen, as an operator would.
func sshKeygen(t testing.TB, args ...string) {
	t.Helper()
	out, err := exec.Command("ssh-keygen", args...).CombinedOutput()
	require.NoError(t, err, "ssh-keygen %s\n%s", strings.Join(args, " "), out)
}

// hostKey makes a host key in dir and has ca certify it for principals.
func hostKey(t testing.TB, dir, ca, principals string) string {
	t.Helper()
	require.NoError(t, os.MkdirAll(dir, 0o700))
	key := filepath.Join(dir, "ssh_host_ed25519_key")
	sshKeygen(t, "-q", "-t", "ed25519", "-N", "", "-f", key)
	sshKeygen(t, "-q", "-s", ca, "-I", filepath.Base(dir), "-h", "-n", principals, "-V", "-1h:+1h", key+".pub")
	return fmt.Sprintf("  sshpop {\n    host_key_path  = %q\n    host_cert_path = %q\n  }\n", key, key+"-cert.pub")
}

func TestNodeAttestSSHPoP(t *testing.T) {
	if testing.Short() {
		t.Skip("starts real server and agent processes")
	}
	if _, err := exec.LookPath("ssh-keygen"); err != nil {
		t.Skip("ssh-keygen not installed")
	}
	dir := t.TempDir()
	ca, rogue := filepath.Join(dir, "host_ca"), filepath.Join(dir, "rogue_ca")
	sshKeygen(t, "-q", "-t", "ed25519", "-N", "", "-f", ca)
	sshKeygen(t, "-q", "-t", "ed25519", "-N", "", "-f", rogue)
	e := newNodeAttestEnv(t, fmt.Sprintf("  sshpop {\n    cert_authorities_file = %q\n  }\n", ca+".pub"))
	e.alias("web", "sshpop:principal:web-1.example.org")
	e.alias("fleet", "sshpop:principal:fleet")

	a := e.c.NewAgentAttested("ssh-a", hostKey(t, filepath.Join(dir, "a"), ca, "web-1.example.org,fleet"))
	b := e.c.NewAgentAttested("ssh-b", hostKey(t, filepath.Join(dir, "b"), ca, "db-1.example.org,fleet"))
	for _, ag := range []*testcluster.Agent{a, b} {
		pub, err := os.ReadFile(filepath.Join(dir, ag.Name[len("ssh-"):], "ssh_host_ed25519_key.pub"))
		require.NoError(t, err)
		k, _, _, _, err := ssh.ParseAuthorizedKey(pub)
		require.NoError(t, err)
		ag.ID = "spiffe://example.org/spire/agent/sshpop/" + sshpop.KeyHash(k)
	}
	a.Start()
	b.Start()
	e.marker(a)
	e.marker(b)
	e.requireSVIDs(a, "web", "fleet")
	e.requireSVIDs(b, "fleet")

	// Wiped, the host proves its key again and is the same agent.
	a.Stop()
	a.WipeData()
	a.Start()
	e.requireSVIDs(a, "web", "fleet")

	// A host certified by a CA the server does not trust is refused.
	c := e.c.NewAgentAttested("ssh-c", hostKey(t, filepath.Join(dir, "c"), rogue, "web-1.example.org"))
	out, err := c.RunToExit(2 * time.Minute)
	require.Error(t, err, out)
	require.Contains(t, out, "host certificate refused", out)
	e.requireServerLog("sshpop attestation rejected")
}
