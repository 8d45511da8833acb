package interop

import (
	"fmt"
	"os"
	"testing"
)

// This module stands apart from ferry's (it builds the binary, as a user
// would), so it keeps its own copy of the rule internal/roottest applies:
// a security test that cannot run skips only where no one requires it to
// run; under CI=true or FERRY_REQUIRE_ROOT_TESTS=1 it fails.

// requireRoot skips or fails tb unless the test runs as root.
func requireRoot(tb testing.TB) {
	tb.Helper()
	if os.Geteuid() != 0 {
		skipSecurity(tb, "needs root to act as other users (running as uid %d)", os.Geteuid())
	}
}

// skipSecurity skips tb with the reason given, or fails it when security
// tests are required to run.
func skipSecurity(tb testing.TB, format string, args ...any) {
	tb.Helper()
	reason := fmt.Sprintf(format, args...)
	if os.Getenv("CI") == "true" || os.Getenv("FERRY_REQUIRE_ROOT_TESTS") == "1" {
		tb.Fatalf("security test cannot run: %s (CI=true or FERRY_REQUIRE_ROOT_TESTS=1 makes this a failure)", reason)
	}
	tb.Skipf("security test skipped: %s", reason)
}
