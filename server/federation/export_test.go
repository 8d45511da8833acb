package federation

// Observe has r call following each time Run waits for a leadership change
// without leading, and workerStopped each time a trust domain's worker
// returns. Call it before Run.
func Observe(r *Refresher, following func(), workerStopped func(td string)) {
	r.observe.Store(&observer{following: following, workerStopped: workerStopped})
}
