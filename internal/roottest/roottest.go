// Package roottest keeps the tests that guard the local trust boundary from
// passing silently. Such a test acts as other users (processes of another
// uid, files chowned to them), which needs root. On a machine where it cannot
// run, Require and Skipf skip it, record why, and, when CI=true or
// FERRY_REQUIRE_ROOT_TESTS=1 is set, fail it instead: a security suite that
// ran nothing must not report ok.
//
// Every skip is appended to the file named by FERRY_SECURITY_SKIP_LOG, when
// set, one line per test, so that `make test` can say how many security tests
// were skipped and why.
package roottest

import (
	"fmt"
	"os"
	"sync"
	"testing"
)

// Require skips (or, when required, fails) t unless the test runs as root.
func Require(t testing.TB) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	Skipf(t, "needs root to act as other users (running as uid %d)", os.Geteuid())
}

// Skipf skips t with the reason given, records the skip, and fails t instead
// when security tests are required to run (see Required).
func Skipf(t testing.TB, format string, args ...any) {
	t.Helper()
	reason := fmt.Sprintf(format, args...)
	record(t.Name(), reason)
	if Required() {
		t.Fatalf("security test cannot run: %s (CI=true or FERRY_REQUIRE_ROOT_TESTS=1 makes this a failure)", reason)
	}
	t.Skipf("security test skipped: %s", reason)
}

// Required reports whether security tests must run rather than skip: when
// CI=true or FERRY_REQUIRE_ROOT_TESTS=1.
func Required() bool {
	return os.Getenv("CI") == "true" || os.Getenv("FERRY_REQUIRE_ROOT_TESTS") == "1"
}

var logMu sync.Mutex

func record(name, reason string) {
	path := os.Getenv("FERRY_SECURITY_SKIP_LOG")
	if path == "" {
		return
	}
	logMu.Lock()
	defer logMu.Unlock()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return
	}
	defer f.Close()
	fmt.Fprintf(f, "%s: %s\n", name, reason)
}
