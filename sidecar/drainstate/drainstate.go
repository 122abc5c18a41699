// Package drainstate keeps the shards a relay is draining, with their
// deadlines, in a file. A shard moved away stays bound on its old owner
// until the drain ends, so that browsers still connected there get its
// messages while they move. A restart (an upgrade's postinst restarts the
// service) must not cut that short: the restarted relay reads this file
// and keeps those shards bound until their deadlines.
package drainstate

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"time"
)

// file is what is written: the queue it is about, so that a state left by
// another configuration is never applied, and shard → deadline.
type file struct {
	Queue  string               `json:"queue"`
	Shards map[string]time.Time `json:"draining"`
}

// Load returns the drains recorded for queue whose deadline is after now.
// A missing file is no drain; a file for another queue is ignored.
func Load(path, queue string, now time.Time) (map[int]time.Time, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("drain state: %w", err)
	}
	var f file
	if err := json.Unmarshal(b, &f); err != nil {
		return nil, fmt.Errorf("drain state %s: %w", path, err)
	}
	if f.Queue != queue {
		return nil, nil
	}
	out := make(map[int]time.Time, len(f.Shards))
	for k, until := range f.Shards {
		s, err := strconv.Atoi(k)
		if err != nil || s < 0 {
			return nil, fmt.Errorf("drain state %s: bad shard %q", path, k)
		}
		if until.After(now) {
			out[s] = until
		}
	}
	return out, nil
}

// Save records the drains of queue, replacing the file atomically (write,
// fsync, rename), so that a crash leaves the old state or the new one.
func Save(path, queue string, draining map[int]time.Time) error {
	f := file{Queue: queue, Shards: make(map[string]time.Time, len(draining))}
	for s, until := range draining {
		f.Shards[strconv.Itoa(s)] = until.UTC()
	}
	b, err := json.Marshal(f)
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".drains-*")
	if err != nil {
		return fmt.Errorf("drain state: %w", err)
	}
	defer os.Remove(tmp.Name()) // a no-op after the rename
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return fmt.Errorf("drain state: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("drain state: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("drain state: %w", err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("drain state: %w", err)
	}
	return nil
}
