// Package state holds the ferry server's replicated state: the tables every server
// node keeps in memory, the finite state machine that changes them from the Raft log,
// and the change feed that agents and bridges stream from.
//
// The contract with hashicorp/raft (see raft.FSM):
//   - Apply and ApplyBatch are called by one goroutine, in log order. They read no
//     clock, no randomness and no local configuration: everything they need is in the
//     command, so every node reaches the same state from the same log.
//   - Snapshot runs concurrently with later Apply calls. It captures an immutable
//     go-memdb read transaction and returns at once; Persist writes that view out.
//   - Restore replaces the whole state with a snapshot's contents and swaps it in
//     under the store's lock; watchers see ErrCompacted and reload.
//
// Every row carries `revision`, the Raft index of the command that last changed it.
// Every command carries a request ID; a request ID seen before is answered with the
// stored result and not applied again, because raft's ErrLeadershipLost means "maybe
// applied" and the caller must be free to retry.
package state
