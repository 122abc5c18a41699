package main

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pushrelay/pushrelay/sidecar/promtext"
)

// relayMetrics renders the families top reads, as a relay writes them,
// from the counters of one moment.
func relayMetrics(received, published, deadInvalid, deadExpired, lagFast, lagSlow, accepted, packets int, extra string) string {
	return fmt.Sprintf(`# TYPE pushrelay_messages_received_total counter
pushrelay_messages_received_total %d
pushrelay_messages_published_total %d
pushrelay_messages_dead_lettered_total{reason="invalid_channel"} %d
pushrelay_messages_dead_lettered_total{reason="expired"} %d
pushrelay_message_lag_seconds_bucket{le="0.001"} 0
pushrelay_message_lag_seconds_bucket{le="0.01"} %d
pushrelay_message_lag_seconds_bucket{le="1"} %d
pushrelay_message_lag_seconds_bucket{le="+Inf"} %d
pushrelay_message_lag_seconds_sum 1
pushrelay_message_lag_seconds_count %d
pushrelay_tcp_accepted_connections_total{port="80"} %d
pushrelay_tcp_accepted_connections_total{port="443"} %d
pushrelay_tcp_established_connections{port="80"} 40
pushrelay_tcp_established_connections{port="443"} 2
pushrelay_packets_total{port="80",direction="rx"} %d
pushrelay_packets_total{port="80",direction="tx"} %d
pushrelay_start_time_seconds 1700000000
%s`, received, published, deadInvalid, deadExpired, lagFast, lagFast+lagSlow, lagFast+lagSlow, lagFast+lagSlow,
		accepted, accepted, packets, packets, extra)
}

const healthyGauges = `pushrelay_messages_in_flight 3
pushrelay_publish_oldest_pending_seconds 0.002
pushrelay_shards_owned 205
pushrelay_shards_draining 0
pushrelay_publisher_state{state="ok"} 1
pushrelay_publisher_state{state="unreachable"} 0
pushrelay_publisher_state{state="failing"} 0
pushrelay_publisher_state{state="misconfigured"} 0
pushrelay_amqp_connected 1
pushrelay_config_applied 1
`

func mustScrape(t *testing.T, at time.Time, text string) scrape {
	t.Helper()
	ss, err := promtext.Parse(strings.NewReader(text))
	if err != nil {
		t.Fatal(err)
	}
	return scrape{at: at, samples: ss}
}

func near(a, b float64) bool { return math.Abs(a-b) < 1e-9 }

func TestComputeRowRates(t *testing.T) {
	t0 := time.Unix(1700000100, 0)
	prev := mustScrape(t, t0, relayMetrics(1000, 990, 4, 1, 900, 0, 10, 500, healthyGauges))
	// Two seconds later: 400 in, 390 out, 6 dead letters (invalid_channel
	// 5, expired 1), 100 lagged observations: 98 ≤ 10 ms, 2 ≤ 1 s.
	cur := mustScrape(t, t0.Add(2*time.Second), relayMetrics(1400, 1380, 9, 2, 998, 2, 20, 700, healthyGauges))
	r := computeRow("fe1", prev, cur)
	for _, c := range []struct {
		what      string
		got, want float64
	}{
		{"in", r.in, 200},
		{"out", r.out, 195},
		{"dead", r.dead, 3},
		// rank 50 of 100, all 98 in (1 ms, 10 ms]: 1 + 9*50/98 ms.
		{"lag p50", r.lagP50, 0.001 + 0.009*50/98},
		// rank 99: the second of the 2 in (10 ms, 1 s]: 10 + 990*1/2 ms.
		{"lag p99", r.lagP99, 0.01 + 0.99*1/2},
		{"in flight", r.inFlight, 3},
		{"oldest", r.oldest, 0.002},
		{"owned", r.owned, 205},
		{"draining", r.drain, 0},
		{"accepted/s, both ports", r.accepted, 10},
		{"established, both ports", r.established, 42},
		{"packets/s, rx+tx", r.packets, 200},
		{"connected", r.connected, 1},
		{"applied", r.applied, 1},
	} {
		if !near(c.got, c.want) {
			t.Errorf("%s = %v, want %v", c.what, c.got, c.want)
		}
	}
	if r.deadReason != "invalid_channel" {
		t.Errorf("dead letter reason = %q, want invalid_channel", r.deadReason)
	}
	if r.publisher != "ok" {
		t.Errorf("publisher = %q", r.publisher)
	}
}

func TestComputeRowFirstScrapeAndProbesOff(t *testing.T) {
	cur := mustScrape(t, time.Now(), "pushrelay_messages_received_total 5\npushrelay_messages_in_flight 0\n")
	r := computeRow("fe1", scrape{}, cur)
	// No previous scrape: rates and the interval's quantiles are unknown;
	// families not exported (probes off, an older relay) too.
	for what, v := range map[string]float64{"in": r.in, "lag p50": r.lagP50, "accepted": r.accepted, "established": r.established, "connected": r.connected} {
		if !math.IsNaN(v) {
			t.Errorf("%s = %v, want unknown", what, v)
		}
	}
	if r.inFlight != 0 {
		t.Errorf("in flight = %v", r.inFlight)
	}
	if ps := problems([]row{r}); len(ps) != 0 {
		t.Errorf("unknowns reported as problems: %v", ps)
	}
}

// A relay restarted between scrapes: counters start again from 0, and the
// rate is what the new process counted, never negative.
func TestComputeRowRestart(t *testing.T) {
	t0 := time.Now()
	prev := mustScrape(t, t0, relayMetrics(5000, 5000, 0, 0, 10, 0, 0, 0, healthyGauges))
	restarted := strings.Replace(relayMetrics(30, 20, 0, 0, 4, 0, 0, 0, healthyGauges), "start_time_seconds 1700000000", "start_time_seconds 1700000500", 1)
	r := computeRow("fe1", prev, mustScrape(t, t0.Add(time.Second), restarted))
	if r.in != 30 || r.out != 20 {
		t.Errorf("after a restart: in %v out %v, want 30 20", r.in, r.out)
	}
	if !near(r.lagP50, 0.001+0.009*2/4) {
		t.Errorf("lag p50 after a restart = %v", r.lagP50)
	}
	if counterRate(100, 40, 2) != 20 {
		t.Error("a counter that went down is counted from 0")
	}
}

func TestComputeRowNoLagInInterval(t *testing.T) {
	t0 := time.Now()
	a := mustScrape(t, t0, relayMetrics(10, 10, 0, 0, 10, 0, 0, 0, healthyGauges))
	b := mustScrape(t, t0.Add(time.Second), relayMetrics(10, 10, 0, 0, 10, 0, 0, 0, healthyGauges))
	r := computeRow("fe1", a, b)
	// Lag observed before the interval must not show as the interval's.
	if !math.IsNaN(r.lagP50) || !math.IsNaN(r.lagP99) {
		t.Errorf("no observation in the interval, yet p50 %v p99 %v", r.lagP50, r.lagP99)
	}
	if r.in != 0 {
		t.Errorf("in = %v", r.in)
	}
}

func TestProblemsOrder(t *testing.T) {
	ok := row{name: "ok", in: 1, out: 1, lagP50: 0.001, lagP99: 0.002, oldest: 0, publisher: "ok", connected: 1, applied: 1}
	with := func(name string, f func(r *row)) row {
		r := ok
		r.name = name
		f(&r)
		return r
	}
	rows := []row{
		with("fe8", func(r *row) { r.drain = 12 }),
		with("fe7", func(r *row) { r.lagP99 = 2.5 }),
		with("fe6", func(r *row) { r.applied = 0 }),
		with("fe3", func(r *row) { r.oldest = 42 }),
		with("fe4", func(r *row) { r.dead, r.deadReason = 12, "invalid_channel" }),
		with("fe4b", func(r *row) { r.dead, r.deadReason = 0.5, "expired" }),
		with("fe1", func(r *row) { r.publisher = "misconfigured" }),
		with("fe1b", func(r *row) { r.publisher = "unreachable" }),
		with("fe2", func(r *row) { r.connected = 0 }),
		{name: "fe5", err: errors.New("connection refused")},
		ok,
		with("fe3b", func(r *row) { r.oldest = 4.9 }), // below the threshold
	}
	var got []string
	for _, p := range problems(rows) {
		got = append(got, p.text)
	}
	want := []string{
		"fe5: scrape failed: connection refused",
		"fe2: not consuming",
		"fe1b: publisher unreachable",
		"fe1: publisher misconfigured",
		"fe4: 12 dead letters/s (invalid_channel)",
		"fe4b: 0.5 dead letters/s (expired)",
		"fe3: oldest pending 42 s",
		"fe6: config not applied yet",
		"fe7: lag p99 2.5s",
		"fe8: 12 shards draining",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("problems, worst first:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	lines := frame(rows, time.Second, time.Now(), false)
	if f := footerLines(lines); len(f) != 2 || f[0] != "worst: fe5: scrape failed: connection refused" || !strings.HasPrefix(f[1], "also:  fe2: not consuming; ") {
		t.Errorf("footer = %q", f)
	}
	if f := footerLines(frame([]row{ok}, time.Second, time.Now(), false)); len(f) != 1 || f[0] != "worst: nothing, 1 host ok" {
		t.Errorf("healthy footer = %q", f)
	}
}

func TestParseTargets(t *testing.T) {
	for _, c := range []struct {
		args []string
		want []target
	}{
		{nil, []target{{"127.0.0.1", "http://127.0.0.1:9470/metrics", false}}},
		{[]string{"fe1", "fe2:9999"}, []target{{"fe1", "http://fe1:9470/metrics", false}, {"fe2", "http://fe2:9999/metrics", false}}},
		{[]string{"127.0.0.1:1", "127.0.0.1:2"}, []target{{"127.0.0.1:1", "http://127.0.0.1:1/metrics", false}, {"127.0.0.1:2", "http://127.0.0.1:2/metrics", false}}},
		{[]string{"fe3=127.0.0.1:9471", "https://fe4.example/relay/metrics?x=1"}, []target{{"fe3", "http://127.0.0.1:9471/metrics", true}, {"fe4.example", "https://fe4.example/relay/metrics?x=1", false}}},
		{[]string{"[::1]:9470", "::1"}, []target{{"[::1]:9470", "http://[::1]:9470/metrics", false}, {"[::1]:9470", "http://[::1]:9470/metrics", false}}},
	} {
		got, err := parseTargets(c.args)
		if err != nil {
			t.Errorf("%q: %v", c.args, err)
			continue
		}
		if fmt.Sprint(got) != fmt.Sprint(c.want) {
			t.Errorf("%q: %v, want %v", c.args, got, c.want)
		}
	}
	for _, bad := range []string{"ftp://fe1/metrics", "http:///metrics"} {
		if _, err := parseTargets([]string{bad}); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestScreenFitsTheTerminal(t *testing.T) {
	lines := []string{"title", "", "HOST", "row1 " + strings.Repeat("x", 200), "row2", "row3", "", "worst: fe1: not consuming", "also:  fe2: x"}
	s := screen(lines, 20, 6)
	body := strings.TrimSuffix(strings.TrimPrefix(s, "\x1b[H"), "\x1b[J")
	got := strings.Split(body, "\x1b[K\r\n")
	got[len(got)-1] = strings.TrimSuffix(got[len(got)-1], "\x1b[K")
	if len(got) != 6 {
		t.Fatalf("%d lines on a 6-line terminal: %q", len(got), got)
	}
	for _, l := range got {
		if len([]rune(l)) > 20 {
			t.Errorf("line wider than 20: %q", l)
		}
	}
	// The footer stays; rows give way.
	if got[4] != "worst: fe1: not cons" || got[5] != "also:  fe2: x" {
		t.Errorf("footer lost: %q", got)
	}
}

func TestFormats(t *testing.T) {
	for _, c := range []struct{ got, want string }{
		{fmtRate(math.NaN()), "-"}, {fmtRate(0), "0"}, {fmtRate(0.25), "0.25"}, {fmtRate(0.5), "0.5"}, {fmtRate(12.5), "12.5"}, {fmtRate(40), "40"}, {fmtRate(0.04), "0.04"}, {fmtRate(0.001), "<0.01"},
		{fmtRate(873.4), "873"}, {fmtRate(12345), "12.3k"}, {fmtRate(2.5e7), "25.0M"},
		{fmtSeconds(math.NaN()), "-"}, {fmtSeconds(0.0004), "400us"}, {fmtSeconds(0.00074), "740us"},
		{fmtSeconds(0.0042), "4.20ms"}, {fmtSeconds(0.018), "18ms"}, {fmtSeconds(42), "42.0s"}, {fmtSeconds(600), "600s"},
	} {
		if c.got != c.want {
			t.Errorf("got %q, want %q", c.got, c.want)
		}
	}
}

// -once scrapes twice one interval apart, so the snapshot has rates, and
// exits 1 when a host could not be scraped.
func TestTopOnce(t *testing.T) {
	var n atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/metrics" {
			http.NotFound(w, r)
			return
		}
		k := int(n.Add(1)) - 1 // 0, then 1
		fmt.Fprint(w, relayMetrics(100+50*k, 100+50*k, 0, 0, 100+50*k, 0, 0, 0, healthyGauges))
	}))
	defer srv.Close()
	addr := strings.TrimPrefix(srv.URL, "http://")

	var out, errb bytes.Buffer
	code := dispatch([]string{"top", "-once", "-interval", "200ms", "fe1=" + addr}, strings.NewReader(""), &out, &errb)
	if code != 0 {
		t.Fatalf("exit %d: %s%s", code, out.String(), errb.String())
	}
	text := out.String()
	if strings.Contains(text, "\x1b") {
		t.Errorf("escape sequences in -once output:\n%q", text)
	}
	row := lineStarting(text, "fe1 ")
	// 50 messages in 200 ms: about 250/s, give or take the scheduling.
	f := strings.Fields(row)
	if len(f) < 3 || f[1] == "-" || f[1] == "0" || f[2] == "-" || f[2] == "0" {
		t.Errorf("no rates in the row %q:\n%s", row, text)
	}
	if !strings.Contains(text, "\nworst: nothing, 1 host ok\n") {
		t.Errorf("footer:\n%s", text)
	}

	out.Reset()
	code = dispatch([]string{"top", "-once", "-interval", "100ms", "fe1=" + addr, "fe5=127.0.0.1:1"}, strings.NewReader(""), &out, &errb)
	if code != 1 {
		t.Errorf("exit %d with a failed scrape, want 1", code)
	}
	if !strings.Contains(out.String(), "worst: fe5: scrape failed: connection refused") {
		t.Errorf("footer does not name the failed scrape:\n%s", out.String())
	}
}

func lineStarting(text, prefix string) string {
	for _, l := range strings.Split(text, "\n") {
		if strings.HasPrefix(l, prefix) {
			return l
		}
	}
	return ""
}

// A row is named by the relay's own host label, which every relay exports,
// rather than by the address Prometheus or the user reaches it by; a name
// the user gave wins.
func TestTopNamesARowByTheRelaysHost(t *testing.T) {
	scrapeOf := func(text string) scrape {
		ss, err := promtext.Parse(strings.NewReader(text))
		if err != nil {
			t.Fatal(err)
		}
		return scrape{samples: ss}
	}
	info := "pushrelay_build_info{version=\"dev\",host=\"web3\"} 1\n"
	v := &topView{
		targets: []target{{name: "127.0.0.1", url: "http://127.0.0.1:9470/metrics"}, {name: "fe1", url: "http://127.0.0.1:9471/metrics", named: true}},
		cur:     []scrape{scrapeOf(info), scrapeOf(info)},
	}
	rows := v.rows()
	if rows[0].name != "web3" || rows[1].name != "fe1" {
		t.Errorf("rows named %q and %q, want web3 (its host label) and fe1 (named by the user)", rows[0].name, rows[1].name)
	}
	v.cur[0] = scrape{} // no scrape yet: the address stands in
	if rows := v.rows(); rows[0].name != "127.0.0.1" {
		t.Errorf("before a scrape the row is named %q, want 127.0.0.1", rows[0].name)
	}
}
