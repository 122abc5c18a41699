package shard

import (
	"cmp"
	"slices"
)

// Plan returns a balanced map of count shards over hosts, and how many shards
// change owner relative to from. Balanced means every host owns count/len(hosts)
// shards or one more. Hosts are taken in the order given; an empty name or a
// repeat is skipped. Plan returns nil when no host is left or count is out of
// 1..MaxCount.
//
// Without from, hosts get consecutive blocks in the order given.
//
// With from, the plan moves the fewest shards possible: the hosts that own the
// most today get the "+1" quotas, each kept host keeps its lowest-numbered
// shards up to its quota, and the released shards (surplus plus those of
// removed hosts) go, lowest first, to the hosts below quota, in the order
// given. Hosts of from that are not in hosts stay in the result owning
// nothing, so that their relays still find themselves in the map, accept the
// reload and drain; the entry is deleted once such a host is shut down. If
// from has another count, its shard numbers mean other channels: the plan is
// made as without from and every shard counts as moved.
func Plan(hosts []string, count int, from *Map) (*Map, int) {
	hosts = distinct(hosts)
	if len(hosts) == 0 || count < 1 || count > MaxCount {
		return nil, 0
	}
	q, r := count/len(hosts), count%len(hosts)
	quota := make(map[string]int, len(hosts))

	if from == nil || from.Count() != count {
		m := &Map{owner: make([]string, 0, count), hosts: slices.Sorted(slices.Values(hosts))}
		for i, h := range hosts {
			quota[h] = q
			if i < r {
				quota[h]++
			}
			for range quota[h] {
				m.owner = append(m.owner, h)
			}
		}
		if from == nil {
			return m, 0
		}
		return m, count
	}

	old := make(map[string]int, len(hosts))
	for s := range count {
		old[from.Owner(s)]++
	}
	// Stable on the given order, so ties go to the host named first.
	bySize := slices.Clone(hosts)
	slices.SortStableFunc(bySize, func(a, b string) int { return cmp.Compare(old[b], old[a]) })
	for i, h := range bySize {
		quota[h] = q
		if i < r {
			quota[h]++
		}
	}

	owner := make([]string, count)
	kept := make(map[string]int, len(hosts))
	var pool []int
	for s := range count {
		h := from.Owner(s)
		if kept[h] < quota[h] {
			owner[s] = h
			kept[h]++
			continue
		}
		pool = append(pool, s)
	}
	for _, h := range hosts {
		for ; kept[h] < quota[h]; kept[h]++ {
			owner[pool[0]] = h
			pool = pool[1:]
		}
	}

	all := slices.Clone(hosts)
	for _, h := range from.Hosts() {
		if _, ok := quota[h]; !ok {
			all = append(all, h)
		}
	}
	slices.Sort(all)
	m := &Map{owner: owner, hosts: all}
	return m, Moved(from, m)
}

func distinct(hosts []string) []string {
	seen := make(map[string]bool, len(hosts))
	out := make([]string, 0, len(hosts))
	for _, h := range hosts {
		if h != "" && !seen[h] {
			seen[h] = true
			out = append(out, h)
		}
	}
	return out
}
