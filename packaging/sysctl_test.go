package packaging

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Every setting names a key this kernel has (a typo would be skipped at
// boot with only a log line), and has a comment saying why.
func TestSysctlFile(t *testing.T) {
	lines := strings.Split(readFile(t, "nginx/sysctl/60-pushrelay-frontend.conf"), "\n")
	settings := 0
	for i, line := range lines {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		key, value, ok := strings.Cut(line, "=")
		if !ok || strings.TrimSpace(value) == "" {
			t.Errorf("line %d: %q is not key = value", i+1, line)
			continue
		}
		settings++
		key = strings.TrimSpace(key)
		optional := strings.HasPrefix(key, "-")
		key = strings.TrimPrefix(key, "-")
		if i == 0 || !strings.HasPrefix(strings.TrimSpace(lines[i-1]), "#") {
			t.Errorf("line %d: %s has no comment above it", i+1, key)
		}
		path := filepath.Join("/proc/sys", strings.ReplaceAll(key, ".", "/"))
		if _, err := os.Stat(path); err != nil && !optional {
			t.Errorf("line %d: %s: %v", i+1, key, err)
		}
	}
	if settings < 10 {
		t.Errorf("only %d settings", settings)
	}
}
