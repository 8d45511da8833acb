package cache

import (
	"crypto/x509"
	"encoding/hex"
	mrand "math/rand/v2"
	"slices"
	"strings"
	"time"

	"github.com/ferry-id/ferry/proto/ferrypb"
)

// DefaultTaintJitter is the default TaintJitter: the window over which the
// SVIDs chained to a newly tainted authority are signed again, each at a
// random moment in it.
const DefaultTaintJitter = 30 * time.Second

// Authority kinds in HeldAuthorities, as the servers name them.
const (
	KindX509 = "x509"
	KindJWT  = "jwt"
)

// TaintJitterDelay is a random delay in [0, window): when an agent acts on
// a newly tainted authority. A fleet of agents learns of a taint within the
// same second; spreading what each does over the window keeps them from
// asking the servers all at once.
func TaintJitterDelay(window time.Duration) time.Duration {
	if window <= 0 {
		return 0
	}
	return time.Duration(mrand.Int64N(int64(window)))
}

// SignedByAny reports whether a certificate of chain (leaf first) was signed
// by one of the authorities, given by hex subject key ID. The authority key
// ID names the candidate; its signature decides.
func SignedByAny(chain []*x509.Certificate, authorities map[string]*x509.Certificate) bool {
	if len(authorities) == 0 {
		return false
	}
	for _, c := range chain {
		if len(c.AuthorityKeyId) > 0 {
			if a := authorities[hex.EncodeToString(c.AuthorityKeyId)]; a != nil && c.CheckSignatureFrom(a) == nil {
				return true
			}
			continue
		}
		for _, a := range authorities {
			if c.CheckSignatureFrom(a) == nil {
				return true
			}
		}
	}
	return false
}

// AuthoritiesByID indexes CA certificates by hex subject key ID (certificates
// without one are left out: ferry's and SPIRE's CAs all carry one).
func AuthoritiesByID(certs []*x509.Certificate) map[string]*x509.Certificate {
	out := make(map[string]*x509.Certificate, len(certs))
	for _, c := range certs {
		if len(c.SubjectKeyId) > 0 {
			out[hex.EncodeToString(c.SubjectKeyId)] = c
		}
	}
	return out
}

// TaintAuthorities tells the cache which authorities of its own trust domain
// are tainted: all of them, every time the bundle changes (one no longer
// listed was revoked). Every X509-SVID chained to a newly tainted X.509
// authority is signed again within TaintJitter, each at a random moment in
// it; JWT-SVIDs and WIT-SVIDs signed by a tainted JWT key are dropped, so the
// next fetch gets a token from the active key. SVIDs that arrive later from a
// tainted authority (signed before the taint) are replaced the same way.
func (c *Cache) TaintAuthorities(x509Authorities []*x509.Certificate, jwtKeyIDs []string) {
	tainted := AuthoritiesByID(x509Authorities)
	c.jwts.taint(jwtKeyIDs)
	c.wits.taint(jwtKeyIDs)
	c.mu.Lock()
	defer c.mu.Unlock()
	fresh := map[string]*x509.Certificate{}
	for id, a := range tainted {
		if c.taintedX509[id] == nil {
			fresh[id] = a
		}
	}
	c.taintedX509 = tainted
	if len(fresh) == 0 {
		return
	}
	now := c.clock.Now()
	n := 0
	for _, es := range c.entries {
		if es.svid != nil && c.rotateIfTaintedLocked(es.svid, fresh, now) {
			n++
		}
	}
	ids := make([]string, 0, len(fresh))
	for id := range fresh {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	c.log.Info("X.509 authority tainted: replacing the X509-SVIDs it signed", "authority_ids", strings.Join(ids, ","),
		"svids", n, "within", c.taintJitter)
	if n > 0 {
		kick(c.schedKick)
	}
}

// rotateIfTaintedLocked moves the rotation of s to a random moment within
// the taint jitter when it is chained to one of tainted, and reports whether
// it was.
func (c *Cache) rotateIfTaintedLocked(s *svidState, tainted map[string]*x509.Certificate, now time.Time) bool {
	if !SignedByAny(s.chain, tainted) {
		return false
	}
	if at := now.Add(TaintJitterDelay(c.taintJitter)); at.Before(s.rotateAt) {
		s.rotateAt = at
	}
	return true
}

// HeldAuthorities reports, per authority of the trust domain, what the cache
// holds from it at now: the X509-SVIDs it serves (by the authority key ID of
// the leaf, which is the signing authority's ID), and the JWT-SVIDs and
// WIT-SVIDs it handed out that have not expired (by key ID), whether still
// cached or not: workloads may still present them. Ordered by kind and ID.
func (c *Cache) HeldAuthorities(now time.Time) []*ferrypb.HeldAuthority {
	held := map[[2]string]*ferrypb.HeldAuthority{}
	add := func(kind, id string, n uint32, exp time.Time) {
		if id == "" || !now.Before(exp) {
			return
		}
		k := [2]string{kind, id}
		h := held[k]
		if h == nil {
			h = &ferrypb.HeldAuthority{Kind: kind, AuthorityId: id}
			held[k] = h
		}
		h.Count += n
		h.ExpiresAt = max(h.ExpiresAt, exp.Unix())
	}
	c.mu.Lock()
	for _, es := range c.entries {
		if s := es.svid; s != nil {
			add(KindX509, hex.EncodeToString(s.chain[0].AuthorityKeyId), 1, s.notAfter)
		}
	}
	c.mu.Unlock()
	for _, t := range []*tokenCache{c.jwts, c.wits} {
		for kid, h := range t.handedOut(now) {
			add(KindJWT, kid, h.count, h.expires)
		}
	}
	out := make([]*ferrypb.HeldAuthority, 0, len(held))
	for _, h := range held {
		out = append(out, h)
	}
	SortHeld(out)
	return out
}

// SortHeld orders held authorities by kind, then ID.
func SortHeld(hs []*ferrypb.HeldAuthority) {
	slices.SortFunc(hs, func(a, b *ferrypb.HeldAuthority) int {
		if c := strings.Compare(a.Kind, b.Kind); c != 0 {
			return c
		}
		return strings.Compare(a.AuthorityId, b.AuthorityId)
	})
}

// HeldChanged receives a value (one pending at most) whenever what
// HeldAuthorities returns may have changed: an SVID was minted or dropped.
func (c *Cache) HeldChanged() <-chan struct{} { return c.heldKick }
