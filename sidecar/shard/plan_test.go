package shard_test

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/pushrelay/pushrelay/sidecar/shard"
)

func hostNames(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("fe%d", i+1)
	}
	return out
}

// checkBalanced fails unless every host owns count/len(hosts) shards or one
// more, and the map survives a trip through the config syntax.
func checkBalanced(t *testing.T, m *shard.Map, hosts []string, count int) {
	t.Helper()
	if m.Count() != count {
		t.Fatalf("Count() = %d, want %d", m.Count(), count)
	}
	q := count / len(hosts)
	total := 0
	for _, h := range hosts {
		n := len(m.Owned(h))
		if n != q && n != q+1 {
			t.Errorf("%s owns %d shards, want %d or %d", h, n, q, q+1)
		}
		total += n
	}
	if total != count {
		t.Errorf("hosts own %d shards in all, want %d", total, count)
	}
	back, err := shard.ParseMap(count, m.Entries())
	if err != nil {
		t.Fatalf("plan does not parse back: %v", err)
	}
	sameOwners(t, m, back)
}

func TestPlanFromScratchGivesEachHostOneBlock(t *testing.T) {
	for _, count := range []int{1, 7, 64, 1000, 1024, 1025} {
		for n := 1; n <= 12; n++ {
			hosts := hostNames(n)
			m, moved := shard.Plan(hosts, count, nil)
			checkBalanced(t, m, hosts, count)
			if moved != 0 {
				t.Errorf("moved = %d without a current map, want 0", moved)
			}
			for _, h := range hosts {
				if r := m.Ranges(h); len(r) > 1 {
					t.Errorf("count %d, %d hosts: %s owns %v, want one block", count, n, h, r)
				}
			}
		}
	}
}

// fewestMoves is the lower bound on moved shards for any balanced plan:
// a host can keep at most min(owned today, its quota), and trying every way
// to hand out the "+1" quotas finds the best any plan can do.
func fewestMoves(from *shard.Map, hosts []string, count int) int {
	q, r := count/len(hosts), count%len(hosts)
	best := count
	var try func(i, plusLeft, kept int)
	try = func(i, plusLeft, kept int) {
		if i == len(hosts) {
			if plusLeft == 0 {
				best = min(best, count-kept)
			}
			return
		}
		old := len(from.Owned(hosts[i]))
		if plusLeft > 0 {
			try(i+1, plusLeft-1, kept+min(old, q+1))
		}
		if len(hosts)-i > plusLeft {
			try(i+1, plusLeft, kept+min(old, q))
		}
	}
	try(0, r, 0)
	return best
}

func TestPlanFromCurrentMapMovesTheFewestShards(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	pool := hostNames(9)
	for trial := range 300 {
		count := 1 + rng.IntN(200)
		before := pool[:1+rng.IntN(6)]
		from := randomMap(t, rng, count, before)
		// The new host set keeps some, drops some, adds some.
		var hosts []string
		for _, h := range rng.Perm(len(pool)) {
			if rng.IntN(2) == 0 {
				hosts = append(hosts, pool[h])
			}
		}
		if len(hosts) == 0 {
			hosts = pool[:1]
		}

		m, moved := shard.Plan(hosts, count, from)
		name := fmt.Sprintf("trial %d: %v → %v, %d shards", trial, before, hosts, count)
		checkBalanced(t, m, hosts, count)

		changed, leaving := 0, 0
		for s := range count {
			if m.Owner(s) != from.Owner(s) {
				changed++
			}
		}
		for _, h := range from.Hosts() {
			old, now := len(from.Owned(h)), len(m.Owned(h))
			if slices.Contains(hosts, h) {
				leaving += max(0, old-now)
			} else {
				leaving += old
				if now != 0 || !m.Has(h) {
					t.Errorf("%s: removed host %s owns %d shards, Has=%v; want it listed with none so that it drains", name, h, now, m.Has(h))
				}
			}
		}
		if moved != changed {
			t.Errorf("%s: reported %d moved, but %d shards changed owner", name, moved, changed)
		}
		if moved != leaving {
			t.Errorf("%s: moved %d, want %d: a host both gave and took shards", name, moved, leaving)
		}
		if low := fewestMoves(from, hosts, count); moved != low {
			t.Errorf("%s: moved %d, but a balanced plan can move only %d", name, moved, low)
		}
	}
}

func TestPlanAddingAHostMovesOnlyWhatTheNewHostTakes(t *testing.T) {
	five, _ := shard.Plan(hostNames(5), 1024, nil)
	six, moved := shard.Plan(hostNames(6), 1024, five)
	checkBalanced(t, six, hostNames(6), 1024)
	if got := len(six.Owned("fe6")); moved != got {
		t.Errorf("moved %d, want exactly the %d shards fe6 takes", moved, got)
	}
	for _, h := range hostNames(5) {
		for _, s := range six.Owned(h) {
			if five.Owner(s) != h {
				t.Fatalf("%s gained shard %d from %s; only fe6 should gain", h, s, five.Owner(s))
			}
		}
	}
}

func TestPlanRemovingAHostMovesOnlyItsShards(t *testing.T) {
	six, _ := shard.Plan(hostNames(6), 1024, nil)
	five, moved := shard.Plan(hostNames(5), 1024, six)
	checkBalanced(t, five, hostNames(5), 1024)
	if got := len(six.Owned("fe6")); moved != got {
		t.Errorf("moved %d, want exactly the %d shards fe6 gives up", moved, got)
	}
	if !five.Has("fe6") || len(five.Owned("fe6")) != 0 {
		t.Errorf("fe6 should stay in the map owning nothing, so its relay reloads and drains")
	}
}

func TestPlanOfABalancedMapMovesNothing(t *testing.T) {
	m, _ := shard.Plan(hostNames(5), 1024, nil)
	again, moved := shard.Plan(hostNames(5), 1024, m)
	if moved != 0 || shard.Moved(m, again) != 0 {
		t.Errorf("replanning a balanced map moved %d shards", moved)
	}
}

func TestPlanWithAnotherCountMovesEverything(t *testing.T) {
	from, _ := shard.Plan(hostNames(3), 1024, nil)
	m, moved := shard.Plan(hostNames(3), 2048, from)
	checkBalanced(t, m, hostNames(3), 2048)
	if moved != 2048 {
		t.Errorf("moved %d, want 2048: a new count renumbers every shard", moved)
	}
}

func TestPlanSkipsRepeatsAndRefusesNothing(t *testing.T) {
	m, _ := shard.Plan([]string{"fe1", "fe2", "fe1", ""}, 10, nil)
	if got := m.Hosts(); !slices.Equal(got, []string{"fe1", "fe2"}) {
		t.Errorf("Hosts() = %v, want [fe1 fe2]", got)
	}
	checkBalanced(t, m, []string{"fe1", "fe2"}, 10)
	for _, c := range []struct {
		hosts []string
		count int
	}{{nil, 10}, {[]string{""}, 10}, {[]string{"fe1"}, 0}, {[]string{"fe1"}, shard.MaxCount + 1}} {
		if m, _ := shard.Plan(c.hosts, c.count, nil); m != nil {
			t.Errorf("Plan(%q, %d) = a map, want nil", c.hosts, c.count)
		}
	}
}
