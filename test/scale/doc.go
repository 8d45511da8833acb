// Package scale is ferry's fleet-scale harness: real `ferry server`
// processes (one node or three) and one load process that runs N simulated
// agents over the real agent API. Each simulated agent is the agent's own
// session (agent/session): mutual TLS with its agent X509-SVID, attestation
// (x509pop with node certificates from a test CA, or a join token), the
// authorized-entry stream with its reconnects and failover between servers,
// agent SVID renewal at half-life, and a workload whose X509-SVID it keeps
// signed. In place of the agent's cache a sink checks every entry it is sent
// against what the agent may have, and the harness checks, whenever writes
// have settled, that every agent holds exactly its entries at their
// acknowledged revisions.
//
// `make scale` runs it and prints the figures (docs/scale.md); a small
// configuration runs in CI. It fails on a correctness violation, never on a
// timing. Knobs (environment):
//
//	FERRY_SCALE=1             run at all (set by make scale)
//	SCALE_NODES               servers: 1 (restart) or 3 (failover, whole-cluster restart); default 1
//	SCALE_AGENTS              simulated agents (default 1000)
//	SCALE_JOIN_SHARE          share attesting with join tokens, the rest x509pop (default 0.1)
//	SCALE_ENTRIES_PER_AGENT   entries parented on each agent (default 10)
//	SCALE_GROUPS, SCALE_GROUP_ENTRIES  node aliases (x509pop:san:group:gNNN) and entries on each (10, 5)
//	SCALE_FLEET_ENTRIES       entries on the fleet alias, which every x509pop agent matches (2)
//	SCALE_IDLE_ENTRIES        entries for agents that never connect (0)
//	SCALE_CHURN, SCALE_CHURN_ROUNDS    entries created and deleted per round, rounds (10000, 3)
//	SCALE_PROBES, SCALE_FANOUT_PROBES  timed changes for one agent, for every agent (20, 3)
//	SCALE_WRITES, SCALE_WRITERS        timed single-entry writes and writers (300, 8)
//	SCALE_STORM_CSRS          CSRs each agent sends at once in the CSR storm (1)
//	SCALE_ATTEST_PARALLEL     agents attesting at once (64)
//	SCALE_AGENT_TTL           agent SVID lifetime (1h; renewed at half)
//	SCALE_SVID_TTL            workload SVID lifetime in seconds (0: the server's default)
//	SCALE_REST_SECONDS        the at-rest CPU window (10)
//	SCALE_RAFT_MULTIPLIER     the servers' cluster.raft_multiplier (0: their default, 1)
//	SCALE_PROFILE             save the servers' heap profile at rest, CPU profiles (rest, fan-out, writes, failover, restart) and logs here
//	SCALE_OUT                 also write the figures as JSON to this file
package scale
