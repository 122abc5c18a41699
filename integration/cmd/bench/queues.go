package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"github.com/pushrelay/pushrelay/integration/stack"
)

// The queues part (issue 10) answers a deployment question rather than
// measuring the relay itself:
//
//	queues: the relay on a classic queue against a quorum queue, both on
//	        the broker at -amqp: drain rate, CPU per message (relay and
//	        broker) and end-to-end latency at -queue-rate. A quorum queue
//	        writes every message to its Raft log and fsyncs it before the
//	        publisher's confirm; this is what that costs on one node
//	        (a cluster adds the replication round trip on top).

// queueRate is the offered rate of the queues part's latency run.
var queueRate int

func init() {
	flag.IntVar(&queueRate, "queue-rate", 2000, "offered msg/s of the queues part's latency run")
}

// queueTypeResult is one queue type's figures.
type queueTypeResult struct {
	queueType string
	drain     drain // nginxCPU holds the broker's CPU (drainWithRelay's "others")
	// brokerAll is the broker's CPU per message from the first publish of
	// the backlog to the end of its drain.
	brokerAll time.Duration
	latency   latencyResult
}

// queueTypesPart runs the queues part and returns its report section.
func queueTypesPart(ctx context.Context, o options) (string, error) {
	var results []queueTypeResult
	for _, qt := range []string{"classic", "quorum"} {
		r, err := runQueueType(ctx, o, qt)
		if err != nil {
			return "", fmt.Errorf("%s queue: %w", qt, err)
		}
		results = append(results, r)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "(queues) the relay on each queue type, one RabbitMQ node (%s); backlog %d messages of 200 B over %d channels, prefetch %d; latency at %d msg/s for %s with %d EventSource subscribers:\n\n",
		o.amqpURL[strings.LastIndex(o.amqpURL, "@")+1:], o.backlog, o.channels, o.prefetch, queueRate, o.duration, o.channels)
	fmt.Fprintf(&b, "| queue | drain msg/s | relay CPU µs/msg | broker CPU µs/msg, drain / publish+drain | sent | received | p50 ms | p99 ms | max ms |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, r := range results {
		l := r.latency
		fmt.Fprintf(&b, "| %s | %.0f | %.1f | %.1f / %.1f | %d | %d | %.2f | %.2f | %.2f |\n", r.queueType, r.drain.rate(),
			us(r.drain.cpuPerMsg()), us(r.drain.nginxCPUPerMsg()), us(r.brokerAll), l.sent, l.received, ms(l.p50), ms(l.p99), ms(l.max))
	}
	if len(results) == 2 && results[0].drain.messages > 0 {
		c, q := results[0], results[1]
		fmt.Fprintf(&b, "\n- quorum / classic: drain rate **%.2f**, relay CPU per message **%.2f**, broker CPU per message **%.2f** (drain) and **%.2f** (publish+drain), p99 at %d msg/s **%.2f**\n",
			q.drain.rate()/c.drain.rate(), float64(q.drain.cpuPerMsg())/float64(c.drain.cpuPerMsg()),
			float64(q.drain.nginxCPUPerMsg())/float64(c.drain.nginxCPUPerMsg()), float64(q.brokerAll)/float64(c.brokerAll),
			queueRate, float64(q.latency.p99)/float64(c.latency.p99))
		fmt.Fprintf(&b, "- the broker's CPU is its whole process: another client of this broker during the run is counted too\n\n")
	}
	return b.String(), nil
}

// runQueueType drains a backlog through a relay whose queue is of type qt,
// then runs the latency measurement on it, with a Nginx + Nchan of its own.
func runQueueType(ctx context.Context, o options, qt string) (queueTypeResult, error) {
	res := queueTypeResult{queueType: qt}
	dir, err := os.MkdirTemp("", "pushrelay-bench-"+qt)
	if err != nil {
		return res, err
	}
	defer os.RemoveAll(dir)
	ngx, err := stack.StartNginx(stack.NginxOptions{Dir: dir, Workers: o.workers})
	if err != nil {
		return res, err
	}
	defer ngx.Stop()
	b, err := dialBroker(o.amqpURL)
	if err != nil {
		return res, err
	}
	defer b.close()
	host := "bench-" + qt
	exchange := fmt.Sprintf("pushrelay.bench.%s.%d", qt, time.Now().Unix())
	defer b.cleanup(exchange, "pushrelay."+host)
	relay, err := stack.NewRelay(o.bin, dir, stack.RelayConfig{
		Host: host, AMQPURL: o.amqpURL, Exchange: exchange, Publish: ngx.PublishURL(),
		Prefetch: o.prefetch, Connections: o.lanes, Pipeline: o.pipeline,
		AMQP: fmt.Sprintf("queue_type = %q", qt),
	})
	if err != nil {
		return res, err
	}
	msgs := newWorkload(o.channels, 200)
	broker := brokerPid()
	progress("(queues) %s: relay draining a %d-message backlog", qt, o.backlog)
	// The broker's CPU over publishing the backlog too: a quorum queue
	// spends most of its extra work there (Raft log, fsync), before the
	// drain window starts.
	cpu0 := procCPU(broker)
	if res.drain, err = drainBacklog(ctx, relay, b, exchange, msgs, o.backlog, []int{broker}); err != nil {
		return res, err
	}
	res.brokerAll = (procCPU(broker) - cpu0) / time.Duration(o.backlog)
	if broker == 0 {
		res.drain.nginxCPU, res.brokerAll = 0, 0
	}
	if err := relay.Start(); err != nil {
		return res, err
	}
	defer relay.Stop()
	subs, err := subscribeAll(ctx, ngx, msgs.channels)
	if err != nil {
		return res, err
	}
	defer subs.close()
	progress("(queues) %s: %d msg/s for %s", qt, queueRate, o.duration)
	res.latency, err = latencyRun(ctx, traffic{b: b, exchange: exchange, w: msgs}, subs, queueRate, o.duration, relay)
	return res, err
}

// brokerPid is the OS pid of the broker node rabbitmqctl reaches by
// default (the machine's), or 0 if it cannot tell: its CPU is then not
// reported. The bench assumes -amqp is that node.
func brokerPid() int {
	out, err := exec.Command("rabbitmqctl", "-q", "eval", "list_to_integer(os:getpid()).").Output()
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(out)))
	return pid
}
