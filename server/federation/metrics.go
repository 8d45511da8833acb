package federation

import (
	"fmt"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the refresher's Prometheus series, by foreign trust domain. A
// nil *metrics records nothing.
type metrics struct {
	refreshes   *prometheus.CounterVec
	sequence    *prometheus.GaugeVec
	lastSuccess *prometheus.GaugeVec
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	if reg == nil {
		return nil, nil
	}
	m := &metrics{
		refreshes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ferry_federation_bundle_refreshes_total",
			Help: "Federated bundle refreshes on this node, by trust domain and result (success, failure).",
		}, []string{"trust_domain", "result"}),
		sequence: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "ferry_federation_bundle_sequence",
			Help: "Sequence number of the federated bundle held after the last successful refresh.",
		}, []string{"trust_domain"}),
		lastSuccess: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "ferry_federation_bundle_last_success_timestamp_seconds",
			Help: "Unix time of the last successful refresh of a federated bundle.",
		}, []string{"trust_domain"}),
	}
	for _, c := range []prometheus.Collector{m.refreshes, m.sequence, m.lastSuccess} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("federation: metrics: %w", err)
		}
	}
	return m, nil
}

func (m *metrics) success(td string, seq uint64, at time.Time) {
	if m == nil {
		return
	}
	m.refreshes.WithLabelValues(td, "success").Inc()
	m.sequence.WithLabelValues(td).Set(float64(seq))
	m.lastSuccess.WithLabelValues(td).Set(float64(at.Unix()))
}

func (m *metrics) failure(td string) {
	if m == nil {
		return
	}
	m.refreshes.WithLabelValues(td, "failure").Inc()
}

func (m *metrics) forget(td string) {
	if m == nil {
		return
	}
	m.refreshes.DeleteLabelValues(td, "success")
	m.refreshes.DeleteLabelValues(td, "failure")
	m.sequence.DeleteLabelValues(td)
	m.lastSuccess.DeleteLabelValues(td)
}
