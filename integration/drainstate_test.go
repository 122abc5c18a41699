package integration

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pushrelay/pushrelay/integration/stack"
	"github.com/pushrelay/pushrelay/sidecar/shard"
)

// drainMaps are two shard maps for host: it owns every shard, then half,
// with the other half draining for drain.
func drainMaps(host string, drain time.Duration) (all, half string) {
	all = fmt.Sprintf("[shards]\ncount = %d\ndrain = %q\n[shards.map]\n%s = [\"0-%d\"]\n",
		shard.DefaultCount, drain.String(), host, shard.DefaultCount-1)
	half = fmt.Sprintf("[shards]\ncount = %d\ndrain = %q\n[shards.map]\n%s = [\"0-511\"]\nother = [\"512-%d\"]\n",
		shard.DefaultCount, drain.String(), host, shard.DefaultCount-1)
	return all, half
}

// inode is the inode of path, 0 if there is none: the state file is
// replaced by a rename at each write, so a new inode is a new write.
func inode(path string) uint64 {
	var st syscall.Stat_t
	if syscall.Stat(path, &st) != nil {
		return 0
	}
	return st.Ino
}

// Issue 19: the drain state file is written when the drains change, not
// at every tick of the relay loop (it used to be replaced and fsynced
// every 5 ms for as long as a drain lasted).
func TestDrainStateIsWrittenOncePerChange(t *testing.T) {
	host := uniqueHost("it-drainwrites")
	all, half := drainMaps(host, 30*time.Second)
	state := t.TempDir()
	p := newPipeline(t, stack.Nchan, host, RelayOptions{Extra: all, StateDir: state})
	o := RelayOptions{Host: p.host, Exchange: p.broker.Exchange, Publish: p.nginx.PublishURL(), Dialect: "nchan",
		Extra: half, StateDir: state}
	p.relay.WriteConfig(o)
	p.relay.Reload()
	waitFor(t, "512 shards draining", 10*time.Second, func() bool { return p.relay.Metric("pushrelay_shards_draining") == 512 })
	file := filepath.Join(state, "drains.json")
	first, writes := inode(file), p.relay.Metric("pushrelay_state_writes_total")
	changed := 0
	for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if ino := inode(file); ino != first {
			changed++
			first = ino
		}
	}
	after := p.relay.Metric("pushrelay_state_writes_total")
	t.Logf("in 3 s of a drain: the file replaced %d times (seen every 10 ms); pushrelay_state_writes_total %v → %v", changed, writes, after)
	if changed != 0 {
		t.Errorf("the drain state file was replaced %d times in 3 s of a drain with nothing changing, want 0", changed)
	}
	if after != writes {
		t.Errorf("pushrelay_state_writes_total went from %v to %v with nothing changing", writes, after)
	}
}

// Issue 19: a state_dir that cannot take the file (full) is not a WARN
// line a second while /readyz says 200: the drains are not applied (a
// restart would unbind them at once), /readyz says why, and the relay
// retries until the disk has room.
func TestDrainStateOnAFullDisk(t *testing.T) {
	if _, err := exec.LookPath("mount"); err != nil {
		t.Skip("no mount here")
	}
	state := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", state).CombinedOutput(); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("mount a tmpfs: %v: %s", err, out)
		}
		t.Skipf("cannot mount a tmpfs here: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", state).Run() })
	host := uniqueHost("it-drainfull")
	all, half := drainMaps(host, time.Minute)
	p := newPipeline(t, stack.Nchan, host, RelayOptions{Extra: all, StateDir: state})
	filler := filepath.Join(state, "filler")
	if out, err := exec.Command("dd", "if=/dev/zero", "of="+filler, "bs=4k", "count=64").CombinedOutput(); err == nil ||
		!strings.Contains(string(out), "No space left") {
		t.Fatalf("filling the tmpfs: %v: %s", err, out)
	}
	o := RelayOptions{Host: p.host, Exchange: p.broker.Exchange, Publish: p.nginx.PublishURL(), Dialect: "nchan",
		Extra: half, StateDir: state}
	p.relay.WriteConfig(o)
	p.relay.Reload()
	waitFor(t, "/readyz to say the drain state is not saved", 10*time.Second, func() bool {
		code, body := readyz(t, p.relay)
		return code == 503 && strings.Contains(body, "drain state is not saved")
	})
	if v := p.relay.Metric("pushrelay_config_applied"); v != 0 {
		t.Errorf("pushrelay_config_applied %v while the drain state cannot be saved, want 0", v)
	}
	if v := p.relay.Metric("pushrelay_shards_draining"); v != 0 {
		t.Errorf("pushrelay_shards_draining %v before the state file says so, want 0", v)
	}
	_, body := readyz(t, p.relay)
	t.Logf("full state_dir: /readyz %q", strings.TrimSpace(body))

	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the drain state saved once the disk has room", 10*time.Second, func() bool {
		code, _ := readyz(t, p.relay)
		return code == 200 && p.relay.Metric("pushrelay_config_applied") == 1 && p.relay.Metric("pushrelay_shards_draining") == 512
	})
	b, err := os.ReadFile(filepath.Join(state, "drains.json"))
	if err != nil || strings.Count(string(b), `"512"`)+strings.Count(string(b), `"1023"`) != 2 {
		t.Errorf("drains.json after the disk had room: %v, %.200s", err, b)
	}
}
