package imds_test

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/internal/roottest"
)

// arcDocScript is the bash example from Azure's Arc documentation
// ("Acquiring an access token using REST API", Linux), verbatim.
const arcDocScript = `ChallengeTokenPath=$(curl -s -D - -H Metadata:true "http://127.0.0.1:40342/metadata/identity/oauth2/token?api-version=2019-11-01&resource=https%3A%2F%2Fmanagement.azure.com" | grep Www-Authenticate | cut -d "=" -f 2 | tr -d "[:cntrl:]")
ChallengeToken=$(cat $ChallengeTokenPath)
if [ $? -ne 0 ]; then
    echo "Could not retrieve challenge token, double check that this command is run with root privileges."
else
    curl -s -H Metadata:true -H "Authorization: Basic $ChallengeToken" "http://127.0.0.1:40342/metadata/identity/oauth2/token?api-version=2019-11-01&resource=https%3A%2F%2Fmanagement.azure.com"
fi
`

func TestArcDocumentationCurl(t *testing.T) {
	for _, tool := range []string{"bash", "curl", "grep", "cut", "tr", "cat"} {
		if _, err := exec.LookPath(tool); err != nil {
			roottest.Skipf(t, "%s is not installed", tool)
		}
	}
	toks := newFakeTokens()
	base, dir := startArc(t, toks, nil)
	_, port, err := net.SplitHostPort(strings.TrimPrefix(base, "http://"))
	require.NoError(t, err)
	// As written, except for the port.
	script := strings.ReplaceAll(arcDocScript, "127.0.0.1:40342", "127.0.0.1:"+port)

	users := []struct {
		name string
		cred *syscall.Credential
		uid  uint32
	}{{"as root", nil, 0}, {"as nobody", asNobody(), nobody}}
	if os.Geteuid() != 0 {
		users = []struct {
			name string
			cred *syscall.Credential
			uid  uint32
		}{{"as this user", nil, uint32(os.Geteuid())}}
	}
	for i, u := range users {
		t.Run(u.name, func(t *testing.T) {
			cmd := exec.Command("bash", "-c", script)
			cmd.Dir = filepath.Dir(dir)
			cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "NO_PROXY=*"}
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: u.cred}
			out, err := cmd.CombinedOutput()
			require.NoError(t, err, string(out))
			m := decodeStrings(t, string(out))
			require.Equal(t, "eyJ0eXAi.fake.token", m["access_token"])
			require.Equal(t, "https://management.azure.com", m["resource"])
			require.Equal(t, "Bearer", m["token_type"])

			calls := toks.Calls()
			require.Len(t, calls, i+1)
			require.Equal(t, u.uid, calls[i].Caller.UID)
			require.Equal(t, "2019-11-01", calls[i].Request.APIVersion)
			entries, err := os.ReadDir(dir)
			require.NoError(t, err)
			require.Empty(t, entries, "the used secret file is gone")
		})
	}

	// Another user running the same commands against a root-issued path
	// cannot read the file: the script's own error branch fires.
	if os.Geteuid() == 0 {
		path := challenge(t, base, dir)
		cmd := exec.Command("bash", "-c", `cat `+path+` >/dev/null 2>&1 || echo denied`)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: asNobody()}
		out, err := cmd.Output()
		require.NoError(t, err)
		require.Equal(t, "denied\n", string(out))
	}
}
