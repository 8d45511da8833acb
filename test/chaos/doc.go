// Package chaos drives faults into a running ferry cluster and checks what
// survives them. It holds the fault-injecting network used by the chaos suite
// (a TCP proxy in front of every server's cluster address that can cut,
// blackhole and heal the links between chosen pairs of nodes) and the lookup
// that tells which node a proxied connection comes from. The campaign itself
// (leader kills, pauses, partitions, restarts, a follower catching up from a
// snapshot, and the checks and figures after each run) is in the package's
// tests; `make chaos` runs it.
package chaos
