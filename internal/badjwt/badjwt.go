// Package badjwt builds a corpus of known-bad JWTs for tests of every place
// that takes a token from the network: the bridge's client assertions and the
// agent's ValidateJWTSVID. Each token is a forgery or a malformation that a
// verifier must refuse, most of them from the form alone, before it looks up
// a key or checks a signature.
package badjwt

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"strings"
)

// Stage is the latest point at which a verifier must refuse a token.
type Stage int

const (
	// Form: the token's form alone disqualifies it. It is refused before
	// any key is looked up, fetched or used.
	Form Stage = iota + 1
	// Key: the token names no trusted key. It is refused at the key lookup
	// (which for a remote issuer may refresh that issuer's keys, rate
	// limited), never at a signature check.
	Key
	// Signature: a well-formed token signed by the wrong key. Only the
	// signature check can refuse it.
	Signature
)

// Case is one hostile token.
type Case struct {
	Name  string
	Token string
	Stage Stage
}

var b64 = base64.RawURLEncoding.EncodeToString

// Sign returns the compact ES256 JWS of header and claims (raw JSON) signed
// by key (P-256).
func Sign(header, claims string, key *ecdsa.PrivateKey) string {
	input := b64([]byte(header)) + "." + b64([]byte(claims))
	sum := sha256.Sum256([]byte(input))
	r, s, err := ecdsa.Sign(rand.Reader, key, sum[:])
	if err != nil {
		panic(err)
	}
	sig := make([]byte, 64)
	r.FillBytes(sig[:32])
	s.FillBytes(sig[32:])
	return input + "." + b64(sig)
}

func mustJSON(v any) string {
	out, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return string(out)
}

// Corpus returns hostile variants of a token with the given claims (which a
// verifier would accept if they were signed by the trusted key kid). attacker
// signs the forgeries; trusted is the public key behind kid, which the
// algorithm-confusion case uses as an HMAC secret.
func Corpus(claims map[string]any, kid string, attacker *ecdsa.PrivateKey, trusted crypto.PublicKey) []Case {
	hdr := func(extra string) string {
		return fmt.Sprintf(`{"alg":"ES256","kid":%q,"typ":"JWT"%s}`, kid, extra)
	}
	body := mustJSON(claims)
	// withClaims splices raw members into the claims object.
	withClaims := func(raw string) string { return strings.TrimSuffix(body, "}") + "," + raw + "}" }
	without := func(name string) string {
		c := map[string]any{}
		for k, v := range claims {
			if k != name {
				c[k] = v
			}
		}
		return mustJSON(c)
	}
	forged := func(h, c string) string { return Sign(h, c, attacker) }
	unsigned := func(h, c string) string { return b64([]byte(h)) + "." + b64([]byte(c)) + "." }

	spki, err := x509.MarshalPKIXPublicKey(trusted)
	if err != nil {
		panic(err)
	}
	hsInput := b64([]byte(fmt.Sprintf(`{"alg":"HS256","kid":%q,"typ":"JWT"}`, kid))) + "." + b64([]byte(body))
	mac := hmac.New(sha256.New, spki)
	mac.Write([]byte(hsInput))
	hs256 := hsInput + "." + b64(mac.Sum(nil))

	attackerJWK := mustJSON(map[string]any{"kty": "EC", "crv": "P-256",
		"x": b64(attacker.X.FillBytes(make([]byte, 32))), "y": b64(attacker.Y.FillBytes(make([]byte, 32)))})
	big := strings.Repeat("A", 10<<20)

	cases := []Case{
		{"alg none", unsigned(fmt.Sprintf(`{"alg":"none","kid":%q,"typ":"JWT"}`, kid), body), Form},
		{"alg None", unsigned(fmt.Sprintf(`{"alg":"None","kid":%q}`, kid), body), Form},
		{"HS256 keyed with the public key", hs256, Form},
		{"alg missing", forged(fmt.Sprintf(`{"kid":%q}`, kid), body), Form},
		{"kid path traversal", forged(`{"alg":"ES256","kid":"../../../../../../dev/null"}`, body), Key},
		{"kid SQL", forged(`{"alg":"ES256","kid":"x' OR '1'='1"}`, body), Key},
		{"kid NUL suffix", forged(`{"alg":"ES256","kid":`+mustJSON(kid+"\x00")+`}`, body), Key},
		{"kid 4 KiB", forged(fmt.Sprintf(`{"alg":"ES256","kid":%q}`, strings.Repeat("k", 4096)), body), Key},
		{"kid number", forged(`{"alg":"ES256","kid":1}`, body), Form},
		{"jku", forged(hdr(`,"jku":"https://attacker.invalid/jwks"`), body), Form},
		{"x5u", forged(hdr(`,"x5u":"https://attacker.invalid/cert.pem"`), body), Form},
		{"x5c", forged(hdr(`,"x5c":["MIIBszCCAVmgAwIBAgIBATAKBggqhkjOPQQDAjAA"]`), body), Form},
		{"jwk embedded", forged(hdr(`,"jwk":`+attackerJWK), body), Form},
		{"crit", forged(hdr(`,"crit":["exp"],"exp":1`), body), Form},
		{"header kid twice", forged(fmt.Sprintf(`{"alg":"ES256","kid":"attacker","kid":%q}`, kid), body), Form},
		{"header alg twice", forged(fmt.Sprintf(`{"alg":"none","alg":"ES256","kid":%q}`, kid), body), Form},
		{"a million dots", strings.Repeat(".", 1_000_000), Form},
		{"10 MiB header", b64([]byte(hdr(`,"x":"`+big+`"`))) + "." + b64([]byte(body)) + ".c2ln", Form},
		{"nested JWE", b64([]byte(`{"alg":"RSA-OAEP-256","enc":"A256GCM","cty":"JWT"}`)) + ".ZW5jcnlwdGVka2V5.aXZpdml2aXZpdg.Y2lwaGVydGV4dA.dGFndGFndGFndGFn", Form},
		{"nested JWS", forged(hdr(`,"cty":"JWT"`), Sign(hdr(""), body, attacker)), Form},
		{"duplicate sub", forged(hdr(""), withClaims(fmt.Sprintf(`"sub":%q`, claims["sub"]))), Form},
		{"duplicate exp", forged(hdr(""), withClaims(`"exp":9999999999`)), Form},
		{"duplicate escaped name", forged(hdr(""), withClaims(`"s\u0075b":"spiffe://evil.invalid/x"`)), Form},
		{"exp as string", forged(hdr(""), strings.Replace(without("exp"), "{", fmt.Sprintf(`{"exp":"%v",`, claims["exp"]), 1)), Form},
		{"exp missing", forged(hdr(""), without("exp")), Form},
		{"sub missing", forged(hdr(""), without("sub")), Form},
		{"claims array", forged(hdr(""), `[`+body+`]`), Form},
		{"claims not JSON", forged(hdr(""), `hello`), Form},
		{"typ at+jwt", forged(fmt.Sprintf(`{"alg":"ES256","kid":%q,"typ":"at+jwt"}`, kid), body), Form},
		{"padded base64", strings.Replace(forged(hdr(""), body), ".", "=.", 1), Form},
		{"two parts", strings.Join(strings.Split(forged(hdr(""), body), ".")[:2], "."), Form},
		{"four parts", forged(hdr(""), body) + ".x", Form},
		{"forged signature", forged(hdr(""), body), Signature},
	}
	return cases
}
