package tokens_test

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"sync/atomic"
	"testing"

	"github.com/ferry-id/ferry/agent/imds"
	"github.com/ferry-id/ferry/agent/tokens"
	"github.com/stretchr/testify/require"
)

// identities maps uids to identities; uid 0 has two.
type identities struct{}

func (identities) Identity(_ context.Context, c imds.Caller, s imds.Selector) (tokens.Identity, error) {
	switch {
	case c.UID == 1000 && s.Kind == imds.SelectorNone:
		return tokens.Identity{TenantID: "tenant-1", ClientID: "client-1000", ObjectID: "obj-1000", SPIFFEID: "spiffe://td/u/1000"}, nil
	case c.UID == 0 && s.Kind == imds.SelectorNone:
		return tokens.Identity{}, imds.ErrAmbiguousIdentity
	case c.UID == 0 && s.Kind == imds.SelectorClientID && s.Value == "client-a":
		return tokens.Identity{TenantID: "tenant-1", ClientID: "client-a", SPIFFEID: "spiffe://td/root"}, nil
	case c.UID == 2000:
		return tokens.Identity{}, fmt.Errorf("no entry: %w", imds.ErrForbidden)
	}
	return tokens.Identity{}, imds.ErrIdentityNotFound
}

type assertions struct{ calls atomic.Int32 }

func (a *assertions) Assertion(_ context.Context, id tokens.Identity) (string, error) {
	a.calls.Add(1)
	return "jwt-svid-for-" + id.SPIFFEID, nil
}

func TestProvider(t *testing.T) {
	a := newAuthority(t, func(w http.ResponseWriter, form url.Values) {
		if form.Get("scope") == "https://bad/.default" {
			jsonReply(400, `{"error":"invalid_resource","error_description":"AADSTS500011: The resource principal named https://bad was not found.","error_codes":[500011]}`)(w, form)
			return
		}
		jsonReply(200, `{"token_type":"Bearer","expires_in":3599,"access_token":"at-`+form.Get("client_id")+`"}`)(w, form)
	})
	asrt := &assertions{}
	p, err := tokens.New(tokens.Config{Identities: identities{}, Assertions: asrt, Exchange: a.exchanger(t, ""), Logger: testLogger(t)})
	require.NoError(t, err)
	ctx := context.Background()
	req := imds.Request{Resource: "https://management.azure.com", APIVersion: "2018-02-01"}

	tok, err := p.Token(ctx, imds.Caller{UID: 1000}, req)
	require.NoError(t, err)
	require.Equal(t, "at-client-1000", tok.AccessToken)
	require.Equal(t, "client-1000", tok.ClientID)
	require.Equal(t, "jwt-svid-for-spiffe://td/u/1000", a.lastForm.Get("client_assertion"))
	require.Equal(t, "/tenant-1/oauth2/v2.0/token", a.lastPath)

	// Cached: no new assertion, no new call.
	tok2, err := p.Token(ctx, imds.Caller{UID: 1000, PID: 77}, req)
	require.NoError(t, err)
	require.Equal(t, tok.AccessToken, tok2.AccessToken)
	require.Equal(t, int32(1), a.calls.Load())
	require.Equal(t, int32(1), asrt.calls.Load())

	// Authorization still runs on every call.
	_, err = p.Token(ctx, imds.Caller{UID: 2000}, req)
	require.ErrorIs(t, err, imds.ErrForbidden)
	_, err = p.Token(ctx, imds.Caller{UID: 0}, req)
	require.ErrorIs(t, err, imds.ErrAmbiguousIdentity)
	_, err = p.Token(ctx, imds.Caller{UID: 3000}, req)
	require.ErrorIs(t, err, imds.ErrIdentityNotFound)

	req.Selector = imds.Selector{Kind: imds.SelectorClientID, Value: "client-a"}
	tok, err = p.Token(ctx, imds.Caller{UID: 0}, req)
	require.NoError(t, err)
	require.Equal(t, "at-client-a", tok.AccessToken)

	_, err = p.Token(ctx, imds.Caller{UID: 0}, imds.Request{Resource: "https://bad", Selector: req.Selector})
	var up imds.UpstreamError
	require.ErrorAs(t, err, &up)
	status, code, _, _ := up.Upstream()
	require.Equal(t, 400, status)
	require.Equal(t, "invalid_resource", code)
}

func TestNewValidation(t *testing.T) {
	_, err := tokens.New(tokens.Config{})
	require.Error(t, err)
}
