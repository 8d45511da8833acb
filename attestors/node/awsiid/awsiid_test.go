package awsiid_test

import (
	"context"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/smallstep/pkcs7"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/attestors/node"
	"github.com/ferry-id/ferry/attestors/node/awsiid"
	"github.com/ferry-id/ferry/attestors/node/metadata"
	"github.com/ferry-id/ferry/internal/selector"
	aws "github.com/ferry-id/ferry/test/metadata/aws"
)

var td = spiffeid.RequireTrustDomainFromString("example.org")

func instance() aws.Instance {
	return aws.Instance{AccountID: "123456789012", Region: "eu-west-1", AvailabilityZone: "eu-west-1b",
		InstanceID: "i-0123456789abcdef0", InstanceType: "m5.large", ImageID: "ami-0abcdef1234567890",
		PendingTime: "2026-11-19T16:32:11Z", PrivateIP: "10.0.0.12"}
}

func newServer(t *testing.T, signer *aws.Signer, mod ...func(*awsiid.ServerConfig)) *awsiid.Server {
	t.Helper()
	c := awsiid.ServerConfig{TrustDomain: td, RegionCertificates: map[string]*x509.Certificate{"eu-west-1": signer.Cert}, AccountIDs: []string{"123456789012"}}
	for _, m := range mod {
		m(&c)
	}
	s, err := awsiid.NewServer(c)
	require.NoError(t, err)
	return s
}

func newAgent(t *testing.T, url string) *awsiid.Agent {
	t.Helper()
	a, err := awsiid.NewAgent(awsiid.AgentConfig{MetadataURL: url, Client: metadata.Options{FirstBackoff: time.Millisecond, Budget: 20 * time.Second}})
	require.NoError(t, err)
	return a
}

func TestAttest(t *testing.T) {
	signer := aws.NewSigner(t, "eu-west-1")
	imds := aws.Start(t, signer, instance())
	res, err := node.Exchange(context.Background(), newAgent(t, imds.URL()), newServer(t, signer))
	require.NoError(t, err)
	require.Equal(t, "spiffe://example.org/spire/agent/aws_iid/123456789012/eu-west-1/i-0123456789abcdef0", res.AgentID.String())
	require.True(t, res.SingleAgent, "a static document admits one agent per instance")
	require.False(t, res.CanReattest)
	var got []string
	for _, s := range res.Selectors {
		got = append(got, selector.Format(s))
		require.NoError(t, selector.MustRegistry(awsiid.Selectors()).Check(selector.Node, s))
	}
	require.Equal(t, []string{
		"aws_iid:account:id:123456789012", "aws_iid:az:eu-west-1b", "aws_iid:image:id:ami-0abcdef1234567890",
		"aws_iid:instance:id:i-0123456789abcdef0", "aws_iid:instance:type:m5.large", "aws_iid:region:eu-west-1",
	}, got)

	res, err = node.Exchange(context.Background(), newAgent(t, imds.URL()), newServer(t, signer, func(c *awsiid.ServerConfig) { c.AllowReattestation = true }))
	require.NoError(t, err)
	require.False(t, res.SingleAgent)
	require.True(t, res.CanReattest)
}

func TestAgentIMDSv2(t *testing.T) {
	signer := aws.NewSigner(t, "eu-west-1")
	imds := aws.Start(t, signer, instance())
	s := newServer(t, signer)
	a := newAgent(t, imds.URL())

	// Throttled and failing answers are retried.
	imds.FailNext(http.StatusTooManyRequests, http.StatusServiceUnavailable)
	_, err := node.Exchange(context.Background(), a, s)
	require.NoError(t, err)
	require.Equal(t, 3, imds.Requests("/latest/api/token"))

	// Without the token (IMDSv2 required) the GETs are refused: the stand-in
	// answers as EC2 does.
	resp, err := http.Get(imds.URL() + "/latest/dynamic/instance-identity/document")
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusUnauthorized, resp.StatusCode)
	req, _ := http.NewRequest(http.MethodPut, imds.URL()+"/latest/api/token", nil)
	resp, err = http.DefaultClient.Do(req)
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusBadRequest, resp.StatusCode, "a token request needs its TTL header")

	// A revoked session token: the agent gets a new one, once.
	before := imds.Requests("/latest/api/token")
	imds.FailNext() // nothing
	imds.RevokeTokens()
	p, err := a.Payload(context.Background())
	require.NoError(t, err)
	require.NotEmpty(t, p)
	require.Equal(t, before+1, imds.Requests("/latest/api/token"))

	// A final answer is reported, not retried forever.
	imds.FailNext(http.StatusForbidden)
	_, err = a.Payload(context.Background())
	require.ErrorContains(t, err, "403")
	_, err = a.Respond(context.Background(), []byte("x"))
	require.ErrorIs(t, err, node.ErrNoChallenge)
}

func payload(doc, sig string) []byte {
	b, _ := json.Marshal(map[string]string{"document": doc, "rsa2048": sig})
	return b
}

func TestRefusals(t *testing.T) {
	signer := aws.NewSigner(t, "eu-west-1")
	other := aws.NewSigner(t, "eu-west-1")
	s := newServer(t, signer, func(c *awsiid.ServerConfig) {
		c.RegionCertificates["us-east-1"] = aws.NewSigner(t, "us-east-1").Cert
	})
	good := instance().Document()
	with := func(mod func(*aws.Instance)) string {
		i := instance()
		mod(&i)
		return i.Document()
	}
	tampered := func() []byte {
		sig := aws.Sign(t, signer, good)
		der, _ := base64.StdEncoding.DecodeString(strings.Join(strings.Fields(sig), ""))
		i := strings.Index(string(der), "m5.large")
		der[i] = 'c'
		doc := strings.Replace(good, "m5.large", "c5.large", 1)
		return payload(doc, base64.StdEncoding.EncodeToString(der))
	}
	usEast := with(func(i *aws.Instance) { i.Region, i.AvailabilityZone = "us-east-1", "us-east-1a" })
	cases := []struct {
		name    string
		payload []byte
		want    string
	}{
		{"malformed", []byte("{"), "malformed payload"},
		{"not base64", payload(good, "%%%"), "not base64"},
		{"not pkcs7", payload(good, "AAAA"), "not PKCS#7"},
		{"document differs", payload(strings.Replace(good, "m5.large", "x1e.32xlarge", 1), aws.Sign(t, signer, good)), "not the signed document"},
		{"unknown signer", payload(good, aws.Sign(t, other, good)), "not signed by the AWS certificate of region eu-west-1"},
		{"another region's key", payload(usEast, aws.Sign(t, signer, usEast)), "not signed by the AWS certificate of region us-east-1"},
		{"region not configured", payload(with(func(i *aws.Instance) { i.Region = "ap-south-1" }), aws.Sign(t, signer, with(func(i *aws.Instance) { i.Region = "ap-south-1" }))), `no AWS certificate is configured for region "ap-south-1"`},
		{"tampered", tampered(), "signature verification failed"},
		{"account not allowed", payload(with(func(i *aws.Instance) { i.AccountID = "999999999999" }), aws.Sign(t, signer, with(func(i *aws.Instance) { i.AccountID = "999999999999" }))), "account 999999999999 is not allowed"},
		{"bad instance ID", payload(with(func(i *aws.Instance) { i.InstanceID = "i-../x" }), aws.Sign(t, signer, with(func(i *aws.Instance) { i.InstanceID = "i-../x" }))), "not AWS's forms"},
		{"oversized", []byte(`{"document":"` + strings.Repeat("a", node.MaxPayloadSize) + `"}`), "over"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := s.Attest(context.Background(), tc.payload, nil)
			require.ErrorContains(t, err, tc.want)
		})
	}
	_, err := s.Attest(context.Background(), payload(good, aws.Sign(t, signer, good)), nil)
	require.NoError(t, err, "the same server admits a well-made payload")
}

// TestStandInShape checks the stand-in's /rsa2048 is shaped as AWS's: base64
// in 64-character lines of PKCS#7 signed data holding the document, with
// signed attributes and no certificate.
func TestStandInShape(t *testing.T) {
	signer := aws.NewSigner(t, "eu-west-1")
	sig := aws.Sign(t, signer, instance().Document())
	for _, l := range strings.Split(sig, "\n") {
		require.LessOrEqual(t, len(l), 64)
	}
	der, err := base64.StdEncoding.DecodeString(strings.ReplaceAll(sig, "\n", ""))
	require.NoError(t, err)
	p7, err := pkcs7.Parse(der)
	require.NoError(t, err)
	require.Empty(t, p7.Certificates)
	require.Len(t, p7.Signers, 1)
	require.NotEmpty(t, p7.Signers[0].AuthenticatedAttributes)
	require.Equal(t, instance().Document(), string(p7.Content))
	var doc awsiid.Document
	require.NoError(t, json.Unmarshal(p7.Content, &doc))
	require.Equal(t, "eu-west-1", doc.Region)
}

func TestServerConfig(t *testing.T) {
	signer := aws.NewSigner(t, "eu-west-1")
	for name, mod := range map[string]func(*awsiid.ServerConfig){
		"no certs":    func(c *awsiid.ServerConfig) { c.RegionCertificates = nil },
		"no accounts": func(c *awsiid.ServerConfig) { c.AccountIDs = nil },
		"bad account": func(c *awsiid.ServerConfig) { c.AccountIDs = []string{"12"} },
		"bad region": func(c *awsiid.ServerConfig) {
			c.RegionCertificates = map[string]*x509.Certificate{"Europe": signer.Cert}
		},
		"no trust domain": func(c *awsiid.ServerConfig) { c.TrustDomain = spiffeid.TrustDomain{} },
	} {
		c := awsiid.ServerConfig{TrustDomain: td, RegionCertificates: map[string]*x509.Certificate{"eu-west-1": signer.Cert}, AccountIDs: []string{"123456789012"}}
		mod(&c)
		_, err := awsiid.NewServer(c)
		require.Error(t, err, name)
	}
}
