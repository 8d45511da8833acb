package cache

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"net/url"
	"time"

	"github.com/ferry-id/ferry/proto/ferrypb"
)

// rotationJitter is the share of half an SVID's lifetime by which its
// rotation time is moved, either way, so that SVIDs minted together are not
// all renewed in the same instant.
const rotationJitter = 0.1

// rotationSlack lets one pass also rotate the SVIDs due shortly after it, so
// that rotations spread by jitter cost a bounded number of passes.
const rotationSlack = 500 * time.Millisecond

// job is one entry taken from the queue for a signing batch.
type job struct {
	es    *entryState
	gen   uint64
	entry *ferrypb.Entry
	key   *ecdsa.PrivateKey
	chain []*x509.Certificate
	err   error
}

// signLoop sends queued entries to the Signer, up to the batch size per
// call. Demand that arrives while a call is in flight is collected into the
// next call, so many concurrent subscribers cost few calls.
func (c *Cache) signLoop(ctx context.Context) {
	kick(c.signKick) // work queued before Run started
	for {
		select {
		case <-ctx.Done():
			return
		case <-c.signKick:
		}
		for ctx.Err() == nil {
			jobs := c.takeBatch()
			if len(jobs) == 0 {
				break
			}
			c.signBatch(ctx, jobs)
		}
	}
}

func (c *Cache) takeBatch() []job {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []job
	for len(c.queue) > 0 && len(out) < c.batchSize {
		es := c.queue[0]
		c.queue[0] = nil
		c.queue = c.queue[1:]
		es.queued = false
		if es.deleted {
			continue
		}
		es.inflight = true
		out = append(out, job{es: es, gen: es.gen, entry: es.entry})
	}
	if len(c.queue) == 0 {
		c.queue = nil
	}
	return out
}

// signBatch makes keys and CSRs for jobs, outside the lock, and sends them
// in one call.
func (c *Cache) signBatch(ctx context.Context, jobs []job) {
	reqs := make([]SignRequest, 0, len(jobs))
	idx := make([]int, 0, len(jobs)) // reqs[i] is for jobs[idx[i]]
	for i := range jobs {
		j := &jobs[i]
		j.key, j.err = newKeyAndCSR(j.entry, &reqs)
		if j.err == nil {
			idx = append(idx, i)
		}
	}
	var callErr error
	if len(reqs) > 0 {
		sctx, cancel := context.WithTimeout(ctx, c.signTimeout)
		results, err := c.signer.SignX509SVIDs(sctx, reqs)
		cancel()
		switch {
		case err != nil:
			callErr = fmt.Errorf("cache: sign X509-SVIDs: %w", err)
		case len(results) != len(reqs):
			callErr = fmt.Errorf("cache: sign X509-SVIDs: %d results for %d requests", len(results), len(reqs))
		default:
			for i, r := range results {
				j := &jobs[idx[i]]
				if r.Err != nil {
					j.err = fmt.Errorf("cache: sign X509-SVID for entry %s: %w", j.entry.GetId(), r.Err)
					continue
				}
				if j.err = checkChain(r.Chain, j.key, j.entry); j.err == nil {
					j.chain = r.Chain
				}
			}
		}
	}
	if callErr != nil {
		c.log.Warn("X509-SVID signing failed; cached SVIDs are still served", "csrs", len(reqs), "error", callErr)
		for i := range jobs {
			if jobs[i].err == nil {
				jobs[i].err = callErr
			}
		}
	}
	c.finishBatch(jobs, callErr != nil)
}

// finishBatch records the outcome of a batch and tells the subscribers.
func (c *Cache) finishBatch(jobs []job, callFailed bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.clock.Now()
	if callFailed {
		c.batchSize = max(1, c.batchSize/2)
	} else {
		c.batchSize = min(c.maxBatch, c.batchSize*2)
	}
	changed := make([]*entryState, 0, len(jobs))
	for i := range jobs {
		j := &jobs[i]
		es := j.es
		es.inflight = false
		if es.deleted {
			continue
		}
		if es.gen != j.gen {
			// The entry changed in a way the SVID reflects while it was
			// being signed: sign the new version.
			if es.subs > 0 || c.recentlyUsed(es, now) {
				c.demandLocked(es, now)
			}
			continue
		}
		if j.err != nil {
			es.failures++
			es.lastErr = j.err
			es.nextAttempt = now.Add(c.backoff(es.failures))
			if !callFailed {
				c.log.Warn("X509-SVID signing failed", "entry_id", es.entry.GetId(), "spiffe_id", es.entry.GetSpiffeId(), "failures", es.failures, "error", j.err)
			}
		} else {
			es.svid = newSVIDState(j.chain, j.key)
			// Signed before its authority was tainted: replace it too.
			c.rotateIfTaintedLocked(es.svid, c.taintedX509, now)
			es.failures = 0
			es.lastErr = nil
			es.nextAttempt = time.Time{}
		}
		changed = append(changed, es)
	}
	c.svidsChangedLocked(changed, now)
	kick(c.schedKick)
}

func (c *Cache) recentlyUsed(es *entryState, now time.Time) bool {
	return !es.lastUsed.IsZero() && now.Sub(es.lastUsed) < c.idle
}

// backoff is the wait after the n-th consecutive failure: RetryMin doubled
// per failure up to RetryMax, with ±10% jitter.
func (c *Cache) backoff(n int) time.Duration {
	d := c.retryMax
	if n < 32 {
		if b := c.retryMin << (n - 1); b > 0 && b < d {
			d = b
		}
	}
	return time.Duration(float64(d) * (0.9 + 0.2*mrand.Float64()))
}

func newSVIDState(chain []*x509.Certificate, key *ecdsa.PrivateKey) *svidState {
	leaf := chain[0]
	half := leaf.NotAfter.Sub(leaf.NotBefore) / 2
	jitter := time.Duration((2*mrand.Float64() - 1) * rotationJitter * float64(half))
	// Encoded once here, served in every Workload API response for this SVID.
	// A P-256 key always encodes; if it did not, responses encode it
	// themselves and report the error.
	keyDER, _ := x509.MarshalPKCS8PrivateKey(key)
	n := 0
	for _, c := range chain {
		n += len(c.Raw)
	}
	chainDER := make([]byte, 0, n)
	for _, c := range chain {
		chainDER = append(chainDER, c.Raw...)
	}
	return &svidState{
		chain:    chain,
		key:      key,
		chainDER: chainDER,
		keyDER:   keyDER,
		notAfter: leaf.NotAfter,
		rotateAt: leaf.NotBefore.Add(half + jitter),
	}
}

// newKeyAndCSR makes a P-256 key for entry and appends its CSR to reqs. The
// CSR names the entry's SPIFFE ID for readability only: the server takes the
// ID from the entry.
func newKeyAndCSR(entry *ferrypb.Entry, reqs *[]SignRequest) (*ecdsa.PrivateKey, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("cache: generate key: %w", err)
	}
	tmpl := &x509.CertificateRequest{}
	if u, err := url.Parse(entry.GetSpiffeId()); err == nil && u.Scheme == "spiffe" {
		tmpl.URIs = []*url.URL{u}
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		return nil, fmt.Errorf("cache: create CSR: %w", err)
	}
	*reqs = append(*reqs, SignRequest{EntryID: entry.GetId(), CSR: csr})
	return key, nil
}

// checkChain makes sure the server signed what was asked: our key, the
// entry's SPIFFE ID as the only URI SAN.
func checkChain(chain []*x509.Certificate, key *ecdsa.PrivateKey, entry *ferrypb.Entry) error {
	if len(chain) == 0 || chain[0] == nil {
		return errors.New("cache: signer returned an empty chain")
	}
	leaf := chain[0]
	if !key.PublicKey.Equal(leaf.PublicKey) {
		return fmt.Errorf("cache: X509-SVID for entry %s does not hold the key sent", entry.GetId())
	}
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != entry.GetSpiffeId() {
		return fmt.Errorf("cache: X509-SVID for entry %s does not name %s", entry.GetId(), entry.GetSpiffeId())
	}
	if !leaf.NotBefore.Before(leaf.NotAfter) {
		return fmt.Errorf("cache: X509-SVID for entry %s has an empty validity period", entry.GetId())
	}
	return nil
}
