package api

import (
	"context"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ferry-id/ferry/proto/ferrypb"
	"github.com/ferry-id/ferry/server/ca"
)

// BundlePublisher puts a node's CA public keys into the replicated trust bundle
// through the Raft log. It implements ca.Publisher: each call returns once the
// change is committed.
type BundlePublisher struct {
	Cluster     Cluster
	TrustDomain spiffeid.TrustDomain
}

var _ ca.Publisher = BundlePublisher{}

func (p BundlePublisher) apply(ctx context.Context, cmd *ferrypb.Command) error {
	res, err := p.Cluster.Apply(ctx, cmd)
	if err != nil {
		return err
	}
	return resultError(res)
}

func (p BundlePublisher) PublishX509Authority(ctx context.Context, a *ferrypb.X509Authority) error {
	return p.apply(ctx, &ferrypb.Command{Op: &ferrypb.Command_BundleX509AuthorityPut{BundleX509AuthorityPut: &ferrypb.BundleX509AuthorityPut{TrustDomain: p.TrustDomain.String(), Authority: a}}})
}

func (p BundlePublisher) PublishJWTAuthority(ctx context.Context, a *ferrypb.JWTAuthority) error {
	return p.apply(ctx, &ferrypb.Command{Op: &ferrypb.Command_BundleJwtAuthorityPut{BundleJwtAuthorityPut: &ferrypb.BundleJWTAuthorityPut{TrustDomain: p.TrustDomain.String(), Authority: a}}})
}

func (p BundlePublisher) RemoveX509Authority(ctx context.Context, der []byte) error {
	return p.apply(ctx, &ferrypb.Command{Op: &ferrypb.Command_BundleX509AuthorityRemove{BundleX509AuthorityRemove: &ferrypb.BundleX509AuthorityRemove{TrustDomain: p.TrustDomain.String(), Certificate: der}}})
}

func (p BundlePublisher) RemoveJWTAuthority(ctx context.Context, kid string) error {
	return p.apply(ctx, &ferrypb.Command{Op: &ferrypb.Command_BundleJwtAuthorityRemove{BundleJwtAuthorityRemove: &ferrypb.BundleJWTAuthorityRemove{TrustDomain: p.TrustDomain.String(), KeyId: kid}}})
}
