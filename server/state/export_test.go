package state

// FeedWaiters is how many watchers are blocked in ChangesSince for a change.
func (s *Store) FeedWaiters() int {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return int(s.feed.waiting.Load())
}
