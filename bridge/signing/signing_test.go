package signing_test

import (
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/bridge/signing"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

var now = time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)

func jwkKey(t *testing.T, j signing.JWK) *rsa.PublicKey {
	t.Helper()
	n, err := base64.RawURLEncoding.DecodeString(j.N)
	require.NoError(t, err)
	e, err := base64.RawURLEncoding.DecodeString(j.E)
	require.NoError(t, err)
	return &rsa.PublicKey{N: new(big.Int).SetBytes(n), E: int(new(big.Int).SetBytes(e).Int64())}
}

func TestSignVerifiesAgainstJWKS(t *testing.T) {
	k, err := signing.Generate("replica-1", now, time.Hour)
	require.NoError(t, err)
	pub := k.Public()
	require.Equal(t, k.KID(), pub.Kid)
	require.Equal(t, "replica-1", pub.Owner)
	require.Equal(t, now.Add(time.Hour).Unix(), pub.NotAfter)
	cert, err := x509.ParseCertificate(pub.Certificate)
	require.NoError(t, err)
	require.Equal(t, signing.Thumbprint(cert.Raw), pub.Kid)

	set := signing.BuildJWKS([]*ferrypb.SigningKey{pub}, now)
	require.Len(t, set.Keys, 1)
	j := set.Keys[0]
	require.Equal(t, "RSA", j.Kty)
	require.Equal(t, "sig", j.Use)
	require.Equal(t, k.KID(), j.Kid)
	require.Equal(t, k.KID(), j.X5t)
	require.Equal(t, "AQAB", j.E)
	require.Equal(t, []string{base64.StdEncoding.EncodeToString(pub.Certificate)}, j.X5c)

	for _, withX5t := range []bool{false, true} {
		tok, err := k.Sign(map[string]any{"aud": "api://x", "exp": now.Add(time.Hour).Unix()}, withX5t)
		require.NoError(t, err)
		parsed, err := jwt.Parse(tok, func(tk *jwt.Token) (any, error) {
			require.Equal(t, j.Kid, tk.Header["kid"])
			return jwkKey(t, j), nil
		}, jwt.WithValidMethods([]string{"RS256"}), jwt.WithTimeFunc(func() time.Time { return now }))
		require.NoError(t, err)
		require.Equal(t, "JWT", parsed.Header["typ"])
		if withX5t {
			require.Equal(t, k.KID(), parsed.Header["x5t"])
		} else {
			require.NotContains(t, parsed.Header, "x5t")
		}
	}
}

func TestBuildJWKSFilters(t *testing.T) {
	a, err := signing.Generate("a", now, time.Hour)
	require.NoError(t, err)
	b, err := signing.Generate("b", now.Add(-2*time.Hour), time.Hour) // expired at now
	require.NoError(t, err)
	bad := &ferrypb.SigningKey{Kid: "bad", PublicKey: []byte("junk")}
	set := signing.BuildJWKS([]*ferrypb.SigningKey{a.Public(), a.Public(), b.Public(), bad, nil}, now)
	require.Len(t, set.Keys, 1)
	require.Equal(t, a.KID(), set.Keys[0].Kid)

	out, err := json.Marshal(signing.BuildJWKS(nil, now))
	require.NoError(t, err)
	require.JSONEq(t, `{"keys":[]}`, string(out))
}

func TestLoadOrCreate(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "bridge-key.pem")
	k1, err := signing.LoadOrCreate(path, "r1", now)
	require.NoError(t, err)
	fi, err := os.Stat(path)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), fi.Mode().Perm())

	k2, err := signing.LoadOrCreate(path, "r1", now)
	require.NoError(t, err)
	require.Equal(t, k1.KID(), k2.KID())
	require.Equal(t, k1.Public().PublicKey, k2.Public().PublicKey)

	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	require.Len(t, entries, 1, "no temporary files left behind")

	require.NoError(t, os.Chmod(path, 0o640))
	_, err = signing.LoadOrCreate(path, "r1", now)
	require.ErrorContains(t, err, "want 0600")

	garbage := filepath.Join(dir, "garbage.pem")
	require.NoError(t, os.WriteFile(garbage, []byte("not pem"), 0o600))
	_, err = signing.LoadOrCreate(garbage, "r1", now)
	require.Error(t, err)
	require.True(t, strings.HasPrefix(err.Error(), "signing: "))

	_, err = signing.LoadOrCreate(filepath.Join(dir, "missing-dir", "k.pem"), "r1", now)
	require.Error(t, err)
}
