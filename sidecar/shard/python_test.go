package shard_test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// pythonHarness runs the README's snippet on every row of the vectors file.
// shard(ch, 2**32) is the bare FNV-1a-32, and shard(ch) checks the default
// count of 1024.
const pythonHarness = `
import sys

def check(path):
    n = bad = 0
    with open(path, encoding="utf-8", newline="") as f:
        for line in f:
            line = line.rstrip("\n").removesuffix("\r")
            if not line or line.startswith("#"):
                continue
            ch, fnv, s1024, s5, s64 = line.split("\t")
            got = (shard(ch, 2**32), shard(ch), shard(ch, 5), shard(ch, 64))
            want = (int(fnv), int(s1024), int(s5), int(s64))
            n += 1
            if got != want:
                bad += 1
                print(f"mismatch for {ch!r}: (fnv1a32, of 1024, of 5, of 64) = {got}, want {want}")
    print(f"checked {n}")
    sys.exit(1 if bad else 0)

check(sys.argv[1])
`

// readmeSnippet returns the first python block of README.md's shard section:
// the shard function a producer pastes.
func readmeSnippet(t *testing.T) string {
	t.Helper()
	readme, err := os.ReadFile(filepath.Join(repoRoot(t), "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	section := regexp.MustCompile(`(?s)<!-- shard:begin -->(.*)<!-- shard:end -->`).FindSubmatch(readme)
	if section == nil {
		t.Fatal("README.md has no <!-- shard:begin --> ... <!-- shard:end --> section")
	}
	block := regexp.MustCompile("(?s)```python\n(.*?)```").FindSubmatch(section[1])
	if block == nil {
		t.Fatal("README.md's shard section has no ```python block")
	}
	return string(block[1])
}

func TestREADMEPythonSnippetMatchesTheContractVectors(t *testing.T) {
	python, err := exec.LookPath("python3")
	if err != nil {
		t.Skip("python3 not installed; the README's Python snippet is not checked")
	}
	vectors, rows := loadVectors(t)
	script := filepath.Join(t.TempDir(), "check_shard.py")
	if err := os.WriteFile(script, []byte(readmeSnippet(t)+pythonHarness), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.CommandContext(t.Context(), python, script, vectors).CombinedOutput()
	if err != nil {
		t.Fatalf("python3 %s: %v\n%s", script, err, out)
	}
	if want := fmt.Sprintf("checked %d", len(rows)); !strings.Contains(string(out), want) {
		t.Errorf("python output %q, want %q: it skipped rows", out, want)
	}
}
