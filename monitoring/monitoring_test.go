package monitoring

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"golang.org/x/sys/unix"

	"github.com/pushrelay/pushrelay/ebpf/probe"
	"github.com/pushrelay/pushrelay/integration/stack"
	"github.com/pushrelay/pushrelay/sidecar/shard"
)

const amqpURL = "amqp://guest:guest@127.0.0.1:5672/"

// The files under test, relative to this package.
var (
	ruleFiles = []string{"pushrelay.rules.yml", "pushrelay.alerts.yml"}
	dashboard = "pushrelay-dashboard.json"
)

// Two relays, as two frontends of one fleet, each owning half the shards,
// so that the fleet rules sum two series and the dashboard's host selector
// has two hosts. Relay a runs as root with its Nginx in a cgroup of its
// own, so its probes attach in the kernel (cgroup_skb); relay b runs with
// no capabilities, so its probes fall back to /proc. Between them every
// probe family exists, and so does the fallback that
// PushrelayProbesFallenBack looks for.
func TestRulesAndDashboardAgainstPrometheus(t *testing.T) {
	promBin, promtool := needPrometheus(t)
	if os.Geteuid() != 0 {
		skipOrFail(t, "needs root: the eBPF probes of one relay, setpriv for the other")
	}
	if _, err := exec.LookPath("setpriv"); err != nil {
		skipOrFail(t, "setpriv (util-linux) not installed: run `make deps`")
	}
	start := time.Now()

	// promtool first: a rule file that does not parse makes the rest moot.
	args := append([]string{"check", "rules"}, ruleFiles...)
	if out, err := exec.Command(promtool, args...).CombinedOutput(); err != nil {
		t.Fatalf("promtool check rules: %v\n%s", err, out)
	}

	bin := relayBinary(t)
	exchange := fmt.Sprintf("pushrelay.test.monitoring.%d", time.Now().UnixNano())
	hosts := []string{"it-mon-a", "it-mon-b"}
	amqpCh := broker(t, exchange, hosts)
	shardsTOML := fmt.Sprintf("[shards]\ncount = %d\n[shards.map]\n%s = [\"0-%d\"]\n%s = [\"%d-%d\"]\n",
		shard.DefaultCount, hosts[0], shard.DefaultCount/2-1, hosts[1], shard.DefaultCount/2, shard.DefaultCount-1)

	// Relay a: Nchan, probes in the kernel.
	cgroup, cgfd := newCgroup(t)
	ngxA := startNginx(t, stack.NginxOptions{Module: stack.Nchan, CgroupFD: cgfd})
	relayA, err := stack.NewRelay(bin, t.TempDir(), stack.RelayConfig{
		Host: hosts[0], AMQPURL: amqpURL, Exchange: exchange, Publish: ngxA.PublishURL(), Dialect: stack.Nchan.Dialect(),
		Probes: fmt.Sprintf("enabled = true\nports = [%s]\ncgroup = %q\ninterval = \"250ms\"", port(ngxA), cgroup),
		Extra:  shardsTOML,
	})
	if err != nil {
		t.Fatal(err)
	}
	startRelay(t, relayA)
	// Without eBPF here, the per-port panels and rules would have nothing
	// to read; that is this machine's limit, not the dashboard's fault.
	if relayA.Metric(`pushrelay_probe_mode{probe="conn",mode="proc"}`) == 1 ||
		relayA.Metric(`pushrelay_probe_mode{probe="packets",mode="none"}`) == 1 {
		skipOrFail(t, "the eBPF probes do not attach on this machine, so their queries cannot be checked:\n"+relayA.Log())
	}

	// Relay b: Push Stream where `make pushstream` built it (its stats have
	// messages_in_trash, Nchan's do not), probes in /proc mode.
	modB := stack.PushStream
	if _, err := modB.Nginx(); err != nil {
		t.Logf("relay b runs Nchan: %v", err)
		modB = stack.Nchan
	}
	ngxB := startNginx(t, stack.NginxOptions{Module: modB})
	dirB := worldReadableDir(t)
	binB := filepath.Join(dirB, "pushrelay")
	copyFile(t, bin, binB, 0o755) // nobody cannot reach a binary under /root
	relayB, err := stack.NewRelay(binB, dirB, stack.RelayConfig{
		Host: hosts[1], AMQPURL: amqpURL, Exchange: exchange, Publish: ngxB.PublishURL(), Dialect: modB.Dialect(),
		Probes: fmt.Sprintf("enabled = true\nports = [%s]\ninterval = \"250ms\"", port(ngxB)),
		Extra:  shardsTOML,
	})
	if err != nil {
		t.Fatal(err)
	}
	relayB.Wrapper = []string{"setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
		"--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--no-new-privs"}
	startRelay(t, relayB)

	// Traffic for every family: subscribers hold connections (established,
	// packets, Nginx's subscriber count) and messages flow to both hosts
	// (rates, lag and publish histograms).
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	chans := []string{channelOn(t, 0, shard.DefaultCount/2), channelOn(t, shard.DefaultCount/2, shard.DefaultCount)}
	for i, ngx := range []*stack.Nginx{ngxA, ngxB} {
		go stack.ReadEventSource(ctx, ngx.URL("/ev/"+chans[i]), "", nil, func(stack.Event) {})
	}
	go func() {
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for ctx.Err() == nil {
			for _, ch := range chans {
				publish(amqpCh, exchange, ch, true)
			}
			select {
			case <-ctx.Done():
			case <-tick.C:
			}
		}
	}()

	// promtool check metrics on both relays' live output.
	for _, r := range []*stack.Relay{relayA, relayB} {
		checkMetrics(t, promtool, r)
	}

	// Prometheus scraping both every second and evaluating the rules every
	// second.
	targets := []string{relayA.MetricsAddr, relayB.MetricsAddr}
	prom := startPrometheus(t, promBin, targets)

	// Wait until both targets are up and the 1m rates of both hosts are
	// above zero: by then every recording rule has had data to work on.
	waitFor(t, "both relays scraped and their rates recorded", 40*time.Second, func() bool {
		up := prom.query(t, `up{job="pushrelay"} == 1`)
		rates := prom.query(t, `instance:pushrelay_messages_published:rate1m > 0`)
		return len(up) == 2 && len(rates) == 2
	})
	// A message without a channel header is dead-lettered as no_channel.
	// Sent only now, so that Prometheus saw the counter at 0 before and the
	// dead-letter rate rises above 0.
	publish(amqpCh, exchange, chans[0], false)
	waitFor(t, "the dead letter counted", 20*time.Second, func() bool {
		return len(prom.query(t, `instance_reason:pushrelay_messages_dead_lettered:rate5m{reason="no_channel"} > 0`)) == 1
	})
	t.Logf("scraping after %s", time.Since(start).Round(time.Millisecond))

	// The checker itself: a misspelled metric or rule must come back empty,
	// or the checks below would prove nothing.
	for _, q := range []string{
		`pushrelay_messages_publishd_total{job="pushrelay"}`,
		`instance:pushrelay_messages_publishd:rate1m`,
	} {
		if n := len(prom.query(t, q)); n != 0 {
			t.Fatalf("misspelled query %s returned %d series; the check cannot tell a typo", q, n)
		}
	}

	// Every rule loaded, evaluated without error.
	groups := prom.rules(t)
	var recording, alerting []promRule
	for _, g := range groups {
		for _, r := range g.Rules {
			if r.Health != "ok" || r.LastError != "" {
				t.Errorf("rule %s in group %s: health %q: %s", r.Name, g.Name, r.Health, r.LastError)
			}
			if r.Type == "recording" {
				recording = append(recording, r)
			} else {
				alerting = append(alerting, r)
			}
		}
	}
	if len(recording) == 0 || len(alerting) == 0 {
		t.Fatalf("Prometheus loaded %d recording and %d alerting rules", len(recording), len(alerting))
	}

	// A recording rule's expression and its recorded series must both have
	// data.
	for _, r := range recording {
		if len(prom.query(t, r.Query)) == 0 {
			t.Errorf("recording rule %s: its expression returns no series: %s", r.Name, r.Query)
		}
		if len(prom.query(t, r.Name)) == 0 {
			t.Errorf("recording rule %s: no series recorded", r.Name)
		}
	}

	// Each alert is labelled and annotated as the mixins do, and its
	// runbook_url points at its own section of RUNBOOK.md.
	runbook, err := os.ReadFile("RUNBOOK.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range alerting {
		if sev := r.Labels["severity"]; sev != "warning" && sev != "critical" {
			t.Errorf("alert %s: severity %q, want warning or critical", r.Name, sev)
		}
		for _, a := range []string{"summary", "description", "runbook_url"} {
			if r.Annotations[a] == "" {
				t.Errorf("alert %s: no %s annotation", r.Name, a)
			}
		}
		if want := "RUNBOOK.md#" + strings.ToLower(r.Name); !strings.HasSuffix(r.Annotations["runbook_url"], want) {
			t.Errorf("alert %s: runbook_url %q does not end in %s", r.Name, r.Annotations["runbook_url"], want)
		}
		if !strings.Contains(string(runbook), "\n## "+r.Name+"\n") {
			t.Errorf("alert %s: RUNBOOK.md has no section \"## %s\"", r.Name, r.Name)
		}
	}

	// An alert's expression returns nothing while all is well, so the test
	// cannot ask for series from it; it asks instead that every series the
	// expression selects (each metric or recorded name with its matchers)
	// exists, which is what a misspelling breaks.
	for _, r := range alerting {
		prom.query(t, r.Query) // must evaluate
		sels := selectors(r.Query)
		if len(sels) == 0 {
			t.Errorf("alert %s: no selector found in %s", r.Name, r.Query)
		}
		for _, sel := range sels {
			if len(prom.query(t, sel)) == 0 {
				t.Errorf("alert %s: %s selects no series (in %s)", r.Name, sel, r.Query)
			}
		}
	}

	// The fleet's sum is both halves of the map: equal to shards.count,
	// so PushrelayShardsNotCovered stays quiet for the right reason.
	if n := len(prom.query(t, `job:pushrelay_shards_owned:sum == on (job) job:pushrelay_shards_expected:count`)); n != 1 {
		t.Errorf("the two relays' shards do not add up to job:pushrelay_shards_expected:count (%d series)", n)
	}

	// One alert does have something to say here: relay b's probes run in
	// /proc mode, so PushrelayProbesFallenBack must be pending for it, which
	// proves an alert goes from expression to Prometheus's alert state.
	waitFor(t, "PushrelayProbesFallenBack pending for relay b", 10*time.Second, func() bool {
		for _, a := range prom.alerts(t) {
			if a.Labels["alertname"] == "PushrelayProbesFallenBack" && a.Labels["instance"] == relayB.MetricsAddr {
				return true
			}
		}
		return false
	})

	// Every dashboard query, with the host selector set to both hosts as
	// Grafana writes a multi-value regex.
	queries := dashboardQueries(t)
	instance := "(" + strings.ReplaceAll(relayA.MetricsAddr, ".", `\\.`) + "|" + strings.ReplaceAll(relayB.MetricsAddr, ".", `\\.`) + ")"
	host := "(" + strings.Join(hosts, "|") + ")"
	vars := strings.NewReplacer("${instance}", instance, "$instance", instance, "${host}", host, "$host", host)
	for _, q := range queries {
		expr := vars.Replace(q.expr)
		if strings.Contains(expr, "$") {
			t.Errorf("panel %q: unknown variable in %s", q.panel, q.expr)
			continue
		}
		isVar := strings.HasPrefix(q.panel, "variable ")
		if !isVar && !strings.Contains(q.expr, "$instance") && !strings.Contains(q.expr, "job:") {
			t.Errorf("panel %q: %s ignores the host selector and is not a fleet (job:) query", q.panel, q.expr)
		}
		if len(prom.query(t, expr)) == 0 {
			t.Errorf("panel %q: no series for %s", q.panel, expr)
		}
	}
	// The host selector narrows the instances: one host chosen, the hidden
	// instance variable holds that relay's address alone.
	for _, q := range queries {
		if q.panel != "variable instance" {
			continue
		}
		expr := strings.NewReplacer("${host}", hosts[0], "$host", hosts[0]).Replace(q.expr)
		var got []string
		for _, raw := range prom.query(t, expr) {
			var s struct {
				Metric map[string]string `json:"metric"`
			}
			json.Unmarshal(raw, &s)
			got = append(got, s.Metric["instance"])
		}
		if len(got) != 1 || got[0] != relayA.MetricsAddr {
			t.Errorf("host %s selects instances %v, want [%s]", hosts[0], got, relayA.MetricsAddr)
		}
	}
	t.Logf("%d recording rules, %d alerts, %d dashboard queries checked in %s",
		len(recording), len(alerting), len(queries), time.Since(start).Round(time.Millisecond))
	if t.Failed() {
		t.Logf("relay a log:\n%s\nrelay b log:\n%s", relayA.Log(), relayB.Log())
	}
}

// needPrometheus returns the prometheus and promtool binaries. Missing, the
// test skips on a developer's machine and fails under CI, where `make deps`
// must have installed them.
func needPrometheus(t *testing.T) (prom, promtool string) {
	t.Helper()
	prom, err1 := exec.LookPath("prometheus")
	promtool, err2 := exec.LookPath("promtool")
	if err1 != nil || err2 != nil {
		skipOrFail(t, "prometheus and promtool (Debian's prometheus) not installed: run `make deps`")
	}
	return prom, promtool
}

func skipOrFail(t *testing.T, why string) {
	t.Helper()
	if os.Getenv("CI") != "" {
		t.Fatal(why)
	}
	t.Skip(why)
}

// relayBinary is $PUSHRELAY_BIN (make test sets it) or a fresh build.
func relayBinary(t *testing.T) string {
	if bin := os.Getenv("PUSHRELAY_BIN"); bin != "" {
		return bin
	}
	bin := filepath.Join(t.TempDir(), "pushrelay")
	build := exec.Command("go", "build", "-o", bin, "./sidecar/cmd/pushrelay")
	build.Dir = stack.RepoRoot()
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build pushrelay: %v\n%s", err, out)
	}
	return bin
}

// broker returns a channel for publishing to exchange, and removes the
// hosts' queues and the exchange at the end.
func broker(t *testing.T, exchange string, hosts []string) *amqp.Channel {
	t.Helper()
	conn, err := amqp.Dial(amqpURL)
	if err != nil {
		t.Fatalf("RabbitMQ at %s: %v (run `make deps`)", amqpURL, err)
	}
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	queues := make([]string, len(hosts))
	for i, h := range hosts {
		queues[i] = "pushrelay." + h
	}
	deleteQueues(conn, queues)
	t.Cleanup(func() {
		// Runs after the relays' cleanups (registered later, run first),
		// so nothing redeclares what is deleted here.
		deleteQueues(conn, queues)
		if c, err := conn.Channel(); err == nil {
			c.ExchangeDelete(exchange, false, false)
		}
		conn.Close()
	})
	return ch
}

func deleteQueues(conn *amqp.Connection, queues []string) {
	for _, q := range queues {
		// A channel each: a failed delete closes its channel.
		if c, err := conn.Channel(); err == nil {
			c.QueueDelete(q, false, false, false)
			c.Close()
		}
	}
}

// publish sends one message as the web tier does; withChannel false leaves
// out the channel header, which the relay dead-letters as no_channel.
// Errors are the test's end racing the publisher goroutine; the waits
// catch a broker that takes nothing.
func publish(ch *amqp.Channel, exchange, channel string, withChannel bool) {
	headers := amqp.Table{"published_at": time.Now().UnixMicro()}
	if withChannel {
		headers["channel"] = channel
	}
	ch.PublishWithContext(context.Background(), exchange, strconv.Itoa(shard.Of(channel, shard.DefaultCount)), false, false,
		amqp.Publishing{Headers: headers, ContentType: "text/plain", Body: []byte(`{"comment":"hello"}`)})
}

// channelOn finds a channel whose shard is in [lo, hi).
func channelOn(t *testing.T, lo, hi int) string {
	for i := 0; i < 100000; i++ {
		ch := "thread:" + strconv.Itoa(i)
		if s := shard.Of(ch, shard.DefaultCount); s >= lo && s < hi {
			return ch
		}
	}
	t.Fatalf("no channel on shards %d-%d", lo, hi-1)
	return ""
}

func startNginx(t *testing.T, o stack.NginxOptions) *stack.Nginx {
	t.Helper()
	o.Dir = t.TempDir()
	n, err := stack.StartNginx(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(n.Stop)
	return n
}

func port(n *stack.Nginx) string {
	return n.Addr[strings.LastIndexByte(n.Addr, ':')+1:]
}

func startRelay(t *testing.T, r *stack.Relay) {
	t.Helper()
	if err := r.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := r.Stop(); err != nil {
			t.Error(err)
		}
	})
}

// newCgroup makes a cgroup v2 child for Nginx, so that the packet probe can
// attach to it as it does to nginx.service in production.
func newCgroup(t *testing.T) (dir string, fd int) {
	t.Helper()
	root, err := probe.Cgroup2Mount()
	if err != nil {
		skipOrFail(t, "no cgroup v2 mount for the packet probe: "+err.Error())
	}
	dir = filepath.Join(root, fmt.Sprintf("pushrelay-monitoring-test-%d-%d", os.Getpid(), time.Now().UnixNano()))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatalf("make cgroup: %v", err)
	}
	fd, err = unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		unix.Close(fd)
		// EBUSY until Nginx's last worker has exited.
		for i := 0; ; i++ {
			err := unix.Rmdir(dir)
			if err == nil || i == 100 {
				if err != nil {
					t.Errorf("remove cgroup %s: %v", dir, err)
				}
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
	})
	return dir, fd
}

// worldReadableDir is a temporary directory the unprivileged relay can
// read its binary and config from.
func worldReadableDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "pushrelay-monitoring")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

func copyFile(t *testing.T, src, dst string, mode os.FileMode) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, b, mode); err != nil {
		t.Fatal(err)
	}
}

// checkMetrics runs promtool check metrics on a relay's /metrics. Its
// errors (a malformed exposition) fail the test; its lint findings are
// logged, and fail it too unless they are in allowedLint.
func checkMetrics(t *testing.T, promtool string, r *stack.Relay) {
	t.Helper()
	text, err := r.Metrics()
	if err != nil {
		t.Fatal(err)
	}
	// An empty page would pass promtool; this is the relay's own output.
	if !strings.Contains(text, "# TYPE pushrelay_build_info gauge") {
		t.Fatalf("%s/metrics is not the relay's:\n%s", r.MetricsAddr, text)
	}
	cmd := exec.Command(promtool, "check", "metrics")
	cmd.Stdin = strings.NewReader(text)
	out, err := cmd.CombinedOutput()
	if err == nil {
		t.Logf("promtool check metrics on %s: no findings in %d lines", r.MetricsAddr, strings.Count(text, "\n"))
		return
	}
	var bad []string
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if line != "" && !allowedLint(line) {
			bad = append(bad, line)
		}
	}
	if len(bad) > 0 {
		t.Errorf("promtool check metrics on %s: %v\n%s", r.MetricsAddr, err, strings.Join(bad, "\n"))
	} else {
		t.Logf("promtool check metrics on %s, findings accepted:\n%s", r.MetricsAddr, out)
	}
}

// allowedLint are promtool's naming findings the relay's families are known
// to have on purpose. None so far.
func allowedLint(line string) bool { return false }

// selectorRE finds the series selectors of an expression: the pushrelay
// metrics and recorded names (level:pushrelay_…:operation), and up, each
// with its label matchers.
var selectorRE = regexp.MustCompile(`\b(up|[a-z_]*:?pushrelay_[a-z0-9_]*(?::[a-z0-9_]+)?)(\{[^}]*\})?`)

func selectors(expr string) []string { return selectorRE.FindAllString(expr, -1) }

func waitFor(t *testing.T, what string, timeout time.Duration, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// ------------------------------------------------------------- Prometheus

type prometheus struct {
	base string
}

// startPrometheus runs Debian's prometheus on a loopback port with a
// temporary config: one job, "pushrelay", as the rule files expect.
func startPrometheus(t *testing.T, bin string, targets []string) *prometheus {
	t.Helper()
	dir := t.TempDir()
	var rules []string
	for _, f := range ruleFiles {
		abs, err := filepath.Abs(f)
		if err != nil {
			t.Fatal(err)
		}
		rules = append(rules, strconv.Quote(abs))
	}
	quoted := make([]string, len(targets))
	for i, tg := range targets {
		quoted[i] = strconv.Quote(tg)
	}
	conf := fmt.Sprintf(`global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files: [%s]
scrape_configs:
  - job_name: pushrelay
    static_configs:
      - targets: [%s]
`, strings.Join(rules, ", "), strings.Join(quoted, ", "))
	confPath := filepath.Join(dir, "prometheus.yml")
	if err := os.WriteFile(confPath, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	p, err := stack.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", p)
	var log strings.Builder
	cmd := exec.Command(bin, "--config.file="+confPath, "--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address="+addr, "--log.level=warn")
	cmd.Stdout, cmd.Stderr = &log, &log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Signal(unix.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
		if t.Failed() {
			t.Logf("prometheus log:\n%s", log.String())
		}
	})
	prom := &prometheus{base: "http://" + addr}
	waitFor(t, "prometheus ready", 20*time.Second, func() bool {
		select {
		case <-exited:
			t.Fatalf("prometheus exited:\n%s", log.String())
		default:
		}
		resp, err := http.Get(prom.base + "/-/ready")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	})
	return prom
}

func (p *prometheus) get(t *testing.T, path string, v url.Values, into any) {
	t.Helper()
	resp, err := http.Get(p.base + path + "?" + v.Encode())
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	var env struct {
		Status string          `json:"status"`
		Error  string          `json:"error"`
		Data   json.RawMessage `json:"data"`
	}
	if err := json.Unmarshal(body, &env); err != nil {
		t.Fatalf("%s: %v: %s", path, err, body)
	}
	if env.Status != "success" {
		t.Fatalf("%s?%s: %s", path, v.Encode(), env.Error)
	}
	if err := json.Unmarshal(env.Data, into); err != nil {
		t.Fatalf("%s: %v: %s", path, err, env.Data)
	}
}

// query evaluates expr now and returns its series; an invalid expression
// fails the test.
func (p *prometheus) query(t *testing.T, expr string) []json.RawMessage {
	t.Helper()
	var data struct {
		ResultType string            `json:"resultType"`
		Result     []json.RawMessage `json:"result"`
	}
	p.get(t, "/api/v1/query", url.Values{"query": {expr}}, &data)
	if data.ResultType != "vector" {
		t.Fatalf("query %s: result type %s, want vector", expr, data.ResultType)
	}
	return data.Result
}

type promRule struct {
	Name        string            `json:"name"`
	Query       string            `json:"query"`
	Type        string            `json:"type"`
	Health      string            `json:"health"`
	LastError   string            `json:"lastError"`
	Labels      map[string]string `json:"labels"`
	Annotations map[string]string `json:"annotations"`
}

type promGroup struct {
	Name  string     `json:"name"`
	File  string     `json:"file"`
	Rules []promRule `json:"rules"`
}

// rules returns the loaded rule groups, once each has been evaluated.
func (p *prometheus) rules(t *testing.T) []promGroup {
	t.Helper()
	var data struct {
		Groups []promGroup `json:"groups"`
	}
	p.get(t, "/api/v1/rules", url.Values{}, &data)
	if len(data.Groups) != len(ruleFiles) {
		t.Fatalf("Prometheus loaded %d rule groups, want %d (one per file)", len(data.Groups), len(ruleFiles))
	}
	return data.Groups
}

type promAlert struct {
	Labels map[string]string `json:"labels"`
	State  string            `json:"state"`
}

func (p *prometheus) alerts(t *testing.T) []promAlert {
	t.Helper()
	var data struct {
		Alerts []promAlert `json:"alerts"`
	}
	p.get(t, "/api/v1/alerts", url.Values{}, &data)
	return data.Alerts
}

// -------------------------------------------------------------- dashboard

type panelQuery struct {
	panel, expr string
}

// dashboardQueries returns every target expression of the dashboard's
// panels (rows' nested panels included) and, as queries, the metric of each
// label_values() template variable.
func dashboardQueries(t *testing.T) []panelQuery {
	t.Helper()
	b, err := os.ReadFile(dashboard)
	if err != nil {
		t.Fatal(err)
	}
	type panel struct {
		Title   string `json:"title"`
		Targets []struct {
			Expr string `json:"expr"`
		} `json:"targets"`
		Panels []json.RawMessage `json:"panels"`
	}
	var d struct {
		Panels     []json.RawMessage `json:"panels"`
		Templating struct {
			List []struct {
				Name  string          `json:"name"`
				Type  string          `json:"type"`
				Query json.RawMessage `json:"query"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("%s: %v", dashboard, err)
	}
	var out []panelQuery
	var walk func(raw []json.RawMessage)
	walk = func(raw []json.RawMessage) {
		for _, r := range raw {
			var p panel
			if err := json.Unmarshal(r, &p); err != nil {
				t.Fatalf("%s: panel: %v", dashboard, err)
			}
			for _, tg := range p.Targets {
				if tg.Expr == "" {
					t.Errorf("panel %q has a target without expr", p.Title)
					continue
				}
				out = append(out, panelQuery{p.Title, tg.Expr})
			}
			walk(p.Panels)
		}
	}
	walk(d.Panels)
	labelValues := regexp.MustCompile(`^label_values\((.+),\s*([a-z_]+)\)$`)
	hostVar := false
	for _, v := range d.Templating.List {
		if v.Type != "query" {
			continue
		}
		// Grafana stores the query as a string or, newer, as an object.
		var q string
		if json.Unmarshal(v.Query, &q) != nil {
			var obj struct {
				Query string `json:"query"`
			}
			json.Unmarshal(v.Query, &obj)
			q = obj.Query
		}
		m := labelValues.FindStringSubmatch(q)
		if m == nil {
			t.Errorf("variable %s: query %q is not label_values(metric, label)", v.Name, q)
			continue
		}
		hostVar = hostVar || v.Name == "host"
		out = append(out, panelQuery{"variable " + v.Name, m[1]})
	}
	if !hostVar {
		t.Errorf("%s has no host variable (the host selector)", dashboard)
	}
	if len(out) == 0 {
		t.Fatalf("%s: no queries", dashboard)
	}
	return out
}
