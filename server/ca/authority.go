package ca

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/ferry-id/ferry/proto/ferrypb"
)

// Kind is the kind of an authority.
type Kind string

// Authority kinds.
const (
	KindX509 Kind = "x509"
	KindJWT  Kind = "jwt"
)

// Status is an authority's place in its lifecycle.
type Status string

// Authority statuses. A kind has at most one prepared and one active
// authority at a time, and any number of old ones.
const (
	// StatusPrepared: published, not yet signing.
	StatusPrepared Status = "prepared"
	// StatusActive: signs new SVIDs.
	StatusActive Status = "active"
	// StatusOld: retired; stays published until what it signed expired.
	StatusOld Status = "old"
)

// Lifecycle thresholds, as SPIRE's: prepare the next authority when half of
// the current one's lifetime remains (at most 30 days before its end), and
// activate it when a sixth remains (at most 7 days before its end).
const (
	prepareDivisor  = 2
	activateDivisor = 6
	maxPrepareLead  = 30 * 24 * time.Hour
	maxActivateLead = 7 * 24 * time.Hour
)

// Authority describes one of this node's authorities. It never carries
// private key material.
type Authority struct {
	Kind      Kind
	ID        string // X.509: hex subject key ID; JWT: key ID (kid)
	Status    Status
	Tainted   bool
	Published bool
	IssuedAt  time.Time
	NotAfter  time.Time
	// Certificate is the CA certificate (X.509 only).
	Certificate *x509.Certificate
	PublicKey   crypto.PublicKey
	// Upstream is set for an X.509 intermediate under the upstream CA;
	// its public half is not in the bundle (the upstream roots are).
	Upstream bool
}

type authority struct {
	kind      Kind
	id        string
	status    Status
	tainted   bool
	published bool
	issuedAt  time.Time
	notAfter  time.Time
	key       crypto.Signer
	cert      *x509.Certificate // X.509 only
	keyFile   string
	// upstream marks an X.509 intermediate signed by the upstream CA.
	upstream bool
}

func (a *authority) record() authorityRecord {
	r := authorityRecord{
		Kind: a.kind, ID: a.id, Status: a.status, Tainted: a.tainted, Published: a.published,
		IssuedAt: a.issuedAt, NotAfter: a.notAfter, KeyFile: a.keyFile,
	}
	if a.cert != nil {
		r.Certificate = a.cert.Raw
	}
	return r
}

func (a *authority) info() Authority {
	return Authority{
		Kind: a.kind, ID: a.id, Status: a.status, Tainted: a.tainted, Published: a.published,
		IssuedAt: a.issuedAt, NotAfter: a.notAfter, Certificate: a.cert, PublicKey: a.key.Public(),
		Upstream: a.intermediate(),
	}
}

// intermediate reports an X.509 authority signed by an upstream CA.
func (a *authority) intermediate() bool { return a.upstream }

// prepareAt is when the next authority should be prepared.
func (a *authority) prepareAt() time.Time {
	return a.notAfter.Add(-min(a.notAfter.Sub(a.issuedAt)/prepareDivisor, maxPrepareLead))
}

// activateAt is when the next authority should take over.
func (a *authority) activateAt() time.Time {
	return a.notAfter.Add(-min(a.notAfter.Sub(a.issuedAt)/activateDivisor, maxActivateLead))
}

// find lists the authorities of kind k in status s. The caller holds mu or opMu.
func (c *CA) find(k Kind, s Status) []*authority {
	var out []*authority
	for _, a := range c.auths {
		if a.kind == k && a.status == s {
			out = append(out, a)
		}
	}
	return out
}

func (c *CA) one(k Kind, s Status) *authority {
	if as := c.find(k, s); len(as) > 0 {
		return as[0]
	}
	return nil
}

func (c *CA) get(k Kind, id string) (*authority, error) {
	for _, a := range c.auths {
		if a.kind == k && a.id == id {
			return a, nil
		}
	}
	return nil, fmt.Errorf("%w: %s %q", ErrUnknownAuthority, k, id)
}

func checkKind(k Kind) error {
	if k != KindX509 && k != KindJWT {
		return fmt.Errorf("ca: unknown authority kind %q", k)
	}
	return nil
}

// List returns this node's authorities of kind k ("" for all), oldest first.
func (c *CA) List(k Kind) []Authority {
	c.mu.RLock()
	defer c.mu.RUnlock()
	var out []Authority
	for _, a := range c.auths {
		if k == "" || a.kind == k {
			out = append(out, a.info())
		}
	}
	slices.SortStableFunc(out, func(x, y Authority) int {
		if x.Kind != y.Kind {
			if x.Kind < y.Kind {
				return 1 // x509 before jwt
			}
			return -1
		}
		return x.IssuedAt.Compare(y.IssuedAt)
	})
	return out
}

// Expired returns the old authorities whose every signed credential has
// expired at now: SVIDs never outlive their authority, so these are the ones
// the bundle no longer needs. Rotate removes them PruneAfter later.
func (c *CA) Expired(now time.Time) []Authority {
	c.mu.RLock()
	defer c.mu.RUnlock()
	var out []Authority
	for _, a := range c.auths {
		if a.status == StatusOld && !now.Before(a.notAfter) {
			out = append(out, a.info())
		}
	}
	return out
}

// Run calls Rotate at once and then every RotateInterval until ctx ends.
// Failures are logged and retried at the next tick.
func (c *CA) Run(ctx context.Context) error {
	t := time.NewTicker(c.interval)
	defer t.Stop()
	for {
		if err := c.Rotate(ctx); err != nil && ctx.Err() == nil {
			c.log.Error("ca: rotation failed", "error", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// Rotate runs one tick of the rotation loop for both kinds: it publishes
// what is unpublished, prepares, activates and prunes as the clock demands.
// On a fresh data dir it creates, publishes and activates the first
// authorities.
func (c *CA) Rotate(ctx context.Context) error {
	c.opMu.Lock()
	defer c.opMu.Unlock()
	var errs []error
	if c.upstream != nil {
		if err := c.publishUpstreamLocked(ctx); err != nil {
			errs = append(errs, err)
		}
	}
	for _, k := range []Kind{KindX509, KindJWT} {
		if err := c.rotateLocked(ctx, k); err != nil {
			errs = append(errs, err)
		}
	}
	if err := c.pruneLocked(ctx); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func (c *CA) rotateLocked(ctx context.Context, k Kind) error {
	now := c.now()
	next := c.one(k, StatusPrepared)
	if next != nil && !next.published {
		if err := c.publishLocked(ctx, next); err != nil {
			return err
		}
	}
	cur := c.one(k, StatusActive)
	switch {
	case cur == nil || !now.Before(cur.notAfter):
		if next == nil || !now.Before(next.notAfter) {
			var err error
			if next, err = c.prepareLocked(ctx, k); err != nil {
				return err
			}
		}
		return c.activateLocked(next)
	case !now.Before(cur.activateAt()):
		if next == nil {
			var err error
			if next, err = c.prepareLocked(ctx, k); err != nil {
				return err
			}
		}
		return c.activateLocked(next)
	case !now.Before(cur.prepareAt()) && next == nil:
		_, err := c.prepareLocked(ctx, k)
		return err
	}
	return nil
}

// Prepare creates and publishes a new authority of kind k in the prepared
// slot. A previously prepared authority is retired.
func (c *CA) Prepare(ctx context.Context, k Kind) (Authority, error) {
	if err := checkKind(k); err != nil {
		return Authority{}, err
	}
	c.opMu.Lock()
	defer c.opMu.Unlock()
	a, err := c.prepareLocked(ctx, k)
	if err != nil {
		return Authority{}, err
	}
	return c.infoLocked(a), nil
}

// Activate makes the prepared authority id of kind k the active one; the
// previously active authority becomes old.
func (c *CA) Activate(ctx context.Context, k Kind, id string) (Authority, error) {
	if err := checkKind(k); err != nil {
		return Authority{}, err
	}
	c.opMu.Lock()
	defer c.opMu.Unlock()
	a, err := c.get(k, id)
	if err != nil {
		return Authority{}, err
	}
	if a.status != StatusPrepared {
		return Authority{}, fmt.Errorf("%w: only a prepared authority can be activated; %s is %s", ErrAuthorityState, id, a.status)
	}
	if !a.published {
		if err := c.publishLocked(ctx, a); err != nil {
			return Authority{}, err
		}
	}
	if err := c.activateLocked(a); err != nil {
		return Authority{}, err
	}
	return c.infoLocked(a), nil
}

// Taint marks the old authority id as tainted in the bundle, telling agents
// to replace what it signed. Active and prepared authorities cannot be
// tainted. Tainting again republishes the flag.
func (c *CA) Taint(ctx context.Context, k Kind, id string) (Authority, error) {
	if err := checkKind(k); err != nil {
		return Authority{}, err
	}
	c.opMu.Lock()
	defer c.opMu.Unlock()
	a, err := c.get(k, id)
	if err != nil {
		return Authority{}, err
	}
	if a.intermediate() {
		return Authority{}, ErrUpstreamManaged
	}
	if a.status != StatusOld {
		return Authority{}, fmt.Errorf("%w: only an old authority can be tainted; %s is %s", ErrAuthorityState, id, a.status)
	}
	c.mu.Lock()
	a.tainted = true
	c.mu.Unlock()
	if err := c.saveLocked(); err != nil {
		return Authority{}, err
	}
	if err := c.publishLocked(ctx, a); err != nil {
		return Authority{}, err
	}
	c.log.Info("ca: authority tainted", "kind", k, "authority_id", id)
	return c.infoLocked(a), nil
}

// Revoke removes the tainted, old authority id from the bundle and deletes
// its key. Credentials it signed stop verifying.
func (c *CA) Revoke(ctx context.Context, k Kind, id string) (Authority, error) {
	if err := checkKind(k); err != nil {
		return Authority{}, err
	}
	c.opMu.Lock()
	defer c.opMu.Unlock()
	a, err := c.get(k, id)
	if err != nil {
		return Authority{}, err
	}
	if a.intermediate() {
		return Authority{}, ErrUpstreamManaged
	}
	if a.status != StatusOld || !a.tainted {
		return Authority{}, fmt.Errorf("%w: only a tainted old authority can be revoked; %s is %s, tainted=%t",
			ErrAuthorityState, id, a.status, a.tainted)
	}
	info := c.infoLocked(a)
	if err := c.removeLocked(ctx, a); err != nil {
		return Authority{}, err
	}
	c.log.Info("ca: authority revoked", "kind", k, "authority_id", id)
	return info, nil
}

func (c *CA) infoLocked(a *authority) Authority {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return a.info()
}

// prepareLocked creates a key and its authority, persists both, then
// publishes the public half. On a publish failure the authority stays
// prepared but unpublished, and Rotate retries.
func (c *CA) prepareLocked(ctx context.Context, k Kind) (*authority, error) {
	now := c.now()
	var a *authority
	var err error
	switch k {
	case KindX509:
		a, err = c.newX509Authority(now)
	case KindJWT:
		a, err = c.newJWTAuthority(now)
	}
	if err != nil {
		return nil, err
	}
	if err := c.writeKey(a.keyFile, a.key); err != nil {
		return nil, err
	}
	c.mu.Lock()
	for _, old := range c.find(k, StatusPrepared) {
		old.status = StatusOld
	}
	c.auths = append(c.auths, a)
	c.mu.Unlock()
	if err := c.saveLocked(); err != nil {
		return nil, err
	}
	c.log.Info("ca: authority prepared", "kind", k, "authority_id", a.id, "not_after", a.notAfter)
	if err := c.publishLocked(ctx, a); err != nil {
		return nil, err
	}
	return a, nil
}

func (c *CA) newJWTAuthority(now time.Time) (*authority, error) {
	key, err := newJWTKey(c.jwtAlg)
	if err != nil {
		return nil, err
	}
	kid := rand.Text() // 26 base32 characters, 130 bits
	return &authority{
		kind: KindJWT, id: kid, status: StatusPrepared, issuedAt: now,
		notAfter: now.Add(c.jwtKeyTTL), key: key, keyFile: "jwt-" + kid + ".key",
	}, nil
}

// activateLocked moves a from prepared to active.
func (c *CA) activateLocked(a *authority) error {
	if !a.published {
		return fmt.Errorf("%w: %s authority %s is not published yet", ErrAuthorityState, a.kind, a.id)
	}
	if !c.now().Before(a.notAfter) {
		return fmt.Errorf("%w: %s authority %s has expired", ErrAuthorityState, a.kind, a.id)
	}
	c.mu.Lock()
	for _, cur := range c.find(a.kind, StatusActive) {
		cur.status = StatusOld
	}
	a.status = StatusActive
	c.mu.Unlock()
	c.installSigners()
	c.log.Info("ca: authority activated", "kind", a.kind, "authority_id", a.id, "not_after", a.notAfter)
	return c.saveLocked()
}

// publishLocked publishes a's public half (for an intermediate: the
// upstream roots) and records that it was.
func (c *CA) publishLocked(ctx context.Context, a *authority) error {
	c.mu.RLock()
	tainted := a.tainted
	c.mu.RUnlock()
	var err error
	switch {
	case a.kind == KindJWT:
		var der []byte
		der, err = x509.MarshalPKIXPublicKey(a.key.Public())
		if err != nil {
			return fmt.Errorf("ca: encode JWT public key: %w", err)
		}
		err = c.pub.PublishJWTAuthority(ctx, &ferrypb.JWTAuthority{
			KeyId: a.id, PublicKey: der, ExpiresAt: a.notAfter.Unix(), Tainted: tainted,
		})
	case a.intermediate():
		err = c.publishUpstreamLocked(ctx)
	default:
		err = c.pub.PublishX509Authority(ctx, &ferrypb.X509Authority{Certificate: a.cert.Raw, Tainted: tainted})
	}
	if err != nil {
		return fmt.Errorf("ca: publish %s authority %s: %w", a.kind, a.id, err)
	}
	if a.published {
		return nil
	}
	c.mu.Lock()
	a.published = true
	c.mu.Unlock()
	return c.saveLocked()
}

func (c *CA) publishUpstreamLocked(ctx context.Context) error {
	if c.upstreamPublished {
		return nil
	}
	for _, root := range c.upstream.roots {
		if err := c.pub.PublishX509Authority(ctx, &ferrypb.X509Authority{Certificate: root.Raw}); err != nil {
			return fmt.Errorf("ca: publish upstream root: %w", err)
		}
	}
	c.upstreamPublished = true
	return nil
}

// pruneLocked removes authorities that expired PruneAfter ago.
func (c *CA) pruneLocked(ctx context.Context) error {
	now := c.now()
	var errs []error
	for _, a := range slices.Clone(c.auths) {
		if a.status == StatusOld && !now.Before(a.notAfter.Add(c.prune)) {
			if err := c.removeLocked(ctx, a); err != nil {
				errs = append(errs, err)
				continue
			}
			c.log.Info("ca: expired authority pruned", "kind", a.kind, "authority_id", a.id)
		}
	}
	return errors.Join(errs...)
}

// removeLocked takes a out of the bundle, the state and the disk, in that
// order, so a failure leaves it where it can be retried.
func (c *CA) removeLocked(ctx context.Context, a *authority) error {
	if a.published {
		var err error
		switch {
		case a.kind == KindJWT:
			err = c.pub.RemoveJWTAuthority(ctx, a.id)
		case !a.intermediate():
			err = c.pub.RemoveX509Authority(ctx, a.cert.Raw)
		}
		if err != nil {
			return fmt.Errorf("ca: remove %s authority %s from bundle: %w", a.kind, a.id, err)
		}
	}
	c.mu.Lock()
	c.auths = slices.DeleteFunc(c.auths, func(x *authority) bool { return x == a })
	c.mu.Unlock()
	if err := c.saveLocked(); err != nil {
		return err
	}
	if err := os.Remove(filepath.Join(c.dir, a.keyFile)); err != nil && !os.IsNotExist(err) {
		return fmt.Errorf("ca: delete key of %s authority %s: %w", a.kind, a.id, err)
	}
	return nil
}

// installSigners points the lock-free signing paths at the active
// authorities. The caller holds opMu.
func (c *CA) installSigners() {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if a := c.one(KindX509, StatusActive); a != nil {
		s := &x509Signer{id: a.id, cert: a.cert, key: a.key, chain: []*x509.Certificate{}}
		if a.intermediate() && c.upstream != nil {
			s.chain = append([]*x509.Certificate{a.cert}, c.upstream.intermediates...)
		}
		c.x509Active.Store(s)
	} else {
		c.x509Active.Store(nil)
	}
	if a := c.one(KindJWT, StatusActive); a != nil {
		c.jwtActive.Store(newJWTSigner(a))
	} else {
		c.jwtActive.Store(nil)
	}
	if c.SigningErr() == nil {
		c.signingOnce.Do(func() { close(c.signing) })
	}
}

// Signing is closed the first time the CA can sign: an X.509 and a JWT
// authority are both active and unexpired. On a fresh data dir that is after
// the first Rotate has published and activated them; on a restart it is as
// soon as New has loaded them, unless they expired while the node was down.
// Listeners that present a server SVID wait for it, so no client is refused
// a handshake because the first authority is still being published.
func (c *CA) Signing() <-chan struct{} { return c.signing }

// SigningErr is nil when the CA can sign now, else ErrNoAuthority saying
// which kind of authority is missing or expired.
func (c *CA) SigningErr() error {
	now := c.now()
	if s := c.x509Active.Load(); s == nil || !now.Before(s.cert.NotAfter) {
		return fmt.Errorf("%w: no unexpired X.509 authority", ErrNoAuthority)
	}
	if s := c.jwtActive.Load(); s == nil || !now.Before(s.notAfter) {
		return fmt.Errorf("%w: no unexpired JWT authority", ErrNoAuthority)
	}
	return nil
}
