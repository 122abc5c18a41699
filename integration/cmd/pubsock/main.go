// Command pubsock compares the two ways the relay can reach Nginx's
// publisher server: TCP on loopback and a Unix socket. It starts one Nginx
// per module with the project's snippets and a publisher server listening
// on both, publishes the same messages over one keep-alive connection to
// each (16 requests in flight, as a relay lane), and prints the CPU time
// Nginx's workers and this client spent per message. Figures, not
// assertions; the runs alternate the order to spread drift over both.
//
//	go run ./integration/cmd/pubsock [-n 200000] [-runs 2] [-modules nchan,pushstream]
package main

import (
	"bufio"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/pushrelay/pushrelay/integration/stack"
)

type options struct {
	n, runs, depth, body, channels int
	modules                        []stack.Module
}

func main() {
	var o options
	var modules string
	flag.IntVar(&o.n, "n", 200000, "messages per measurement")
	flag.IntVar(&o.runs, "runs", 2, "rounds; each publishes over both transports, alternating which goes first")
	flag.IntVar(&o.depth, "depth", 16, "requests in flight on the connection")
	flag.IntVar(&o.body, "body", 100, "body size in bytes")
	flag.IntVar(&o.channels, "channels", 100, "channels, published round-robin")
	flag.StringVar(&modules, "modules", "nchan,pushstream", "publisher modules to measure")
	flag.Parse()
	for _, m := range strings.Split(modules, ",") {
		o.modules = append(o.modules, stack.Module(m))
	}
	if err := run(o); err != nil {
		slog.Error("pubsock", "err", err)
		os.Exit(1)
	}
}

func run(o options) error {
	fmt.Printf("%d messages of %d bytes over %d channels per measurement, %d in flight on one connection; nginx: 2 workers\n",
		o.n, o.body, o.channels, o.depth)
	fmt.Printf("%-10s %-4s %-5s %10s %14s %14s\n", "module", "run", "via", "msg/s", "nginx CPU/msg", "client CPU/msg")
	for _, m := range o.modules {
		if _, err := m.Nginx(); err != nil {
			fmt.Printf("%-10s skipped: %v\n", m, err)
			continue
		}
		if err := measureModule(o, m); err != nil {
			return fmt.Errorf("%s: %w", m, err)
		}
	}
	return nil
}

func measureModule(o options, m stack.Module) error {
	dir, err := os.MkdirTemp("", "pubsock")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	port, err := stack.FreePort()
	if err != nil {
		return err
	}
	tcp := fmt.Sprintf("127.0.0.1:%d", port)
	sock := filepath.Join(dir, "publish.sock")
	ngx, err := stack.StartNginx(stack.NginxOptions{Dir: dir, Module: m, Publisher: []string{tcp, "unix:" + sock}})
	if err != nil {
		return err
	}
	defer ngx.Stop()
	dial := map[string]func() (net.Conn, error){
		"tcp":  func() (net.Conn, error) { return net.Dial("tcp", tcp) },
		"unix": func() (net.Conn, error) { return net.Dial("unix", sock) },
	}
	// Warm up both paths (worker start-up, shared memory first touched).
	for _, via := range []string{"tcp", "unix"} {
		if _, err := publish(dial[via], m, o, o.n/10); err != nil {
			return err
		}
	}
	for r := 1; r <= o.runs; r++ {
		order := []string{"tcp", "unix"}
		if r%2 == 0 {
			order = []string{"unix", "tcp"}
		}
		for _, via := range order {
			if m == stack.PushStream {
				// Push Stream keeps every message 10-14 s after it leaves
				// its channel; at this rate a 512M zone fills up (500s)
				// unless the trash drains between measurements.
				time.Sleep(15 * time.Second)
			}
			w0, err := workersCPU(ngx.Pid())
			if err != nil {
				return err
			}
			c0 := selfCPU()
			res, err := publish(dial[via], m, o, o.n)
			if err != nil {
				return err
			}
			c1 := selfCPU()
			w1, err := workersCPU(ngx.Pid())
			if err != nil {
				return err
			}
			perMsg := func(d time.Duration) string {
				return fmt.Sprintf("%.2f µs", float64(d)/float64(o.n)/1e3)
			}
			fmt.Printf("%-10s %-4d %-5s %10.0f %14s %14s\n", m, r, via, float64(o.n)/res.Seconds(),
				perMsg(w1-w0), perMsg(c1-c0))
		}
	}
	return nil
}

// publish sends n messages over one connection, keeping depth requests in
// flight, and returns the wall time. Any status but the module's success
// is an error: the figures would not be comparable.
func publish(dial func() (net.Conn, error), m stack.Module, o options, n int) (time.Duration, error) {
	conn, err := dial()
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	reqs := make([][]byte, o.channels)
	body := strings.Repeat("x", o.body)
	for i := range reqs {
		reqs[i] = []byte(fmt.Sprintf("POST /pub?id=bench:%d HTTP/1.1\r\nHost: publisher\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s",
			i, len(body), body))
	}
	w := bufio.NewWriterSize(conn, 64<<10)
	r := bufio.NewReaderSize(conn, 64<<10)
	var resp fasthttp.Response
	start := time.Now()
	sent, inFlight := 0, 0
	for done := 0; done < n; done++ {
		for inFlight < o.depth && sent < n {
			w.Write(reqs[sent%len(reqs)])
			sent++
			inFlight++
		}
		if err := w.Flush(); err != nil {
			return 0, err
		}
		if err := resp.Read(r); err != nil {
			return 0, fmt.Errorf("response %d: %w", done, err)
		}
		if !m.Accepted(resp.StatusCode()) {
			return 0, fmt.Errorf("response %d: status %d: %s", done, resp.StatusCode(), resp.Body())
		}
		inFlight--
	}
	return time.Since(start), nil
}

// workersCPU sums user and system CPU time of the master's children (the
// workers), from /proc/PID/stat. The master itself does nothing per request.
func workersCPU(master int) (time.Duration, error) {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return 0, err
	}
	var ticks int64
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue // exited meanwhile
		}
		// Fields after the command, which is in parentheses and may hold
		// spaces: state(3) ppid(4) ... utime(14) stime(15).
		f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
		if len(f) < 13 || f[1] != strconv.Itoa(master) || pid == master {
			continue
		}
		u, _ := strconv.ParseInt(f[11], 10, 64)
		s, _ := strconv.ParseInt(f[12], 10, 64)
		ticks += u + s
	}
	const clkTck = 100 // USER_HZ on Linux
	return time.Duration(ticks) * time.Second / clkTck, nil
}

// selfCPU is this process's user + system CPU time so far.
func selfCPU() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
