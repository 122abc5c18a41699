// Command idlesubs measures how much memory an Nginx worker spends per idle
// EventSource subscriber: it starts its own nginx (temporary prefix, one
// worker, a free loopback port, the Nchan module, or the Push Stream build
// of `make pushstream` for the pushstream variants), records the worker's RSS,
// opens N subscribers from several child processes (each stays under the
// machine's per-process open-file limit), waits for every one to get the
// EventSource preamble, and divides the RSS growth by N. It does this for
// the shipped snippets (nginx/pushrelay-nchan*.conf) and for an untuned
// config with the same locations and every setting left at its default;
// pushstream and pushstream-untuned do the same with
// nginx/pushrelay-pushstream*.conf.
//
//	go run ./integration/cmd/idlesubs [-n 10000] [-per-proc 5000] [-variants untuned,shipped,pushstream]
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/pushrelay/pushrelay/integration/stack"
)

const (
	nchanModule = "/usr/lib/nginx/modules/ngx_nchan_module.so"
	echoModule  = "/usr/lib/nginx/modules/ngx_http_echo_module.so"
)

// A browser's EventSource request, with the headers Chrome sends, so the
// header buffers hold what they would in production.
const browserRequest = "GET /ev/%s HTTP/1.1\r\n" +
	"Host: push.example.com\r\n" +
	"Connection: keep-alive\r\n" +
	"Accept: text/event-stream\r\n" +
	"Cache-Control: no-cache\r\n" +
	"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36\r\n" +
	"Origin: https://www.example.com\r\n" +
	"Referer: https://www.example.com/live/match/12345\r\n" +
	"Accept-Encoding: gzip, deflate, br, zstd\r\n" +
	"Accept-Language: en-US,en;q=0.9,fr;q=0.8\r\n" +
	"\r\n"

// minimalRequest is the least a client can send, to show what the headers
// themselves cost.
const minimalRequest = "GET /ev/%s HTTP/1.1\r\nHost: push.example.com\r\nAccept: text/event-stream\r\n\r\n"

// untunedLocations are the same URL shapes with Nchan's and nginx's defaults.
const untunedLocations = `
location = /pub {
    allow 127.0.0.1;
    deny all;
    nchan_publisher;
    nchan_channel_id $arg_id;
}
location ~ ^/ev/(?<pr_channel>[A-Za-z0-9_.:@-]+)$ {
    nchan_subscriber;
    nchan_channel_id $pr_channel;
}
`

type options struct {
	n         int
	perProc   int
	channels  int
	settle    time.Duration
	repoRoot  string
	variants  []string
	extra     string
	request   string
	keepFiles bool
}

func main() {
	logger := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	// Child mode: hold subscribers for the parent until stdin closes.
	if len(os.Args) > 1 && os.Args[1] == "hold" {
		if err := hold(ctx, os.Args[2:]); err != nil {
			fmt.Fprintln(os.Stderr, "idlesubs hold:", err)
			os.Exit(1)
		}
		return
	}

	var o options
	var variants string
	flag.IntVar(&o.n, "n", 10000, "idle subscribers to hold (5,000-15,000: one nginx worker may open 20,000 files)")
	flag.IntVar(&o.perProc, "per-proc", 5000, "subscribers per child process")
	flag.IntVar(&o.channels, "channels", 0, "distinct channels (0: one per subscriber)")
	flag.DurationVar(&o.settle, "settle", 3*time.Second, "wait after the last subscriber before reading RSS")
	flag.StringVar(&o.repoRoot, "repo", ".", "repository root (for nginx/*.conf)")
	flag.StringVar(&variants, "variants", "untuned,shipped", "configs to measure, in order: untuned, shipped, no-nchan (Nchan); pushstream, pushstream-untuned (Push Stream)")
	flag.BoolVar(&o.keepFiles, "keep", false, "keep the nginx prefix directories")
	flag.StringVar(&o.request, "request", "browser", "subscriber request: browser (Chrome's headers) or minimal")
	flag.StringVar(&o.extra, "extra", "", "directives added to the shipped server block, to try a tuning before shipping it")
	flag.Parse()
	o.variants = strings.Split(variants, ",")
	if o.n < 1 || o.n > 18000 || o.perProc < 1 || o.perProc > 18000 {
		fmt.Fprintln(os.Stderr, "idlesubs: -n and -per-proc must be 1..18000")
		os.Exit(2)
	}
	if o.request != "browser" && o.request != "minimal" {
		fmt.Fprintln(os.Stderr, "idlesubs: -request must be browser or minimal")
		os.Exit(2)
	}
	if o.channels <= 0 {
		o.channels = o.n
	}
	if err := run(ctx, logger, o); err != nil {
		logger.Error("idlesubs failed", "err", err)
		os.Exit(1)
	}
}

type result struct {
	variant       string
	before, after memory
	ready         int
	perSubKB      float64
}

// pushStream tells the variants that run nginx-push-stream-module.
func pushStream(variant string) bool { return strings.HasPrefix(variant, "pushstream") }

func run(ctx context.Context, logger *slog.Logger, o options) error {
	for _, v := range o.variants {
		if !pushStream(v) && v != "no-nchan" {
			if _, err := os.Stat(nchanModule); err != nil {
				return fmt.Errorf("nchan module: %w (make deps installs libnginx-mod-nchan)", err)
			}
		}
	}
	var results []result
	for _, v := range o.variants {
		r, err := measure(ctx, logger, o, v)
		if err != nil {
			return fmt.Errorf("%s: %w", v, err)
		}
		results = append(results, r)
	}
	fmt.Printf("\nnginx worker memory per idle EventSource subscriber (N=%d, %d channels, %d per client process, %s request)\n\n", o.n, o.channels, o.perProc, o.request)
	fmt.Println("| config | worker VmRSS before → after | Δ VmRSS per subscriber | of which private (RssAnon) | of which shared memory (RssShmem) |")
	fmt.Println("|---|---|---|---|---|")
	for _, r := range results {
		n := float64(r.ready)
		fmt.Printf("| %s | %.1f → %.1f MB | **%.2f KB** | %.2f KB | %.2f KB |\n", r.variant,
			float64(r.before.rss)/1024, float64(r.after.rss)/1024, r.perSubKB,
			float64(r.after.anon-r.before.anon)/n, float64(r.after.shmem-r.before.shmem)/n)
	}
	return nil
}

func measure(ctx context.Context, logger *slog.Logger, o options, variant string) (result, error) {
	res := result{variant: variant}
	prefix, err := os.MkdirTemp("", "idlesubs-"+variant+"-")
	if err != nil {
		return res, fmt.Errorf("temp prefix: %w", err)
	}
	if !o.keepFiles {
		defer os.RemoveAll(prefix)
	}
	port, err := freePort()
	if err != nil {
		return res, err
	}
	conf, err := nginxConf(o, variant, prefix, port)
	if err != nil {
		return res, err
	}
	confPath := filepath.Join(prefix, "nginx.conf")
	if err := os.MkdirAll(filepath.Join(prefix, "logs"), 0o755); err != nil {
		return res, fmt.Errorf("prefix: %w", err)
	}
	if err := os.WriteFile(confPath, []byte(conf), 0o644); err != nil {
		return res, fmt.Errorf("write nginx.conf: %w", err)
	}

	bin := "nginx"
	if pushStream(variant) {
		if bin, err = stack.PushStreamNginx(); err != nil {
			return res, err
		}
	}
	ngx := exec.CommandContext(ctx, bin, "-p", prefix, "-c", confPath)
	ngx.Stdout, ngx.Stderr = os.Stderr, os.Stderr
	ngx.Cancel = func() error { return ngx.Process.Signal(syscall.SIGTERM) }
	ngx.WaitDelay = 10 * time.Second
	if err := ngx.Start(); err != nil {
		return res, fmt.Errorf("start nginx: %w", err)
	}
	defer func() {
		_ = ngx.Process.Signal(syscall.SIGTERM)
		_ = ngx.Wait()
	}()
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	worker, err := waitWorker(ctx, ngx.Process.Pid, addr)
	if err != nil {
		return res, err
	}
	// Warm up: fault in code and the first pages of every pool, so the
	// delta is what subscribers add, not what the first request touches.
	if err := warmUp(addr, requestFor(o.request), preambleFor(variant), 50); err != nil {
		return res, fmt.Errorf("warm-up: %w", err)
	}
	time.Sleep(time.Second)
	if res.before, err = readMemory(worker); err != nil {
		return res, err
	}

	self, err := os.Executable()
	if err != nil {
		return res, fmt.Errorf("own path: %w", err)
	}
	var children []*exec.Cmd
	var stdins []io.Closer
	defer func() {
		for _, s := range stdins {
			s.Close()
		}
		for _, c := range children {
			_ = c.Wait()
		}
	}()
	for start := 0; start < o.n; start += o.perProc {
		count := min(o.perProc, o.n-start)
		c := exec.CommandContext(ctx, self, "hold", addr, strconv.Itoa(start), strconv.Itoa(count), strconv.Itoa(o.channels), o.request, preambleFor(variant))
		c.Stderr = os.Stderr
		in, err := c.StdinPipe()
		if err != nil {
			return res, fmt.Errorf("child stdin: %w", err)
		}
		out, err := c.StdoutPipe()
		if err != nil {
			return res, fmt.Errorf("child stdout: %w", err)
		}
		if err := c.Start(); err != nil {
			return res, fmt.Errorf("start child: %w", err)
		}
		children, stdins = append(children, c), append(stdins, in)
		line, err := bufio.NewReader(out).ReadString('\n')
		if err != nil {
			return res, fmt.Errorf("child %d: %w", len(children), err)
		}
		n, err := strconv.Atoi(strings.TrimSpace(strings.TrimPrefix(line, "ready ")))
		if err != nil || n != count {
			return res, fmt.Errorf("child %d: %q, want ready %d", len(children), strings.TrimSpace(line), count)
		}
		res.ready += n
		logger.Info("subscribers held", "variant", variant, "total", res.ready)
	}
	time.Sleep(o.settle)
	if res.after, err = readMemory(worker); err != nil {
		return res, err
	}
	if st, err := stubStatus(addr); err == nil {
		logger.Info("worker state", "variant", variant, "established", st)
	}
	res.perSubKB = float64(res.after.rss-res.before.rss) / float64(res.ready)
	return res, nil
}

func nginxConf(o options, variant, prefix string, port int) (string, error) {
	var httpExtra, serverBody string
	modules := "load_module " + nchanModule + ";\n"
	switch variant {
	case "shipped":
		root, err := filepath.Abs(o.repoRoot)
		if err != nil {
			return "", fmt.Errorf("repo root: %w", err)
		}
		httpExtra = "include " + filepath.Join(root, "nginx/pushrelay-nchan-http.conf") + ";"
		serverBody = o.extra + "\n        include " + filepath.Join(root, "nginx/pushrelay-nchan.conf") + ";"
	case "untuned":
		serverBody = untunedLocations
	case "no-nchan":
		// nginx alone holding the same request open (echo module), to tell
		// nginx's own share of the cost from Nchan's.
		modules = "load_module " + echoModule + ";\n"
		httpExtra = o.extra
		serverBody = `location ~ ^/ev/ {
            default_type text/event-stream;
            chunked_transfer_encoding off;
            echo ": hi";
            echo "";
            echo_flush;
            echo_sleep 3600;
        }`
	case "pushstream", "pushstream-untuned":
		// Push Stream is built in (no load_module). Its http-level snippet
		// carries the shared zone and a publisher server, moved here to a
		// free port; untuned drops the one tuning of the server snippet.
		modules = ""
		root, err := filepath.Abs(o.repoRoot)
		if err != nil {
			return "", fmt.Errorf("repo root: %w", err)
		}
		pubPort, err := freePort()
		if err != nil {
			return "", err
		}
		httpConf, err := rewrite(filepath.Join(root, "nginx/pushrelay-pushstream-http.conf"), prefix, listenRE,
			fmt.Sprintf("    listen 127.0.0.1:%d;", pubPort))
		if err != nil {
			return "", err
		}
		serverConf := filepath.Join(root, "nginx/pushrelay-pushstream.conf")
		if variant == "pushstream-untuned" {
			if serverConf, err = rewrite(serverConf, prefix, poolSizeRE, ""); err != nil {
				return "", err
			}
		}
		httpExtra = "include " + httpConf + ";"
		serverBody = o.extra + "\n        include " + serverConf + ";"
	default:
		return "", fmt.Errorf("unknown variant %q (shipped, untuned, no-nchan, pushstream, pushstream-untuned)", variant)
	}
	// Only the limits the measurement needs are raised here: one worker so
	// one RSS holds every subscriber, and room for N descriptors.
	return fmt.Sprintf(`%s
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 19900;
pid %[2]s/nginx.pid;
error_log %[2]s/logs/error.log warn;
events {
    worker_connections 19800;
}
http {
    access_log off;
    client_body_temp_path %[2]s/client_body;
    proxy_temp_path %[2]s/proxy;
    fastcgi_temp_path %[2]s/fastcgi;
    uwsgi_temp_path %[2]s/uwsgi;
    scgi_temp_path %[2]s/scgi;
    %[3]s
    server {
        listen 127.0.0.1:%[4]d backlog=4096;
        %[5]s
        location = /idlesubs-status { stub_status; }
    }
}
`, modules, prefix, httpExtra, port, serverBody), nil
}

var (
	listenRE   = regexp.MustCompile(`(?m)^[ \t]*listen[ \t]+[^;\n]*;`)
	poolSizeRE = regexp.MustCompile(`(?m)^[ \t]*request_pool_size[ \t]+[^;\n]*;`)
)

// rewrite copies the snippet at path into dir with the one line re matches
// replaced by repl, and returns the copy's path. Exactly one match, so a
// snippet that changed shape fails here rather than measure something else.
func rewrite(path, dir string, re *regexp.Regexp, repl string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	if n := len(re.FindAll(b, -1)); n != 1 {
		return "", fmt.Errorf("%s: %d lines match %s, want 1", path, n, re)
	}
	out := filepath.Join(dir, filepath.Base(path))
	return out, os.WriteFile(out, re.ReplaceAllLiteral(b, []byte(repl)), 0o644)
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// waitWorker waits until nginx answers and returns its only worker's pid.
func waitWorker(ctx context.Context, master int, addr string) (int, error) {
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		if ctx.Err() != nil {
			return 0, ctx.Err()
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", master, master))
		if err == nil {
			if kids := strings.Fields(string(b)); len(kids) == 1 {
				if _, err := stubStatus(addr); err == nil {
					return strconv.Atoi(kids[0])
				}
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	return 0, errors.New("nginx did not start one worker within 15s (see its error.log)")
}

func stubStatus(addr string) (string, error) {
	conn, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := fmt.Fprintf(conn, "GET /idlesubs-status HTTP/1.0\r\nHost: x\r\n\r\n"); err != nil {
		return "", err
	}
	b, err := io.ReadAll(conn)
	if err != nil {
		return "", err
	}
	if !strings.HasPrefix(string(b), "HTTP/1.1 200") {
		return "", fmt.Errorf("status: %.40q", b)
	}
	_, body, _ := strings.Cut(string(b), "\r\n\r\n")
	return strings.Join(strings.Fields(body), " "), nil
}

// warmUp opens and closes a few subscribers.
func warmUp(addr, format, preamble string, n int) error {
	for i := range n {
		c, err := subscribe(addr, format, preamble, "warmup-"+strconv.Itoa(i))
		if err != nil {
			return err
		}
		c.Close()
	}
	return nil
}

func requestFor(kind string) string {
	if kind == "minimal" {
		return minimalRequest
	}
	return browserRequest
}

// preambleFor is what the module sends first on a new EventSource stream,
// right after the response headers: once it is read, the subscriber is
// registered. Nchan sends a ": hi" comment; Push Stream an empty comment,
// as a chunk.
func preambleFor(variant string) string {
	if pushStream(variant) {
		return "pushstream"
	}
	return "nchan"
}

var preambles = map[string]string{
	"nchan":      "\r\n\r\n: hi\n",
	"pushstream": "\r\n\r\n3\r\n: \n\r\n",
}

type memory struct{ rss, anon, file, shmem int64 } // KB

func readMemory(pid int) (memory, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return memory{}, fmt.Errorf("worker status: %w", err)
	}
	var m memory
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		switch k {
		case "VmRSS":
			m.rss = kb
		case "RssAnon":
			m.anon = kb
		case "RssFile":
			m.file = kb
		case "RssShmem":
			m.shmem = kb
		}
	}
	if m.rss == 0 {
		return m, fmt.Errorf("no VmRSS for pid %d", pid)
	}
	return m, nil
}

// subscribe sends the EventSource request and reads until the module's
// preamble, so the subscriber is registered before it is counted.
func subscribe(addr, format, preamble, channel string) (net.Conn, error) {
	want, ok := preambles[preamble]
	if !ok {
		return nil, fmt.Errorf("unknown preamble %q", preamble)
	}
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return nil, fmt.Errorf("dial: %w", err)
	}
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := fmt.Fprintf(c, format, channel); err != nil {
		c.Close()
		return nil, fmt.Errorf("send: %w", err)
	}
	var got []byte
	buf := make([]byte, 512)
	for !strings.Contains(string(got), want) {
		n, err := c.Read(buf)
		got = append(got, buf[:n]...)
		if err != nil || len(got) > 4096 {
			c.Close()
			return nil, fmt.Errorf("channel %s: no EventSource preamble in %q: %v", channel, got, err)
		}
	}
	if !strings.HasPrefix(string(got), "HTTP/1.1 200") {
		c.Close()
		return nil, fmt.Errorf("channel %s: %.60q", channel, got)
	}
	_ = c.SetDeadline(time.Time{})
	return c, nil
}

// hold opens count subscribers, says "ready N", and keeps them until stdin
// closes (the parent is done or died) or an hour passes.
func hold(ctx context.Context, args []string) error {
	if len(args) != 6 {
		return errors.New("usage: hold ADDR START COUNT CHANNELS browser|minimal nchan|pushstream")
	}
	format := requestFor(args[4])
	addr := args[0]
	start, err1 := strconv.Atoi(args[1])
	count, err2 := strconv.Atoi(args[2])
	channels, err3 := strconv.Atoi(args[3])
	if err := errors.Join(err1, err2, err3); err != nil || channels < 1 {
		return fmt.Errorf("bad arguments %q: %v", args, err)
	}
	conns := make([]net.Conn, 0, count)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for i := start; i < start+count; i++ {
		c, err := subscribe(addr, format, args[5], "ch"+strconv.Itoa(i%channels))
		if err != nil {
			return err
		}
		conns = append(conns, c)
	}
	fmt.Printf("ready %d\n", len(conns))
	done := make(chan struct{})
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		close(done)
	}()
	// Nobody reads the pings (one every 10 s): they wait in socket
	// buffers, which are kernel memory, not the worker's.
	select {
	case <-done:
	case <-ctx.Done():
	case <-time.After(time.Hour):
	}
	return nil
}
