package relay

import (
	"strconv"
	"strings"
	"time"

	"github.com/VictoriaMetrics/metrics"

	"github.com/pushrelay/pushrelay/sidecar/message"
	"github.com/pushrelay/pushrelay/sidecar/publish"
	"github.com/pushrelay/pushrelay/sidecar/telemetry"
	"github.com/pushrelay/pushrelay/sidecar/version"
)

// Histogram buckets in seconds: loopback publishes take tens of µs; lag
// (producer → Nginx) is ms when healthy and seconds during an outage.
var (
	durationBuckets = []float64{.00005, .0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, 1}
	lagBuckets      = []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60}
)

type relayMetrics struct {
	received      *metrics.Counter
	redelivered   *metrics.Counter
	duplicates    *metrics.Counter
	dead          map[string]*metrics.Counter // by reason
	reconnects    *metrics.Counter
	stateWrites   *metrics.Counter
	reloadsOK     *metrics.Counter
	reloadsFailed *metrics.Counter
	publish       publish.Metrics
}

// newMetrics registers the relay's families. Gauges read state through
// the given functions, which must be safe to call from the /metrics handler.
func newMetrics(reg *telemetry.Registry, r *Relay) relayMetrics {
	m := relayMetrics{
		received:    reg.Counter("pushrelay_messages_received_total", "Deliveries consumed from the host's queue, including redeliveries."),
		redelivered: reg.Counter("pushrelay_messages_redelivered_total", "Deliveries flagged redelivered by RabbitMQ: possible duplicates after a reconnect or restart."),
		duplicates: reg.Counter("pushrelay_messages_duplicates_skipped_total",
			"Redelivered messages acked without a publish, because Nginx took them before the session that held them was lost."),
		stateWrites: reg.Counter("pushrelay_state_writes_total",
			"Attempts to write the drain state file (state_dir/drains.json): one per change of the draining shards, and one a second while a write fails."),
		reconnects:    reg.Counter("pushrelay_amqp_reconnects_total", "AMQP sessions opened after the first."),
		reloadsOK:     reg.Counter(`pushrelay_config_reloads_total{result="success"}`, "Config reloads by result."),
		reloadsFailed: reg.Counter(`pushrelay_config_reloads_total{result="failure"}`, "Config reloads by result."),
		dead:          map[string]*metrics.Counter{},
		publish: publish.Metrics{
			Published: reg.Counter("pushrelay_messages_published_total", "Messages Nginx accepted."),
			Retries:   reg.Counter("pushrelay_publish_retries_total", "Publish attempts that failed (no answer, 5xx, 4xx) and will be retried; an idle connection Nginx closed is not one."),
			Refused:   reg.Counter("pushrelay_publish_refused_total", "Messages the publisher gave up on: 413/414, a 4xx on one channel alone, a 5xx retry budget spent."),
			Duration: reg.Histogram("pushrelay_publish_duration_seconds",
				"Time from writing a publish request batch to reading each response.", durationBuckets),
			Lag: reg.Histogram("pushrelay_message_lag_seconds",
				"Time from the producer's published_at header to Nginx accepting the message.", lagBuckets),
		},
	}
	reasons := []string{publish.ReasonBudget, publish.ReasonExpired}
	for _, status := range publish.RefusedStatuses {
		reasons = append(reasons, "nginx_"+strconv.Itoa(status))
	}
	for _, r := range message.Reasons {
		reasons = append(reasons, string(r))
	}
	for _, reason := range reasons {
		m.dead[reason] = reg.Counter(`pushrelay_messages_dead_lettered_total{reason="`+reason+`"}`,
			"Poison messages sent to the dead-letter exchange, by reason.")
	}
	reg.Gauge("pushrelay_messages_in_flight", "Messages handed to the publisher and not yet settled.",
		func() float64 { return float64(r.inFlight.Load()) })
	reg.Gauge("pushrelay_publish_oldest_pending_seconds", "Age of the oldest delivery not yet published, dead-lettered or acked (0 when none): a stuck channel shows here.",
		func() float64 {
			at := r.oldestPending.Load()
			if at == 0 {
				return 0
			}
			return max(0, time.Since(time.Unix(0, at)).Seconds())
		})
	for _, st := range publish.States {
		reg.Gauge(`pushrelay_publisher_state{state="`+st.String()+`"}`, "1 for the publisher's current state: ok, unreachable (no HTTP answer), failing (an error on every channel), misconfigured (4xx on several channels).",
			func() float64 {
				p := r.pool.Load()
				if p == nil {
					return 0
				}
				return b2f(p.State() == st)
			})
	}
	reg.Gauge("pushrelay_messages_unacked", "Deliveries of the current AMQP session not yet acked or rejected (at most amqp.prefetch), as of the last ack.",
		func() float64 { return float64(r.unacked.Load()) })
	reg.Gauge("pushrelay_amqp_connected", "1 while an AMQP session is consuming.",
		func() float64 { return b2f(r.consuming.Load()) })
	reg.Gauge("pushrelay_amqp_standby", "1 while the session waits as the second consumer of this host's queue (x-single-active-consumer): another consumer is active.",
		func() float64 { return b2f(r.standby.Load()) })
	reg.Gauge("pushrelay_amqp_nodes_failing", "Configured broker nodes (amqp.urls) that refused or did not answer a connection at the last check (once a minute; the log names them).",
		func() float64 { return float64(r.nodesFailing.Load()) })
	reg.Gauge("pushrelay_publisher_reachable", "1 while every publisher lane's last attempt got an HTTP answer.",
		func() float64 { return b2f(r.publisherReachable()) })
	reg.Gauge("pushrelay_deadletter_blocked", "1 while the broker blocks the dead-letter connection (a resource alarm): copies wait, their originals stay unacked.",
		func() float64 { return b2f(r.deadBlocked.Load()) })
	reg.Gauge("pushrelay_shards_owned", "Shards this host owns in the current map.",
		func() float64 { return float64(r.shardsOwned.Load()) })
	reg.Gauge("pushrelay_shards_draining", "Shards moved away and still bound until their drain ends.",
		func() float64 { return float64(r.shardsDraining.Load()) })
	reg.Gauge("pushrelay_config_applied", "1 when the last accepted config is fully in force (publisher, session, bindings, the drain state saved); 0 while the relay works on the difference (the log and /readyz say why).",
		func() float64 { return b2f(r.unapplied.Load() == nil && r.persistErr.Load() == nil) })
	reg.Gauge("pushrelay_config_last_reload_successful", "1 if the last config reload was applied, 0 if it was refused.",
		func() float64 { return b2f(r.lastReloadOK.Load()) })
	reg.Gauge("pushrelay_config_last_reload_success_timestamp_seconds", "Unix time of the last applied config.",
		func() float64 { return float64(r.lastReloadAt.Load()) })
	start := float64(time.Now().Unix())
	reg.Gauge("pushrelay_start_time_seconds", "Unix time the relay started.", func() float64 { return start })
	// host names the frontend in dashboards and `pushrelay top`, whatever
	// address Prometheus scrapes it by.
	reg.Gauge(`pushrelay_build_info{version="`+version.Version+`",host="`+promLabel(r.cfg.Host)+`"}`,
		"The running build and the frontend's host (config key host); always 1.",
		func() float64 { return 1 })
	return m
}

// promLabel escapes a label value for the text format.
func promLabel(v string) string {
	return strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`).Replace(v)
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
