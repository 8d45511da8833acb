// Package replica is the bridge.Directory a bridge replica runs on: it follows
// the server's Directory.Watch stream and answers every lookup from memory.
//
// The replica holds the directory in a go-memdb database. Lookups read an
// immutable snapshot of it, published together with the revision it reflects,
// and never wait for the network or for the writer. One goroutine (Run) applies
// the stream: a full snapshot replaces the whole database, changes are applied
// in one write transaction per message, and only then is the new snapshot
// published, so a lookup never sees a change its Revision does not cover. When the stream breaks, Run reconnects with exponential backoff and
// resumes from the last revision it holds; the server answers with the missed
// changes, or with a new full snapshot when it no longer has them.
//
// Run also publishes the public half of the replica's signing key through
// PublishSigningKey whenever the followed directory does not list it, so every
// replica's JWKS lists every replica's key.
package replica

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-memdb"
	"google.golang.org/grpc"

	"github.com/ferry-id/ferry/bridge"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

// Source is the part of the server's Directory service a replica uses;
// ferrypb.DirectoryClient implements it.
type Source interface {
	Watch(ctx context.Context, in *ferrypb.WatchRequest, opts ...grpc.CallOption) (grpc.ServerStreamingClient[ferrypb.WatchResponse], error)
	PublishSigningKey(ctx context.Context, in *ferrypb.SigningKey, opts ...grpc.CallOption) (*ferrypb.SigningKey, error)
	RetireSigningKey(ctx context.Context, in *ferrypb.RetireSigningKeyRequest, opts ...grpc.CallOption) (*ferrypb.RetireSigningKeyResponse, error)
}

// Config configures a Replica.
type Config struct {
	// Source is the server's Directory service (required).
	Source Source
	// Key is the public half of this replica's signing key (signing.Key.Public());
	// nil publishes nothing.
	Key *ferrypb.SigningKey
	// Issuers maps OIDC issuer URLs of local trust domains to the trust domain,
	// in addition to those the server sends.
	Issuers map[string]string
	Logger  *slog.Logger
	// MinBackoff and MaxBackoff bound the wait between reconnects (defaults
	// 100 ms and 30 s); the wait doubles after each failure, with jitter.
	MinBackoff time.Duration
	MaxBackoff time.Duration
	// PublishTimeout bounds one PublishSigningKey call (default 10 s).
	PublishTimeout time.Duration
}

// Replica is a bridge.Directory following the server. Lookups are safe for
// concurrent use and never block; Run must be called once to follow the server.
type Replica struct {
	cfg Config
	log *slog.Logger

	// live is the database Run writes (only Run touches it); view is what
	// lookups read: an immutable snapshot of live with its revision.
	live *memdb.MemDB
	view atomic.Pointer[view]

	readyOnce sync.Once
	ready     chan struct{}
	publish   chan struct{} // a pending "make sure the keys are published"
	own       atomic.Pointer[[]*ferrypb.SigningKey]
	// sent maps the kid of each key this replica published to the revision
	// the server answered with: until the replica reflects that revision the
	// key is in flight, not missing, and is not published again.
	sentMu sync.Mutex
	sent   map[string]uint64
}

// view is one consistent state of the followed directory.
type view struct {
	db       *memdb.MemDB
	issuers  map[string]string
	revision uint64
}

var _ bridge.Directory = (*Replica)(nil)

// New returns a replica holding an empty directory until Run has received the
// first snapshot.
func New(cfg Config) (*Replica, error) {
	if cfg.Source == nil {
		return nil, errors.New("replica: Config.Source is required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.MinBackoff <= 0 {
		cfg.MinBackoff = 100 * time.Millisecond
	}
	if cfg.MaxBackoff < cfg.MinBackoff {
		cfg.MaxBackoff = max(30*time.Second, cfg.MinBackoff)
	}
	if cfg.PublishTimeout <= 0 {
		cfg.PublishTimeout = 10 * time.Second
	}
	r := &Replica{cfg: cfg, log: cfg.Logger, ready: make(chan struct{}), publish: make(chan struct{}, 1), sent: map[string]uint64{}}
	var own []*ferrypb.SigningKey
	if cfg.Key != nil {
		own = []*ferrypb.SigningKey{cfg.Key}
	}
	r.own.Store(&own)
	db, err := newDB()
	if err != nil {
		return nil, err
	}
	r.live = db
	r.publishView(nil, 0)
	return r, nil
}

// Ready is closed once the replica holds a complete snapshot of the directory.
func (r *Replica) Ready() <-chan struct{} { return r.ready }

// Revision is the server revision the replica's directory reflects.
func (r *Replica) Revision() uint64 { return r.view.Load().revision }

// Run follows the server until ctx ends, reconnecting as needed. It returns nil
// when ctx ends.
func (r *Replica) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	{
		wg.Add(1)
		go func() {
			defer wg.Done()
			r.publishLoop(ctx)
		}()
	}
	defer wg.Wait()
	backoff := r.cfg.MinBackoff
	for {
		progressed, err := r.follow(ctx)
		if ctx.Err() != nil {
			return nil
		}
		if progressed {
			backoff = r.cfg.MinBackoff
		}
		wait := backoff/2 + rand.N(backoff/2+1)
		r.log.Warn("directory stream ended; reconnecting", "error", err, "revision", r.Revision(), "retry_in", wait)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
		backoff = min(backoff*2, r.cfg.MaxBackoff)
	}
}

// follow runs one Watch stream. progressed reports whether it received anything.
func (r *Replica) follow(ctx context.Context) (progressed bool, err error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	since := r.Revision()
	stream, err := r.cfg.Source.Watch(ctx, &ferrypb.WatchRequest{SinceRevision: since})
	if err != nil {
		return false, fmt.Errorf("replica: watch: %w", err)
	}
	var pending *memdb.Txn // a snapshot being received into pendingDB
	var pendingDB *memdb.MemDB
	var pendingIssuers map[string]string
	defer func() {
		if pending != nil {
			pending.Abort()
		}
	}()
	for {
		msg, err := stream.Recv()
		if err != nil {
			return progressed, fmt.Errorf("replica: watch: %w", err)
		}
		if !progressed {
			r.log.Info("following the directory", "since", since)
		}
		progressed = true
		switch {
		case msg.Snapshot != nil:
			if pending == nil {
				if pendingDB, err = newDB(); err != nil {
					return progressed, err
				}
				pending = pendingDB.Txn(true)
				pendingIssuers = map[string]string{}
			}
			if err := loadSnapshot(pending, msg.Snapshot); err != nil {
				return progressed, err
			}
			for _, i := range msg.Snapshot.Issuers {
				pendingIssuers[i.Issuer] = i.TrustDomain
			}
			if msg.More {
				continue
			}
			pending.Commit()
			r.live = pendingDB
			pending = nil
			r.publishView(pendingIssuers, msg.Revision)
			r.log.Info("directory snapshot loaded", "revision", msg.Revision)
		case pending != nil:
			return progressed, errors.New("replica: watch: changes inside a snapshot")
		default:
			if len(msg.Changes) > 0 {
				if err := r.applyChanges(msg.Changes); err != nil {
					return progressed, err
				}
			}
			if cur := r.view.Load(); len(msg.Changes) > 0 || msg.Revision > cur.revision {
				r.publishView(cur.issuers, max(msg.Revision, cur.revision))
			}
		}
		r.readyOnce.Do(func() { close(r.ready) })
		r.checkKey()
	}
}

func loadSnapshot(txn *memdb.Txn, s *ferrypb.DirectorySnapshot) error {
	insert := func(table string, row any) error {
		if err := txn.Insert(table, row); err != nil {
			return fmt.Errorf("replica: snapshot %s row: %w", table, err)
		}
		return nil
	}
	var err error
	for _, x := range s.Tenants {
		err = errors.Join(err, insert(tableTenants, x))
	}
	for _, x := range s.Identities {
		err = errors.Join(err, insert(tableIdentities, x))
	}
	for _, x := range s.FederatedCredentials {
		err = errors.Join(err, insert(tableCredentials, x))
	}
	for _, x := range s.Resources {
		err = errors.Join(err, insert(tableResources, x))
	}
	for _, x := range s.RoleAssignments {
		err = errors.Join(err, insert(tableAssignments, x))
	}
	for _, x := range s.SigningKeys {
		err = errors.Join(err, insert(tableKeys, x))
	}
	for _, x := range s.Bundles {
		err = errors.Join(err, insert(tableBundles, x))
	}
	return err
}

// applyChanges applies one message's changes to the live database in one
// transaction; readers see them once publishView publishes the result.
func (r *Replica) applyChanges(cs []*ferrypb.DirectoryChange) error {
	txn := r.live.Txn(true)
	defer txn.Abort()
	for _, c := range cs {
		table, row := changeRow(c)
		if table == "" {
			r.log.Debug("skipping a directory change of an unknown kind")
			continue
		}
		var err error
		if c.Deleted {
			if err = txn.Delete(table, row); errors.Is(err, memdb.ErrNotFound) {
				err = nil
			}
		} else {
			err = txn.Insert(table, row)
		}
		if err != nil {
			return fmt.Errorf("replica: apply %s change: %w", table, err)
		}
	}
	txn.Commit()
	return nil
}

func changeRow(c *ferrypb.DirectoryChange) (string, any) {
	switch row := c.Row.(type) {
	case *ferrypb.DirectoryChange_Tenant:
		return tableTenants, row.Tenant
	case *ferrypb.DirectoryChange_Identity:
		return tableIdentities, row.Identity
	case *ferrypb.DirectoryChange_FederatedCredential:
		return tableCredentials, row.FederatedCredential
	case *ferrypb.DirectoryChange_Resource:
		return tableResources, row.Resource
	case *ferrypb.DirectoryChange_RoleAssignment:
		return tableAssignments, row.RoleAssignment
	case *ferrypb.DirectoryChange_SigningKey:
		return tableKeys, row.SigningKey
	case *ferrypb.DirectoryChange_Bundle:
		return tableBundles, row.Bundle
	}
	return "", nil
}

// publishView makes the live database, the server's issuers and revision
// what lookups see, in one step.
func (r *Replica) publishView(fromServer map[string]string, revision uint64) {
	m := make(map[string]string, len(fromServer)+len(r.cfg.Issuers))
	for k, v := range fromServer {
		m[k] = v
	}
	for k, v := range r.cfg.Issuers {
		m[k] = v
	}
	r.view.Store(&view{db: r.live.Snapshot(), issuers: m, revision: revision})
}

// SetKeys replaces the set of this replica's keys that must be published (a
// key ring's current, next and previous keys); missing ones are published.
func (r *Replica) SetKeys(keys []*ferrypb.SigningKey) {
	keys = append([]*ferrypb.SigningKey(nil), keys...)
	r.own.Store(&keys)
	r.sentMu.Lock()
	for kid := range r.sent {
		if !slices.ContainsFunc(keys, func(k *ferrypb.SigningKey) bool { return k.Kid == kid }) {
			delete(r.sent, kid)
		}
	}
	r.sentMu.Unlock()
	r.checkKey()
}

// Retire withdraws one of this replica's keys from the directory.
func (r *Replica) Retire(ctx context.Context, kid string) error {
	pctx, cancel := context.WithTimeout(ctx, r.cfg.PublishTimeout)
	defer cancel()
	_, err := r.cfg.Source.RetireSigningKey(pctx, &ferrypb.RetireSigningKeyRequest{Kid: kid})
	if err != nil {
		return fmt.Errorf("replica: retire signing key %s: %w", kid, err)
	}
	r.log.Info("signing key retired", "kid", kid)
	return nil
}

// checkKey asks publishLoop to publish the keys the directory lacks.
func (r *Replica) checkKey() {
	if len(r.missingKeys()) == 0 {
		return
	}
	select {
	case r.publish <- struct{}{}:
	default:
	}
}

// missingKeys are this replica's keys the followed directory does not list,
// leaving out those published at a revision the replica has not reached yet.
func (r *Replica) missingKeys() []*ferrypb.SigningKey {
	v := r.view.Load()
	txn := v.db.Txn(false)
	r.sentMu.Lock()
	defer r.sentMu.Unlock()
	var out []*ferrypb.SigningKey
	for _, k := range *r.own.Load() {
		raw, err := txn.First(tableKeys, "id", k.Kid)
		if err == nil && raw != nil && bytes.Equal(raw.(*ferrypb.SigningKey).PublicKey, k.PublicKey) {
			continue
		}
		if rev, ok := r.sent[k.Kid]; ok && rev > v.revision {
			continue
		}
		out = append(out, k)
	}
	return out
}

// publishLoop publishes missing keys when asked, retrying with backoff until
// the server accepts them.
func (r *Replica) publishLoop(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.publish:
		}
		backoff := r.cfg.MinBackoff
		for _, key := range r.missingKeys() {
			for {
				pctx, cancel := context.WithTimeout(ctx, r.cfg.PublishTimeout)
				row, err := r.cfg.Source.PublishSigningKey(pctx, key)
				cancel()
				if err == nil {
					r.sentMu.Lock()
					r.sent[key.Kid] = row.GetRevision()
					r.sentMu.Unlock()
					r.log.Info("signing key published", "kid", key.Kid)
					break
				}
				if ctx.Err() != nil {
					return
				}
				r.log.Warn("publishing the signing key failed; retrying", "kid", key.Kid, "error", err)
				select {
				case <-ctx.Done():
					return
				case <-time.After(backoff):
				}
				backoff = min(backoff*2, r.cfg.MaxBackoff)
			}
		}
	}
}

// Lookups ----------------------------------------------------------------------

func (r *Replica) first(table, index string, args ...any) any {
	raw, err := r.view.Load().db.Txn(false).First(table, index, args...)
	if err != nil {
		return nil
	}
	return raw
}

func all[T any](r *Replica, table, index string, args ...any) []T {
	it, err := r.view.Load().db.Txn(false).Get(table, index, args...)
	if err != nil {
		return nil
	}
	var out []T
	for raw := it.Next(); raw != nil; raw = it.Next() {
		out = append(out, raw.(T))
	}
	return out
}

// Tenant implements bridge.Directory.
func (r *Replica) Tenant(id string) (*ferrypb.Tenant, bool) {
	t, ok := r.first(tableTenants, "id", id).(*ferrypb.Tenant)
	return t, ok
}

// IdentityByClientID implements bridge.Directory.
func (r *Replica) IdentityByClientID(tenantID, clientID string) (*ferrypb.Identity, bool) {
	i, ok := r.first(tableIdentities, "client_id", clientID).(*ferrypb.Identity)
	if !ok || i.TenantId != tenantID {
		return nil, false
	}
	return i, true
}

// Identity returns the identity with this object ID.
func (r *Replica) Identity(objectID string) (*ferrypb.Identity, bool) {
	i, ok := r.first(tableIdentities, "id", objectID).(*ferrypb.Identity)
	return i, ok
}

// FederatedCredentials implements bridge.Directory.
func (r *Replica) FederatedCredentials(identityObjectID string) []*ferrypb.FederatedCredential {
	return all[*ferrypb.FederatedCredential](r, tableCredentials, "identity", identityObjectID)
}

// ResourceByIdentifier implements bridge.Directory.
func (r *Replica) ResourceByIdentifier(tenantID, uriOrAppID string) (*ferrypb.Resource, bool) {
	res, ok := r.first(tableResources, "identifier", tenantID, uriOrAppID).(*ferrypb.Resource)
	return res, ok
}

// RoleAssignments implements bridge.Directory.
func (r *Replica) RoleAssignments(resourceObjectID, principalObjectID string) []*ferrypb.RoleAssignment {
	return all[*ferrypb.RoleAssignment](r, tableAssignments, "resource_principal", resourceObjectID, principalObjectID)
}

// LocalIssuer implements bridge.Directory: an issuer URL mapped to a trust
// domain is local even before its bundle arrives (its keys are then unknown,
// never fetched).
func (r *Replica) LocalIssuer(iss string) (bridge.LocalIssuer, bool) {
	v := r.view.Load()
	td, ok := v.issuers[iss]
	if !ok {
		return bridge.LocalIssuer{}, false
	}
	li := bridge.LocalIssuer{TrustDomain: td}
	if raw, err := v.db.Txn(false).First(tableBundles, "id", td); err == nil && raw != nil {
		li.Authorities = raw.(*ferrypb.Bundle).JwtAuthorities
	}
	return li, true
}

// SigningKeys implements bridge.Directory.
func (r *Replica) SigningKeys() []*ferrypb.SigningKey {
	return all[*ferrypb.SigningKey](r, tableKeys, "id")
}
