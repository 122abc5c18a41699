package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// fiveFrontendMap is the example layout: 205 shards each, the last 204.
const fiveFrontendMap = `
[shards.map]
fe1 = ["0-204"]
fe2 = ["205-409"]
fe3 = ["410-614"]
fe4 = ["615-819"]
fe5 = ["820-1023"]
`

func tempConfig(t *testing.T, text string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "pushrelay.toml")
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func invoke(stdin string, args ...string) (rc int, stdout, stderr string) {
	var out, errOut bytes.Buffer
	rc = dispatch(args, strings.NewReader(stdin), &out, &errOut)
	return rc, out.String(), errOut.String()
}

func TestShardPrintsChannelShardAndOwner(t *testing.T) {
	// The web tier is not in the map: its copy of the config still works.
	path := tempConfig(t, `host = "web1"`+fiveFrontendMap)
	channels := []string{"thread:1", "forum:cnn", "user:42", "x"}
	// shard_of_1024 of these rows in shared/contract/shard-vectors.tsv, as
	// fixed values: computing them with shard.Of would hide a bug in it.
	shards := []int{608, 237, 898, 135}
	rc, out, errOut := invoke("", append([]string{"shard", "-config", path}, channels...)...)
	if rc != 0 {
		t.Fatalf("rc %d, stderr %s", rc, errOut)
	}
	lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
	if len(lines) != len(channels) {
		t.Fatalf("%d lines, want one per channel:\n%s", len(lines), out)
	}
	for i, ch := range channels {
		s := shards[i]
		owner := "fe" + strconv.Itoa(min(s/205, 4)+1) // blocks of 205, as in fiveFrontendMap
		if want := ch + " " + strconv.Itoa(s) + " " + owner; lines[i] != want {
			t.Errorf("line %d = %q, want %q", i, lines[i], want)
		}
	}
}

func TestShardRefusesInvalidChannelsButPrintsTheRest(t *testing.T) {
	path := tempConfig(t, `host = "fe1"`+fiveFrontendMap)
	rc, out, errOut := invoke("", "shard", "-config", path, "a/b", "thread:1", "ALL")
	if rc != 1 {
		t.Errorf("rc %d, want 1", rc)
	}
	if !strings.HasPrefix(out, "thread:1 ") || strings.Count(out, "\n") != 1 {
		t.Errorf("stdout %q, want only the thread:1 line", out)
	}
	if !strings.Contains(errOut, `"a/b"`) || !strings.Contains(errOut, `"ALL"`) {
		t.Errorf("stderr %q, want both invalid channels named", errOut)
	}
}

func TestShardUsageAndConfigErrors(t *testing.T) {
	if rc, _, _ := invoke("", "shard", "-config", tempConfig(t, fiveFrontendMap)); rc != 2 {
		t.Errorf("no channel: rc %d, want 2", rc)
	}
	rc, _, errOut := invoke("", "shard", "-config", tempConfig(t, "[shards.map]\nfe1 = [\"0-9\"]\n"), "x")
	if rc != 1 || !strings.Contains(errOut, "shards 10-1023 have no owner") {
		t.Errorf("bad map: rc %d, stderr %q; want 1 and the gap", rc, errOut)
	}
}
