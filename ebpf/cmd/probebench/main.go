// Command probebench measures what the socket probes cost: the kernel's own
// run time per event of each program, and the throughput of a loopback
// connection-per-request load against nginx with the probes attached and
// detached, alternating ABBA in one run, next to an A/A run of the same
// shape as the noise floor. It prints figures; it asserts nothing.
//
// Run as root (make bench-probes): it makes a cgroup, starts nginx in it,
// and turns on kernel.bpf_stats_enabled while the probes are attached.
package main

import (
	"bufio"
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pushrelay/pushrelay/ebpf/probe"
	"github.com/pushrelay/pushrelay/sidecar/telemetry"
)

func main() {
	cycles := flag.Int("cycles", 6, "ABBA cycles per run (each is 4 rounds)")
	round := flag.Duration("round", time.Second, "length of one round")
	clients := flag.Int("clients", 4, "concurrent client connections")
	flag.Parse()
	if err := run(*cycles, *round, *clients); err != nil {
		fmt.Fprintln(os.Stderr, "probebench:", err)
		os.Exit(1)
	}
}

func run(cycles int, round time.Duration, clients int) error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("needs root: makes a cgroup and loads eBPF")
	}
	ctx := context.Background()
	// The client on CPU0 (one Go P), nginx's worker on CPU1: the two sides
	// do not compete, and the probes' cost lands on the side it belongs to.
	runtime.GOMAXPROCS(1)
	pinAllThreads(0)

	cg, err := makeCgroup()
	if err != nil {
		return err
	}
	defer os.Remove(cg)
	ngx, addr, port, err := startNginx(cg)
	if err != nil {
		return err
	}
	defer ngx.stop()

	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	cfg := probe.Config{Ports: []uint16{port}, Cgroup: cg, Interval: 50 * time.Millisecond}
	var modes map[string]string
	runTime := map[string]float64{}
	runs := map[string]float64{}
	attach := func() (func(), error) {
		reg := telemetry.New()
		p, err := probe.Start(ctx, cfg, reg, log)
		if err != nil {
			return nil, err
		}
		modes = p.Modes()
		return func() {
			time.Sleep(2 * cfg.Interval) // one more read of the programs' stats
			var b bytes.Buffer
			reg.WritePrometheus(&b)
			for name, v := range samples(b.String(), "pushrelay_probe_program_run_seconds_total") {
				runTime[name] += v
			}
			for name, v := range samples(b.String(), "pushrelay_probe_program_runs_total") {
				runs[name] += v
			}
			p.Close()
		}, nil
	}
	none := func() (func(), error) { return func() {}, nil }

	load(addr, clients, round/2) // warm-up: nginx, caches, ephemeral ports
	fmt.Printf("nginx on %s (worker on CPU1) in %s; client on CPU0, %d connections at a time, connection per request; rounds of %s\n\n", addr, cg, clients, round)

	aa, err := abba(addr, clients, round, cycles, none, none)
	if err != nil {
		return err
	}
	ab, err := abba(addr, clients, round, cycles, none, attach)
	if err != nil {
		return err
	}
	fmt.Printf("probe modes: conn=%s packets=%s\n\n", modes[probe.ProbeConn], modes[probe.ProbePackets])
	fmt.Println("| program | runs | ns/event (run_time_ns/run_cnt) |")
	fmt.Println("|---|---|---|")
	names := make([]string, 0, len(runs))
	for n := range runs {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		if runs[n] > 0 {
			fmt.Printf("| %s | %.0f | %.0f |\n", n, runs[n], runTime[n]*1e9/runs[n])
		}
	}
	fmt.Println()
	fmt.Println("| run | req/s detached (median) | ratio B/A: median | IQR | min–max | cycles |")
	fmt.Println("|---|---|---|---|---|---|")
	aa.print("A/A (nothing attached: noise floor)")
	ab.print("A/B (probes attached in B)")
	return nil
}

type result struct {
	ratios []float64
	rateA  []float64
}

func (r result) print(name string) {
	q := func(xs []float64, p float64) float64 {
		s := slices.Clone(xs)
		slices.Sort(s)
		i := p * float64(len(s)-1)
		lo := int(i)
		if lo+1 >= len(s) {
			return s[lo]
		}
		return s[lo] + (i-float64(lo))*(s[lo+1]-s[lo])
	}
	fmt.Printf("| %s | %.0f | %.3f | %.3f–%.3f | %.3f–%.3f | %d |\n", name, q(r.rateA, 0.5),
		q(r.ratios, 0.5), q(r.ratios, 0.25), q(r.ratios, 0.75), q(r.ratios, 0), q(r.ratios, 1), len(r.ratios))
}

// abba runs cycles of A B B A rounds; each cycle gives one ratio, so a drift
// over the run cancels within the cycle.
func abba(addr string, clients int, round time.Duration, cycles int, a, b func() (func(), error)) (result, error) {
	var r result
	for c := 0; c < cycles; c++ {
		var rate [4]float64
		for i, setup := range []func() (func(), error){a, b, b, a} {
			done, err := setup()
			if err != nil {
				return r, err
			}
			rate[i] = load(addr, clients, round)
			done()
		}
		r.ratios = append(r.ratios, (rate[1]+rate[2])/(rate[0]+rate[3]))
		r.rateA = append(r.rateA, (rate[0]+rate[3])/2)
	}
	return r, nil
}

// load makes connection-per-request HTTP requests for d and returns their
// rate.
func load(addr string, clients int, d time.Duration) float64 {
	var n atomic.Int64
	stop := time.Now().Add(d)
	var wg sync.WaitGroup
	req := []byte("GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
	buf := make([][]byte, clients)
	for i := range clients {
		buf[i] = make([]byte, 4096)
		wg.Add(1)
		go func(buf []byte) {
			defer wg.Done()
			for time.Now().Before(stop) {
				c, err := net.Dial("tcp", addr)
				if err != nil {
					continue
				}
				c.Write(req)
				for {
					if _, err := c.Read(buf); err != nil {
						break
					}
				}
				c.Close()
				n.Add(1)
			}
		}(buf[i])
	}
	start := time.Now()
	wg.Wait()
	return float64(n.Load()) / time.Since(start).Seconds()
}

// samples returns program → value of one per-program family.
func samples(text, family string) map[string]float64 {
	out := map[string]float64{}
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, family+"{program=\"") {
			continue
		}
		rest := strings.TrimPrefix(line, family+"{program=\"")
		name, val, _ := strings.Cut(rest, "\"} ")
		v, err := strconv.ParseFloat(val, 64)
		if err == nil {
			out[name] = v
		}
	}
	return out
}

func pinAllThreads(cpu int) {
	var set unix.CPUSet
	set.Set(cpu)
	tasks, _ := os.ReadDir("/proc/self/task")
	for _, t := range tasks {
		if tid, err := strconv.Atoi(t.Name()); err == nil {
			unix.SchedSetaffinity(tid, &set)
		}
	}
}

func makeCgroup() (string, error) {
	root, err := probe.Cgroup2Mount()
	if err != nil {
		return "", err
	}
	dir := filepath.Join(root, fmt.Sprintf("pushrelay-probebench-%d", os.Getpid()))
	return dir, os.Mkdir(dir, 0o755)
}

type nginx struct {
	cmd    *exec.Cmd
	prefix string
}

func startNginx(cgroup string) (*nginx, string, uint16, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, "", 0, err
	}
	port := uint16(l.Addr().(*net.TCPAddr).Port)
	l.Close()
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	prefix, err := os.MkdirTemp("", "pushrelay-probebench-nginx-")
	if err != nil {
		return nil, "", 0, err
	}
	conf := fmt.Sprintf(`user root;
daemon off;
master_process on;
worker_processes 1;
worker_cpu_affinity 10;
pid %[1]s/nginx.pid;
error_log %[1]s/error.log;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path %[1]s/body;
    server { listen %[2]s backlog=4096; location / { return 200 "ok\n"; } }
}
`, prefix, addr)
	if err := os.WriteFile(filepath.Join(prefix, "nginx.conf"), []byte(conf), 0o644); err != nil {
		return nil, "", 0, err
	}
	fd, err := unix.Open(cgroup, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		return nil, "", 0, err
	}
	defer unix.Close(fd)
	cmd := exec.Command("nginx", "-p", prefix, "-c", filepath.Join(prefix, "nginx.conf"), "-e", filepath.Join(prefix, "error.log"))
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: fd, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, "", 0, fmt.Errorf("start nginx: %w", err)
	}
	n := &nginx{cmd: cmd, prefix: prefix}
	for i := 0; ; i++ {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
			return n, addr, port, nil
		}
		if i == 200 {
			n.stop()
			return nil, "", 0, fmt.Errorf("nginx did not listen: %w", err)
		}
		time.Sleep(25 * time.Millisecond)
	}
}

func (n *nginx) stop() {
	n.cmd.Process.Signal(syscall.SIGTERM)
	n.cmd.Wait()
	os.RemoveAll(n.prefix)
}
