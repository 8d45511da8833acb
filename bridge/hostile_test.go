package bridge_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/bridge"
	"github.com/ferry-id/ferry/internal/badjwt"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

// countingLog counts the bridge's log lines that contain a phrase.
type countingLog struct {
	mu  sync.Mutex
	buf strings.Builder
}

func (l *countingLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *countingLog) count(phrase string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Count(l.buf.String(), phrase)
}

// signatureChecks is what the bridge logs (at debug) after every signature
// check that failed: the hook for "reached the expensive step".
const signatureChecks = "assertion signature rejected"

// TestTokenEndpointHostileAssertions posts the known-bad corpus as client
// assertions, for the local trust domain's issuer and for an external OIDC
// issuer. Every one is refused with an Entra error; only the well-formed
// forgery reaches a signature check, and nothing refused by its form alone
// makes the bridge fetch the issuer's keys.
func TestTokenEndpointHostileAssertions(t *testing.T) {
	logs := &countingLog{}
	withLog := func(c *bridge.Config) {
		c.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	f, o := newExternalFixture(t, withLog)
	// Both issuers are trusted for the identity.
	f.dir.SetFederatedCredentials(objectID,
		&ferrypb.FederatedCredential{IdentityObjectId: objectID, Name: "web-frontend", Issuer: localIss, Subject: spiffeID, Audiences: []string{exchangeAz}},
		&ferrypb.FederatedCredential{IdentityObjectId: objectID, Name: "github-main", Issuer: o.issuer, Subject: extSubject, Audiences: []string{exchangeAz}},
	)
	attacker, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	exp := f.clock.Now().Add(4 * time.Minute).Unix()

	issuers := []struct {
		name, iss, sub, kid string
		trusted             crypto.PublicKey
	}{
		{"local", localIss, spiffeID, localKID, &svidKey.PublicKey},
		{"external", o.issuer, extSubject, "k1", &rsaIssKey1.PublicKey},
	}
	for _, is := range issuers {
		claims := map[string]any{"iss": is.iss, "sub": is.sub, "aud": []string{exchangeAz}, "exp": exp}
		for _, tc := range badjwt.Corpus(claims, is.kid, attacker, is.trusted) {
			t.Run(is.name+"/"+tc.Name, func(t *testing.T) {
				checks := logs.count(signatureChecks)
				disc, jwks := o.fetches()
				res := f.post(t, v2Token, url.Values{
					"grant_type":            {"client_credentials"},
					"client_id":             {clientID},
					"client_assertion_type": {"urn:ietf:params:oauth:client-assertion-type:jwt-bearer"},
					"client_assertion":      {tc.Token},
					"scope":                 {resURI + "/.default"},
				})
				require.Contains(t, []int{http.StatusBadRequest, http.StatusUnauthorized, http.StatusRequestEntityTooLarge}, res.status, "body: %s", res.raw)
				require.NotEmpty(t, res.body["error"], "an Entra error: %s", res.raw)
				require.NotEmpty(t, res.body["error_codes"], "an Entra error: %s", res.raw)
				after := logs.count(signatureChecks) - checks
				if tc.Stage == badjwt.Signature {
					require.Equal(t, 1, after, "the forgery is refused by its signature")
					return
				}
				require.Zero(t, after, "refused before any signature check")
				if tc.Stage == badjwt.Form {
					d, j := o.fetches()
					require.Equal(t, disc, d, "no discovery fetch")
					require.Equal(t, jwks, j, "no JWKS fetch")
				}
			})
		}
	}
	// The hook counts: the genuine assertions still work.
	require.Equal(t, http.StatusOK, f.post(t, v2Token, v2Form(svid(t))).status)
	require.Equal(t, http.StatusOK, f.post(t, v2Token, v2Form(f.extToken(t, o.issuer, "k1", rsaIssKey1))).status)
}
