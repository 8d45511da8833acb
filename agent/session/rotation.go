package session

import (
	"context"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/ferry-id/ferry/agent/cache"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

// Holder tells what the agent holds from its trust domain's authorities
// (*cache.Cache implements it).
type Holder interface {
	// HeldAuthorities lists, per authority, the unexpired SVIDs held at now.
	HeldAuthorities(now time.Time) []*ferrypb.HeldAuthority
	// HeldChanged receives a value whenever that may have changed.
	HeldChanged() <-chan struct{}
}

var _ Holder = (*cache.Cache)(nil)

// unimplementedRetry is how often an agent asks servers that take no
// reports again.
const unimplementedRetry = 5 * time.Minute

// reportSettle gathers a burst of changes (SVIDs signed one batch after
// another) into one report.
const reportSettle = time.Second

// applyTaint hands the own bundle's tainted authorities to the cache and
// schedules the replacement of the agent's own SVID when one of them signed
// it. A newly tainted authority is reported to the servers at once, with what
// the agent still holds from it, so an operator cannot revoke it on a stale
// report while the agent replaces its SVIDs.
func (s *Session) applyTaint(b *ferrypb.Bundle) {
	var certs []*x509.Certificate
	var kids []string
	for _, a := range b.X509Authorities {
		if !a.Tainted {
			continue
		}
		if c, err := x509.ParseCertificate(a.Certificate); err == nil {
			certs = append(certs, c)
		}
	}
	for _, k := range b.JwtAuthorities {
		if k.Tainted {
			kids = append(kids, k.KeyId)
		}
	}
	s.cfg.Sink.TaintAuthorities(certs, kids)
	tainted := cache.AuthoritiesByID(certs)
	s.mu.Lock()
	fresh := false
	for id := range tainted {
		if s.tainted[id] == nil {
			fresh = true
		}
	}
	for _, k := range kids {
		if !s.taintedJWT[k] {
			fresh = true
		}
	}
	s.tainted = tainted
	s.taintedJWT = make(map[string]bool, len(kids))
	for _, k := range kids {
		s.taintedJWT[k] = true
	}
	s.mu.Unlock()
	if fresh {
		s.forceReport.Store(true)
		kick(s.reportKick)
	}
	s.checkOwnTaint()
}

// checkOwnTaint schedules the agent SVID's replacement, at a random moment
// within the taint jitter, when a tainted authority signed it.
func (s *Session) checkOwnTaint() {
	s.mu.Lock()
	if s.svid == nil || !s.renewBy.IsZero() || !cache.SignedByAny(s.svid.Certificates, s.tainted) {
		s.mu.Unlock()
		return
	}
	delay := cache.TaintJitterDelay(s.cfg.TaintJitter)
	s.renewBy = time.Now().Add(delay)
	s.mu.Unlock()
	s.log.Info("the agent SVID's authority is tainted: renewing it", "in", delay.Round(time.Millisecond))
	kick(s.renewKick)
}

// held is what the agent holds: the cache's SVIDs and tokens, and its own
// SVID.
func (s *Session) held(now time.Time) []*ferrypb.HeldAuthority {
	out := s.cfg.Holder.HeldAuthorities(now)
	s.mu.RLock()
	own := s.svid
	s.mu.RUnlock()
	if own == nil {
		return out
	}
	leaf := own.Certificates[0]
	id := hex.EncodeToString(leaf.AuthorityKeyId)
	if id == "" || !now.Before(leaf.NotAfter) {
		return out
	}
	for _, h := range out {
		if h.Kind == cache.KindX509 && h.AuthorityId == id {
			h.Count++
			h.ExpiresAt = max(h.ExpiresAt, leaf.NotAfter.Unix())
			return out
		}
	}
	out = append(out, &ferrypb.HeldAuthority{Kind: cache.KindX509, AuthorityId: id, Count: 1, ExpiresAt: leaf.NotAfter.Unix()})
	cache.SortHeld(out)
	return out
}

// needReport reports whether cur (sorted) tells the servers something sent
// did not: another set of authorities, or SVIDs from an authority lasting
// longer than reported. The authority whose SVIDs last longest (of each kind)
// is left out of the second rule: it is the one signing now, whose expiry
// moves with every renewal, and it cannot be revoked while it signs.
func needReport(sent, cur []*ferrypb.HeldAuthority) bool {
	if len(sent) != len(cur) {
		return true
	}
	latest := map[string]int64{}
	for _, h := range cur {
		latest[h.Kind] = max(latest[h.Kind], h.ExpiresAt)
	}
	for i, h := range cur {
		if h.Kind != sent[i].Kind || h.AuthorityId != sent[i].AuthorityId {
			return true
		}
		if h.ExpiresAt > sent[i].ExpiresAt && h.ExpiresAt < latest[h.Kind] {
			return true
		}
	}
	return false
}

// reportLoop keeps the servers' record of what this agent holds current: one
// report at start, then one whenever needReport says so, a held authority's
// last SVID expires, or an authority is newly tainted.
func (s *Session) reportLoop(ctx context.Context) {
	if s.cfg.Holder == nil {
		return
	}
	var sent []*ferrypb.HeldAuthority
	reported := false
	for attempt := 0; ; {
		now := time.Now()
		cur := s.held(now)
		force := s.forceReport.Swap(false)
		var wait time.Duration = -1
		if !reported || force || needReport(sent, cur) {
			if err := s.report(ctx, cur); err != nil {
				if ctx.Err() != nil {
					return
				}
				attempt++
				wait = backoff(attempt)
				if force {
					s.forceReport.Store(true)
				}
				if status.Code(err) == codes.Unimplemented {
					// Servers of an older release: ask again now and then,
					// they may be upgraded.
					wait = unimplementedRetry
					if attempt == 1 {
						s.log.Info("the servers take no reports of held authorities; revoking an authority will not wait for this agent", "error", err)
					}
				} else {
					s.log.Warn("reporting held authorities failed; retrying", "error", err, "in", wait.Round(time.Millisecond))
				}
			} else {
				sent, reported, attempt = cur, true, 0
			}
		}
		if wait < 0 {
			// Wake when the first held authority's SVIDs have all expired.
			for _, h := range cur {
				if d := time.Unix(h.ExpiresAt, 0).Sub(now); wait < 0 || d < wait {
					wait = max(d, 0)
				}
			}
		}
		var timer *time.Timer
		var expired <-chan time.Time
		if wait >= 0 {
			timer = time.NewTimer(wait + reportSettle)
			expired = timer.C
		}
		select {
		case <-ctx.Done():
		case <-s.cfg.Holder.HeldChanged():
		case <-s.reportKick:
		case <-expired:
		}
		if timer != nil {
			timer.Stop()
		}
		if err := sleep(ctx, reportSettle); err != nil {
			return
		}
	}
}

func (s *Session) report(ctx context.Context, held []*ferrypb.HeldAuthority) error {
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	_, err := s.agentClient().ReportAuthorities(rctx, &ferrypb.ReportAuthoritiesRequest{Authorities: held})
	if err == nil && s.log.Enabled(ctx, slog.LevelDebug) {
		var b strings.Builder
		for _, h := range held {
			fmt.Fprintf(&b, "%s:%s(%d until %s) ", h.Kind, h.AuthorityId, h.Count, time.Unix(h.ExpiresAt, 0).UTC().Format(time.TimeOnly))
		}
		s.log.Debug("held authorities reported", "held", strings.TrimSpace(b.String()))
	}
	return err
}

// kick wakes a loop without blocking; one pending wake-up is enough.
func kick(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}
