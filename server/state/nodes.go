package state

import (
	"bytes"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	"github.com/ferry-id/ferry/proto/ferrypb"
)

// Join tokens ----------------------------------------------------------------

func (a *applier) createJoinToken(t *ferrypb.JoinToken) *ferrypb.CommandResult {
	if t == nil || len(t.Hash) != 64 {
		return &ferrypb.CommandResult{Status: status(codes.InvalidArgument, "join token hash must be 64 hex characters")}
	}
	if t.SpiffeId != "" {
		if err := ValidateSPIFFEID(t.SpiffeId); err != nil {
			return &ferrypb.CommandResult{Status: status(codes.InvalidArgument, "join token spiffe_id: %v", err)}
		}
	}
	if raw, _ := a.txn.First(TableJoinTokens, "id", t.Hash); raw != nil {
		return &ferrypb.CommandResult{Status: status(codes.AlreadyExists, "join token exists")}
	}
	row := proto.Clone(t).(*ferrypb.JoinToken)
	row.Revision = a.index
	a.upsert(TableJoinTokens, row.Hash, row)
	return &ferrypb.CommandResult{Status: ok(), JoinToken: row}
}

// consumeJoinToken deletes the token and returns it. The log orders concurrent
// attempts, so exactly one of them finds the token. An expired token is
// deleted too: it can never be used.
func (a *applier) consumeJoinToken(hash string) *ferrypb.CommandResult {
	raw, err := a.txn.First(TableJoinTokens, "id", hash)
	must(err)
	if raw == nil {
		return &ferrypb.CommandResult{Status: status(codes.NotFound, "join token unknown or already used")}
	}
	t := raw.(*ferrypb.JoinToken)
	a.delete(TableJoinTokens, hash, t)
	if t.ExpiresAt != 0 && a.now.Unix() >= t.ExpiresAt {
		return &ferrypb.CommandResult{Status: status(codes.PermissionDenied, "join token expired")}
	}
	return &ferrypb.CommandResult{Status: ok(), JoinToken: t}
}

// Attested nodes ---------------------------------------------------------------

func (a *applier) node(id string) *ferrypb.AttestedNode {
	raw, err := a.txn.First(TableNodes, "id", id)
	must(err)
	if raw == nil {
		return nil
	}
	return raw.(*ferrypb.AttestedNode)
}

func (a *applier) putNode(p *ferrypb.NodePut) *ferrypb.CommandResult {
	n := p.GetNode()
	if n == nil {
		return &ferrypb.CommandResult{Status: status(codes.InvalidArgument, "node is required")}
	}
	if err := ValidateSPIFFEID(n.SpiffeId); err != nil {
		return &ferrypb.CommandResult{Status: status(codes.InvalidArgument, "node spiffe_id: %v", err)}
	}
	old := a.node(n.SpiffeId)
	if old != nil && old.Banned {
		return &ferrypb.CommandResult{Status: status(codes.PermissionDenied, "agent %s is banned", n.SpiffeId)}
	}
	if p.ExpectSerial != "" && (old == nil || old.CertSerial != p.ExpectSerial) {
		return &ferrypb.CommandResult{Status: status(codes.Aborted, "agent %s changed since it presented serial %s", n.SpiffeId, p.ExpectSerial)}
	}
	if p.RefuseActive && old != nil {
		if until := max(old.CertNotAfter, old.NewCertNotAfter); until > a.now.Unix() {
			return &ferrypb.CommandResult{Status: status(codes.PermissionDenied,
				"agent %s is already attested and its SVID is valid until %s; evict it first, or allow re-attestation in the attestor's configuration",
				n.SpiffeId, time.Unix(until, 0).UTC().Format(time.RFC3339))}
		}
	}
	if h := p.ConsumeJoinToken; h != "" {
		// Spent here, with the agent recorded, or not at all: last, after
		// every other reason to refuse.
		if res := a.consumeJoinToken(h); codes.Code(res.Status.GetCode()) != codes.OK {
			return res
		}
	}
	row := proto.Clone(n).(*ferrypb.AttestedNode)
	sortSelectors(row.Selectors)
	row.Revision = a.index
	row.Banned = false
	if old != nil {
		row.CreatedIndex, row.CreatedAt = old.CreatedIndex, old.CreatedAt
	} else {
		row.CreatedIndex, row.CreatedAt = a.index, a.now.Unix()
	}
	// The flag follows the identity, which only NodeIdentitySet creates and
	// deletes: (re-)attestation neither grants nor drops it.
	row.SystemAssignedIdentity = old != nil && old.SystemAssignedIdentity
	a.upsert(TableNodes, row.SpiffeId, row)
	return &ferrypb.CommandResult{Status: ok(), Node: row}
}

func (a *applier) deleteNode(id string) *ferrypb.CommandResult {
	old := a.node(id)
	if old == nil {
		return &ferrypb.CommandResult{Status: status(codes.NotFound, "agent %s not found", id)}
	}
	a.delete(TableNodes, id, old)
	res := &ferrypb.CommandResult{Status: ok(), Node: old}
	// Evicting an agent deletes its system-assigned identity, as deleting a
	// VM deletes its identity.
	if idn := a.ownedIdentity("", id); idn != nil {
		a.removeIdentity(idn)
		res.Identities = []*ferrypb.Identity{idn}
	}
	return res
}

// banNode marks an agent banned (it may not attest again until unbanned) and
// clears its certificate, so its current SVID is refused at once.
func (a *applier) banNode(b *ferrypb.NodeBan) *ferrypb.CommandResult {
	old := a.node(b.SpiffeId)
	row := &ferrypb.AttestedNode{SpiffeId: b.SpiffeId, CreatedIndex: a.index, CreatedAt: a.now.Unix()}
	if old != nil {
		row = proto.Clone(old).(*ferrypb.AttestedNode)
	} else if err := ValidateSPIFFEID(b.SpiffeId); err != nil {
		return &ferrypb.CommandResult{Status: status(codes.InvalidArgument, "spiffe_id: %v", err)}
	}
	row.Banned = b.Banned
	if b.Banned {
		row.CertSerial, row.NewCertSerial = "", ""
		row.CertNotAfter, row.NewCertNotAfter = 0, 0
	}
	row.Revision = a.index
	a.upsert(TableNodes, row.SpiffeId, row)
	return &ferrypb.CommandResult{Status: ok(), Node: row}
}

// Bundles ----------------------------------------------------------------------

func (a *applier) bundle(td string) *ferrypb.Bundle {
	raw, err := a.txn.First(TableBundles, "id", td)
	must(err)
	if raw == nil {
		return nil
	}
	return raw.(*ferrypb.Bundle)
}

// editBundle applies fn to a copy of td's bundle (a new one if none), bumps the
// sequence number when fn changed something, and stores it.
func (a *applier) editBundle(td string, fn func(b *ferrypb.Bundle) (changed bool, st *ferrypb.Status)) *ferrypb.CommandResult {
	if _, err := spiffeid.TrustDomainFromString(td); err != nil {
		return &ferrypb.CommandResult{Status: status(codes.InvalidArgument, "trust domain: %v", err)}
	}
	var b *ferrypb.Bundle
	if old := a.bundle(td); old != nil {
		b = proto.Clone(old).(*ferrypb.Bundle)
	} else {
		b = &ferrypb.Bundle{TrustDomain: td}
	}
	changed, st := fn(b)
	if st != nil {
		return &ferrypb.CommandResult{Status: st}
	}
	if !changed {
		return &ferrypb.CommandResult{Status: ok(), Bundle: a.bundle(td)}
	}
	b.SequenceNumber++
	b.Revision = a.index
	a.upsert(TableBundles, td, b)
	return &ferrypb.CommandResult{Status: ok(), Bundle: b}
}

func (a *applier) putX509Authority(p *ferrypb.BundleX509AuthorityPut) *ferrypb.CommandResult {
	if len(p.GetAuthority().GetCertificate()) == 0 {
		return &ferrypb.CommandResult{Status: status(codes.InvalidArgument, "certificate is required")}
	}
	return a.editBundle(p.TrustDomain, func(b *ferrypb.Bundle) (bool, *ferrypb.Status) {
		for i, x := range b.X509Authorities {
			if bytes.Equal(x.Certificate, p.Authority.Certificate) {
				if x.Tainted == p.Authority.Tainted {
					return false, nil
				}
				b.X509Authorities[i] = proto.Clone(p.Authority).(*ferrypb.X509Authority)
				return true, nil
			}
		}
		b.X509Authorities = append(b.X509Authorities, proto.Clone(p.Authority).(*ferrypb.X509Authority))
		return true, nil
	})
}

func (a *applier) removeX509Authority(p *ferrypb.BundleX509AuthorityRemove) *ferrypb.CommandResult {
	return a.editBundle(p.TrustDomain, func(b *ferrypb.Bundle) (bool, *ferrypb.Status) {
		for i, x := range b.X509Authorities {
			if bytes.Equal(x.Certificate, p.Certificate) {
				b.X509Authorities = append(b.X509Authorities[:i:i], b.X509Authorities[i+1:]...)
				return true, nil
			}
		}
		return false, nil
	})
}

func (a *applier) putJWTAuthority(p *ferrypb.BundleJWTAuthorityPut) *ferrypb.CommandResult {
	if p.GetAuthority().GetKeyId() == "" || len(p.GetAuthority().GetPublicKey()) == 0 {
		return &ferrypb.CommandResult{Status: status(codes.InvalidArgument, "key_id and public_key are required")}
	}
	return a.editBundle(p.TrustDomain, func(b *ferrypb.Bundle) (bool, *ferrypb.Status) {
		for i, k := range b.JwtAuthorities {
			if k.KeyId == p.Authority.KeyId {
				if !bytes.Equal(k.PublicKey, p.Authority.PublicKey) {
					return false, status(codes.AlreadyExists, "a different key with key ID %q exists", k.KeyId)
				}
				if proto.Equal(k, p.Authority) {
					return false, nil
				}
				b.JwtAuthorities[i] = proto.Clone(p.Authority).(*ferrypb.JWTAuthority)
				return true, nil
			}
		}
		b.JwtAuthorities = append(b.JwtAuthorities, proto.Clone(p.Authority).(*ferrypb.JWTAuthority))
		return true, nil
	})
}

func (a *applier) removeJWTAuthority(p *ferrypb.BundleJWTAuthorityRemove) *ferrypb.CommandResult {
	return a.editBundle(p.TrustDomain, func(b *ferrypb.Bundle) (bool, *ferrypb.Status) {
		for i, k := range b.JwtAuthorities {
			if k.KeyId == p.KeyId {
				b.JwtAuthorities = append(b.JwtAuthorities[:i:i], b.JwtAuthorities[i+1:]...)
				return true, nil
			}
		}
		return false, nil
	})
}

func (a *applier) setBundle(p *ferrypb.BundleSet) *ferrypb.CommandResult {
	in := p.GetBundle()
	if in == nil {
		return &ferrypb.CommandResult{Status: status(codes.InvalidArgument, "bundle is required")}
	}
	if _, err := spiffeid.TrustDomainFromString(in.TrustDomain); err != nil {
		return &ferrypb.CommandResult{Status: status(codes.InvalidArgument, "trust domain: %v", err)}
	}
	old := a.bundle(in.TrustDomain)
	if p.RequireNewer && old != nil && in.SequenceNumber <= old.SequenceNumber {
		return &ferrypb.CommandResult{Status: status(codes.FailedPrecondition, "bundle sequence %d is not newer than %d", in.SequenceNumber, old.SequenceNumber), Bundle: old}
	}
	row := proto.Clone(in).(*ferrypb.Bundle)
	row.Revision = a.index
	a.upsert(TableBundles, row.TrustDomain, row)
	return &ferrypb.CommandResult{Status: ok(), Bundle: row}
}

func (a *applier) deleteBundle(td string) *ferrypb.CommandResult {
	old := a.bundle(td)
	if old == nil {
		return &ferrypb.CommandResult{Status: status(codes.NotFound, "no bundle for %q", td)}
	}
	a.delete(TableBundles, td, old)
	return &ferrypb.CommandResult{Status: ok(), Bundle: old}
}
