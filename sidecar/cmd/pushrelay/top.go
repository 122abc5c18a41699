package main

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pushrelay/pushrelay/sidecar/promtext"
)

// defaultTopAddr is metrics.listen's default.
const defaultTopAddr = "127.0.0.1:9470"

// Thresholds above which a healthy-looking host still gets named in the
// footer. A delivery pending 5 s is stuck (loopback publishes take µs and
// retries back off to push.retry_max, 1 s by default); a p99 lag of a
// second is what a browser user notices.
const (
	stuckPending = 5.0 // seconds
	slowLagP99   = 1.0 // seconds
)

// runTop is `pushrelay top [ADDR...]`: a live view of relays' /metrics,
// one row per host, for the operator on call. Everything it shows comes
// from /metrics, so it works from any machine that can reach the relays.
func runTop(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("top", flag.ContinueOnError)
	fs.SetOutput(stderr)
	interval := fs.Duration("interval", time.Second, "time between scrapes; rates are over this interval")
	once := fs.Bool("once", false, "scrape twice, one interval apart, print one snapshot and exit (1 if a scrape failed)")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: pushrelay top [-interval 1s] [-once] [[NAME=]ADDR...]")
		fmt.Fprintln(stderr, "  ADDR is host[:port] or a URL of /metrics; default "+defaultTopAddr+". NAME labels the row.")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *interval < 100*time.Millisecond {
		fmt.Fprintln(stderr, "pushrelay top: -interval must be at least 100ms")
		return 2
	}
	targets, err := parseTargets(fs.Args())
	if err != nil {
		fmt.Fprintln(stderr, "pushrelay top:", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	t := &topView{targets: targets, interval: *interval, client: &http.Client{}}
	if *once {
		return t.runOnce(ctx, stdout)
	}
	return t.runLive(ctx, stdin, stdout)
}

// target is one relay's /metrics.
// target is one relay to scrape. named: the user gave NAME=; otherwise the
// row takes the relay's own host label once a scrape has it.
type target struct {
	name, url string
	named     bool
}

// parseTargets reads [NAME=]ADDR arguments. A row is named by NAME, else
// by the relay's host (its pushrelay_build_info label), else, until a
// scrape answers, by the address's host, or host:port where hosts repeat
// (several relays behind one tunnel).
func parseTargets(args []string) ([]target, error) {
	if len(args) == 0 {
		args = []string{defaultTopAddr}
	}
	out := make([]target, 0, len(args))
	hosts := map[string]int{}
	for _, a := range args {
		name, addr, labelled := strings.Cut(a, "=")
		if !labelled || strings.Contains(name, "/") {
			name, addr = "", a
		}
		u, err := metricsURL(addr)
		if err != nil {
			return nil, fmt.Errorf("%q: %w", a, err)
		}
		out = append(out, target{name: name, url: u.String(), named: name != ""})
		hosts[u.Hostname()]++
	}
	for i := range out {
		if out[i].name != "" {
			continue
		}
		u, _ := url.Parse(out[i].url)
		out[i].name = u.Hostname()
		if hosts[u.Hostname()] > 1 {
			out[i].name = u.Host
		}
	}
	return out, nil
}

// metricsURL turns host, host:port or a URL into the URL of /metrics: the
// port defaults to 9470 and the path to /metrics.
func metricsURL(addr string) (*url.URL, error) {
	if !strings.Contains(addr, "://") {
		if _, _, err := net.SplitHostPort(addr); err != nil {
			addr = net.JoinHostPort(strings.Trim(addr, "[]"), "9470")
		}
		addr = "http://" + addr
	}
	u, err := url.Parse(addr)
	if err != nil {
		return nil, err
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return nil, fmt.Errorf("scheme %q: want http or https", u.Scheme)
	}
	if u.Hostname() == "" {
		return nil, errors.New("no host")
	}
	if u.Path == "" || u.Path == "/" {
		u.Path = "/metrics"
	}
	return u, nil
}

// scrape is one read of a target's /metrics.
type scrape struct {
	at      time.Time
	samples promtext.Samples
	err     error
}

type topView struct {
	targets  []target
	interval time.Duration
	client   *http.Client
	prev     []scrape // the scrape before the latest, per target
	cur      []scrape
}

// scrapeAll reads every target at once, each within timeout, and shifts
// the latest scrapes into prev.
func (t *topView) scrapeAll(ctx context.Context, timeout time.Duration) {
	next := make([]scrape, len(t.targets))
	var wg sync.WaitGroup
	for i, tg := range t.targets {
		wg.Go(func() {
			c, cancel := context.WithTimeout(ctx, timeout)
			defer cancel()
			next[i] = t.fetch(c, tg.url)
		})
	}
	wg.Wait()
	t.prev, t.cur = t.cur, next
}

func (t *topView) fetch(ctx context.Context, u string) scrape {
	s := scrape{at: time.Now()}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		s.err = err
		return s
	}
	resp, err := t.client.Do(req)
	if err != nil {
		s.err = shortErr(err)
		return s
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		s.err = fmt.Errorf("HTTP %s", resp.Status)
		return s
	}
	// A relay's /metrics is tens of KiB; a wrong URL may serve anything.
	body, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		s.err = shortErr(err)
		return s
	}
	s.samples, s.err = promtext.Parse(bytes.NewReader(body))
	return s
}

// shortErr drops the method and URL net/http puts in front of the cause,
// which the row's name already says: "connection refused" fits a row.
func shortErr(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		err = ue.Err
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return errors.New("timeout")
	}
	var se syscall.Errno
	if errors.As(err, &se) {
		return se
	}
	return err
}

func (t *topView) rows() []row {
	out := make([]row, len(t.targets))
	for i, tg := range t.targets {
		var prev scrape
		if i < len(t.prev) {
			prev = t.prev[i]
		}
		name := tg.name
		if host := hostLabel(t.cur[i].samples); host != "" && !tg.named {
			name = host
		}
		out[i] = computeRow(name, prev, t.cur[i])
	}
	return out
}

// hostLabel is the relay's host (config key host) from its build_info
// sample, or "" before the first scrape or from a relay that has none.
func hostLabel(samples promtext.Samples) string {
	for _, s := range samples {
		if s.Name == "pushrelay_build_info" {
			return s.Label("host")
		}
	}
	return ""
}

func (t *topView) runOnce(ctx context.Context, stdout io.Writer) int {
	t.scrapeAll(ctx, t.interval)
	select {
	case <-ctx.Done():
		return 130
	case <-time.After(t.interval):
	}
	t.scrapeAll(ctx, t.interval)
	rows := t.rows()
	fmt.Fprint(stdout, strings.Join(frame(rows, t.interval, time.Now(), false), "\n")+"\n")
	for _, r := range rows {
		if r.err != nil {
			return 1
		}
	}
	return 0
}

// runLive redraws every interval until q, Ctrl-C or SIGTERM. On a terminal
// it draws in the alternate screen, as top does; otherwise (a pipe, a log
// file) it appends one plain snapshot per interval.
func (t *topView) runLive(ctx context.Context, stdin io.Reader, stdout io.Writer) int {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	out, tty := stdout.(*os.File)
	tty = tty && isTerminal(out)
	if in, ok := stdin.(*os.File); ok && isTerminal(in) {
		restore, err := cbreak(in)
		if err == nil {
			defer restore()
		}
		go readKeys(in, cancel)
	}
	winch := make(chan os.Signal, 1)
	if tty {
		signal.Notify(winch, syscall.SIGWINCH)
		defer signal.Stop(winch)
		fmt.Fprint(out, "\x1b[?1049h\x1b[?25l") // alternate screen, hide cursor
		defer fmt.Fprint(out, "\x1b[?25h\x1b[?1049l")
	}
	// Scrapes must not outlast the refresh, or a dead host would slow the
	// view of the live ones.
	timeout := max(t.interval*9/10, 100*time.Millisecond)
	var rows []row
	draw := func() {
		if !tty {
			fmt.Fprint(stdout, strings.Join(frame(rows, t.interval, time.Now(), false), "\n")+"\n\n")
			return
		}
		w, h := termSize(out)
		fmt.Fprint(out, screen(frame(rows, t.interval, time.Now(), true), w, h))
	}
	tick := time.NewTicker(t.interval)
	defer tick.Stop()
	for {
		t.scrapeAll(ctx, timeout)
		if ctx.Err() != nil {
			return 0
		}
		rows = t.rows()
		draw()
	wait:
		for {
			select {
			case <-ctx.Done():
				return 0
			case <-winch:
				draw()
			case <-tick.C:
				break wait
			}
		}
	}
}

// readKeys cancels on q, Q or a Ctrl-C byte (should the terminal deliver
// it as a byte rather than SIGINT). It blocks in Read until the process
// exits: a terminal read cannot be interrupted portably, and top exits
// when it returns.
func readKeys(in *os.File, cancel func()) {
	buf := make([]byte, 16)
	for {
		n, err := in.Read(buf)
		if err != nil {
			cancel()
			return
		}
		if bytes.ContainsAny(buf[:n], "qQ\x03") {
			cancel()
			return
		}
	}
}

func isTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// cbreak turns off line buffering and echo so a single q is read at once,
// and keeps ISIG so that Ctrl-C stays SIGINT. x/sys/unix, already a
// dependency, does what golang.org/x/term would.
func cbreak(f *os.File) (restore func(), err error) {
	fd := int(f.Fd())
	old, err := unix.IoctlGetTermios(fd, unix.TCGETS)
	if err != nil {
		return nil, err
	}
	raw := *old
	raw.Lflag &^= unix.ICANON | unix.ECHO
	raw.Cc[unix.VMIN], raw.Cc[unix.VTIME] = 1, 0
	if err := unix.IoctlSetTermios(fd, unix.TCSETS, &raw); err != nil {
		return nil, err
	}
	return func() { unix.IoctlSetTermios(fd, unix.TCSETS, old) }, nil
}

func termSize(f *os.File) (w, h int) {
	ws, err := unix.IoctlGetWinsize(int(f.Fd()), unix.TIOCGWINSZ)
	if err != nil || ws.Col == 0 || ws.Row == 0 {
		return 80, 24
	}
	return int(ws.Col), int(ws.Row)
}

// screen draws lines from the top-left corner, each cut to the width and
// cleared to its end, then clears what is below: no flicker from a full
// clear. Rows that do not fit the height give way to the footer.
func screen(lines []string, w, h int) string {
	if len(lines) > h && h > 0 {
		footer := footerLines(lines)
		keep := max(h-len(footer)-1, 0)
		hidden := 0
		for _, l := range lines[keep : len(lines)-len(footer)] {
			if l != "" {
				hidden++
			}
		}
		lines = append(append(slices.Clip(lines[:keep]), fmt.Sprintf("(%d more rows; enlarge the window)", hidden)), footer...)
		if len(lines) > h {
			lines = lines[len(lines)-h:]
		}
	}
	var b strings.Builder
	b.WriteString("\x1b[H")
	for i, l := range lines {
		b.WriteString(truncate(l, w))
		b.WriteString("\x1b[K")
		if i < len(lines)-1 {
			b.WriteString("\r\n")
		}
	}
	b.WriteString("\x1b[J")
	return b.String()
}

// footerLines are the trailing "worst:" and "also:" lines of a frame.
func footerLines(lines []string) []string {
	for i := len(lines) - 1; i >= 0; i-- {
		if strings.HasPrefix(lines[i], "worst:") {
			return lines[i:]
		}
	}
	return nil
}

// truncate cuts s to w columns; every cell top writes is one rune wide.
func truncate(s string, w int) string {
	if w <= 0 {
		return ""
	}
	r := []rune(s)
	if len(r) <= w {
		return s
	}
	return string(r[:w])
}

// row is what top shows for one host. NaN stands for "not known": no
// previous scrape yet for a rate, no observation for a quantile, a family
// the relay does not export (probes off).
type row struct {
	name string
	err  error // the scrape failed: nothing else is set

	in, out        float64 // messages/s received, published
	lagP50, lagP99 float64 // seconds, over the last interval
	inFlight       float64
	oldest         float64 // seconds
	dead           float64 // dead letters/s, all reasons
	deadReason     string  // the reason with the highest rate
	owned, drain   float64
	accepted       float64 // connections/s, all watched ports
	established    float64
	packets        float64 // packets/s, rx + tx, all watched ports
	publisher      string  // ok, unreachable, failing, misconfigured; "" unknown
	connected      float64 // pushrelay_amqp_connected
	applied        float64 // pushrelay_config_applied
}

var nan = math.NaN()

// computeRow derives a host's row from its last two scrapes; prev may be
// empty (the first refresh) or failed, and then rates are unknown.
func computeRow(name string, prev, cur scrape) row {
	r := row{name: name}
	if cur.err != nil {
		r.err = cur.err
		return r
	}
	s := cur.samples
	var p promtext.Samples
	dt := 0.0
	if prev.err == nil && prev.samples != nil {
		p, dt = prev.samples, cur.at.Sub(prev.at).Seconds()
		// A relay restarted in between: its counters started again from 0.
		if st, ok := s.Value("pushrelay_start_time_seconds"); ok {
			if pst, ok := p.Value("pushrelay_start_time_seconds"); ok && pst != st {
				p = promtext.Samples{}
			}
		}
	}
	rate := func(name string) float64 {
		c, ok := s.Sum(name)
		if !ok || p == nil || dt <= 0 {
			return nan
		}
		pv, _ := p.Sum(name)
		return counterRate(pv, c, dt)
	}
	gauge := func(name string) float64 {
		v, ok := s.Sum(name)
		if !ok {
			return nan
		}
		return v
	}
	r.in = rate("pushrelay_messages_received_total")
	r.out = rate("pushrelay_messages_published_total")
	r.lagP50, r.lagP99 = nan, nan
	if p != nil {
		cb, err1 := s.Histogram("pushrelay_message_lag_seconds")
		pb, err2 := p.Histogram("pushrelay_message_lag_seconds")
		if err1 == nil && err2 == nil {
			d := promtext.Delta(cb, pb)
			r.lagP50, r.lagP99 = promtext.Quantile(0.5, d), promtext.Quantile(0.99, d)
		}
	}
	r.inFlight = gauge("pushrelay_messages_in_flight")
	r.oldest = gauge("pushrelay_publish_oldest_pending_seconds")
	r.dead = rate("pushrelay_messages_dead_lettered_total")
	if r.dead > 0 {
		r.deadReason = topReason(p.ByLabel("pushrelay_messages_dead_lettered_total", "reason"),
			s.ByLabel("pushrelay_messages_dead_lettered_total", "reason"))
	}
	r.owned = gauge("pushrelay_shards_owned")
	r.drain = gauge("pushrelay_shards_draining")
	r.accepted = rate("pushrelay_tcp_accepted_connections_total")
	r.established = gauge("pushrelay_tcp_established_connections")
	r.packets = rate("pushrelay_packets_total")
	for state, v := range s.ByLabel("pushrelay_publisher_state", "state") {
		if v == 1 {
			r.publisher = state
		}
	}
	r.connected = gauge("pushrelay_amqp_connected")
	r.applied = gauge("pushrelay_config_applied")
	return r
}

// counterRate is the per-second increase of a counter; one that went down
// was reset, and counted again from 0.
func counterRate(prev, cur, dt float64) float64 {
	if cur < prev {
		prev = 0
	}
	return (cur - prev) / dt
}

// topReason is the reason whose counter grew most.
func topReason(prev, cur map[string]float64) string {
	best, bestD := "", 0.0
	for reason, c := range cur {
		d := c - prev[reason]
		if c < prev[reason] {
			d = c
		}
		if d > bestD || (d == bestD && d > 0 && reason < best) {
			best, bestD = reason, d
		}
	}
	return best
}

// Severities, highest first, for the footer. The order is by how much is
// lost and how soon:
//   - a failed scrape: the relay is down or unreachable, and nothing of it
//     is known;
//   - not consuming: the host's whole queue stands still (and fills, then
//     drops its oldest messages);
//   - publisher unreachable, misconfigured or failing: everything is held
//     unacked, no browser on the host gets anything;
//   - dead letters: messages are leaving for pushrelay.dead right now, and
//     browsers will never get them;
//   - a stuck delivery (oldest pending ≥ 5 s): one channel is held up,
//     nothing lost yet;
//   - a config not applied: a reload is still being worked on;
//   - p99 lag ≥ 1 s: slow, but delivered;
//   - shards draining: a rebalance in progress, as planned.
const (
	sevNone = iota
	sevDraining
	sevSlow
	sevUnapplied
	sevStuck
	sevDead
	sevPublisher
	sevNotConsuming
	sevScrape
)

// problem is one thing wrong on one host; weight orders those of equal
// severity (more dead letters, older pending first).
type problem struct {
	sev    int
	weight float64
	host   int // the row's index: ties go to the first on the command line
	text   string
}

func (p problem) String() string { return p.text }

// problems lists what is wrong on every host, worst first.
func problems(rows []row) []problem {
	var out []problem
	add := func(i, sev int, weight float64, format string, args ...any) {
		out = append(out, problem{sev, weight, i, rows[i].name + ": " + fmt.Sprintf(format, args...)})
	}
	for i, r := range rows {
		if r.err != nil {
			add(i, sevScrape, 0, "scrape failed: %v", r.err)
			continue
		}
		if r.connected == 0 {
			add(i, sevNotConsuming, 0, "not consuming")
		}
		if r.publisher != "" && r.publisher != "ok" {
			add(i, sevPublisher, publisherWeight(r.publisher), "publisher %s", r.publisher)
		}
		if r.dead > 0 {
			add(i, sevDead, r.dead, "%s dead letters/s (%s)", fmtRate(r.dead), r.deadReason)
		}
		if r.oldest >= stuckPending {
			add(i, sevStuck, r.oldest, "oldest pending %.0f s", r.oldest)
		}
		if r.applied == 0 {
			add(i, sevUnapplied, 0, "config not applied yet")
		}
		if r.lagP99 >= slowLagP99 {
			add(i, sevSlow, r.lagP99, "lag p99 %s", fmtSeconds(r.lagP99))
		}
		if r.drain > 0 {
			add(i, sevDraining, r.drain, "%.0f shards draining", r.drain)
		}
	}
	slices.SortStableFunc(out, func(a, b problem) int {
		return cmp.Or(cmp.Compare(b.sev, a.sev), cmp.Compare(b.weight, a.weight), cmp.Compare(a.host, b.host))
	})
	return out
}

// publisherWeight: unreachable (Nginx down) before misconfigured (a wrong
// URL or allow list, needs a person) before failing (5xx, often passes).
func publisherWeight(state string) float64 {
	switch state {
	case "unreachable":
		return 3
	case "misconfigured":
		return 2
	}
	return 1
}

// frame is the text of one refresh: a title, the table, and the footer
// naming the worst thing happening. live adds the key help.
func frame(rows []row, interval time.Duration, now time.Time, live bool) []string {
	hosts := "hosts"
	if len(rows) == 1 {
		hosts = "host"
	}
	title := fmt.Sprintf("pushrelay top - %d %s - every %s - %s", len(rows), hosts, interval, now.UTC().Format("15:04:05 UTC"))
	if live {
		title += " - q: quit"
	}
	lines := []string{title, ""}
	nameW := 4
	for _, r := range rows {
		nameW = max(nameW, len(r.name))
	}
	nameW = min(nameW, 24)
	head := fmt.Sprintf("%-*s %8s %8s %8s %8s %7s %7s %7s %6s %5s %7s %7s %8s  %-13s %-4s %s",
		nameW, "HOST", "IN/s", "OUT/s", "LAG p50", "p99", "INFLT", "OLDEST", "DEAD/s", "SHARDS", "DRAIN", "ACC/s", "ESTAB", "PKTS/s", "PUBLISHER", "AMQP", "CONFIG")
	lines = append(lines, head)
	for _, r := range rows {
		name := truncate(r.name, nameW)
		if r.err != nil {
			lines = append(lines, fmt.Sprintf("%-*s scrape failed: %v", nameW, name, r.err))
			continue
		}
		lines = append(lines, fmt.Sprintf("%-*s %8s %8s %8s %8s %7s %7s %7s %6s %5s %7s %7s %8s  %-13s %-4s %s",
			nameW, name, fmtRate(r.in), fmtRate(r.out), fmtSeconds(r.lagP50), fmtSeconds(r.lagP99),
			fmtCount(r.inFlight), fmtSeconds(r.oldest), fmtRate(r.dead), fmtCount(r.owned), fmtCount(r.drain),
			fmtRate(r.accepted), fmtCount(r.established), fmtRate(r.packets),
			cmp.Or(r.publisher, "-"), flag01(r.connected, "up", "DOWN"), flag01(r.applied, "applied", "PENDING")))
	}
	lines = append(lines, "")
	ps := problems(rows)
	switch {
	case len(ps) == 0:
		lines = append(lines, fmt.Sprintf("worst: nothing, %d %s ok", len(rows), hosts))
	default:
		lines = append(lines, "worst: "+ps[0].text)
		if len(ps) > 1 {
			rest := make([]string, 0, len(ps)-1)
			for _, p := range ps[1:] {
				rest = append(rest, p.text)
			}
			lines = append(lines, "also:  "+strings.Join(rest, "; "))
		}
	}
	return lines
}

func flag01(v float64, one, zero string) string {
	switch v {
	case 1:
		return one
	case 0:
		return zero
	}
	return "-"
}

// fmtRate keeps a rate within 7 columns: 0, 0.04, 0.4, 12, 12.5, 873, 12.3k, 1.2M.
func fmtRate(v float64) string {
	switch {
	case math.IsNaN(v):
		return "-"
	case v == 0:
		return "0"
	case v < 0.01:
		return "<0.01" // never "0" for something that happened
	case v < 1:
		return strconv.FormatFloat(v, 'g', 2, 64)
	case v < 100:
		return strings.TrimSuffix(fmt.Sprintf("%.1f", v), ".0")
	case v < 10_000:
		return fmt.Sprintf("%.0f", v)
	case v < 10_000_000:
		return fmt.Sprintf("%.1fk", v/1e3)
	}
	return fmt.Sprintf("%.1fM", v/1e6)
}

func fmtCount(v float64) string {
	if math.IsNaN(v) {
		return "-"
	}
	return fmt.Sprintf("%.0f", v)
}

// fmtSeconds shows a duration in the unit that keeps 2-3 digits: lags are
// ms when healthy, seconds in an outage.
func fmtSeconds(v float64) string {
	switch {
	case math.IsNaN(v):
		return "-"
	case v == 0:
		return "0"
	case v < 0.001:
		return fmt.Sprintf("%.0fus", v*1e6)
	case v < 0.01:
		return fmt.Sprintf("%.2fms", v*1e3)
	case v < 1:
		return fmt.Sprintf("%.0fms", v*1e3)
	case v < 100:
		return fmt.Sprintf("%.1fs", v)
	}
	return fmt.Sprintf("%.0fs", v)
}
