package workloadapi

import (
	"bytes"
	"log/slog"
	"testing"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// TestFitDescriptors: MaxConnections is lowered to what the descriptor limit
// holds at descriptorsPerConn each, and left alone when it fits.
func TestFitDescriptors(t *testing.T) {
	var rl unix.Rlimit
	require.NoError(t, unix.Getrlimit(unix.RLIMIT_NOFILE, &rl))
	fit := int((int64(rl.Cur) - reservedDescriptors) / descriptorsPerConn)
	var buf bytes.Buffer
	log := slog.New(slog.NewTextHandler(&buf, nil))

	l := fitDescriptors(Limits{MaxConnections: 1 << 30, MaxConnectionsPerUID: 1 << 29}, log)
	require.Equal(t, max(fit, 1), l.MaxConnections)
	require.LessOrEqual(t, l.MaxConnectionsPerUID, l.MaxConnections)
	require.Contains(t, buf.String(), "max_connections lowered to fit the descriptor limit")

	buf.Reset()
	l = fitDescriptors(Limits{MaxConnections: 1, MaxConnectionsPerUID: 1}, log)
	require.Equal(t, 1, l.MaxConnections)
	require.Empty(t, buf.String())
}
