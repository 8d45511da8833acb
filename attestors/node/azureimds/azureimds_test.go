package azureimds_test

import (
	"context"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/smallstep/pkcs7"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/attestors/node"
	"github.com/ferry-id/ferry/attestors/node/azureimds"
	"github.com/ferry-id/ferry/attestors/node/metadata"
	"github.com/ferry-id/ferry/internal/selector"
	azure "github.com/ferry-id/ferry/test/metadata/azure"
)

const (
	tenant = "72f988bf-86f1-41af-91ab-2d7cd011db47"
	sub    = "8d10da13-8125-4ba9-a717-bf7490507b3d"
	vmID   = "02aab8a4-74ef-476e-8182-f6d2ba4166a6"
)

var td = spiffeid.RequireTrustDomainFromString("example.org")

func newServer(t *testing.T, pki *azure.PKI, mod ...func(*azureimds.ServerConfig)) *azureimds.Server {
	t.Helper()
	c := azureimds.ServerConfig{
		TrustDomain: td, Roots: []*x509.Certificate{pki.Root.Cert}, Intermediates: []*x509.Certificate{pki.Intermediate.Cert},
		Tenants: map[string][]string{tenant: {sub}},
	}
	for _, m := range mod {
		m(&c)
	}
	s, err := azureimds.NewServer(c)
	require.NoError(t, err)
	return s
}

func newAgent(t *testing.T, url string) *azureimds.Agent {
	t.Helper()
	a, err := azureimds.NewAgent(azureimds.AgentConfig{MetadataURL: url, Client: metadata.Options{FirstBackoff: time.Millisecond, Budget: 20 * time.Second}})
	require.NoError(t, err)
	return a
}

func vm() azure.VM {
	return azure.VM{VMID: vmID, SubscriptionID: sub, SKU: "22_04-lts-gen2", Plan: azureimds.Plan{Publisher: "canonical", Product: "ubuntu", Name: "22_04"}}
}

func TestAttest(t *testing.T) {
	pki := azure.NewPKI(t, "metadata.azure.com")
	imds := azure.Start(t, pki, vm())
	res, err := node.Exchange(context.Background(), newAgent(t, imds.URL()), newServer(t, pki))
	require.NoError(t, err)
	require.Equal(t, "spiffe://example.org/spire/agent/azure_imds/"+tenant+"/"+sub+"/"+vmID, res.AgentID.String())
	require.True(t, res.CanReattest, "each attestation proves presence on the VM now")
	require.False(t, res.SingleAgent)
	var got []string
	for _, s := range res.Selectors {
		got = append(got, selector.Format(s))
		require.NoError(t, selector.MustRegistry(azureimds.Selectors()).Check(selector.Node, s), "reported selectors fit the declared forms")
	}
	require.Equal(t, []string{
		"azure_imds:plan:canonical:ubuntu:22_04",
		"azure_imds:sku:22_04-lts-gen2",
		"azure_imds:subscription-id:" + sub,
		"azure_imds:tenant-id:" + tenant,
		"azure_imds:vm-id:" + vmID,
	}, got)

	// Again, after the data dir is gone: the same ID.
	res2, err := node.Exchange(context.Background(), newAgent(t, imds.URL()), newServer(t, pki))
	require.NoError(t, err)
	require.Equal(t, res.AgentID, res2.AgentID)
}

func TestAgentRetries(t *testing.T) {
	pki := azure.NewPKI(t, "eastus.metadata.azure.com")
	imds := azure.Start(t, pki, vm())
	s := newServer(t, pki)
	// A first document, so the cache has one for another nonce.
	_, err := node.Exchange(context.Background(), newAgent(t, imds.URL()), s)
	require.NoError(t, err)
	before := imds.Requests()
	imds.FailNext(http.StatusGone, http.StatusTooManyRequests, http.StatusInternalServerError)
	imds.ServeStale(2)
	_, err = node.Exchange(context.Background(), newAgent(t, imds.URL()), s)
	require.NoError(t, err, "410, 429, 500 and two cached answers for another nonce are retried")
	require.Equal(t, 6, imds.Requests()-before)
}

func TestAgentFinalErrors(t *testing.T) {
	pki := azure.NewPKI(t, "metadata.azure.com")
	imds := azure.Start(t, pki, vm())
	s := newServer(t, pki)

	imds.FailNext(http.StatusBadRequest)
	_, err := node.Exchange(context.Background(), newAgent(t, imds.URL()), s)
	require.ErrorContains(t, err, "metadata service answered 400", "a 400 is final")

	_, err = node.Exchange(context.Background(), newAgent(t, imds.URL()+"/nowhere"), s)
	require.ErrorContains(t, err, "404", "a wrong path is final")

	a, err := azureimds.NewAgent(azureimds.AgentConfig{MetadataURL: "http://127.0.0.1:1", Client: metadata.Options{FirstBackoff: time.Millisecond, Budget: 300 * time.Millisecond}})
	require.NoError(t, err)
	_, err = node.Exchange(context.Background(), a, s)
	require.ErrorContains(t, err, "gave up after", "an unreachable IMDS is retried within the budget, then reported")

	_, err = a.Respond(context.Background(), []byte(`{"nonce":"12345"}`))
	require.ErrorContains(t, err, "10 digits")
	_, err = azureimds.NewAgent(azureimds.AgentConfig{MetadataURL: "ftp://x"})
	require.Error(t, err)
}

// TestStandInSpeaksIMDS checks the stand-in's refusals against IMDS's
// documented ones, so the attestor is tested against the real shape.
func TestStandInSpeaksIMDS(t *testing.T) {
	imds := azure.Start(t, azure.NewPKI(t, "metadata.azure.com"), vm())
	get := func(path string, hdr map[string]string) (int, string) {
		req, _ := http.NewRequest(http.MethodGet, imds.URL()+path, nil)
		for k, v := range hdr {
			req.Header.Set(k, v)
		}
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	code, body := get("/metadata/attested/document?api-version=2021-02-01&nonce=1234567890", nil)
	require.Equal(t, 400, code)
	require.Contains(t, body, "Required metadata header not specified")
	code, body = get("/metadata/attested/document?nonce=1234567890", map[string]string{"Metadata": "true"})
	require.Equal(t, 400, code)
	require.Contains(t, body, "api-version was not specified")
	code, _ = get("/metadata/attested/document?api-version=2021-02-01", map[string]string{"Metadata": "true", "X-Forwarded-For": "1.2.3.4"})
	require.Equal(t, 400, code)
	code, body = get("/metadata/attested/document?api-version=2021-02-01", map[string]string{"Metadata": "true"})
	require.Equal(t, 200, code, body)
	var doc azureimds.Document
	require.NoError(t, json.Unmarshal([]byte(body), &doc))
	require.Equal(t, "pkcs7", doc.Encoding)
}

// azureSample is the attested document of Azure's IMDS documentation
// ("Sample 1: Getting attested data"), byte for byte: the shape the stand-in
// copies and the attestor must parse.
const azureSample = "MIIEEgYJKoZIhvcNAQcCoIIEAzCCA/8CAQExDzANBgkqhkiG9w0BAQsFADCBugYJKoZIhvcNAQcBoIGsBIGpeyJub25jZSI6IjEyMzQ1NjY3NjYiLCJwbGFuIjp7Im5hbWUiOiIiLCJwcm9kdWN0IjoiIiwicHVibGlzaGVyIjoiIn0sInRpbWVTdGFtcCI6eyJjcmVhdGVkT24iOiIxMS8yMC8xOCAyMjowNzozOSAtMDAwMCIsImV4cGlyZXNPbiI6IjExLzIwLzE4IDIyOjA4OjI0IC0wMDAwIn0sInZtSWQiOiIifaCCAj8wggI7MIIBpKADAgECAhBnxW5Kh8dslEBA0E2mIBJ0MA0GCSqGSIb3DQEBBAUAMCsxKTAnBgNVBAMTIHRlc3RzdWJkb21haW4ubWV0YWRhdGEuYXp1cmUuY29tMB4XDTE4MTEyMDIxNTc1N1oXDTE4MTIyMDIxNTc1NlowKzEpMCcGA1UEAxMgdGVzdHN1YmRvbWFpbi5tZXRhZGF0YS5henVyZS5jb20wgZ8wDQYJKoZIhvcNAQEBBQADgY0AMIGJAoGBAML/tBo86ENWPzmXZ0kPkX5dY5QZ150mA8lommszE71x2sCLonzv4/UWk4H+jMMWRRwIea2CuQ5RhdWAHvKq6if4okKNt66fxm+YTVz9z0CTfCLmLT+nsdfOAsG1xZppEapC0Cd9vD6NCKyE8aYI1pliaeOnFjG0WvMY04uWz2MdAgMBAAGjYDBeMFwGA1UdAQRVMFOAENnYkHLa04Ut4Mpt7TkJFfyhLTArMSkwJwYDVQQDEyB0ZXN0c3ViZG9tYWluLm1ldGFkYXRhLmF6dXJlLmNvbYIQZ8VuSofHbJRAQNBNpiASdDANBgkqhkiG9w0BAQQFAAOBgQCLSM6aX5Bs1KHCJp4VQtxZPzXF71rVKCocHy3N9PTJQ9Fpnd+bYw2vSpQHg/AiG82WuDFpPReJvr7Pa938mZqW9HUOGjQKK2FYDTg6fXD8pkPdyghlX5boGWAMMrf7bFkup+lsT+n2tRw2wbNknO1tQ0wICtqy2VqzWwLi45RBwTGB6DCB5QIBATA/MCsxKTAnBgNVBAMTIHRlc3RzdWJkb21haW4ubWV0YWRhdGEuYXp1cmUuY29tAhBnxW5Kh8dslEBA0E2mIBJ0MA0GCSqGSIb3DQEBCwUAMA0GCSqGSIb3DQEBAQUABIGAld1BM/yYIqqv8SDE4kjQo3Ul/IKAVR8ETKcve5BAdGSNkTUooUGVniTXeuvDj5NkmazOaKZp9fEtByqqPOyw/nlXaZgOO44HDGiPUJ90xVYmfeK6p9RpJBu6kiKhnnYTelUk5u75phe5ZbMZfBhuPhXmYAdjc7Nmw97nx8NnprQ="

func TestAzureSample(t *testing.T) {
	der, err := base64.StdEncoding.DecodeString(azureSample)
	require.NoError(t, err)
	p7, err := pkcs7.Parse(der)
	require.NoError(t, err)
	require.NoError(t, p7.Verify(), "the library verifies the signature of Azure's own document")
	c, err := azureimds.ParseContent(p7.Content)
	require.NoError(t, err)
	require.Equal(t, "1234566766", c.Nonce)
	created, err := time.Parse(azureimds.TimeLayout, c.TimeStamp.CreatedOn)
	require.NoError(t, err)
	require.Equal(t, "2018-11-20T22:07:39Z", created.UTC().Format(time.RFC3339))
	require.Equal(t, c.TimeStamp.CreatedOn, azure.Time(created), "the stand-in writes times as Azure does")

	// Signed by a self-signed test certificate of 2018: refused.
	s := newServer(t, azure.NewPKI(t, "metadata.azure.com"), func(c *azureimds.ServerConfig) {
		c.Now = func() time.Time { return created }
	})
	_, err = s.Verify(azureimds.Document{Encoding: "pkcs7", Signature: azureSample})
	require.ErrorContains(t, err, "does not chain to a configured root")

	// The stand-in's documents have the same structure: one signer, its
	// certificate alone, no signed attributes, the same algorithm names.
	pki := azure.NewPKI(t, "metadata.azure.com")
	doc := pki.Sign(t, azureimds.Content{Nonce: "1"})
	mine, err := base64.StdEncoding.DecodeString(doc.Signature)
	require.NoError(t, err)
	q7, err := pkcs7.Parse(mine)
	require.NoError(t, err)
	for _, p := range []*pkcs7.PKCS7{p7, q7} {
		require.Len(t, p.Certificates, 1)
		require.Len(t, p.Signers, 1)
		require.Empty(t, p.Signers[0].AuthenticatedAttributes)
		require.Equal(t, "1.2.840.113549.1.1.11", p.Signers[0].DigestAlgorithm.Algorithm.String())
		require.Equal(t, "1.2.840.113549.1.1.1", p.Signers[0].DigestEncryptionAlgorithm.Algorithm.String())
	}
}

// craftAgent answers the server's nonce with whatever document respond makes.
type craftAgent struct {
	respond func(nonce string) []byte
}

func (craftAgent) Name() string                            { return azureimds.Name }
func (craftAgent) Payload(context.Context) ([]byte, error) { return []byte("{}"), nil }
func (a craftAgent) Respond(_ context.Context, c []byte) ([]byte, error) {
	var ch struct{ Nonce string }
	if err := json.Unmarshal(c, &ch); err != nil {
		return nil, err
	}
	return a.respond(ch.Nonce), nil
}

func docJSON(d azureimds.Document) []byte {
	b, _ := json.Marshal(map[string]any{"document": d})
	return b
}

func TestRefusals(t *testing.T) {
	pki := azure.NewPKI(t, "metadata.azure.com")
	now := time.Now()
	content := func(nonce string) azureimds.Content {
		return azureimds.Content{Nonce: nonce, SubscriptionID: sub, VMID: vmID, SKU: "x",
			TimeStamp: azureimds.TimeStamp{CreatedOn: azure.Time(now), ExpiresOn: azure.Time(now.Add(6 * time.Hour))}}
	}
	signed := func(p *azure.PKI, mod func(*azureimds.Content)) func(string) []byte {
		return func(nonce string) []byte {
			c := content(nonce)
			if mod != nil {
				mod(&c)
			}
			return docJSON(p.Sign(t, c))
		}
	}
	other := azure.NewPKI(t, "metadata.azure.com")
	evil := azure.NewPKI(t, "metadata.evil.example")
	lookalike := azure.NewPKI(t, "evilmetadata.azure.com")
	// A document captured from an earlier attestation.
	captured := pki.Sign(t, content("0123456789"))
	tampered := func(nonce string) []byte {
		d := pki.Sign(t, content(nonce))
		der, _ := base64.StdEncoding.DecodeString(d.Signature)
		i := strings.Index(string(der), `"sku":"x"`)
		der[i+7] = 'y'
		d.Signature = base64.StdEncoding.EncodeToString(der)
		return docJSON(d)
	}
	cases := []struct {
		name    string
		respond func(string) []byte
		payload string
		want    string
	}{
		{"malformed payload", signed(pki, nil), "not json", "malformed payload"},
		{"malformed response", func(string) []byte { return []byte("<html>") }, "", "malformed response"},
		{"encoding", func(string) []byte { return docJSON(azureimds.Document{Encoding: "json", Signature: "e30="}) }, "", `encoding "json", want pkcs7`},
		{"not base64", func(string) []byte { return docJSON(azureimds.Document{Encoding: "pkcs7", Signature: "%%%"}) }, "", "not base64"},
		{"not pkcs7", func(string) []byte { return docJSON(azureimds.Document{Encoding: "pkcs7", Signature: "AAAA"}) }, "", "not PKCS#7"},
		{"untrusted root", signed(other, nil), "", "does not chain to a configured root"},
		{"signer not azure", signed(evil, nil), "", "not an allowed metadata domain"},
		{"lookalike signer", signed(lookalike, nil), "", "not an allowed metadata domain"},
		{"tampered content", tampered, "", "signature verification failed"},
		{"replayed document", func(string) []byte { return docJSON(captured) }, "", "nonce is not this attestation's"},
		{"too old", signed(pki, func(c *azureimds.Content) { c.TimeStamp.CreatedOn = azure.Time(now.Add(-10 * time.Minute)) }), "", "more than 5m0s ago"},
		{"future", signed(pki, func(c *azureimds.Content) { c.TimeStamp.CreatedOn = azure.Time(now.Add(10 * time.Minute)) }), "", "created in the future"},
		{"expired", signed(pki, func(c *azureimds.Content) { c.TimeStamp.ExpiresOn = azure.Time(now.Add(-2 * time.Minute)) }), "", "document expired"},
		{"bad time", signed(pki, func(c *azureimds.Content) { c.TimeStamp.CreatedOn = "yesterday" }), "", "createdOn"},
		{"subscription not allowed", signed(pki, func(c *azureimds.Content) { c.SubscriptionID = "00000000-0000-0000-0000-000000000001" }), "", "subscription 00000000-0000-0000-0000-000000000001 is not allowed"},
		{"vmId not a GUID", signed(pki, func(c *azureimds.Content) { c.VMID = "../../x" }), "", "vmId"},
		{"no subscription", signed(pki, func(c *azureimds.Content) { c.SubscriptionID = "" }), "", "subscriptionId"},
		{"oversized", func(string) []byte {
			return []byte(`{"document":{"encoding":"pkcs7","signature":"` + strings.Repeat("A", node.MaxPayloadSize) + `"}}`)
		}, "", "over"},
	}
	s := newServer(t, pki)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			payload := tc.payload
			if payload == "" {
				payload = "{}"
			}
			_, err := s.Attest(context.Background(), []byte(payload), func(_ context.Context, c []byte) ([]byte, error) {
				return craftAgent{respond: tc.respond}.Respond(context.Background(), c)
			})
			require.ErrorContains(t, err, tc.want)
		})
	}
	// The same server admits a well-made document: the cases failed for their reason alone.
	_, err := node.Exchange(context.Background(), craftAgent{respond: signed(pki, nil)}, s)
	require.NoError(t, err)
}

func TestServerConfig(t *testing.T) {
	pki := azure.NewPKI(t, "metadata.azure.com")
	for name, mod := range map[string]func(*azureimds.ServerConfig){
		"no roots":              func(c *azureimds.ServerConfig) { c.Roots = nil },
		"no tenants":            func(c *azureimds.ServerConfig) { c.Tenants = nil },
		"tenant without subs":   func(c *azureimds.ServerConfig) { c.Tenants = map[string][]string{tenant: nil} },
		"tenant not a GUID":     func(c *azureimds.ServerConfig) { c.Tenants = map[string][]string{"contoso.com": {sub}} },
		"sub in two tenants":    func(c *azureimds.ServerConfig) { c.Tenants = map[string][]string{tenant: {sub}, vmID: {sub}} },
		"no trust domain":       func(c *azureimds.ServerConfig) { c.TrustDomain = spiffeid.TrustDomain{} },
		"empty metadata domain": func(c *azureimds.ServerConfig) { c.MetadataDomains = []string{"."} },
	} {
		c := azureimds.ServerConfig{TrustDomain: td, Roots: []*x509.Certificate{pki.Root.Cert}, Tenants: map[string][]string{tenant: {sub}}}
		mod(&c)
		_, err := azureimds.NewServer(c)
		require.Error(t, err, name)
	}
}
