package packaging

import (
	"regexp"
	"strings"
	"testing"
	"time"
)

// The man page documents every command the binary's own help lists.
func TestManPageCoversEveryCommand(t *testing.T) {
	help := mustRun(t, time.Minute, nil, relayBinary(t), "help")
	page := readFile(t, "packaging/pushrelay.1.md")
	commands := regexp.MustCompile(`(?m)^  ([a-z][a-z-]*)\b`).FindAllStringSubmatch(help, -1)
	if len(commands) < 3 {
		t.Fatalf("found %d commands in help:\n%s", len(commands), help)
	}
	for _, c := range commands {
		if !strings.Contains(page, "**"+c[1]+"**") && !strings.Contains(page, "**"+c[1]+" ") {
			t.Errorf("command %q is not in pushrelay.1.md", c[1])
		}
	}
}
