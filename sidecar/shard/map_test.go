package shard_test

import (
	"errors"
	"math/rand/v2"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/pelletier/go-toml/v2"

	"github.com/pushrelay/pushrelay/sidecar/shard"
)

// problems flattens the errors.Join that ParseMap returns.
func problems(t *testing.T, err error) []error {
	t.Helper()
	if err == nil {
		t.Fatal("ParseMap accepted a bad map")
	}
	j, ok := err.(interface{ Unwrap() []error })
	if !ok {
		return []error{err}
	}
	return j.Unwrap()
}

func TestParseMapAssignsEveryShardToItsHost(t *testing.T) {
	m, err := shard.ParseMap(1024, map[string][]string{
		"fe1": {"0-204"},
		"fe2": {"205-409", "1000"},
		"fe3": {"410-999", "1001-1023"},
	})
	if err != nil {
		t.Fatal(err)
	}
	for s, want := range map[int]string{0: "fe1", 204: "fe1", 205: "fe2", 409: "fe2", 410: "fe3", 999: "fe3", 1000: "fe2", 1001: "fe3", 1023: "fe3", -1: "", 1024: ""} {
		if got := m.Owner(s); got != want {
			t.Errorf("Owner(%d) = %q, want %q", s, got, want)
		}
	}
	fe2 := m.Owned("fe2")
	if len(fe2) != 206 || fe2[0] != 205 || fe2[204] != 409 || fe2[205] != 1000 || !slices.IsSorted(fe2) {
		t.Errorf("Owned(fe2) = %d shards from %d to %d, want 205..409 and 1000 ascending", len(fe2), fe2[0], fe2[len(fe2)-1])
	}
	if got := m.Owned("fe9"); got != nil {
		t.Errorf("Owned(unknown host) = %v, want nil", got)
	}
	if got, want := m.Hosts(), []string{"fe1", "fe2", "fe3"}; !slices.Equal(got, want) {
		t.Errorf("Hosts() = %v, want %v", got, want)
	}
	if m.Count() != 1024 {
		t.Errorf("Count() = %d, want 1024", m.Count())
	}
	if got, want := m.Ranges("fe2"), []string{"205-409", "1000"}; !slices.Equal(got, want) {
		t.Errorf("Ranges(fe2) = %v, want %v", got, want)
	}
}

func TestParseMapNamesEveryProblemAtOnce(t *testing.T) {
	_, err := shard.ParseMap(100, map[string][]string{
		"fe1": {"0-9", "banana", "95-120"},
		"fe2": {"5-14", "30-20", "130"},
		"fe3": {"40-94", "60"},
	})
	got := problems(t, err)
	want := []error{
		&shard.SyntaxError{Host: "fe1", Range: "banana", Reason: `want "n" or "a-b" with a <= b, n, a and b decimal shard numbers`},
		&shard.RangeError{Host: "fe1", Range: "95-120", From: 100, To: 120, Count: 100},
		&shard.SyntaxError{Host: "fe2", Range: "30-20", Reason: "start 30 is after end 20"},
		&shard.RangeError{Host: "fe2", Range: "130", From: 130, To: 130, Count: 100},
		&shard.OverlapError{From: 5, To: 9, Hosts: []string{"fe1", "fe2"}},
		&shard.GapError{From: 15, To: 39},
		&shard.OverlapError{From: 60, To: 60, Hosts: []string{"fe3", "fe3"}},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("problems:\n%v\nwant:\n%v", errors.Join(got...), errors.Join(want...))
	}
}

func TestParseMapMessagesNameTheShardsAndHosts(t *testing.T) {
	for _, c := range []struct {
		name    string
		entries map[string][]string
		want    string
	}{
		{"gap", map[string][]string{"fe1": {"0-4", "10-15"}}, "shards 5-9 have no owner"},
		{"one-shard gap", map[string][]string{"fe1": {"0-4", "6-15"}}, "shard 5 has no owner"},
		{"overlap", map[string][]string{"fe1": {"0-8"}, "fe2": {"8-15"}}, "shard 8 is claimed by fe1 and fe2"},
		{"three-way overlap", map[string][]string{"a": {"0-15"}, "b": {"0-15"}, "c": {"0-15"}}, "shards 0-15 are claimed by a and b and c"},
		{"listed twice", map[string][]string{"fe1": {"0-15", "3-4"}}, "shards 3-4 are claimed by fe1 2 times"},
		{"out of range", map[string][]string{"fe1": {"0-17"}}, `host "fe1": "0-17": shards 16-17 outside 0-15`},
		{"empty host", map[string][]string{"": {"0-15"}}, "empty host name"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := shard.ParseMap(16, c.entries)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("error %v, want it to contain %q", err, c.want)
			}
		})
	}
}

func TestParseMapRefusesMalformedRanges(t *testing.T) {
	for _, r := range []string{"", " 1", "1 ", "+1", "-1", "1-", "-", "1-2-3", "0x1", "1.5", "1–2", "9999999999"} {
		_, err := shard.ParseMap(16, map[string][]string{"fe1": {"0-15", r}})
		var syn *shard.SyntaxError
		if !errors.As(err, &syn) || syn.Range != r {
			t.Errorf("range %q: error %v, want a SyntaxError naming it", r, err)
		}
	}
}

func TestParseMapRefusesCountOutOfBounds(t *testing.T) {
	for _, count := range []int{-1, 0, shard.MaxCount + 1} {
		if _, err := shard.ParseMap(count, map[string][]string{"fe1": {"0"}}); err == nil {
			t.Errorf("count %d accepted", count)
		}
	}
}

func TestHostWithNoRangesIsKnownAndOwnsNothing(t *testing.T) {
	m, err := shard.ParseMap(8, map[string][]string{"fe1": {"0-7"}, "fe9": {}})
	if err != nil {
		t.Fatal(err)
	}
	if !m.Has("fe9") || m.Owned("fe9") != nil || m.Has("fe8") {
		t.Errorf("Has(fe9)=%v Owned(fe9)=%v Has(fe8)=%v, want true, nil, false", m.Has("fe9"), m.Owned("fe9"), m.Has("fe8"))
	}
	if got := m.Ranges("fe9"); got == nil || len(got) != 0 {
		t.Errorf("Ranges(fe9) = %#v, want an empty list so that TOML prints []", got)
	}
}

// randomMap scatters count shards over hosts, so that ranges are short and
// many, the hard case for range compression.
func randomMap(t *testing.T, rng *rand.Rand, count int, hosts []string) *shard.Map {
	t.Helper()
	owned := map[string][]int{}
	for s := range count {
		h := hosts[rng.IntN(len(hosts))]
		owned[h] = append(owned[h], s)
	}
	entries := map[string][]string{}
	for _, h := range hosts {
		entries[h] = shard.Ranges(owned[h])
	}
	m, err := shard.ParseMap(count, entries)
	if err != nil {
		t.Fatal(err)
	}
	for s := range count {
		if !slices.Contains(owned[m.Owner(s)], s) {
			t.Fatalf("shard %d: owner %q does not list it", s, m.Owner(s))
		}
	}
	return m
}

func sameOwners(t *testing.T, a, b *shard.Map) {
	t.Helper()
	if a.Count() != b.Count() || shard.Moved(a, b) != 0 || !slices.Equal(a.Hosts(), b.Hosts()) {
		t.Fatalf("maps differ: %d vs %d shards, %d moved, hosts %v vs %v", a.Count(), b.Count(), shard.Moved(a, b), a.Hosts(), b.Hosts())
	}
}

func TestTOMLRoundTripsThroughPushrelayToml(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	hosts := []string{"fe1", "fe2.example.com", `odd"name`, "fe_4-x"}
	for range 20 {
		m := randomMap(t, rng, 1+rng.IntN(300), hosts)
		var file struct {
			Shards struct {
				Map map[string][]string `toml:"map"`
			} `toml:"shards"`
		}
		if err := toml.Unmarshal([]byte(m.TOML()), &file); err != nil {
			t.Fatalf("TOML() is not valid TOML: %v\n%s", err, m.TOML())
		}
		back, err := shard.ParseMap(m.Count(), file.Shards.Map)
		if err != nil {
			t.Fatal(err)
		}
		sameOwners(t, m, back)
	}
}

func TestTOMLCompressesRangesAndOrdersHostsNaturally(t *testing.T) {
	m, err := shard.ParseMap(14, map[string][]string{
		"fe10":  {"0", "1", "2-4", "9"},
		"fe2":   {"5-8", "10", "11"},
		"fe1":   {"12-13"},
		"empty": {},
	})
	if err != nil {
		t.Fatal(err)
	}
	want := "[shards.map]\n" +
		`empty = []` + "\n" +
		`fe1 = ["12-13"]` + "\n" +
		`fe2 = ["5-8", "10-11"]` + "\n" +
		`fe10 = ["0-4", "9"]` + "\n"
	if got := m.TOML(); got != want {
		t.Errorf("TOML():\n%s\nwant:\n%s", got, want)
	}
}

func TestMovedCountsShardsThatChangeOwner(t *testing.T) {
	a, _ := shard.ParseMap(10, map[string][]string{"x": {"0-4"}, "y": {"5-9"}})
	b, _ := shard.ParseMap(10, map[string][]string{"x": {"0-2"}, "y": {"3-9"}})
	c, _ := shard.ParseMap(11, map[string][]string{"x": {"0-4"}, "y": {"5-10"}})
	if got := shard.Moved(a, a); got != 0 {
		t.Errorf("Moved(a, a) = %d, want 0", got)
	}
	if got := shard.Moved(a, b); got != 2 {
		t.Errorf("Moved(a, b) = %d, want 2 (shards 3 and 4)", got)
	}
	if got := shard.Moved(a, c); got != 11 {
		t.Errorf("Moved across counts = %d, want 11: every shard is renumbered", got)
	}
}
