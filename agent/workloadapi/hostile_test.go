package workloadapi_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"sync/atomic"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	workloadpb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	ferrywl "github.com/ferry-id/ferry/agent/workloadapi"
	"github.com/ferry-id/ferry/internal/badjwt"
)

// countingKey is a JWT authority that counts the signature checks made with
// it (go-jose hands an OpaqueVerifier the signing input and signature) and
// verifies ES256 with the P-256 key behind it.
type countingKey struct {
	pub    *ecdsa.PublicKey
	checks atomic.Int64
}

func (k *countingKey) VerifyPayload(payload, sig []byte, alg jose.SignatureAlgorithm) error {
	k.checks.Add(1)
	if alg != jose.ES256 || len(sig) != 64 {
		return errors.New("not ES256")
	}
	sum := sha256.Sum256(payload)
	if !ecdsa.Verify(k.pub, sum[:], new(big.Int).SetBytes(sig[:32]), new(big.Int).SetBytes(sig[32:])) {
		return errors.New("bad signature")
	}
	return nil
}

var _ jose.OpaqueVerifier = (*countingKey)(nil)

// TestValidateJWTSVIDHostileTokens sends the known-bad corpus to
// ValidateJWTSVID. Every token is refused with InvalidArgument (or, past
// the request limit, ResourceExhausted), and only the well-formed forgery
// reaches a signature check: the rest are refused before any.
func TestValidateJWTSVIDHostileTokens(t *testing.T) {
	f := startServer(t)
	ctx := withHeader(testCtx(t))
	c := rawClient(t, f)

	trusted := mustEC(t, elliptic.P256())
	key := &countingKey{pub: &trusted.PublicKey}
	const kid = "counted"
	f.mgr.addJWTAuthority(kid, key)
	claims := map[string]any{"sub": "spiffe://example.org/web", "aud": []string{"aud1"}, "exp": time.Now().Add(time.Hour).Unix()}

	// The hook works: a genuine token is verified once, and accepted.
	good := badjwt.Sign(fmt.Sprintf(`{"alg":"ES256","kid":%q,"typ":"JWT"}`, kid), mustJSONString(t, claims), trusted)
	resp, err := c.ValidateJWTSVID(ctx, &workloadpb.ValidateJWTSVIDRequest{Svid: good, Audience: "aud1"})
	require.NoError(t, err)
	require.Equal(t, "spiffe://example.org/web", resp.SpiffeId)
	require.EqualValues(t, 1, key.checks.Load())

	for _, tc := range badjwt.Corpus(claims, kid, mustEC(t, elliptic.P256()), &trusted.PublicKey) {
		t.Run(tc.Name, func(t *testing.T) {
			before := key.checks.Load()
			_, err := c.ValidateJWTSVID(ctx, &workloadpb.ValidateJWTSVIDRequest{Svid: tc.Token, Audience: "aud1"})
			code := status.Code(err)
			if len(tc.Token) > ferrywl.DefaultLimits().MaxRequestBytes {
				require.Equal(t, codes.ResourceExhausted, code, "%v", err)
			} else {
				require.Equal(t, codes.InvalidArgument, code, "%v", err)
			}
			checks := key.checks.Load() - before
			if tc.Stage == badjwt.Signature {
				require.EqualValues(t, 1, checks, "the forgery is refused by its signature")
			} else {
				require.Zero(t, checks, "refused before any signature check")
			}
		})
	}
}

func mustJSONString(t *testing.T, v any) string {
	t.Helper()
	out, err := json.Marshal(v)
	require.NoError(t, err)
	return string(out)
}
