package shard_test

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/pushrelay/pushrelay/sidecar/shard"
)

// vector is one row of shared/contract/shard-vectors.tsv: the values every
// producer, in any language, must compute for channel.
type vector struct {
	channel string
	fnv     uint32
	of1024  int
	of5     int
	of64    int
}

// repoRoot walks up from the package directory to the folder holding go.mod.
func repoRoot(t *testing.T) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("go.mod not found above the test directory")
		}
		dir = parent
	}
}

// vectorsPath is where CI puts the contract: a shared/ folder beside the
// repository's root, whatever the clone is called.
func vectorsPath(t *testing.T) string {
	return filepath.Join(repoRoot(t), "..", "shared", "contract", "shard-vectors.tsv")
}

func loadVectors(t *testing.T) (string, []vector) {
	t.Helper()
	path := vectorsPath(t)
	f, err := os.Open(path)
	if os.IsNotExist(err) {
		// In CI the contract must be checked: a checkout without shared/
		// would otherwise pass having verified nothing.
		if os.Getenv("CI") != "" {
			t.Fatalf("contract vectors absent at %s, and CI is set: the shard function is unchecked (put shared/ beside the repository)", path)
		}
		// Loud: without -v a skip says nothing, and a green run would hide
		// that the shard function was never checked against the contract.
		fmt.Fprintf(os.Stderr, "WARNING: %s skipped: contract vectors absent at %s; the shard function is NOT checked against the contract (CI fails here)\n", t.Name(), path)
		t.Skipf("contract vectors absent at %s (expected a shared/ folder beside the repository)", path)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()

	var out []vector
	sc := bufio.NewScanner(f)
	for line := 1; sc.Scan(); line++ {
		text := strings.TrimSuffix(sc.Text(), "\r")
		if text == "" {
			continue
		}
		if strings.HasPrefix(text, "#") {
			if want := "# channel\tfnv1a32\tshard_of_1024\tshard_of_5\tshard_of_64"; line == 1 && text != want {
				t.Fatalf("%s: header %q, want %q: the columns changed, update this test", path, text, want)
			}
			continue
		}
		f := strings.Split(text, "\t")
		if len(f) != 5 {
			t.Fatalf("%s:%d: %d fields, want 5", path, line, len(f))
		}
		var n [4]uint64
		for i := range n {
			if n[i], err = strconv.ParseUint(f[i+1], 10, 32); err != nil {
				t.Fatalf("%s:%d: field %d: %v", path, line, i+2, err)
			}
		}
		out = append(out, vector{f[0], uint32(n[0]), int(n[1]), int(n[2]), int(n[3])})
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	if len(out) == 0 {
		t.Fatalf("%s holds no vectors", path)
	}
	return path, out
}

func TestContractVectors(t *testing.T) {
	_, vs := loadVectors(t)
	for _, v := range vs {
		if got := shard.FNV1a32(v.channel); got != v.fnv {
			t.Errorf("FNV1a32(%q) = %d, want %d", v.channel, got, v.fnv)
		}
		for _, c := range []struct{ count, want int }{{1024, v.of1024}, {5, v.of5}, {64, v.of64}} {
			if got := shard.Of(v.channel, c.count); got != c.want {
				t.Errorf("Of(%q, %d) = %d, want %d", v.channel, c.count, got, c.want)
			}
		}
	}
	t.Logf("%d vectors checked", len(vs))
}
