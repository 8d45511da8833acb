// Package cache is the agent's SVID cache: it follows the registration entries the
// server authorizes for this agent, mints and rotates X509-SVIDs (keys generated
// here; the server only ever sees CSRs) and JWT-SVIDs, and tells subscribed
// workloads about every change. SVIDs of an authority the servers taint are
// replaced within a jitter window, and the cache tells which authorities it
// holds SVIDs from (HeldAuthorities).
package cache

import (
	"context"
	"crypto"
	"crypto/x509"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ferry-id/ferry/proto/ferrypb"
)

// Identity is one X509-SVID a workload may use, with the entry that grants it.
type Identity struct {
	Entry      *ferrypb.Entry
	SVID       []*x509.Certificate // leaf first, then intermediates
	PrivateKey crypto.Signer
	// SVIDDER and PrivateKeyDER, when set, are SVID's certificates
	// concatenated in DER and PrivateKey in PKCS #8 DER, encoded once when
	// the SVID was minted so responses need not encode them per call. They
	// are shared and must not be modified.
	SVIDDER       []byte
	PrivateKeyDER []byte
}

// WorkloadUpdate is everything a workload with a given selector set receives.
// Identities are ordered: the first is the workload's default identity.
type WorkloadUpdate struct {
	Identities []Identity
	// Bundle is the agent's own trust domain's bundle (X.509 and JWT authorities).
	Bundle *spiffebundle.Bundle
	// FederatedBundles are the bundles of trust domains the identities'
	// entries federate with.
	FederatedBundles map[spiffeid.TrustDomain]*spiffebundle.Bundle
}

// Subscriber receives a WorkloadUpdate at once and then on every change that
// concerns its selectors. Updates is closed after Finish.
type Subscriber interface {
	Updates() <-chan *WorkloadUpdate
	Finish()
}

// JWTSVID is a minted JWT-SVID.
type JWTSVID struct {
	Token     string
	ExpiresAt time.Time
	IssuedAt  time.Time
}

// Manager is what the Workload API and the managed-identity endpoint need from
// the cache. Implementations are safe for concurrent use.
type Manager interface {
	// SubscribeToCacheChanges follows the identities granted to a workload with
	// these selectors.
	SubscribeToCacheChanges(ctx context.Context, selectors []*ferrypb.Selector) (Subscriber, error)
	// FetchWorkloadUpdate is a one-shot read of the same.
	FetchWorkloadUpdate(ctx context.Context, selectors []*ferrypb.Selector) (*WorkloadUpdate, error)
	// FetchJWTSVID returns a JWT-SVID for the entry's SPIFFE ID and audience,
	// from cache when one with enough life left exists.
	FetchJWTSVID(ctx context.Context, entry *ferrypb.Entry, audience []string) (*JWTSVID, error)
	// SelectorKinds reports which selector kinds ("unix:uid", "systemd:id", ...)
	// some entry on this node uses, so attestors can skip the rest; nil while
	// that is not known yet (every kind may be in use).
	SelectorKinds() map[string]bool
}

// WITSVID is a Workload Identity Token SVID with the private key it is bound to
// (the token's cnf claim carries the public half).
type WITSVID struct {
	Entry      *ferrypb.Entry
	Token      string
	PrivateKey crypto.Signer
	ExpiresAt  time.Time
}

// WITSource is implemented by a Manager that also serves WIT-SVIDs.
type WITSource interface {
	// FetchWITSVID returns a WIT-SVID for the entry, from cache when one with
	// enough life left exists.
	FetchWITSVID(ctx context.Context, entry *ferrypb.Entry) (*WITSVID, error)
}
