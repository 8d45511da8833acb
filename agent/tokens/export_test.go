package tokens

// WaitFlight lets the black-box tests wait for a background refresh.
func (c *Cache) WaitFlight(k Key) { c.waitFlight(k) }
