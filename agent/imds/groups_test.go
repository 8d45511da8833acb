package imds_test

import (
	"os"
	"syscall"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/ferry-id/ferry/agent/imds"
)

const (
	allowedGID = 4747
	bodyGroups = `{"error":"access_denied","error_description":"The caller is not a member of a group allowed to request tokens"}`
)

// AllowedGroups, with real processes of other uids and groups: root, a
// primary gid and a supplementary group are admitted; anyone else gets 403
// before Tokens is asked, and in Arc mode before a challenge file exists.
func TestAllowedGroups(t *testing.T) {
	requireRoot(t)
	bin := childBinary(t)
	for _, mode := range []imds.Mode{imds.ModeVM, imds.ModeArc} {
		t.Run(mode.String(), func(t *testing.T) {
			toks := newFakeTokens()
			var base, dir string
			if mode == imds.ModeArc {
				base, dir = startArc(t, toks, func(c *imds.Config) { c.AllowedGroups = []uint32{allowedGID} })
			} else {
				_, base = startServer(t, imds.Config{Mode: imds.ModeVM, Tokens: toks, AllowedGroups: []uint32{allowedGID}})
			}
			url := tokenURL(base, arcQuery)
			admitted := 200
			if mode == imds.ModeArc {
				admitted = 401 // the challenge
			}

			r := runChild(t, bin, asNobody(), "CHILD_URL="+url)
			require.Equal(t, 403, r.Status, r.Body)
			require.Equal(t, bodyGroups, r.Body)
			require.Empty(t, toks.Calls())
			if dir != "" {
				files, err := os.ReadDir(dir)
				require.NoError(t, err)
				require.Empty(t, files, "no challenge for a refused caller")
			}
			// Another group that is not allowed, as primary and supplementary.
			r = runChild(t, bin, &syscall.Credential{Uid: nobody, Gid: 4848, Groups: []uint32{4949}}, "CHILD_URL="+url)
			require.Equal(t, 403, r.Status, r.Body)

			for name, cred := range map[string]*syscall.Credential{
				"primary gid":         {Uid: nobody, Gid: allowedGID},
				"supplementary group": {Uid: nobody, Gid: nobody, Groups: []uint32{4848, allowedGID}},
			} {
				r := runChild(t, bin, cred, "CHILD_URL="+url)
				require.Equal(t, admitted, r.Status, "%s: %s", name, r.Body)
			}
			// Root is always admitted.
			resp := get(t, url, "Metadata", "true")
			require.Equal(t, admitted, resp.Status, resp.Body)
			if mode == imds.ModeVM {
				require.Len(t, toks.Calls(), 3)
			}
		})
	}
}
