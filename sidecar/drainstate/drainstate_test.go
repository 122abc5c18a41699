package drainstate

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestSaveLoadKeepsOnlyLiveDrainsOfTheQueue(t *testing.T) {
	path := filepath.Join(t.TempDir(), "drains.json")
	now := time.Now()
	in := map[int]time.Time{3: now.Add(time.Minute), 7: now.Add(-time.Second), 1023: now.Add(time.Hour)}
	if err := Save(path, "pushrelay.fe1", in); err != nil {
		t.Fatal(err)
	}
	got, err := Load(path, "pushrelay.fe1", now)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || !got[3].Equal(in[3]) || !got[1023].Equal(in[1023]) {
		t.Fatalf("loaded %v, want shards 3 and 1023 with their deadlines (7 has ended)", got)
	}
	if other, err := Load(path, "pushrelay.fe2", now); err != nil || len(other) != 0 {
		t.Fatalf("another queue's state applied: %v %v", other, err)
	}
	if none, err := Load(filepath.Join(t.TempDir(), "absent"), "q", now); err != nil || none != nil {
		t.Fatalf("missing file: %v %v", none, err)
	}
	if err := os.WriteFile(path, []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(path, "pushrelay.fe1", now); err == nil {
		t.Fatal("a corrupt state file was accepted")
	}
}
