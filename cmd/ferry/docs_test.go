package main

import (
	"os"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestDocsListSelectors: docs/cli.md shows the selector forms exactly as
// `ferry entry create --help` does (both from the attestors' declarations).
func TestDocsListSelectors(t *testing.T) {
	doc, err := os.ReadFile("../../docs/cli.md")
	require.NoError(t, err)
	var want strings.Builder
	for _, line := range strings.Split(strings.TrimRight(selectorHelp(), "\n"), "\n") {
		if line != "" {
			line = "  " + line
		}
		want.WriteString(line + "\n")
	}
	require.Contains(t, string(doc), want.String(), "update docs/cli.md's selector list from `ferry entry create --help`")
}
