package interop

import (
	"context"
	"encoding/xml"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// h2specDeviations are the h2spec cases the agent's Workload API does not
// pass, each with why. h2spec sends plain HTTP/2 requests (GET /, no gRPC
// content type) and some cases expect an ordinary response with a body; a
// gRPC server answers every such request with an error (HTTP 415 and a gRPC
// status, END_STREAM on the HEADERS), so those cases do not apply. The
// others are where grpc-go's server is more lenient than RFC 9113: it
// ignores a frame the RFC says to treat as an error, or refuses a malformed
// request with an error response instead of RST_STREAM. In every one the
// offending frame is dropped or the request refused; none is served, none
// holds memory past the frame. Any other failure fails TestH2Spec.
var h2specDeviations = map[string]string{
	// Not applicable: a gRPC server answers h2spec's non-gRPC request at once with an error, no DATA.
	"generic/2 | Sends a WINDOW_UPDATE frame on half-closed (remote) stream":                                           "expects a DATA response to GET /",
	"generic/2 | Sends a PRIORITY frame on half-closed (remote) stream":                                                "expects a DATA response to GET /",
	"http2/5.1.2 | Sends HEADERS frames that causes their advertised concurrent stream limit to be exceeded":           "each request is answered (415) and closed at once, so the streams are never concurrent; calls held open are refused past the limit (test/e2e TestHostileExhaustion)",
	"http2/6.9.1 | Sends multiple WINDOW_UPDATE frames increasing the flow control window to above 2^31-1 on a stream": "the stream was already answered and reset (415) when the overflow arrives",
	"http2/6.10 | Sends multiple CONTINUATION frames preceded by a HEADERS frame":                                      "its header list is larger than max_header_list_bytes (8 KiB): reset with RST_STREAM, by design",
	// grpc-go ignores these frames instead of a connection or stream error.
	"http2/5.1 | idle: Sends a DATA frame":                                                                  "grpc-go ignores DATA for a stream it does not know",
	"http2/5.1 | idle: Sends a RST_STREAM frame":                                                            "grpc-go ignores RST_STREAM for a stream it does not know",
	"http2/5.1 | idle: Sends a WINDOW_UPDATE frame":                                                         "grpc-go ignores WINDOW_UPDATE for a stream it does not know",
	"http2/5.1 | half closed (remote): Sends a DATA frame":                                                  "grpc-go answers (415) and ignores the later DATA",
	"http2/5.1 | closed: Sends a DATA frame after sending RST_STREAM frame":                                 "grpc-go ignores DATA for a stream it has forgotten",
	"http2/5.1 | closed: Sends a DATA frame":                                                                "grpc-go ignores DATA for a stream it has forgotten",
	"http2/6.1 | Sends a DATA frame on the stream that is not in \"open\" or \"half-closed (local)\" state": "grpc-go ignores DATA for a stream it has forgotten",
	"http2/6.4 | Sends a RST_STREAM frame on a idle stream":                                                 "grpc-go ignores RST_STREAM for a stream it does not know",
	"http2/5.3.1 | Sends HEADERS frame that depend on itself":                                               "grpc-go ignores priorities (RFC 9113 deprecates them)",
	"http2/5.3.1 | Sends PRIORITY frame that depend on itself":                                              "grpc-go ignores priorities (RFC 9113 deprecates them)",
	"http2/6.5.2 | SETTINGS_ENABLE_PUSH (0x2): Sends the value other than 0 or 1":                           "grpc-go never pushes and ignores the value",
	"http2/6.5.2 | SETTINGS_MAX_FRAME_SIZE (0x5): Sends the value below the initial value":                  "grpc-go keeps its own frame size (16 KiB), never below the minimum",
	"http2/6.5.2 | SETTINGS_MAX_FRAME_SIZE (0x5): Sends the value above the maximum allowed frame size":     "grpc-go keeps its own frame size (16 KiB)",
	"http2/6.9.1 | Sends multiple WINDOW_UPDATE frames increasing the flow control window to above 2^31-1":  "grpc-go caps its send window instead of a connection error",
	"http2/8.2 | Sends a PUSH_PROMISE frame":                                                                "grpc-go ignores PUSH_PROMISE from a client",
	// grpc-go refuses these malformed requests with an error response (HTTP 4xx, gRPC status) rather than RST_STREAM.
	"http2/8.1.2.2 | Sends a HEADERS frame that contains the TE header field with any value other than \"trailers\"":                                         "refused with an error response, not RST_STREAM",
	"http2/8.1.2.3 | Sends a HEADERS frame with empty \":path\" pseudo-header field":                                                                         "refused with an error response, not RST_STREAM",
	"http2/8.1.2.3 | Sends a HEADERS frame that omits \":method\" pseudo-header field":                                                                       "refused with an error response, not RST_STREAM",
	"http2/8.1.2.3 | Sends a HEADERS frame that omits \":scheme\" pseudo-header field":                                                                       "refused with an error response, not RST_STREAM",
	"http2/8.1.2.3 | Sends a HEADERS frame that omits \":path\" pseudo-header field":                                                                         "refused with an error response, not RST_STREAM",
	"http2/8.1.2.6 | Sends a HEADERS frame with the \"content-length\" header field which does not equal the DATA frame payload length":                      "refused with an error response, not RST_STREAM",
	"http2/8.1.2.6 | Sends a HEADERS frame with the \"content-length\" header field which does not equal the sum of the multiple DATA frames payload length": "refused with an error response, not RST_STREAM",
}

// h2specReport is the part of h2spec's JUnit report the test reads.
type h2specReport struct {
	Suites []struct {
		Cases []struct {
			Package string    `xml:"package,attr"`
			Name    string    `xml:"classname,attr"`
			Error   *string   `xml:"error"`
			Failure *string   `xml:"failure"`
			Skipped *struct{} `xml:"skipped"`
		} `xml:"testcase"`
	} `xml:"testsuite"`
}

// TestH2Spec runs h2spec (pinned in ./h2spec/go.mod) against the agent's
// Workload API socket, through a TCP-to-unix relay since h2spec speaks
// only TCP. Every case must pass but the documented deviations, and the
// agent must serve calls afterwards.
func TestH2Spec(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "h2spec")
	build := exec.Command("go", "build", "-o", bin, "github.com/summerwind/h2spec/cmd/h2spec")
	build.Dir = "h2spec"
	out, err := build.CombinedOutput()
	require.NoError(t, err, "building h2spec: %s", out)

	socket := strings.TrimPrefix(dev.env["SPIFFE_ENDPOINT_SOCKET"], "unix://")
	port := relay(t, socket)
	report := filepath.Join(t.TempDir(), "h2spec.xml")
	// h2spec exits non-zero when any case fails; the report says which.
	run := exec.Command(bin, "-h", "127.0.0.1", "-p", strconv.Itoa(port), "-o", "3", "-j", report)
	out, _ = run.CombinedOutput()
	data, err := os.ReadFile(report)
	require.NoError(t, err, "h2spec wrote no report:\n%s", out)
	var rep h2specReport
	require.NoError(t, xml.Unmarshal(data, &rep))

	var passed, deviated, skipped int
	var unexpected []string
	for _, s := range rep.Suites {
		for _, c := range s.Cases {
			key := c.Package + " | " + c.Name
			switch {
			case c.Skipped != nil:
				skipped++
			case c.Error == nil && c.Failure == nil:
				passed++
				if _, ok := h2specDeviations[key]; ok {
					t.Logf("h2spec: %s now passes: remove it from h2specDeviations", key)
				}
			default:
				if _, ok := h2specDeviations[key]; ok {
					deviated++
					continue
				}
				msg := c.Error
				if msg == nil {
					msg = c.Failure
				}
				unexpected = append(unexpected, key+": "+strings.ReplaceAll(*msg, "\n", " / "))
			}
		}
	}
	sort.Strings(unexpected)
	t.Logf("h2spec: %d passed, %d documented deviations, %d skipped by h2spec", passed, deviated, skipped)
	require.Positive(t, passed)
	require.Empty(t, unexpected, "h2spec cases failing that are not documented deviations:\n%s\n\nh2spec output:\n%s", strings.Join(unexpected, "\n"), out)

	// The agent still serves.
	conn, err := grpc.NewClient(dev.env["SPIFFE_ENDPOINT_SOCKET"], grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	defer conn.Close()
	ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(context.Background(), "workload.spiffe.io", "true"), 10*time.Second)
	defer cancel()
	_, err = workload.NewSpiffeWorkloadAPIClient(conn).FetchJWTSVID(ctx, &workload.JWTSVIDRequest{})
	require.Equal(t, codes.InvalidArgument, status.Code(err), "%v", err)
}

// relay accepts TCP connections on a loopback port and relays each to the
// unix socket at path, until the test ends.
func relay(t *testing.T, path string) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				u, err := net.Dial("unix", path)
				if err != nil {
					return
				}
				defer u.Close()
				done := make(chan struct{})
				go func() {
					defer close(done)
					if _, err := io.Copy(u, c); err != nil {
						// The agent closed: keep reading what h2spec
						// still sends, so that closing c sends a FIN
						// and not a reset, which would discard the
						// agent's last frames (its GOAWAY) before
						// h2spec reads them.
						_, _ = io.Copy(io.Discard, c)
					}
					_ = u.(*net.UnixConn).CloseWrite()
				}()
				_, _ = io.Copy(c, u)
				_ = c.(*net.TCPConn).CloseWrite()
				<-done // h2spec closes its side once it has read ours
			}()
		}
	}()
	return l.Addr().(*net.TCPAddr).Port
}
