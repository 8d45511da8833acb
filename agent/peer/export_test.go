package peer

// Internals exposed to the black-box tests.
var (
	ParseStartTime = parseStartTime
	LookupNetlink  = lookupNetlink
	LookupProcNet  = lookupProcNet
)
