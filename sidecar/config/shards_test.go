package config_test

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pushrelay/pushrelay/sidecar/config"
	"github.com/pushrelay/pushrelay/sidecar/shard"
)

const fiveFrontends = `
[shards.map]
fe1 = ["0-204"]
fe2 = ["205-409"]
fe3 = ["410-614"]
fe4 = ["615-819"]
fe5 = ["820-1023"]
`

func shardMap(t *testing.T, file string) *shard.Map {
	t.Helper()
	cfg, err := config.Parse([]byte(file))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	m, err := cfg.ShardMap()
	if err != nil {
		t.Fatalf("ShardMap after a successful Parse: %v", err)
	}
	return m
}

func TestWithoutMapThisHostOwnsEveryShard(t *testing.T) {
	for _, c := range []struct {
		file  string
		count int
	}{
		{`host = "fe1"`, shard.DefaultCount},
		{"host = \"fe1\"\n[shards]\ncount = 16", 16},
	} {
		m := shardMap(t, c.file)
		if m.Count() != c.count || len(m.Owned("fe1")) != c.count || len(m.Hosts()) != 1 {
			t.Errorf("%q: %d shards, fe1 owns %d, hosts %v; want fe1 alone owning all %d", c.file, m.Count(), len(m.Owned("fe1")), m.Hosts(), c.count)
		}
	}
}

func TestMapGivesThisHostItsEntry(t *testing.T) {
	m := shardMap(t, `host = "fe3"`+fiveFrontends)
	if got := m.Owned("fe3"); len(got) != 205 || got[0] != 410 || got[204] != 614 {
		t.Errorf("fe3 owns %d shards, want 410-614", len(got))
	}
	if m.Owner(1023) != "fe5" {
		t.Errorf("Owner(1023) = %q, want fe5", m.Owner(1023))
	}
}

func TestHostMayBeAQuotedFQDN(t *testing.T) {
	m := shardMap(t, `host = "fe1.example.com"
[shards]
count = 8
[shards.map]
"fe1.example.com" = ["0-3"]
"fe2.example.com" = ["4-7"]
`)
	if len(m.Owned("fe1.example.com")) != 4 {
		t.Errorf("fe1.example.com owns %v, want 0-3", m.Owned("fe1.example.com"))
	}
}

func TestHostMissingFromTheMapIsRefused(t *testing.T) {
	_, err := config.Parse([]byte(`host = "fe9"` + fiveFrontends))
	if err == nil || !strings.Contains(err.Error(), `"fe9" is not in shards.map (hosts: fe1, fe2, fe3, fe4, fe5)`) {
		t.Errorf("error %v, want it to name fe9 and the hosts of the map", err)
	}
}

func TestBadMapIsRefusedWithEveryProblemUnderItsKey(t *testing.T) {
	_, err := config.Parse([]byte(`host = "fe1"
[shards]
count = 100
[shards.map]
fe1 = ["0-50"]
fe2 = ["40-89", "x"]
`))
	if err == nil {
		t.Fatal("bad map accepted")
	}
	var gap *shard.GapError
	var overlap *shard.OverlapError
	var syntax *shard.SyntaxError
	if !errors.As(err, &gap) || !errors.As(err, &overlap) || !errors.As(err, &syntax) {
		t.Errorf("error %v: want the gap, the overlap and the bad range each reachable with errors.As", err)
	}
	for _, want := range []string{"shards 40-50 are claimed by fe1 and fe2", "shards 90-99 have no owner", `host "fe2": range "x"`} {
		if !strings.Contains(err.Error(), `key "shards.map": `+want) {
			t.Errorf("error %v: want a line %q", err, `key "shards.map": `+want)
		}
	}
}

func TestOwnedIsShorthandForAOneHostMap(t *testing.T) {
	m := shardMap(t, "host = \"fe1\"\n[shards]\ncount = 8\nowned = [\"0-3\", \"4-7\"]")
	if len(m.Owned("fe1")) != 8 {
		t.Errorf("fe1 owns %v, want every shard", m.Owned("fe1"))
	}

	_, err := config.Parse([]byte("host = \"fe1\"\n[shards]\ncount = 8\nowned = [\"0-3\"]"))
	if err == nil || !strings.Contains(err.Error(), `key "shards.owned"`) || !strings.Contains(err.Error(), "shards 4-7 have no owner") {
		t.Errorf("partial owned: error %v, want it to say that owned must cover 4-7 too", err)
	}

	_, err = config.Parse([]byte("host = \"fe1\"\n[shards]\nowned = [\"0-1023\"]\n" + fiveFrontends))
	if err == nil || !strings.Contains(err.Error(), "not both") {
		t.Errorf("map and owned: error %v, want a refusal of both", err)
	}
}

func TestBadCountOrHostIsReportedOnceUnderItsOwnKey(t *testing.T) {
	_, err := config.Parse([]byte("host = \"fe1\"\n[shards]\ncount = 0\n" + strings.TrimPrefix(fiveFrontends, "\n")))
	if err == nil || !strings.Contains(err.Error(), `key "shards.count"`) || strings.Contains(err.Error(), "shards.map") {
		t.Errorf("count 0: error %v, want only the shards.count complaint", err)
	}
	_, err = config.Parse([]byte(`host = ""` + fiveFrontends))
	if err == nil || !strings.Contains(err.Error(), `key "host": must not be empty`) || strings.Contains(err.Error(), "shards.map") {
		t.Errorf("empty host: error %v, want only the host complaint", err)
	}
}

func writeFile(t *testing.T, text string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "pushrelay.toml")
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestLoadShardMapReadsAFrontendsConfigAnywhere(t *testing.T) {
	// Another host's name and a section the relay would refuse: neither
	// matters to a reader of the map.
	m, err := config.LoadShardMap(writeFile(t, "host = \"elsewhere\"\n[push]\nconnections = 0\n"+fiveFrontends))
	if err != nil {
		t.Fatal(err)
	}
	if m.Owner(300) != "fe2" || m.Count() != 1024 {
		t.Errorf("Owner(300) = %q of %d shards, want fe2 of 1024", m.Owner(300), m.Count())
	}

	for name, file := range map[string]string{
		"bad map":     "[shards.map]\nfe1 = [\"0-10\"]\n",
		"unknown key": "[shards]\ncuont = 3\n",
		"bad count":   "[shards]\ncount = 70000\n",
	} {
		if _, err := config.LoadShardMap(writeFile(t, file)); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, err := config.LoadShardMap(filepath.Join(t.TempDir(), "absent.toml")); err == nil {
		t.Error("absent file: accepted")
	}
}
