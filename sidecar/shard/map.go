package shard

import (
	"cmp"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
)

// MaxCount bounds the shard count. A map holds one owner per shard, so the
// bound keeps a typo in a config from allocating gigabytes.
const MaxCount = 65536

// Map says which host owns each shard. Every shard in 0..Count()-1 has
// exactly one owner; ParseMap refuses anything else. A Map is immutable, so
// one value may be shared between the reload path and readers.
type Map struct {
	owner []string // shard → host
	hosts []string // sorted; includes hosts that own no shard
}

// GapError reports shards that no host owns.
type GapError struct{ From, To int }

func (e *GapError) Error() string {
	return fmt.Sprintf("%s %s no owner", span(e.From, e.To), plural(e.From, e.To, "has", "have"))
}

// OverlapError reports shards claimed more than once: by several hosts, or
// twice by the same host (then Hosts holds that host twice).
type OverlapError struct {
	From, To int
	Hosts    []string
}

func (e *OverlapError) Error() string {
	who := strings.Join(e.Hosts, " and ")
	if len(slices.Compact(slices.Sorted(slices.Values(e.Hosts)))) == 1 {
		who = fmt.Sprintf("%s %d times", e.Hosts[0], len(e.Hosts))
	}
	return fmt.Sprintf("%s %s claimed by %s", span(e.From, e.To), plural(e.From, e.To, "is", "are"), who)
}

// RangeError reports the part of a host's range that lies outside
// 0..Count-1.
type RangeError struct {
	Host, Range string
	From, To    int // the out-of-range part
	Count       int
}

func (e *RangeError) Error() string {
	return fmt.Sprintf("host %q: %q: %s outside 0-%d", e.Host, e.Range, span(e.From, e.To), e.Count-1)
}

// SyntaxError reports a range that is neither "n" nor "a-b" with a <= b, or
// an empty host name.
type SyntaxError struct {
	Host, Range string
	Reason      string
}

func (e *SyntaxError) Error() string {
	if e.Range == "" && e.Host == "" {
		return e.Reason
	}
	return fmt.Sprintf("host %q: range %q: %s", e.Host, e.Range, e.Reason)
}

func span(from, to int) string {
	if from == to {
		return "shard " + strconv.Itoa(from)
	}
	return fmt.Sprintf("shards %d-%d", from, to)
}

func plural(from, to int, one, many string) string {
	if from == to {
		return one
	}
	return many
}

// ParseMap builds a Map from count and host → ranges, each range "n" or
// "a-b" (inclusive). Its error, built with errors.Join, names every malformed
// range, every out-of-range part, every overlap with the hosts involved and
// every gap, so an operator fixes a bad map in one pass. A host may list no
// ranges: it is then known and owns nothing, which is how a frontend is
// emptied before it is removed.
func ParseMap(count int, entries map[string][]string) (*Map, error) {
	if count < 1 || count > MaxCount {
		return nil, &SyntaxError{Reason: fmt.Sprintf("shard count must be 1..%d, got %d", MaxCount, count)}
	}
	hosts := make([]string, 0, len(entries))
	for h := range entries {
		hosts = append(hosts, h)
	}
	slices.Sort(hosts)

	var errs []error
	// claims[s] lists every host that claims s, in claim order, so that one
	// walk afterwards finds both gaps and overlaps.
	claims := make([][]string, count)
	for _, h := range hosts {
		if h == "" {
			errs = append(errs, &SyntaxError{Host: h, Range: "", Reason: "empty host name"})
			continue
		}
		for _, r := range entries[h] {
			from, to, err := parseRange(r)
			if err != nil {
				errs = append(errs, &SyntaxError{Host: h, Range: r, Reason: err.Error()})
				continue
			}
			if to >= count {
				errs = append(errs, &RangeError{Host: h, Range: r, From: max(from, count), To: to, Count: count})
				to = count - 1
			}
			for s := from; s <= to; s++ {
				claims[s] = append(claims[s], h)
			}
		}
	}
	for from := 0; from < count; {
		to := from
		for to+1 < count && slices.Equal(claims[to+1], claims[from]) {
			to++
		}
		switch c := claims[from]; {
		case len(c) == 0:
			errs = append(errs, &GapError{From: from, To: to})
		case len(c) > 1:
			errs = append(errs, &OverlapError{From: from, To: to, Hosts: slices.Clone(c)})
		}
		from = to + 1
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	m := &Map{owner: make([]string, count), hosts: hosts}
	for s, c := range claims {
		m.owner[s] = c[0]
	}
	return m, nil
}

// parseRange reads "n" or "a-b". Only digits are accepted so that "-5" or
// "+5" is refused rather than guessed at.
func parseRange(r string) (from, to int, err error) {
	a, b, isRange := strings.Cut(r, "-")
	if from, err = parseShard(a); err != nil {
		return 0, 0, err
	}
	if !isRange {
		return from, from, nil
	}
	if to, err = parseShard(b); err != nil {
		return 0, 0, err
	}
	if from > to {
		return 0, 0, fmt.Errorf("start %d is after end %d", from, to)
	}
	return from, to, nil
}

func parseShard(s string) (int, error) {
	if s == "" || len(s) > 9 || strings.Trim(s, "0123456789") != "" {
		return 0, errors.New(`want "n" or "a-b" with a <= b, n, a and b decimal shard numbers`)
	}
	return strconv.Atoi(s)
}

// Count is the number of shards.
func (m *Map) Count() int { return len(m.owner) }

// Owner returns the host that owns shard, or "" when shard is out of range.
func (m *Map) Owner(shard int) string {
	if shard < 0 || shard >= len(m.owner) {
		return ""
	}
	return m.owner[shard]
}

// Owned returns the shards host owns, ascending; nil for an unknown host.
func (m *Map) Owned(host string) []int {
	var out []int
	for s, h := range m.owner {
		if h == host {
			out = append(out, s)
		}
	}
	return out
}

// Hosts returns every host named in the map, sorted, including those that
// own no shard.
func (m *Map) Hosts() []string { return slices.Clone(m.hosts) }

// Has reports whether host is named in the map.
func (m *Map) Has(host string) bool {
	_, found := slices.BinarySearch(m.hosts, host)
	return found
}

// Ranges returns host's shards compressed into the range strings ParseMap
// reads: consecutive shards become "a-b", a lone shard "n".
func (m *Map) Ranges(host string) []string {
	return Ranges(m.Owned(host))
}

// Ranges compresses ascending shard numbers into "a-b" and "n" strings.
func Ranges(shards []int) []string {
	out := []string{}
	for i := 0; i < len(shards); {
		j := i
		for j+1 < len(shards) && shards[j+1] == shards[j]+1 {
			j++
		}
		if i == j {
			out = append(out, strconv.Itoa(shards[i]))
		} else {
			out = append(out, fmt.Sprintf("%d-%d", shards[i], shards[j]))
		}
		i = j + 1
	}
	return out
}

// Entries returns the map in the form ParseMap reads.
func (m *Map) Entries() map[string][]string {
	out := make(map[string][]string, len(m.hosts))
	for _, h := range m.hosts {
		out[h] = m.Ranges(h)
	}
	return out
}

// Moved counts the shards whose owner differs between a and b. Maps of
// different counts number their shards differently, so every shard of b
// counts as moved.
func Moved(a, b *Map) int {
	if a.Count() != b.Count() {
		return b.Count()
	}
	n := 0
	for s := range a.owner {
		if a.owner[s] != b.owner[s] {
			n++
		}
	}
	return n
}

// TOML formats the map as a [shards.map] table that can be pasted into
// pushrelay.toml. Hosts come in natural order (fe2 before fe10), so the old
// and the new table of a rebalance diff line by line.
func (m *Map) TOML() string {
	hosts := m.Hosts()
	slices.SortStableFunc(hosts, naturalCompare) // stable: "fe01" and "fe1" tie

	var b strings.Builder
	b.WriteString("[shards.map]\n")
	for _, h := range hosts {
		b.WriteString(tomlKey(h))
		b.WriteString(" = [")
		for i, r := range m.Ranges(h) {
			if i > 0 {
				b.WriteString(", ")
			}
			b.WriteString(`"` + r + `"`)
		}
		b.WriteString("]\n")
	}
	return b.String()
}

// tomlKey writes a bare key when TOML allows one; host names with dots (FQDNs)
// must be quoted or TOML would read them as nested tables.
func tomlKey(k string) string {
	bare := k != ""
	for _, c := range k {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-') {
			bare = false
			break
		}
	}
	if bare {
		return k
	}
	var b strings.Builder
	b.WriteByte('"')
	for _, c := range k {
		switch {
		case c == '"' || c == '\\':
			b.WriteByte('\\')
			b.WriteRune(c)
		case c < 0x20 || c == 0x7f:
			fmt.Fprintf(&b, `\u%04X`, c)
		default:
			b.WriteRune(c)
		}
	}
	b.WriteByte('"')
	return b.String()
}

// naturalCompare orders strings with their digit runs compared as numbers.
func naturalCompare(a, b string) int {
	for a != "" && b != "" {
		da, db := digitPrefix(a), digitPrefix(b)
		if da > 0 && db > 0 {
			na, nb := strings.TrimLeft(a[:da], "0"), strings.TrimLeft(b[:db], "0")
			if c := cmp.Or(cmp.Compare(len(na), len(nb)), strings.Compare(na, nb)); c != 0 {
				return c
			}
			a, b = a[da:], b[db:]
			continue
		}
		if c := cmp.Compare(a[0], b[0]); c != 0 {
			return c
		}
		a, b = a[1:], b[1:]
	}
	return cmp.Compare(len(a), len(b))
}

func digitPrefix(s string) int {
	i := 0
	for i < len(s) && s[i] >= '0' && s[i] <= '9' {
		i++
	}
	return i
}
