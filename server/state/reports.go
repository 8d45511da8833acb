package state

import (
	"fmt"

	"github.com/hashicorp/go-memdb"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	"github.com/ferry-id/ferry/proto/ferrypb"
)

// TableAgentReports holds each agent's last report of the authorities it
// holds SVIDs from (one row per agent, keyed by its SPIFFE ID). It is a table
// of its own, not a field of the node row, so a report wakes no entry stream.
const TableAgentReports = "agent_reports"

// Bounds of one report: an agent holds SVIDs from a few authorities at a
// time (the active and the retiring one of each kind, per server node).
const (
	MaxReportedAuthorities = 256
	maxAuthorityIDLen      = 128
)

func agentReportsTable() *memdb.TableSchema {
	return &memdb.TableSchema{
		Name: TableAgentReports,
		Indexes: map[string]*memdb.IndexSchema{
			"id": {Name: "id", Unique: true, Indexer: &memdb.StringFieldIndex{Field: "SpiffeId"}},
		},
	}
}

// ValidateAgentReport checks a report's authorities as the FSM will: a known
// kind, a non-empty bounded ID, each (kind, ID) once, at most
// MaxReportedAuthorities.
func ValidateAgentReport(as []*ferrypb.HeldAuthority) error {
	if len(as) > MaxReportedAuthorities {
		return fmt.Errorf("%d authorities (at most %d)", len(as), MaxReportedAuthorities)
	}
	seen := map[[2]string]bool{}
	for i, a := range as {
		if a.GetKind() != "x509" && a.GetKind() != "jwt" {
			return fmt.Errorf("authority %d: kind %q (want x509 or jwt)", i, a.GetKind())
		}
		if a.AuthorityId == "" || len(a.AuthorityId) > maxAuthorityIDLen {
			return fmt.Errorf("authority %d: authority_id must have 1 to %d characters", i, maxAuthorityIDLen)
		}
		k := [2]string{a.Kind, a.AuthorityId}
		if seen[k] {
			return fmt.Errorf("authority %d: %s %s listed twice", i, a.Kind, a.AuthorityId)
		}
		seen[k] = true
	}
	return nil
}

// putAgentReport replaces an attested agent's report.
func (a *applier) putAgentReport(p *ferrypb.AgentReportPut) *ferrypb.CommandResult {
	r := p.GetReport()
	if r == nil {
		return &ferrypb.CommandResult{Status: status(codes.InvalidArgument, "report is required")}
	}
	if a.node(r.SpiffeId) == nil {
		return &ferrypb.CommandResult{Status: status(codes.NotFound, "agent %s not found", r.SpiffeId)}
	}
	if err := ValidateAgentReport(r.Authorities); err != nil {
		return &ferrypb.CommandResult{Status: status(codes.InvalidArgument, "report of %s: %v", r.SpiffeId, err)}
	}
	row := proto.Clone(r).(*ferrypb.AgentReport)
	row.Revision = a.index
	a.upsert(TableAgentReports, row.SpiffeId, row)
	return &ferrypb.CommandResult{Status: ok()}
}

// deleteAgentReport drops an agent's report (the agent was evicted).
func (a *applier) deleteAgentReport(id string) {
	raw, err := a.txn.First(TableAgentReports, "id", id)
	must(err)
	if raw != nil {
		a.delete(TableAgentReports, id, raw.(*ferrypb.AgentReport))
	}
}

// AgentReports returns every agent's last report, by SPIFFE ID.
func (v *View) AgentReports() []*ferrypb.AgentReport {
	it, err := v.txn.Get(TableAgentReports, "id")
	if err != nil {
		return nil
	}
	var out []*ferrypb.AgentReport
	for raw := it.Next(); raw != nil; raw = it.Next() {
		out = append(out, raw.(*ferrypb.AgentReport))
	}
	return out
}

// AgentReport returns one agent's last report, or nil.
func (v *View) AgentReport(id string) *ferrypb.AgentReport {
	raw, err := v.txn.First(TableAgentReports, "id", id)
	if err != nil || raw == nil {
		return nil
	}
	return raw.(*ferrypb.AgentReport)
}
