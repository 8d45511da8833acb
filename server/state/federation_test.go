package state_test

import (
	"bytes"
	"context"
	"io"
	"testing"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/state"
)

func fedPut(p *ferrypb.FederationPut) *ferrypb.Command {
	return &ferrypb.Command{Op: &ferrypb.Command_FederationPut{FederationPut: p}}
}

func fedDelete(td string) *ferrypb.Command {
	return &ferrypb.Command{Op: &ferrypb.Command_FederationDelete{FederationDelete: &ferrypb.FederationDelete{TrustDomain: td}}}
}

func fedStatus(td string, at int64, msg string) *ferrypb.Command {
	return &ferrypb.Command{Op: &ferrypb.Command_FederationStatusSet{FederationStatusSet: &ferrypb.FederationStatusSet{TrustDomain: td, LastRefresh: at, LastError: msg}}}
}

func webRel(td string) *ferrypb.FederationRelationship {
	return &ferrypb.FederationRelationship{TrustDomain: td, BundleEndpointUrl: "https://" + td + "/bundle", Profile: state.ProfileHTTPSWeb}
}

func spiffeRel(td, endpointID string) *ferrypb.FederationRelationship {
	return &ferrypb.FederationRelationship{TrustDomain: td, BundleEndpointUrl: "https://" + td + ":8443", Profile: state.ProfileHTTPSSPIFFE, EndpointSpiffeId: endpointID}
}

func testBundle(td string, seq uint64) *ferrypb.Bundle {
	return &ferrypb.Bundle{TrustDomain: td, SequenceNumber: seq, X509Authorities: []*ferrypb.X509Authority{{Certificate: []byte("der-" + td)}}}
}

func TestFederationLifecycle(t *testing.T) {
	h := newHarness(t, state.Config{})

	res := h.apply(fedPut(&ferrypb.FederationPut{Relationship: webRel("other.org"), CreateOnly: true}))
	require.Equal(t, codes.OK, codeOf(res.Status), res.Status.GetMessage())
	require.Equal(t, res.Index, res.FederationRelationship.Revision)
	require.Nil(t, h.s.View().Bundle("other.org"), "https_web needs no initial bundle")

	res = h.apply(fedPut(&ferrypb.FederationPut{Relationship: webRel("other.org"), CreateOnly: true}))
	require.Equal(t, codes.AlreadyExists, codeOf(res.Status))
	res = h.apply(fedPut(&ferrypb.FederationPut{Relationship: webRel("nobody.org"), UpdateOnly: true}))
	require.Equal(t, codes.NotFound, codeOf(res.Status))

	// The refresher's status is recorded, and an operator's update keeps it.
	res = h.apply(fedStatus("other.org", 1234, "federation: could not GET bundle"))
	require.Equal(t, codes.OK, codeOf(res.Status))
	upd := webRel("other.org")
	upd.BundleEndpointUrl = "https://other.org/v2/bundle"
	upd.LastError = "forged by the client"
	res = h.apply(fedPut(&ferrypb.FederationPut{Relationship: upd, UpdateOnly: true}))
	require.Equal(t, codes.OK, codeOf(res.Status), res.Status.GetMessage())
	got := h.s.View().FederationRelationship("other.org")
	require.Equal(t, "https://other.org/v2/bundle", got.BundleEndpointUrl)
	require.Equal(t, int64(1234), got.LastRefresh)
	require.Equal(t, "federation: could not GET bundle", got.LastError)

	require.Len(t, h.s.View().FederationRelationships(), 1)
	res = h.apply(fedDelete("other.org"))
	require.Equal(t, codes.OK, codeOf(res.Status))
	require.Nil(t, h.s.View().FederationRelationship("other.org"))
	require.Equal(t, codes.NotFound, codeOf(h.apply(fedDelete("other.org")).Status))
	require.Equal(t, codes.NotFound, codeOf(h.apply(fedStatus("other.org", 1, "")).Status))
}

func TestFederationSPIFFEProfileNeedsBundle(t *testing.T) {
	h := newHarness(t, state.Config{})
	rel := spiffeRel("other.org", "spiffe://other.org/spire/server")

	res := h.apply(fedPut(&ferrypb.FederationPut{Relationship: rel}))
	require.Equal(t, codes.FailedPrecondition, codeOf(res.Status))
	require.Contains(t, res.Status.Message, "other.org")

	res = h.apply(fedPut(&ferrypb.FederationPut{Relationship: rel, Bundle: testBundle("third.org", 1)}))
	require.Equal(t, codes.InvalidArgument, codeOf(res.Status), "a bundle of another trust domain")
	require.Nil(t, h.s.View().Bundle("third.org"))

	// The initial bundle is stored in the same command.
	res = h.apply(fedPut(&ferrypb.FederationPut{Relationship: rel, Bundle: testBundle("other.org", 0)}))
	require.Equal(t, codes.OK, codeOf(res.Status), res.Status.GetMessage())
	b := h.s.View().Bundle("other.org")
	require.NotNil(t, b)
	require.Equal(t, res.Index, b.Revision)

	// Once a bundle is known, later updates need none.
	res = h.apply(fedPut(&ferrypb.FederationPut{Relationship: rel, UpdateOnly: true}))
	require.Equal(t, codes.OK, codeOf(res.Status), res.Status.GetMessage())

	// An endpoint in a third trust domain is authenticated with that domain's bundle.
	rel2 := spiffeRel("fourth.org", "spiffe://third.org/bundle-server")
	res = h.apply(fedPut(&ferrypb.FederationPut{Relationship: rel2, Bundle: testBundle("fourth.org", 0)}))
	require.Equal(t, codes.FailedPrecondition, codeOf(res.Status))
	h.apply(&ferrypb.Command{Op: &ferrypb.Command_BundleSet{BundleSet: &ferrypb.BundleSet{Bundle: testBundle("third.org", 1)}}})
	res = h.apply(fedPut(&ferrypb.FederationPut{Relationship: rel2}))
	require.Equal(t, codes.OK, codeOf(res.Status), res.Status.GetMessage())
}

func TestFederationValidation(t *testing.T) {
	for name, r := range map[string]*ferrypb.FederationRelationship{
		"no trust domain":        {BundleEndpointUrl: "https://x/b", Profile: state.ProfileHTTPSWeb},
		"bad trust domain":       {TrustDomain: "Not A TD", BundleEndpointUrl: "https://x/b", Profile: state.ProfileHTTPSWeb},
		"spiffe:// prefix":       {TrustDomain: "spiffe://other.org", BundleEndpointUrl: "https://x/b", Profile: state.ProfileHTTPSWeb},
		"http URL":               {TrustDomain: "other.org", BundleEndpointUrl: "http://x/b", Profile: state.ProfileHTTPSWeb},
		"no host":                {TrustDomain: "other.org", BundleEndpointUrl: "https:///b", Profile: state.ProfileHTTPSWeb},
		"unknown profile":        {TrustDomain: "other.org", BundleEndpointUrl: "https://x/b", Profile: "https_acme"},
		"web with endpoint ID":   {TrustDomain: "other.org", BundleEndpointUrl: "https://x/b", Profile: state.ProfileHTTPSWeb, EndpointSpiffeId: "spiffe://other.org/s"},
		"spiffe without ID":      {TrustDomain: "other.org", BundleEndpointUrl: "https://x/b", Profile: state.ProfileHTTPSSPIFFE},
		"spiffe with a bad ID":   {TrustDomain: "other.org", BundleEndpointUrl: "https://x/b", Profile: state.ProfileHTTPSSPIFFE, EndpointSpiffeId: "https://other.org/s"},
		"spiffe with a TD as ID": {TrustDomain: "other.org", BundleEndpointUrl: "https://x/b", Profile: state.ProfileHTTPSSPIFFE, EndpointSpiffeId: "spiffe://other.org/"},
	} {
		t.Run(name, func(t *testing.T) {
			require.Error(t, state.ValidateFederationRelationship(r))
			h := newHarness(t, state.Config{})
			res := h.apply(fedPut(&ferrypb.FederationPut{Relationship: r, Bundle: testBundle("other.org", 1)}))
			require.Equal(t, codes.InvalidArgument, codeOf(res.Status))
			require.Empty(t, h.s.View().FederationRelationships())
			require.Nil(t, h.s.View().Bundle("other.org"), "nothing of a refused command is applied")
		})
	}
	require.NoError(t, state.ValidateFederationRelationship(webRel("other.org")))
}

func TestFederationChangeFeedAndSnapshot(t *testing.T) {
	h := newHarness(t, state.Config{})
	start := h.s.AppliedIndex()
	h.apply(fedPut(&ferrypb.FederationPut{Relationship: spiffeRel("a.org", "spiffe://a.org/s"), Bundle: testBundle("a.org", 3)}))
	h.apply(fedPut(&ferrypb.FederationPut{Relationship: webRel("b.org")}))
	h.apply(fedStatus("b.org", 99, "unreachable"))

	cs, err := h.s.ChangesSince(context.Background(), start, state.TableFederation)
	require.NoError(t, err)
	require.Len(t, cs, 3)
	require.Equal(t, []string{"a.org", "b.org", "b.org"}, []string{cs[0].Key, cs[1].Key, cs[2].Key})

	var buf bytes.Buffer
	require.NoError(t, h.s.WriteSnapshot(&buf))
	other, err := state.New(state.Config{})
	require.NoError(t, err)
	require.NoError(t, other.Restore(io.NopCloser(bytes.NewReader(buf.Bytes()))))
	for _, td := range []string{"a.org", "b.org"} {
		require.True(t, proto.Equal(h.s.View().FederationRelationship(td), other.View().FederationRelationship(td)), td)
	}
	require.True(t, proto.Equal(h.s.View().Bundle("a.org"), other.View().Bundle("a.org")))
	var again bytes.Buffer
	require.NoError(t, other.WriteSnapshot(&again))
	require.Equal(t, buf.Bytes(), again.Bytes())
}
