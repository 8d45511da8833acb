package roottest_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ferry-id/ferry/internal/roottest"
)

// TestSkipRecordedAndFailsWhenRequired runs a child test that skips as a
// non-root test would, and checks that the skip is logged and that it turns
// into a failure when security tests are required.
func TestSkipRecordedAndFailsWhenRequired(t *testing.T) {
	if os.Getenv("ROOTTEST_CHILD") == "1" {
		roottest.Skipf(t, "child reason %d", 7)
		return
	}
	for _, required := range []bool{false, true} {
		log := filepath.Join(t.TempDir(), "skips")
		cmd := exec.Command(os.Args[0], "-test.run", "^TestSkipRecordedAndFailsWhenRequired$", "-test.v")
		env := []string{"ROOTTEST_CHILD=1", "FERRY_SECURITY_SKIP_LOG=" + log, "CI=false", "FERRY_REQUIRE_ROOT_TESTS=0"}
		if required {
			env = append(env, "FERRY_REQUIRE_ROOT_TESTS=1")
		}
		cmd.Env = append(os.Environ(), env...)
		out, err := cmd.CombinedOutput()
		if required != (err != nil) {
			t.Fatalf("required=%v: child exit %v, output:\n%s", required, err, out)
		}
		b, rerr := os.ReadFile(log)
		if rerr != nil || !strings.Contains(string(b), "TestSkipRecordedAndFailsWhenRequired: child reason 7") {
			t.Fatalf("required=%v: skip log %q (%v)", required, b, rerr)
		}
	}
}
