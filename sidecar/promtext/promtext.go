// Package promtext reads the Prometheus text exposition format (version
// 0.0.4), as the relay's /metrics writes it, for `pushrelay top`.
//
// It is strict about what it needs to get right (names, label quoting and
// escapes, values) and refuses a malformed line with its number, rather
// than showing a figure read from half a line. It ignores what top does not
// use: HELP and TYPE are checked for shape only, and timestamps are
// dropped. The relay's own families are the target, so no OpenMetrics
// extensions (exemplars, # EOF) are accepted.
package promtext

import (
	"bufio"
	"fmt"
	"io"
	"math"
	"slices"
	"strconv"
	"strings"
)

// Label is one name="value" pair of a sample.
type Label struct{ Name, Value string }

// Sample is one line of the exposition: a metric name, its labels in the
// order written, and the value.
type Sample struct {
	Name   string
	Labels []Label
	Value  float64
}

// Label returns the value of label name, or "".
func (s Sample) Label(name string) string {
	for _, l := range s.Labels {
		if l.Name == name {
			return l.Value
		}
	}
	return ""
}

// Samples is a parsed scrape, in the order of the text.
type Samples []Sample

// maxLine bounds one line, so that a wrong URL serving something huge is
// refused rather than read into memory whole.
const maxLine = 1 << 20

// Parse reads a whole exposition. A line it cannot read is an error naming
// its number; nothing is returned then.
func Parse(r io.Reader) (Samples, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64*1024), maxLine)
	var out Samples
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimRight(sc.Text(), " \t\r")
		line = strings.TrimLeft(line, " \t")
		if line == "" {
			continue
		}
		if line[0] == '#' {
			if err := checkComment(line); err != nil {
				return nil, fmt.Errorf("line %d: %w", n, err)
			}
			continue
		}
		s, err := ParseLine(line)
		if err != nil {
			return nil, fmt.Errorf("line %d: %w", n, err)
		}
		out = append(out, s)
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	return out, nil
}

// checkComment accepts any comment, but a HELP or TYPE line must name a
// valid metric, and TYPE a known type.
func checkComment(line string) error {
	f := strings.Fields(line)
	if len(f) < 2 || f[0] != "#" || (f[1] != "HELP" && f[1] != "TYPE") {
		return nil // a plain comment
	}
	if len(f) < 3 || !validName(f[2]) {
		return fmt.Errorf("%s without a valid metric name", f[1])
	}
	if f[1] == "TYPE" {
		if len(f) != 4 {
			return fmt.Errorf("TYPE %s: want one type", f[2])
		}
		switch f[3] {
		case "counter", "gauge", "histogram", "summary", "untyped":
		default:
			return fmt.Errorf("TYPE %s: unknown type %q", f[2], f[3])
		}
	}
	return nil
}

// ParseLine reads one sample line: name, optional {labels}, value and an
// optional integer timestamp, which is dropped.
func ParseLine(line string) (Sample, error) {
	var s Sample
	i := 0
	for i < len(line) && isNameChar(line[i], i == 0) {
		i++
	}
	if i == 0 {
		return s, fmt.Errorf("no metric name in %q", line)
	}
	s.Name = line[:i]
	rest := line[i:]
	if strings.HasPrefix(rest, "{") {
		labels, n, err := parseLabels(rest)
		if err != nil {
			return s, fmt.Errorf("%s: %w", s.Name, err)
		}
		s.Labels = labels
		rest = rest[n:]
	}
	if rest == "" || (rest[0] != ' ' && rest[0] != '\t') {
		return s, fmt.Errorf("%s: no space before the value", s.Name)
	}
	f := strings.Fields(rest)
	if len(f) < 1 || len(f) > 2 {
		return s, fmt.Errorf("%s: want a value and an optional timestamp, got %q", s.Name, strings.TrimSpace(rest))
	}
	v, err := parseValue(f[0])
	if err != nil {
		return s, fmt.Errorf("%s: %w", s.Name, err)
	}
	if len(f) == 2 {
		if _, err := strconv.ParseInt(f[1], 10, 64); err != nil {
			return s, fmt.Errorf("%s: bad timestamp %q", s.Name, f[1])
		}
	}
	s.Value = v
	return s, nil
}

// parseLabels reads `{a="x",b="y"}` (a trailing comma allowed) at the start
// of s and returns how many bytes it took.
func parseLabels(s string) ([]Label, int, error) {
	var labels []Label
	i := 1 // past '{'
	for {
		for i < len(s) && (s[i] == ' ' || s[i] == '\t') {
			i++
		}
		if i >= len(s) {
			return nil, 0, fmt.Errorf("unterminated label set")
		}
		if s[i] == '}' {
			return labels, i + 1, nil
		}
		start := i
		for i < len(s) && isLabelChar(s[i], i == start) {
			i++
		}
		if i == start {
			return nil, 0, fmt.Errorf("bad label name at %q", s[start:])
		}
		name := s[start:i]
		for i < len(s) && (s[i] == ' ' || s[i] == '\t') {
			i++
		}
		if i+1 >= len(s) || s[i] != '=' {
			return nil, 0, fmt.Errorf("label %s: want =\"value\"", name)
		}
		i++
		for i < len(s) && (s[i] == ' ' || s[i] == '\t') {
			i++
		}
		if i >= len(s) || s[i] != '"' {
			return nil, 0, fmt.Errorf("label %s: value not quoted", name)
		}
		i++
		var v strings.Builder
		closed := false
		for i < len(s) {
			c := s[i]
			i++
			if c == '"' {
				closed = true
				break
			}
			if c != '\\' {
				v.WriteByte(c)
				continue
			}
			if i >= len(s) {
				break
			}
			switch e := s[i]; e {
			case '\\', '"':
				v.WriteByte(e)
			case 'n':
				v.WriteByte('\n')
			default:
				return nil, 0, fmt.Errorf("label %s: bad escape \\%c", name, e)
			}
			i++
		}
		if !closed {
			return nil, 0, fmt.Errorf("label %s: unterminated value", name)
		}
		for _, l := range labels {
			if l.Name == name {
				return nil, 0, fmt.Errorf("label %s twice", name)
			}
		}
		labels = append(labels, Label{name, v.String()})
		for i < len(s) && (s[i] == ' ' || s[i] == '\t') {
			i++
		}
		if i < len(s) && s[i] == ',' {
			i++
			continue
		}
		if i < len(s) && s[i] == '}' {
			return labels, i + 1, nil
		}
		return nil, 0, fmt.Errorf("label %s: want , or } after the value", name)
	}
}

func parseValue(s string) (float64, error) {
	switch s {
	case "+Inf", "Inf":
		return math.Inf(1), nil
	case "-Inf":
		return math.Inf(-1), nil
	case "NaN":
		return math.NaN(), nil
	}
	// ParseFloat also takes "inf", "infinity" and "nan" in any case; the
	// format allows only the spellings above, hence the Inf/NaN check.
	v, err := strconv.ParseFloat(s, 64)
	if err != nil || math.IsInf(v, 0) || math.IsNaN(v) {
		return 0, fmt.Errorf("bad value %q", s)
	}
	return v, nil
}

func isNameChar(c byte, first bool) bool {
	return c == '_' || c == ':' || ('a' <= c && c <= 'z') || ('A' <= c && c <= 'Z') || (!first && '0' <= c && c <= '9')
}

func isLabelChar(c byte, first bool) bool {
	return c != ':' && isNameChar(c, first)
}

func validName(s string) bool {
	for i := 0; i < len(s); i++ {
		if !isNameChar(s[i], i == 0) {
			return false
		}
	}
	return s != ""
}

// Has reports whether any sample of the metric name is present.
func (ss Samples) Has(name string) bool {
	for _, s := range ss {
		if s.Name == name {
			return true
		}
	}
	return false
}

// Value returns the sample of name whose labels include every given
// name, value pair (labelPairs alternates names and values), and whether
// there was one.
func (ss Samples) Value(name string, labelPairs ...string) (float64, bool) {
	for _, s := range ss {
		if s.Name == name && matches(s, labelPairs) {
			return s.Value, true
		}
	}
	return 0, false
}

// Sum adds every sample of name, whatever its labels, and says whether
// there was any.
func (ss Samples) Sum(name string) (float64, bool) {
	sum, found := 0.0, false
	for _, s := range ss {
		if s.Name == name {
			sum += s.Value
			found = true
		}
	}
	return sum, found
}

// ByLabel maps each value of label to its sample's value, for a family
// split by one label (dead letters by reason, publisher state).
func (ss Samples) ByLabel(name, label string) map[string]float64 {
	out := map[string]float64{}
	for _, s := range ss {
		if s.Name == name {
			out[s.Label(label)] += s.Value
		}
	}
	return out
}

func matches(s Sample, pairs []string) bool {
	for i := 0; i+1 < len(pairs); i += 2 {
		if s.Label(pairs[i]) != pairs[i+1] {
			return false
		}
	}
	return true
}

// Bucket is one cumulative histogram bucket: the count of observations at
// most UpperBound.
type Bucket struct {
	UpperBound float64
	Count      float64
}

// Histogram returns the cumulative buckets of histogram family name (its
// name_bucket samples), sorted by bound, or nil if there are none. A
// bucket with an unreadable le is an error: its counts cannot be placed.
func (ss Samples) Histogram(name string) ([]Bucket, error) {
	var out []Bucket
	for _, s := range ss {
		if s.Name != name+"_bucket" {
			continue
		}
		le, err := parseValue(s.Label("le"))
		if err != nil {
			return nil, fmt.Errorf("%s_bucket: le: %w", name, err)
		}
		out = append(out, Bucket{le, s.Value})
	}
	slices.SortFunc(out, func(a, b Bucket) int {
		switch {
		case a.UpperBound < b.UpperBound:
			return -1
		case a.UpperBound > b.UpperBound:
			return 1
		}
		return 0
	})
	return out, nil
}

// Delta is cur minus prev, bucket by bucket: the observations made between
// two scrapes. When the bounds differ, or a count went down (the process
// restarted in between), cur is returned as it is, the best estimate of
// what happened since the restart.
func Delta(cur, prev []Bucket) []Bucket {
	if len(prev) != len(cur) {
		return cur
	}
	out := make([]Bucket, len(cur))
	for i := range cur {
		if cur[i].UpperBound != prev[i].UpperBound || cur[i].Count < prev[i].Count {
			return cur
		}
		out[i] = Bucket{cur[i].UpperBound, cur[i].Count - prev[i].Count}
	}
	return out
}

// Quantile estimates the q-quantile (0 ≤ q ≤ 1) from cumulative buckets
// the way Prometheus's histogram_quantile does: linear interpolation
// inside the bucket the rank falls in, 0 as the lower bound of the first
// bucket, and the highest finite bound when the rank falls in +Inf. It
// returns NaN without observations or without a +Inf bucket.
func Quantile(q float64, buckets []Bucket) float64 {
	if len(buckets) == 0 || !math.IsInf(buckets[len(buckets)-1].UpperBound, 1) || q < 0 || q > 1 {
		return math.NaN()
	}
	total := buckets[len(buckets)-1].Count
	if total <= 0 {
		return math.NaN()
	}
	rank := q * total
	i := 0
	for i < len(buckets)-1 && buckets[i].Count < rank {
		i++
	}
	if i == len(buckets)-1 { // the +Inf bucket: nothing to interpolate towards
		if i == 0 {
			return math.NaN()
		}
		return buckets[i-1].UpperBound
	}
	lower, below := 0.0, 0.0
	if i > 0 {
		lower, below = buckets[i-1].UpperBound, buckets[i-1].Count
	}
	upper, in := buckets[i].UpperBound, buckets[i].Count-below
	if upper <= 0 && i == 0 {
		return upper
	}
	if in <= 0 || rank >= buckets[i].Count {
		return upper // exactly, not upper plus rounding
	}
	return lower + (upper-lower)*(rank-below)/in
}
