package tpm_test

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/attestors/node"
	"github.com/ferry-id/ferry/attestors/node/tpm"
	"github.com/ferry-id/ferry/internal/selector"
	"github.com/ferry-id/ferry/test/metadata/testpki"
	"github.com/ferry-id/ferry/test/swtpm"
)

var td = spiffeid.RequireTrustDomainFromString("example.org")

func newServer(t testing.TB, sw *swtpm.TPM) *tpm.Server {
	t.Helper()
	s, err := tpm.NewServer(tpm.ServerConfig{TrustDomain: td, ManufacturerCAs: sw.CAs[:1], Intermediates: sw.CAs[1:]})
	require.NoError(t, err)
	return s
}

func newAgent(t testing.TB, sw *swtpm.TPM) *tpm.Agent {
	t.Helper()
	a, err := tpm.NewAgent(tpm.AgentConfig{Device: sw.Socket})
	require.NoError(t, err)
	return a
}

func TestAttest(t *testing.T) {
	sw := swtpm.Start(t)
	s := newServer(t, sw)
	res, err := node.Exchange(context.Background(), newAgent(t, sw), s)
	require.NoError(t, err)
	require.True(t, res.CanReattest)
	require.False(t, res.SingleAgent)
	require.True(t, strings.HasPrefix(res.AgentID.String(), "spiffe://example.org/spire/agent/tpm/"), res.AgentID)
	hash := strings.TrimPrefix(res.AgentID.Path(), "/spire/agent/tpm/")
	require.Len(t, hash, 64)
	var got []string
	for _, sel := range res.Selectors {
		got = append(got, selector.Format(sel))
		require.NoError(t, selector.MustRegistry(tpm.Selectors()).Check(selector.Node, sel))
	}
	require.Contains(t, got, "tpm:ek-hash:"+hash)
	require.Len(t, got, 3, "the EK hash, the issuing CA and the root")

	// A new AK each time, the same EK: the same agent.
	res2, err := node.Exchange(context.Background(), newAgent(t, sw), s)
	require.NoError(t, err)
	require.Equal(t, res.AgentID, res2.AgentID)
}

// relay is an agent half whose payload comes from one TPM and whose
// challenge answers come from another, or are tampered with.
type relay struct {
	payload func() ([]byte, error)
	respond func(context.Context, []byte) ([]byte, error)
}

func (relay) Name() string                                            { return tpm.Name }
func (r relay) Payload(context.Context) ([]byte, error)               { return r.payload() }
func (r relay) Respond(ctx context.Context, c []byte) ([]byte, error) { return r.respond(ctx, c) }

func TestRefusals(t *testing.T) {
	sw, other := swtpm.Start(t), swtpm.Start(t)
	s := newServer(t, sw)
	ctx := context.Background()

	// A TPM whose EK certificate comes from a CA the server does not trust.
	_, err := node.Exchange(ctx, newAgent(t, other), s)
	require.ErrorContains(t, err, "does not chain to a configured manufacturer CA")

	// Someone who copied a trusted TPM's EK certificate, with an AK on
	// another TPM: the credential cannot be activated.
	good := newAgent(t, sw)
	thief := newAgent(t, other)
	_, err = node.Exchange(ctx, relay{
		payload: func() ([]byte, error) {
			p, err := good.Payload(ctx)
			if err != nil {
				return nil, err
			}
			q, err := thief.Payload(ctx)
			if err != nil {
				return nil, err
			}
			var pm, qm map[string]json.RawMessage
			require.NoError(t, json.Unmarshal(p, &pm))
			require.NoError(t, json.Unmarshal(q, &qm))
			qm["ek_cert"] = pm["ek_cert"]
			return json.Marshal(qm)
		},
		respond: thief.Respond,
	}, s)
	require.ErrorContains(t, err, "activate credential", "the thief's TPM does not hold the EK the credential is encrypted to")

	// A made-up answer.
	a := newAgent(t, sw)
	_, err = node.Exchange(ctx, relay{payload: func() ([]byte, error) { return a.Payload(ctx) },
		respond: func(context.Context, []byte) ([]byte, error) {
			return []byte(`{"secret":"AAAAAAAAAAAAAAAAAAAAAA=="}`), nil
		}}, s)
	require.ErrorContains(t, err, "credential activation failed")

	// An AK that is not the TPM's own (its attributes or attestation changed).
	_, err = node.Exchange(ctx, relay{payload: func() ([]byte, error) {
		p, err := a.Payload(ctx)
		if err != nil {
			return nil, err
		}
		var m map[string]json.RawMessage
		require.NoError(t, json.Unmarshal(p, &m))
		var ak map[string]any
		require.NoError(t, json.Unmarshal(m["ak"], &ak))
		ak["CreateSignature"] = ak["CreateData"]
		m["ak"], _ = json.Marshal(ak)
		return json.Marshal(m)
	}, respond: a.Respond}, s)
	require.ErrorContains(t, err, "attestation key refused")

	for name, c := range map[string]struct{ payload, want string }{
		"malformed":  {"{", "malformed payload"},
		"no EK cert": {`{"ek_cert":"AAAA"}`, "EK certificate"},
		"not our CA": {`{"ek_cert":"` + b64(testpki.NewRoot(t, "x").Cert.Raw) + `"}`, "does not chain"},
		"oversized":  {strings.Repeat("a", node.MaxPayloadSize+1), "over"},
	} {
		_, err := s.Attest(ctx, []byte(c.payload), func(context.Context, []byte) ([]byte, error) { return nil, nil })
		require.ErrorContains(t, err, c.want, name)
	}
	_, err = tpm.NewServer(tpm.ServerConfig{TrustDomain: td})
	require.Error(t, err)
	_, err = tpm.NewAgent(tpm.AgentConfig{Device: "/nonexistent/tpm"})
	require.Error(t, err)
}

func b64(b []byte) string { return base64.StdEncoding.EncodeToString(b) }
