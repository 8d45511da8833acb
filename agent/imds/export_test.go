package imds

// WithQueuedHook returns c with f called each time a request starts waiting
// for a slot.
func WithQueuedHook(c Config, f func()) Config {
	c.queued = f
	return c
}
