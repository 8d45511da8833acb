package discovery_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"math/big"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/bridge/discovery"
)

type issuer struct {
	srv      *httptest.Server
	iss      string
	jwks     atomic.Value // string
	fail     atomic.Bool
	fetches  atomic.Int64
	redirect atomic.Bool
}

func newIssuer(t *testing.T) *issuer {
	is := &issuer{}
	is.srv = httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/.well-known/openid-configuration":
			is.fetches.Add(1)
			if is.fail.Load() {
				w.WriteHeader(503)
				return
			}
			if is.redirect.Load() {
				http.Redirect(w, r, "http://127.0.0.1:1/x", http.StatusFound)
				return
			}
			_ = json.NewEncoder(w).Encode(map[string]string{"issuer": is.iss, "jwks_uri": is.iss + "/keys"})
		case "/keys":
			_, _ = w.Write([]byte(is.jwks.Load().(string)))
		}
	}))
	t.Cleanup(is.srv.Close)
	is.iss = is.srv.URL
	return is
}

func b64(b []byte) string { return base64.RawURLEncoding.EncodeToString(b) }

func TestKeyTypes(t *testing.T) {
	is := newIssuer(t)
	ec, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	rk, _ := rsa.GenerateKey(rand.Reader, 2048)
	small, _ := rsa.GenerateKey(rand.Reader, 1024)
	rsaJWK := func(kid string, k *rsa.PublicKey, extra string) string {
		return `{"kty":"RSA","kid":"` + kid + `","n":"` + b64(k.N.Bytes()) + `","e":"` + b64(big.NewInt(int64(k.E)).Bytes()) + `"` + extra + `}`
	}
	x, y := ec.X.FillBytes(make([]byte, 48)), ec.Y.FillBytes(make([]byte, 48))
	is.jwks.Store(`{"keys":[` + strings.Join([]string{
		rsaJWK("rsa", &rk.PublicKey, `,"use":"sig","alg":"RS256"`),
		rsaJWK("enc", &rk.PublicKey, `,"use":"enc"`),
		rsaJWK("hs", &rk.PublicKey, `,"alg":"HS256"`),
		rsaJWK("small", &small.PublicKey, ``),
		`{"kty":"EC","kid":"ec","crv":"P-384","x":"` + b64(x) + `","y":"` + b64(y) + `"}`,
		`{"kty":"EC","kid":"offcurve","crv":"P-384","x":"` + b64(x) + `","y":"` + b64(x) + `"}`,
		`{"kty":"oct","kid":"oct","k":"c2VjcmV0"}`,
		`{"kty":"RSA","n":"AQAB","e":"AQAB"}`,
		`"garbage"`,
	}, ",") + `]}`)
	c := discovery.New(discovery.Config{HTTPClient: is.srv.Client()})
	ctx := context.Background()

	k, err := c.Key(ctx, is.iss, "rsa")
	require.NoError(t, err)
	require.True(t, rk.PublicKey.Equal(k.Public))
	require.Equal(t, "RS256", k.Alg)
	k, err = c.Key(ctx, is.iss, "ec")
	require.NoError(t, err)
	require.True(t, ec.PublicKey.Equal(k.Public))
	for _, kid := range []string{"enc", "hs", "small", "offcurve", "oct", ""} {
		_, err := c.Key(ctx, is.iss, kid)
		require.ErrorIs(t, err, discovery.ErrUnknownKey, kid)
	}
	require.EqualValues(t, 1, is.fetches.Load())
}

func TestConcurrentLookupsFetchOnce(t *testing.T) {
	is := newIssuer(t)
	rk, _ := rsa.GenerateKey(rand.Reader, 2048)
	is.jwks.Store(`{"keys":[{"kty":"RSA","kid":"k","n":"` + b64(rk.N.Bytes()) + `","e":"AQAB"}]}`)
	c := discovery.New(discovery.Config{HTTPClient: is.srv.Client()})
	var wg sync.WaitGroup
	for range 20 {
		wg.Go(func() {
			_, err := c.Key(context.Background(), is.iss, "k")
			require.NoError(t, err)
		})
	}
	wg.Wait()
	require.EqualValues(t, 1, is.fetches.Load())
}

func TestStaleKeysServedWhileIssuerFails(t *testing.T) {
	is := newIssuer(t)
	rk, _ := rsa.GenerateKey(rand.Reader, 2048)
	is.jwks.Store(`{"keys":[{"kty":"RSA","kid":"k","n":"` + b64(rk.N.Bytes()) + `","e":"AQAB"}]}`)
	now := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	var mu sync.Mutex
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	advance := func(d time.Duration) { mu.Lock(); now = now.Add(d); mu.Unlock() }
	c := discovery.New(discovery.Config{HTTPClient: is.srv.Client(), Clock: clock})
	ctx := context.Background()
	_, err := c.Key(ctx, is.iss, "k")
	require.NoError(t, err)

	is.fail.Store(true)
	advance(25 * time.Hour)
	_, err = c.Key(ctx, is.iss, "k") // refresh fails, stale key still served
	require.NoError(t, err)
	require.EqualValues(t, 2, is.fetches.Load())
	_, err = c.Key(ctx, is.iss, "k") // within the error back-off: no fetch
	require.NoError(t, err)
	require.EqualValues(t, 2, is.fetches.Load())
	advance(30 * time.Second)
	_, err = c.Key(ctx, is.iss, "k")
	require.NoError(t, err)
	require.EqualValues(t, 3, is.fetches.Load())
}

func TestRefusesInsecureURLs(t *testing.T) {
	is := newIssuer(t)
	c := discovery.New(discovery.Config{HTTPClient: is.srv.Client()})
	_, err := c.Key(context.Background(), strings.Replace(is.iss, "https", "http", 1), "k")
	require.ErrorIs(t, err, discovery.ErrFetch)

	is.redirect.Store(true)
	_, err = c.Key(context.Background(), is.iss, "k")
	require.ErrorIs(t, err, discovery.ErrFetch)
	require.ErrorContains(t, err, "refusing redirect")
}

func TestDiscoveryURL(t *testing.T) {
	require.Equal(t, "https://h/t/.well-known/openid-configuration", discovery.DiscoveryURL("https://h/t/"))
	require.Equal(t, "https://h/.well-known/openid-configuration", discovery.DiscoveryURL("https://h"))
}
