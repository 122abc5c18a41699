package relay

import (
	"io"
	"log/slog"
	"slices"
	"testing"
	"time"
)

func testRelay() *Relay {
	return &Relay{
		log:      slog.New(slog.NewTextHandler(io.Discard, nil)),
		bound:    map[int]bool{},
		draining: map[int]time.Time{},
	}
}

func boundShards(r *Relay) []int {
	var out []int
	for s := range r.bound {
		out = append(out, s)
	}
	slices.Sort(out)
	return out
}

// While disconnected (no session) the bookkeeping is what the next
// connect binds; the drain rules are the same as with a session.
func TestShardMovesDrainBeforeUnbinding(t *testing.T) {
	r := testRelay()
	if err := r.moveShards(nil, []int{1, 2, 3}, time.Hour); err != nil {
		t.Fatal(err)
	}
	// Lose 3, gain 4: 4 is bound at once, 3 stays bound while it drains.
	if err := r.moveShards(nil, []int{1, 2, 4}, time.Hour); err != nil {
		t.Fatal(err)
	}
	if got := boundShards(r); !slices.Equal(got, []int{1, 2, 3, 4}) {
		t.Fatalf("bound %v, want [1 2 3 4] while 3 drains", got)
	}
	if r.shardsOwned.Load() != 3 || r.shardsDraining.Load() != 1 {
		t.Fatalf("owned %d draining %d, want 3 and 1", r.shardsOwned.Load(), r.shardsDraining.Load())
	}
	// 3 comes back before its drain ends: simply kept.
	if err := r.moveShards(nil, []int{1, 2, 3, 4}, time.Hour); err != nil {
		t.Fatal(err)
	}
	if len(r.draining) != 0 || r.shardsDraining.Load() != 0 {
		t.Fatalf("shard moved back still draining: %v", r.draining)
	}
	// A second reload during a drain does not restart the drain's clock.
	r.moveShards(nil, []int{1}, time.Hour)
	first := r.draining[2]
	r.moveShards(nil, []int{1}, 2*time.Hour)
	if !r.draining[2].Equal(first) {
		t.Fatal("a repeated reload extended a running drain")
	}
}

func TestDrainEndsUnbind(t *testing.T) {
	r := testRelay()
	r.moveShards(nil, []int{1, 2}, 0)
	if err := r.moveShards(nil, []int{1}, 0); err != nil {
		t.Fatal(err)
	}
	if got := boundShards(r); !slices.Equal(got, []int{1}) {
		t.Fatalf("with no drain, bound %v, want [1]", got)
	}
	r.moveShards(nil, []int{1, 2}, 0)
	r.moveShards(nil, []int{2}, 20*time.Millisecond)
	if got := boundShards(r); !slices.Equal(got, []int{1, 2}) {
		t.Fatalf("bound %v during the drain", got)
	}
	time.Sleep(30 * time.Millisecond)
	if err := r.expireDrains(nil); err != nil {
		t.Fatal(err)
	}
	if got := boundShards(r); !slices.Equal(got, []int{2}) || r.shardsDraining.Load() != 0 {
		t.Fatalf("after the drain, bound %v draining %d", got, r.shardsDraining.Load())
	}
}

func TestRateLimiterCountsWhatItHolds(t *testing.T) {
	l := newRateLimiter(time.Hour)
	if !l.allow("x") {
		t.Fatal("first line held back")
	}
	for range 5 {
		if l.allow("x") {
			t.Fatal("a line within the interval let through")
		}
	}
	if !l.allow("y") {
		t.Fatal("another key held back")
	}
	if n := l.suppressed("x"); n != 5 {
		t.Fatalf("suppressed %d, want 5", n)
	}
	if n := l.suppressed("x"); n != 0 {
		t.Fatalf("suppressed not reset: %d", n)
	}
}
