package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/pushrelay/pushrelay/integration/stack"
)

// drain is the result of draining a backlog.
type drain struct {
	messages int
	elapsed  time.Duration
	cpu      time.Duration // CPU of the draining process over elapsed
	nginxCPU time.Duration // CPU of Nginx's master and workers over elapsed, if measured
}

func (d drain) rate() float64 { return float64(d.messages) / d.elapsed.Seconds() }

func (d drain) cpuPerMsg() time.Duration { return d.cpu / time.Duration(d.messages) }

func (d drain) nginxCPUPerMsg() time.Duration { return d.nginxCPU / time.Duration(d.messages) }

// plus is d and e as one drain, for figures over several rounds.
func (d drain) plus(e drain) drain {
	return drain{messages: d.messages + e.messages, elapsed: d.elapsed + e.elapsed, cpu: d.cpu + e.cpu, nginxCPU: d.nginxCPU + e.nginxCPU}
}

// rawConsumeMain is the raw consumer, run as its own process so that its
// CPU is measured the same way as the relay's: a minimal consumer that
// acks with multiple=true every 256 deliveries, as the relay's acker does,
// and does nothing else.
func rawConsumeMain(args []string) int {
	fs := flag.NewFlagSet("rawconsume", flag.ExitOnError)
	url := fs.String("amqp", "", "")
	queue := fs.String("queue", "", "")
	n := fs.Int("n", 0, "")
	prefetch := fs.Int("prefetch", 2048, "")
	fs.Parse(args)
	conn, err := amqp.Dial(*url)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ch.Qos(*prefetch, 0, false)
	deliveries, err := ch.Consume(*queue, "raw", false, false, false, false, nil)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	var start time.Time
	var cpu0 time.Duration
	for i := 1; i <= *n; i++ {
		d := <-deliveries
		if i == 1 {
			start, cpu0 = time.Now(), selfCPU()
		}
		if i%256 == 0 || i == *n {
			d.Ack(true)
		}
	}
	res := drain{messages: *n - 1, elapsed: time.Since(start), cpu: selfCPU() - cpu0}
	json.NewEncoder(os.Stdout).Encode(map[string]int64{"messages": int64(res.messages), "elapsed_ns": int64(res.elapsed), "cpu_ns": int64(res.cpu)})
	return 0
}

func selfCPU() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func runRawConsumer(ctx context.Context, o options, queue string) (drain, error) {
	cmd := exec.CommandContext(ctx, selfPath(), "rawconsume", "-amqp", o.amqpURL, "-queue", queue,
		"-n", strconv.Itoa(o.backlog), "-prefetch", strconv.Itoa(o.prefetch))
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		return drain{}, fmt.Errorf("raw consumer: %w", err)
	}
	var r map[string]int64
	if err := json.Unmarshal(out, &r); err != nil {
		return drain{}, fmt.Errorf("raw consumer output %q: %w", out, err)
	}
	return drain{messages: int(r["messages"]), elapsed: time.Duration(r["elapsed_ns"]), cpu: time.Duration(r["cpu_ns"])}, nil
}

// drainBacklog has the relay drain n messages of w. A first start declares
// its queue and bindings; it is stopped while the backlog is published and
// started again to drain. nginx are the processes whose CPU to count too.
func drainBacklog(ctx context.Context, relay *stack.Relay, b *broker, exchange string, w workload, n int, nginx []int) (drain, error) {
	if err := relay.Start(); err != nil {
		return drain{}, err
	}
	relay.Stop()
	if err := b.publishBacklog(ctx, exchange, routingKey, w, n); err != nil {
		return drain{}, err
	}
	return drainWithRelay(ctx, relay, n, nginx)
}

// drainWithRelay starts the relay on its backlog and times it from the
// first published message to the last, reading its CPU, and that of the
// nginx processes if any, from /proc.
func drainWithRelay(ctx context.Context, relay *stack.Relay, n int, nginx []int) (drain, error) {
	if err := relay.Start(); err != nil {
		return drain{}, err
	}
	defer relay.Stop()
	pid := relay.Pid()
	var (
		start      time.Time
		cpu0, ngx0 time.Duration
		startPub   float64
	)
	deadline := time.Now().Add(5 * time.Minute)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		pub := relay.Metric("pushrelay_messages_published_total")
		now := time.Now()
		if start.IsZero() && pub > 0 {
			start, cpu0, ngx0, startPub = now, procCPU(pid), procsCPU(nginx), pub
		}
		if pub >= float64(n) {
			return drain{messages: n - int(startPub), elapsed: now.Sub(start), cpu: procCPU(pid) - cpu0, nginxCPU: procsCPU(nginx) - ngx0}, nil
		}
		// Not faster: every /metrics scrape is CPU the relay would be
		// charged for.
		time.Sleep(100 * time.Millisecond)
	}
	return drain{}, fmt.Errorf("relay did not drain %d messages in 5 minutes", n)
}

// nginxPids are the master and its children (the workers): what Nginx
// spends on a message is split between them.
func nginxPids(master int) []int {
	pids := []int{master}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if f := procStat(pid); len(f) > 1 && f[1] == strconv.Itoa(master) {
			pids = append(pids, pid)
		}
	}
	return pids
}

func procsCPU(pids []int) time.Duration {
	var sum time.Duration
	for _, pid := range pids {
		sum += procCPU(pid)
	}
	return sum
}

// procCPU is the user+system CPU time of pid, from /proc/pid/stat.
func procCPU(pid int) time.Duration {
	f := procStat(pid)
	if len(f) < 13 {
		return 0
	}
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	const ticksPerSecond = 100 // USER_HZ, fixed at 100 on Linux
	return time.Duration(utime+stime) * time.Second / ticksPerSecond
}

// procStat is /proc/pid/stat's fields after the command name (which is in
// parentheses and may hold spaces): state, ppid, …
func procStat(pid int) []string {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return nil
	}
	return strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
}
