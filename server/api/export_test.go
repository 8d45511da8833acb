package api

// OnResumeWait makes d call f each time a Watch starts waiting for this node
// to reach a replica's revision.
func OnResumeWait(d *Directory, f func(rev uint64)) {
	d.resumeWaiting.Store(&f)
}
