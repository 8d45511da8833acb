package e2e

import (
	"context"
	"crypto/sha256"
	"fmt"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/ferry-id/ferry/proto/ferrypb"
)

// directoryState lists, one line per object, everything a restart must keep
// as it was: tenants, identities with their client IDs, federated
// credentials, resources with their app IDs and roles, role assignments,
// registration entries, attested agents, and the trust bundle's authorities.
// Revisions and other bookkeeping are left out. The admin socket answers
// once the server has caught up with its log, so what it lists is the state.
func directoryState(t *testing.T, adminSocket string) []string {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+adminSocket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	dir, admin := ferrypb.NewDirectoryClient(conn), ferrypb.NewAdminClient(conn)
	var out []string
	add := func(format string, args ...any) { out = append(out, fmt.Sprintf(format, args...)) }

	ts, err := dir.ListTenants(ctx, &ferrypb.ListTenantsRequest{})
	require.NoError(t, err)
	for _, tn := range ts.Tenants {
		add("tenant %s %s", tn.Id, tn.Name)
	}
	ids, err := dir.ListIdentities(ctx, &ferrypb.ListIdentitiesRequest{})
	require.NoError(t, err)
	for _, i := range ids.Identities {
		add("identity %s name=%s client_id=%s tenant=%s kind=%s", i.ObjectId, i.Name, i.ClientId, i.TenantId, i.Kind)
		fics, err := dir.ListFederatedCredentials(ctx, &ferrypb.ListFederatedCredentialsRequest{Identity: &ferrypb.IdentityRef{ObjectId: i.ObjectId}})
		require.NoError(t, err)
		for _, f := range fics.Credentials {
			add("credential %s/%s issuer=%s subject=%s audiences=%v", i.ObjectId, f.Name, f.Issuer, f.Subject, f.Audiences)
		}
	}
	res, err := dir.ListResources(ctx, &ferrypb.ListResourcesRequest{})
	require.NoError(t, err)
	for _, r := range res.Resources {
		var roles []string
		for _, ar := range r.AppRoles {
			roles = append(roles, ar.Id+"="+ar.Value)
		}
		add("resource %s app_id=%s uris=%v roles=%v", r.ObjectId, r.AppId, r.IdentifierUris, roles)
	}
	ras, err := dir.ListRoleAssignments(ctx, &ferrypb.ListRoleAssignmentsRequest{})
	require.NoError(t, err)
	for _, ra := range ras.Assignments {
		add("assignment %s %s -> %s role=%s", ra.Id, ra.PrincipalObjectId, ra.ResourceObjectId, ra.AppRoleId)
	}
	es, err := admin.ListEntries(ctx, &ferrypb.ListEntriesRequest{PageSize: 1000})
	require.NoError(t, err)
	for _, e := range es.Entries {
		var sel []string
		for _, s := range e.Selectors {
			sel = append(sel, s.Type+":"+s.Value)
		}
		add("entry %s %s parent=%s selectors=%v", e.Id, e.SpiffeId, e.ParentId, sel)
	}
	ags, err := admin.ListAgents(ctx, &ferrypb.ListAgentsRequest{})
	require.NoError(t, err)
	for _, a := range ags.Agents {
		add("agent %s banned=%t", a.SpiffeId, a.Banned)
	}
	bs, err := admin.ListBundles(ctx, &ferrypb.ListBundlesRequest{})
	require.NoError(t, err)
	for _, b := range bs.Bundles {
		for _, a := range b.X509Authorities {
			add("x509 authority %s %x", b.TrustDomain, sha256.Sum256(a.Certificate))
		}
		for _, a := range b.JwtAuthorities {
			add("jwt authority %s %s", b.TrustDomain, a.KeyId)
		}
	}
	sort.Strings(out)
	return out
}

// requireSameState fails with the lines that differ.
func requireSameState(t *testing.T, want, got []string, msg string) {
	t.Helper()
	if strings.Join(want, "\n") == strings.Join(got, "\n") {
		return
	}
	wantSet := map[string]bool{}
	for _, l := range want {
		wantSet[l] = true
	}
	gotSet := map[string]bool{}
	for _, l := range got {
		gotSet[l] = true
	}
	var diff []string
	for _, l := range want {
		if !gotSet[l] {
			diff = append(diff, "- "+l)
		}
	}
	for _, l := range got {
		if !wantSet[l] {
			diff = append(diff, "+ "+l)
		}
	}
	t.Fatalf("%s: the state changed:\n%s", msg, strings.Join(diff, "\n"))
}
