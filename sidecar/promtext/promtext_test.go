package promtext

import (
	"math"
	"strings"
	"testing"
)

// A slice of the relay's /metrics as it writes it: HELP and TYPE lines, a
// VictoriaMetrics histogram, labelled counters, and one escaped label.
const relayText = `# HELP pushrelay_messages_received_total Deliveries consumed.
# TYPE pushrelay_messages_received_total counter
pushrelay_messages_received_total 1200
# HELP pushrelay_messages_dead_lettered_total Poison messages, by reason.
# TYPE pushrelay_messages_dead_lettered_total counter
pushrelay_messages_dead_lettered_total{reason="invalid_channel"} 7
pushrelay_messages_dead_lettered_total{reason="expired"} 3
# TYPE pushrelay_message_lag_seconds histogram
pushrelay_message_lag_seconds_bucket{le="0.001"} 10
pushrelay_message_lag_seconds_bucket{le="0.01"} 90
pushrelay_message_lag_seconds_bucket{le="+Inf"} 100
pushrelay_message_lag_seconds_sum 0.5
pushrelay_message_lag_seconds_count 100
pushrelay_publisher_state{state="ok"} 1
pushrelay_publisher_state{state="misconfigured"} 0
odd{path="a\"b\\c\nd", x = "1" ,} -1.5e-3 1700000000000
nan_gauge NaN
`

func TestParseRelayText(t *testing.T) {
	ss, err := Parse(strings.NewReader(relayText))
	if err != nil {
		t.Fatal(err)
	}
	if len(ss) != 12 {
		t.Fatalf("got %d samples, want 12", len(ss))
	}
	if v, ok := ss.Value("pushrelay_messages_received_total"); !ok || v != 1200 {
		t.Errorf("received = %v, %v", v, ok)
	}
	if v, _ := ss.Sum("pushrelay_messages_dead_lettered_total"); v != 10 {
		t.Errorf("dead letters sum = %v, want 10", v)
	}
	if v, ok := ss.Value("pushrelay_messages_dead_lettered_total", "reason", "expired"); !ok || v != 3 {
		t.Errorf("expired = %v, %v", v, ok)
	}
	if _, ok := ss.Value("pushrelay_messages_dead_lettered_total", "reason", "nope"); ok {
		t.Error("found a reason that is not there")
	}
	st := ss.ByLabel("pushrelay_publisher_state", "state")
	if st["ok"] != 1 || st["misconfigured"] != 0 || len(st) != 2 {
		t.Errorf("publisher states = %v", st)
	}
	odd, ok := ss.Value("odd")
	if !ok || odd != -1.5e-3 {
		t.Errorf("odd = %v, %v", odd, ok)
	}
	if got := ss[10].Label("path"); got != "a\"b\\c\nd" {
		t.Errorf("escaped label = %q", got)
	}
	if got := ss[10].Label("x"); got != "1" {
		t.Errorf("spaced label = %q", got)
	}
	if v, _ := ss.Value("nan_gauge"); !math.IsNaN(v) {
		t.Errorf("NaN gauge = %v", v)
	}
	b, err := ss.Histogram("pushrelay_message_lag_seconds")
	if err != nil {
		t.Fatal(err)
	}
	want := []Bucket{{0.001, 10}, {0.01, 90}, {math.Inf(1), 100}}
	if len(b) != len(want) {
		t.Fatalf("buckets = %v", b)
	}
	for i := range want {
		if b[i] != want[i] {
			t.Errorf("bucket %d = %v, want %v", i, b[i], want[i])
		}
	}
	if ss.Has("pushrelay_tcp_accepted_connections_total") {
		t.Error("Has found an absent family")
	}
}

// Each of these is refused with its line number, rather than read half.
func TestParseRefuses(t *testing.T) {
	for _, text := range []string{
		"m",                     // no value
		"m 1 2 3",               // too many fields
		"m abc",                 // not a number
		"m inf",                 // only +Inf, -Inf, NaN are spelled out
		"m 1e999",               // out of range
		"m{a=\"1\" 2",           // unterminated label set
		"m{a=1} 2",              // unquoted value
		"m{a=\"1\",a=\"2\"} 3",  // label twice
		"m{a=\"\\t\"} 1",        // unknown escape
		"m{1a=\"x\"} 1",         // bad label name
		"m{a=\"x\"}1",           // no space before the value
		"m{a=\"x\" b=\"y\"} 1",  // no comma
		"m 1 1.5",               // timestamp not an integer
		"1m 1",                  // bad name
		"# TYPE m countr",       // unknown type
		"# TYPE 9m counter",     // bad name in TYPE
		"# HELP",                // HELP without a name
		"m{a=\"unterminated} 1", // unterminated value
	} {
		in := "ok 1\n" + text + "\n"
		_, err := Parse(strings.NewReader(in))
		if err == nil {
			t.Errorf("%q: accepted", text)
			continue
		}
		if !strings.HasPrefix(err.Error(), "line 2: ") {
			t.Errorf("%q: error %q does not name line 2", text, err)
		}
	}
}

func TestParseAccepts(t *testing.T) {
	for _, text := range []string{
		"# just a comment",
		"#",
		"m +Inf",
		"m -Inf",
		"m{} 1",
		"m{a=\"\"} 0",
		"m:sub_1 0x1p-2",
		"  m 1  ",
		"m{a=\"x\",} 1",
	} {
		if _, err := Parse(strings.NewReader(text + "\n")); err != nil {
			t.Errorf("%q: %v", text, err)
		}
	}
}

func TestQuantile(t *testing.T) {
	inf := math.Inf(1)
	b := []Bucket{{0.001, 10}, {0.01, 90}, {0.1, 100}, {inf, 100}}
	for _, c := range []struct {
		q, want float64
	}{
		{0, 0},
		{0.05, 0.0005}, // rank 5 in [0, 0.001], 5 of 10
		{0.1, 0.001},   // exactly the first bound
		{0.5, 0.0055},  // rank 50: 0.001 + 0.009*40/80
		{0.9, 0.01},    // exactly the second bound
		{0.99, 0.091},  // rank 99: 0.01 + 0.09*9/10
		{1, 0.1},       // the last finite bucket holds all
	} {
		if got := Quantile(c.q, b); math.Abs(got-c.want) > 1e-12 {
			t.Errorf("Quantile(%v) = %v, want %v", c.q, got, c.want)
		}
	}
	// Observations above every finite bound: the highest finite bound,
	// as histogram_quantile answers.
	over := []Bucket{{0.001, 0}, {60, 1}, {inf, 10}}
	if got := Quantile(0.99, over); got != 60 {
		t.Errorf("rank in +Inf: %v, want 60", got)
	}
	for name, bs := range map[string][]Bucket{
		"empty":      nil,
		"no +Inf":    {{1, 5}},
		"no samples": {{1, 0}, {inf, 0}},
		"only +Inf":  {{inf, 3}},
	} {
		if got := Quantile(0.5, bs); !math.IsNaN(got) {
			t.Errorf("%s: %v, want NaN", name, got)
		}
	}
}

func TestDelta(t *testing.T) {
	inf := math.Inf(1)
	prev := []Bucket{{0.001, 100}, {0.01, 900}, {inf, 1000}}
	cur := []Bucket{{0.001, 100}, {0.01, 905}, {inf, 1010}}
	d := Delta(cur, prev)
	want := []Bucket{{0.001, 0}, {0.01, 5}, {inf, 10}}
	for i := range want {
		if d[i] != want[i] {
			t.Fatalf("Delta = %v, want %v", d, want)
		}
	}
	// Of the 10 new observations, 5 were ≤ 10 ms and 5 above: the median
	// is at the 10 ms bound, and p99 at the highest finite bound.
	if got := Quantile(0.5, d); got != 0.01 {
		t.Errorf("p50 of the interval = %v, want 0.01", got)
	}
	if got := Quantile(0.99, d); got != 0.01 {
		t.Errorf("p99 of the interval = %v, want 0.01", got)
	}
	// A restart between the scrapes: counts went down, cur is all there is.
	restarted := []Bucket{{0.001, 1}, {0.01, 2}, {inf, 2}}
	if d := Delta(restarted, prev); d[2].Count != 2 {
		t.Errorf("after a restart: %v", d)
	}
	// Bounds changed (a new build): cur as is.
	other := []Bucket{{0.005, 1}, {0.05, 2}, {inf, 2}}
	if d := Delta(other, prev); d[0].UpperBound != 0.005 {
		t.Errorf("other bounds: %v", d)
	}
}

// Parse reads text from the network: whatever it is given, it returns an
// error or samples with valid names, and never panics.
func FuzzParse(f *testing.F) {
	f.Add(relayText)
	f.Add("m{a=\"x\\\"\",b=\"\\\\\"} +Inf 1\n# TYPE m gauge\n")
	f.Add("m{a=\"unterminated} 1")
	f.Fuzz(func(t *testing.T, text string) {
		ss, err := Parse(strings.NewReader(text))
		if err != nil {
			return
		}
		for _, s := range ss {
			if !validName(s.Name) {
				t.Errorf("invalid name %q accepted", s.Name)
			}
			for _, l := range s.Labels {
				if !validName(l.Name) || strings.Contains(l.Name, ":") {
					t.Errorf("invalid label name %q accepted", l.Name)
				}
			}
		}
	})
}
