package imds_test

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ferry-id/ferry/agent/imds"
	"github.com/stretchr/testify/require"
)

const arcQuery = "api-version=2020-06-01&resource=https%3A%2F%2Fmanagement.azure.com"

var realmRE = regexp.MustCompile(`^Basic realm=(/.+/[0-9a-f]{32}\.key)$`)

// startArc starts an Arc-mode server whose token directory every uid can
// reach; it returns the base URL and the token directory.
func startArc(t *testing.T, toks imds.Tokens, mod func(c *imds.Config)) (string, string) {
	t.Helper()
	dir := filepath.Join(sharedTempDir(t), "tokens")
	c := imds.Config{Mode: imds.ModeArc, Tokens: toks, TokenDir: dir}
	if mod != nil {
		mod(&c)
	}
	_, base := startServer(t, c)
	return base, dir
}

// challenge makes the first request and returns the realm's file path.
func challenge(t *testing.T, base, dir string) string {
	t.Helper()
	r := get(t, tokenURL(base, arcQuery), "Metadata", "true")
	require.Equal(t, 401, r.Status, r.Body)
	require.Len(t, r.Header.Values("WWW-Authenticate"), 1)
	m := realmRE.FindStringSubmatch(r.Header.Get("WWW-Authenticate"))
	require.NotNil(t, m, "WWW-Authenticate %q", r.Header.Get("WWW-Authenticate"))
	require.Equal(t, dir, filepath.Dir(m[1]))
	return m[1]
}

func fileOwner(t *testing.T, p string) (uid uint32, mode os.FileMode) {
	t.Helper()
	fi, err := os.Lstat(p)
	require.NoError(t, err)
	return fi.Sys().(*syscall.Stat_t).Uid, fi.Mode()
}

func TestArcChallengeHappyPath(t *testing.T) {
	toks := newFakeTokens()
	base, dir := startArc(t, toks, nil)

	fi, err := os.Stat(dir)
	require.NoError(t, err)
	require.Equal(t, os.ModeDir|0o711, fi.Mode())

	path := challenge(t, base, dir)
	uid, mode := fileOwner(t, path)
	require.Equal(t, uint32(os.Geteuid()), uid)
	require.Equal(t, os.FileMode(0o600), mode)
	secret, err := os.ReadFile(path)
	require.NoError(t, err)
	require.Len(t, secret, 64)
	require.NotContains(t, string(secret), "\n")
	require.Empty(t, toks.Calls(), "the challenge does not reach Tokens")

	r := get(t, tokenURL(base, arcQuery), "Metadata", "true", "Authorization", "Basic "+string(secret))
	require.Equal(t, 200, r.Status, r.Body)
	m := decodeStrings(t, r.Body)
	require.Equal(t, "eyJ0eXAi.fake.token", m["access_token"])
	require.Equal(t, "https://management.azure.com", m["resource"])
	require.NoFileExists(t, path, "a used secret file is removed")
	require.Len(t, toks.Calls(), 1)
	require.Equal(t, "2020-06-01", toks.Calls()[0].Request.APIVersion)

	// Replay of a used secret.
	r = get(t, tokenURL(base, arcQuery), "Metadata", "true", "Authorization", "Basic "+string(secret))
	require.Equal(t, 401, r.Status)
	require.Equal(t, `{"error":"invalid_request","error_description":"Invalid or expired secret"}`, r.Body)
	require.Empty(t, r.Header.Get("WWW-Authenticate"))
	require.Len(t, toks.Calls(), 1)

	// Each challenge is a new file and a new secret.
	p1, p2 := challenge(t, base, dir), challenge(t, base, dir)
	require.NotEqual(t, p1, p2)
	s1, _ := os.ReadFile(p1)
	s2, _ := os.ReadFile(p2)
	require.NotEqual(t, s1, s2)

	// Validation still comes first: a bad request creates no file.
	before, _ := os.ReadDir(dir)
	r = get(t, tokenURL(base, "api-version=2020-06-01"), "Metadata", "true")
	require.Equal(t, 400, r.Status)
	after, _ := os.ReadDir(dir)
	require.Equal(t, len(before), len(after))
}

func TestArcUserAssignedEcho(t *testing.T) {
	toks := newFakeTokens()
	base, dir := startArc(t, toks, nil)
	for _, sel := range []string{"client_id=11111111-2222-3333-4444-555555555555", "object_id=o-1", "msi_res_id=%2Fsubscriptions%2Fs%2Fu"} {
		q := arcQuery + "&" + sel
		r := get(t, tokenURL(base, q), "Metadata", "true")
		require.Equal(t, 401, r.Status)
		path := realmRE.FindStringSubmatch(r.Header.Get("WWW-Authenticate"))[1]
		secret, err := os.ReadFile(path)
		require.NoError(t, err)
		r = get(t, tokenURL(base, q), "Metadata", "true", "Authorization", "Basic "+string(secret))
		require.Equal(t, 200, r.Status, r.Body)
		k, v, _ := strings.Cut(sel, "=")
		v = strings.ReplaceAll(v, "%2F", "/")
		require.Equal(t, v, decodeStrings(t, r.Body)[k])
	}
	_ = dir
}

func TestArcBadAuthorization(t *testing.T) {
	toks := newFakeTokens()
	base, dir := startArc(t, toks, nil)
	path := challenge(t, base, dir)
	secret, err := os.ReadFile(path)
	require.NoError(t, err)
	for _, auth := range []string{
		"Basic " + strings.ToUpper(string(secret)),
		"Basic " + string(secret[:63]),
		"Basic ",
		"Bearer " + string(secret),
		string(secret),
		"Basic " + strings.Repeat("a", 5000),
	} {
		r := get(t, tokenURL(base, arcQuery), "Metadata", "true", "Authorization", auth)
		require.Equal(t, 401, r.Status, auth)
		require.Equal(t, `{"error":"invalid_request","error_description":"Invalid or expired secret"}`, r.Body)
	}
	// Wrong guesses do not burn the real secret.
	require.FileExists(t, path)
	r := get(t, tokenURL(base, arcQuery), "Metadata", "true", "Authorization", "basic "+string(secret))
	require.Equal(t, 200, r.Status, r.Body)
	require.Len(t, toks.Calls(), 1)
}

func TestArcExpiry(t *testing.T) {
	toks := newFakeTokens()
	base, dir := startArc(t, toks, func(c *imds.Config) { c.ChallengeTTL = 200 * time.Millisecond })
	path := challenge(t, base, dir)
	secret, err := os.ReadFile(path)
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		_, err := os.Stat(path)
		return os.IsNotExist(err)
	}, 5*time.Second, 10*time.Millisecond, "expired secret file is removed")
	r := get(t, tokenURL(base, arcQuery), "Metadata", "true", "Authorization", "Basic "+string(secret))
	require.Equal(t, 401, r.Status)
	require.Empty(t, toks.Calls())
}

func TestArcOtherUID(t *testing.T) {
	requireRoot(t)
	bin := childBinary(t)
	toks := newFakeTokens()
	base, dir := startArc(t, toks, nil)
	url := tokenURL(base, arcQuery)

	// A challenge issued to root: nobody cannot list the directory, cannot
	// read the file, and cannot use the secret even when it learns it.
	path := challenge(t, base, dir)
	secret, err := os.ReadFile(path)
	require.NoError(t, err)
	r := runChild(t, bin, asNobody(), "CHILD_LIST="+dir, "CHILD_READ="+path,
		"CHILD_URL="+url, "CHILD_AUTH=Basic "+string(secret))
	require.Contains(t, r.ListErr, "permission denied")
	require.Contains(t, r.ReadErr, "permission denied")
	require.Empty(t, r.Content)
	require.Equal(t, 401, r.Status)
	require.Equal(t, `{"error":"invalid_request","error_description":"Invalid or expired secret"}`, r.Body)
	require.Empty(t, toks.Calls())
	// The leaked secret is burnt: root cannot use it either now.
	require.NoFileExists(t, path)
	resp := get(t, url, "Metadata", "true", "Authorization", "Basic "+string(secret))
	require.Equal(t, 401, resp.Status)

	// nobody's own challenge: the file is nobody's, readable by it alone.
	r = runChild(t, bin, asNobody(), "CHILD_URL="+url)
	require.Equal(t, 401, r.Status)
	own := r.Realm
	require.Equal(t, dir, filepath.Dir(own))
	uid, mode := fileOwner(t, own)
	require.Equal(t, uint32(nobody), uid)
	require.Equal(t, os.FileMode(0o600), mode)

	// root holding nobody's secret cannot use it for itself.
	theirs, err := os.ReadFile(own)
	require.NoError(t, err)
	resp = get(t, url, "Metadata", "true", "Authorization", "Basic "+string(theirs))
	require.Equal(t, 401, resp.Status)
	require.Empty(t, toks.Calls())

	// The full flow as nobody: challenge, read, answer.
	r = runChild(t, bin, asNobody(), "CHILD_URL="+url)
	r = runChild(t, bin, asNobody(), "CHILD_READ="+r.Realm)
	require.Empty(t, r.ReadErr)
	r = runChild(t, bin, asNobody(), "CHILD_URL="+url, "CHILD_AUTH=Basic "+r.Content)
	require.Equal(t, 200, r.Status, r.Body)
	calls := toks.Calls()
	require.Len(t, calls, 1)
	require.Equal(t, uint32(nobody), calls[0].Caller.UID)
}

func TestArcSecretBoundToProcess(t *testing.T) {
	requireRoot(t)
	bin := childBinary(t)
	toks := newFakeTokens()
	base, dir := startArc(t, toks, func(c *imds.Config) { c.ResolvePID = true })
	url := tokenURL(base, arcQuery)

	// Issued to this process; presented by another process of the same uid.
	path := challenge(t, base, dir)
	secret, err := os.ReadFile(path)
	require.NoError(t, err)
	r := runChild(t, bin, nil, "CHILD_URL="+url, "CHILD_AUTH=Basic "+string(secret))
	require.Equal(t, 401, r.Status)
	require.Empty(t, toks.Calls())

	// The same process may use its own secret.
	path = challenge(t, base, dir)
	secret, err = os.ReadFile(path)
	require.NoError(t, err)
	resp := get(t, url, "Metadata", "true", "Authorization", "Basic "+string(secret))
	require.Equal(t, 200, resp.Status, resp.Body)
	require.Equal(t, int32(os.Getpid()), toks.Calls()[0].Caller.PID)
}

func TestArcChallengeLimit(t *testing.T) {
	toks := newFakeTokens()
	base, dir := startArc(t, toks, func(c *imds.Config) { c.MaxChallengesPerUID = 2; c.RetryAfter = 2 * time.Second })
	challenge(t, base, dir)
	p2 := challenge(t, base, dir)
	r := get(t, tokenURL(base, arcQuery), "Metadata", "true")
	require.Equal(t, 429, r.Status)
	require.Equal(t, "2", r.Header.Get("Retry-After"))
	require.Equal(t, bodyTooMany, r.Body)

	// Redeeming one frees a slot.
	secret, _ := os.ReadFile(p2)
	require.Equal(t, 200, get(t, tokenURL(base, arcQuery), "Metadata", "true", "Authorization", "Basic "+string(secret)).Status)
	challenge(t, base, dir)
}

func TestArcShutdownRemovesFiles(t *testing.T) {
	dir := filepath.Join(sharedTempDir(t), "tokens")
	s, err := imds.New(imds.Config{Mode: imds.ModeArc, Tokens: newFakeTokens(), TokenDir: dir, Address: "127.0.0.1:0", Logger: testLogger(t)})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	base := "http://" + s.Addr().String()
	challenge(t, base, dir)
	challenge(t, base, dir)
	entries, _ := os.ReadDir(dir)
	require.Len(t, entries, 2)
	cancel()
	require.NoError(t, <-done)
	entries, _ = os.ReadDir(dir)
	require.Empty(t, entries)
}

func TestArcTokenDirChecks(t *testing.T) {
	root := sharedTempDir(t)

	// An existing directory is tightened and cleared of stale secrets.
	dir := filepath.Join(root, "loose")
	require.NoError(t, os.Mkdir(dir, 0o777))
	require.NoError(t, os.Chmod(dir, 0o777))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "old.key"), []byte("x"), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "keep.txt"), []byte("x"), 0o644))
	s, err := imds.New(imds.Config{Mode: imds.ModeArc, Tokens: newFakeTokens(), TokenDir: dir, Address: "127.0.0.1:0", Logger: testLogger(t)})
	require.NoError(t, err)
	closeUnrun(t, s)
	fi, err := os.Stat(dir)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o711), fi.Mode().Perm())
	require.NoFileExists(t, filepath.Join(dir, "old.key"))
	require.FileExists(t, filepath.Join(dir, "keep.txt"))

	// A symlink or a file is refused.
	link := filepath.Join(root, "link")
	require.NoError(t, os.Symlink(dir, link))
	_, err = imds.New(imds.Config{Mode: imds.ModeArc, Tokens: newFakeTokens(), TokenDir: link, Address: "127.0.0.1:0"})
	require.ErrorContains(t, err, "not a directory")
	file := filepath.Join(root, "file")
	require.NoError(t, os.WriteFile(file, nil, 0o600))
	_, err = imds.New(imds.Config{Mode: imds.ModeArc, Tokens: newFakeTokens(), TokenDir: file, Address: "127.0.0.1:0"})
	require.Error(t, err)

	// A directory owned by someone else is refused.
	if os.Geteuid() == 0 {
		other := filepath.Join(root, "other")
		require.NoError(t, os.Mkdir(other, 0o711))
		require.NoError(t, os.Chown(other, nobody, nobody))
		_, err = imds.New(imds.Config{Mode: imds.ModeArc, Tokens: newFakeTokens(), TokenDir: other, Address: "127.0.0.1:0"})
		require.ErrorContains(t, err, "owned by uid 65534")
	}
}

// closeUnrun releases a server that was created but not run.
func closeUnrun(t *testing.T, s *imds.Server) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	require.NoError(t, s.Run(ctx))
}

// The token path is served with a trailing slash too, as IMDS and himds serve
// it (msal-node adds one whenever AZURE_POD_IDENTITY_AUTHORITY_HOST is set):
// in Arc mode the whole challenge exchange, in VM mode the token itself.
func TestTrailingSlash(t *testing.T) {
	toks := newFakeTokens()
	base, dir := startArc(t, toks, nil)
	u := base + imds.TokenPath + "/?" + arcQuery
	r := get(t, u, "Metadata", "true")
	require.Equal(t, 401, r.Status, r.Body)
	m := realmRE.FindStringSubmatch(r.Header.Get("WWW-Authenticate"))
	require.NotNil(t, m)
	require.Equal(t, dir, filepath.Dir(m[1]))
	secret, err := os.ReadFile(m[1])
	require.NoError(t, err)
	r = get(t, u, "Metadata", "true", "Authorization", "Basic "+string(secret))
	require.Equal(t, 200, r.Status, r.Body)

	_, vm := startServer(t, imds.Config{Mode: imds.ModeVM, Tokens: toks})
	r = get(t, vm+imds.TokenPath+"/?"+mgmt, "Metadata", "true")
	require.Equal(t, 200, r.Status, r.Body)
	// One slash only, and nothing below it.
	for _, p := range []string{imds.TokenPath + "//", imds.TokenPath + "/x", imds.TokenPath + "x"} {
		r = get(t, vm+p+"?"+mgmt, "Metadata", "true")
		require.Equal(t, 400, r.Status, p)
		require.Equal(t, `{"error":"invalid_request","error_description":"The requested path is not served"}`, r.Body, p)
	}
}
