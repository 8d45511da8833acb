package workloadapi_test

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	ferrywl "github.com/ferry-id/ferry/agent/workloadapi"
	"github.com/ferry-id/ferry/attestors/workload"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

// kindsRecorder is a unix attestor stand-in that records the kinds it was
// asked for.
type kindsRecorder struct{ got []workload.Kinds }

func (r *kindsRecorder) Name() string { return "unix" }
func (r *kindsRecorder) Attest(_ context.Context, _ int32, k workload.Kinds) ([]*ferrypb.Selector, error) {
	r.got = append(r.got, k)
	return []*ferrypb.Selector{{Type: "unix", Value: "uid:1000"}}, nil
}

type staticKinds map[string]bool

func (k staticKinds) SelectorKinds() map[string]bool { return k }

// Attestors are asked for the kinds in use only once they are known: a
// caller attested while the agent does not know its entries yet gets every
// selector, since those entries may use any.
func TestWorkloadAttestorsKinds(t *testing.T) {
	for name, tc := range map[string]struct {
		src     ferrywl.KindsSource
		wantAll bool
		want    workload.Kinds
	}{
		"no source":        {src: nil, wantAll: true},
		"not known yet":    {src: staticKinds(nil), wantAll: true},
		"none in use":      {src: staticKinds{}, want: workload.Kinds{}},
		"unix:uid in use":  {src: staticKinds{"unix:uid": true}, want: workload.Kinds{"unix:uid": {}}},
		"false is not use": {src: staticKinds{"unix:uid": true, "unix:gid": false}, want: workload.Kinds{"unix:uid": {}}},
	} {
		t.Run(name, func(t *testing.T) {
			r := &kindsRecorder{}
			sels, err := ferrywl.WorkloadAttestors(tc.src, r).Attest(context.Background(), 1)
			require.NoError(t, err)
			require.Len(t, sels, 1)
			require.Len(t, r.got, 1)
			if tc.wantAll {
				assert.Nil(t, r.got[0], "every kind")
			} else {
				assert.Equal(t, tc.want, r.got[0])
			}
		})
	}
}
