package main

import (
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/pelletier/go-toml/v2"

	"github.com/pushrelay/pushrelay/sidecar/config"
	"github.com/pushrelay/pushrelay/sidecar/shard"
)

// parsePlan reads plan's output as the operator uses it: as TOML, comments
// and all, and the "# moved: N" last line.
func parsePlan(t *testing.T, out string, count int) (*shard.Map, int) {
	t.Helper()
	var file struct {
		Shards struct {
			Map map[string][]string `toml:"map"`
		} `toml:"shards"`
	}
	if err := toml.Unmarshal([]byte(out), &file); err != nil {
		t.Fatalf("plan output is not TOML: %v\n%s", err, out)
	}
	m, err := shard.ParseMap(count, file.Shards.Map)
	if err != nil {
		t.Fatalf("plan output is not a valid map: %v\n%s", err, out)
	}
	moved := -1
	if g := regexp.MustCompile(`\n# moved: (\d+)\n$`).FindStringSubmatch(out); g != nil {
		moved, _ = strconv.Atoi(g[1])
	}
	return m, moved
}

func TestPlanPrintsABalancedMapToPaste(t *testing.T) {
	rc, out, errOut := invoke("", "plan", "-hosts", "fe1,fe2,fe3", "-count", "10")
	if rc != 0 {
		t.Fatalf("rc %d: %s", rc, errOut)
	}
	m, moved := parsePlan(t, out, 10)
	for _, h := range []string{"fe1", "fe2", "fe3"} {
		if n := len(m.Owned(h)); n != 3 && n != 4 {
			t.Errorf("%s owns %d of 10 shards, want 3 or 4", h, n)
		}
	}
	if moved != -1 {
		t.Errorf("without -from there is nothing to move, yet a moved line was printed:\n%s", out)
	}
	if rc, out, _ := invoke("", "plan", "-hosts", "a,b"); rc != 0 || !strings.Contains(out, `a = ["0-511"]`) {
		t.Errorf("default count: rc %d, output:\n%s\nwant 1024 shards split in two", rc, out)
	}
}

func TestPlanFromAddsAHostMovingOnlyItsShards(t *testing.T) {
	from := tempConfig(t, "host = \"fe1\"\n"+fiveFrontendMap)
	rc, out, errOut := invoke("", "plan", "-hosts", "fe1,fe2,fe3,fe4,fe5,fe6", "-from", from)
	if rc != 0 {
		t.Fatalf("rc %d: %s", rc, errOut)
	}
	old, err := config.LoadShardMap(from)
	if err != nil {
		t.Fatal(err)
	}
	next, moved := parsePlan(t, out, 1024)
	if moved != shard.Moved(old, next) {
		t.Errorf("printed moved: %d, but %d shards changed owner", moved, shard.Moved(old, next))
	}
	if moved != len(next.Owned("fe6")) {
		t.Errorf("moved %d, want only the %d shards fe6 takes", moved, len(next.Owned("fe6")))
	}

	// The output pasted in place of the old table is a valid config for
	// the new frontend.
	pasted := "host = \"fe6\"\n" + out
	if _, err := config.Parse([]byte(pasted)); err != nil {
		t.Errorf("pasted plan is refused: %v\n%s", err, pasted)
	}
}

func TestPlanFromKeepsARemovedHostOwningNothing(t *testing.T) {
	from := tempConfig(t, "host = \"fe1\"\n"+fiveFrontendMap)
	rc, out, errOut := invoke("", "plan", "-hosts", "fe1,fe2,fe3,fe4", "-from", from)
	if rc != 0 {
		t.Fatalf("rc %d: %s", rc, errOut)
	}
	next, moved := parsePlan(t, out, 1024)
	if !next.Has("fe5") || len(next.Owned("fe5")) != 0 {
		t.Errorf("fe5 should stay listed with no shards so its relay reloads and drains:\n%s", out)
	}
	if moved != 204 {
		t.Errorf("moved %d, want the 204 shards fe5 owned (820-1023)", moved)
	}
	// fe5's relay accepts the new map.
	if _, err := config.Parse([]byte("host = \"fe5\"\n" + out)); err != nil {
		t.Errorf("fe5 refuses the plan: %v", err)
	}
}

func TestPlanRefusesBadArguments(t *testing.T) {
	from := tempConfig(t, "host = \"fe1\"\n"+fiveFrontendMap)
	for _, c := range []struct {
		args []string
		rc   int
		want string
	}{
		{[]string{"plan"}, 2, "-hosts is required"},
		{[]string{"plan", "-hosts", "fe1,,fe2"}, 2, "empty name"},
		{[]string{"plan", "-hosts", "fe1,fe2,fe1"}, 2, `"fe1" twice`},
		{[]string{"plan", "-hosts", "fe1", "extra"}, 2, "unexpected argument"},
		{[]string{"plan", "-hosts", "fe1", "-count", "0"}, 0, ""}, // 0 means the default
		{[]string{"plan", "-hosts", "fe1", "-count", "70000"}, 2, "-count must be"},
		{[]string{"plan", "-hosts", "fe1", "-from", from, "-count", "2048"}, 1, "not a rebalance"},
		{[]string{"plan", "-hosts", "fe1", "-from", from + ".absent"}, 1, "no such file"},
	} {
		rc, _, errOut := invoke("", c.args...)
		if rc != c.rc || !strings.Contains(errOut, c.want) {
			t.Errorf("%q: rc %d, stderr %q; want %d and %q", c.args, rc, errOut, c.rc, c.want)
		}
	}
}
