// Package stack runs the real pieces of a frontend for tests, the demo and
// the benchmarks: Debian's Nginx with the Nchan module and the project's
// nginx/ snippet, the pushrelay binary with a generated config, and
// EventSource subscribers. It is the one place that knows how to start
// them, so that what the tests check is what the demo shows and what the
// benchmarks measure.
package stack

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"syscall"
	"time"
)

// NchanModule is where Debian's libnginx-mod-nchan installs the module.
const NchanModule = "/usr/lib/nginx/modules/ngx_nchan_module.so"

// RepoRoot is the checkout this package was built from.
func RepoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Dir(filepath.Dir(filepath.Dir(file)))
}

// NchanSnippet is the project's Nchan server-block snippet.
func NchanSnippet() string { return Nchan.snippet("") }

// VendorDir holds the pinned third-party sources the Push Stream build
// needs; it sits next to the checkout and exists only on some machines.
func VendorDir() string { return filepath.Join(filepath.Dir(RepoRoot()), "shared", "vendor") }

// PushStreamNginx is the nginx binary with the Push Stream module built in,
// from `make pushstream` (integration/pushstream.mk), or
// $PUSHRELAY_PUSHSTREAM_NGINX. The error says why there is none.
func PushStreamNginx() (string, error) {
	if p := os.Getenv("PUSHRELAY_PUSHSTREAM_NGINX"); p != "" {
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Errorf("PUSHRELAY_PUSHSTREAM_NGINX: %w", err)
		}
		return p, nil
	}
	bin := filepath.Join(RepoRoot(), ".build", "pushstream", "nginx", "sbin", "nginx")
	if _, err := os.Stat(bin); err == nil {
		return bin, nil
	}
	if _, err := os.Stat(VendorDir()); err != nil {
		return "", fmt.Errorf("no nginx with Push Stream: %s is absent, so there is nothing to build it from (Debian does not ship the module)", VendorDir())
	}
	return "", fmt.Errorf("no nginx with Push Stream: %s is not built (run `make pushstream`)", bin)
}

// Module is the publish/subscribe module an Nginx instance runs.
type Module string

const (
	// Nchan is Debian's libnginx-mod-nchan on Debian's nginx.
	Nchan Module = "nchan"
	// PushStream is nginx-push-stream-module, built from ../shared/vendor
	// by `make pushstream` (Debian does not ship it).
	PushStream Module = "pushstream"
)

// Dialect is the relay's [push] dialect for the module.
func (m Module) Dialect() string { return string(m) }

// Nginx is the binary that runs the module: Debian's for Nchan (loaded as a
// dynamic module), the static build for Push Stream.
func (m Module) Nginx() (string, error) {
	if m == PushStream {
		return PushStreamNginx()
	}
	return "nginx", nil
}

// Accepted reports whether a publish status means the module took the
// message: Push Stream answers 200; Nchan 201 (someone listening) or 202.
func (m Module) Accepted(status int) bool {
	if m == PushStream {
		return status == 200
	}
	return status == 201 || status == 202
}

// snippet is the project's nginx/pushrelay-<module><suffix>.conf: suffix ""
// for the server-block snippet, "-http" for the http-level one.
func (m Module) snippet(suffix string) string {
	if m == "" {
		m = Nchan
	}
	return filepath.Join(RepoRoot(), "nginx", "pushrelay-"+string(m)+suffix+".conf")
}

// NginxOptions shape the generated nginx.conf.
type NginxOptions struct {
	Module  Module   // default Nchan
	Dir     string   // prefix directory (created by the caller; holds conf, pid, logs)
	Listen  string   // address:port; default 127.0.0.1 and a free port
	Workers int      // worker_processes; default 2
	Modules []string // load_module paths; nil means the module's (Nchan's .so; none for the static Push Stream)
	HTTP    string   // directives at http{} level
	// Server are the directives inside server{}. Empty means the project's
	// snippets for Module: the server one here, the http-level one in http{}.
	Server string
	// Publisher are the listen addresses of the publisher server that the
	// module's http-level snippet holds ("127.0.0.1:port" or "unix:/path"),
	// in place of the snippet's fixed one, so that instances can run side
	// by side. Default: one free loopback port.
	Publisher []string
	// PublisherLog turns on the publisher server's access log (the shipped
	// snippet has it off), for tests that must know which instance
	// answered a publish, and when: Nginx.PublisherLog. Benchmarks leave it
	// off, as production does.
	PublisherLog bool
	// CgroupFD, if positive, starts the master in that cgroup v2 directory
	// (CLONE_INTO_CGROUP), so its workers are born there too.
	CgroupFD int
}

// Nginx is a running instance, a child of this process.
type Nginx struct {
	Addr   string // 127.0.0.1:port
	Prefix string
	Module Module
	// PubAddr is the publisher server's first listen address
	// ("127.0.0.1:port" or "unix:/path"); "" when the config has none.
	PubAddr string
	bin     string
	conf    string
	opts    NginxOptions
	cmd     *exec.Cmd
	exited  chan struct{}
}

// StartNginx writes the config and starts nginx, returning once it answers.
func StartNginx(o NginxOptions) (*Nginx, error) {
	if o.Listen == "" {
		port, err := FreePort()
		if err != nil {
			return nil, err
		}
		o.Listen = fmt.Sprintf("127.0.0.1:%d", port)
	}
	if o.Workers == 0 {
		o.Workers = 2
	}
	if o.Module == "" {
		o.Module = Nchan
	}
	bin, err := o.Module.Nginx()
	if err != nil {
		return nil, err
	}
	if o.Modules == nil && o.Module == Nchan {
		o.Modules = []string{NchanModule}
	}
	if o.Server == "" {
		o.HTTP = "include " + o.Module.snippet("-http") + ";\n" + o.HTTP
		o.Server = "include " + o.Module.snippet("") + ";"
	}
	pubAddr := ""
	if include := "include " + o.Module.snippet("-http") + ";"; strings.Contains(o.HTTP, include) {
		if len(o.Publisher) == 0 {
			port, err := FreePort()
			if err != nil {
				return nil, err
			}
			o.Publisher = []string{fmt.Sprintf("127.0.0.1:%d", port)}
		}
		local, err := publisherSnippet(o.Module, o.Dir, o.Publisher, o.PublisherLog)
		if err != nil {
			return nil, err
		}
		o.HTTP = strings.ReplaceAll(o.HTTP, include, "include "+local+";")
		pubAddr = o.Publisher[0]
	}
	for _, m := range o.Modules {
		if _, err := os.Stat(m); err != nil {
			return nil, fmt.Errorf("nginx module %s missing (run `make deps`): %w", m, err)
		}
	}
	n := &Nginx{Addr: o.Listen, Prefix: o.Dir, Module: o.Module, PubAddr: pubAddr, bin: bin, conf: filepath.Join(o.Dir, "nginx.conf"), opts: o}
	var conf strings.Builder
	for _, m := range o.Modules {
		fmt.Fprintf(&conf, "load_module %s;\n", m)
	}
	if os.Getuid() == 0 {
		conf.WriteString("user root;\n") // workers can then read 0700 temp dirs
	}
	fmt.Fprintf(&conf, `daemon off;
master_process on;
worker_processes %[1]d;
worker_rlimit_nofile 20000;
pid %[2]s/nginx.pid;
error_log %[2]s/error.log notice;
events { worker_connections 16384; }
http {
    access_log off;
    client_body_temp_path %[2]s/body;
    proxy_temp_path %[2]s/proxy;
    fastcgi_temp_path %[2]s/fastcgi;
    uwsgi_temp_path %[2]s/uwsgi;
    scgi_temp_path %[2]s/scgi;
    %[3]s
    server {
        listen %[4]s;
        %[5]s
    }
}
`, o.Workers, o.Dir, o.HTTP, o.Listen, o.Server)
	if err := os.WriteFile(n.conf, []byte(conf.String()), 0o644); err != nil {
		return nil, err
	}
	return n, n.Start()
}

// Start (re)starts the instance and waits until it answers HTTP.
func (n *Nginx) Start() error {
	cmd := exec.Command(n.bin, "-p", n.Prefix, "-c", n.conf, "-e", filepath.Join(n.Prefix, "error.log"))
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	// Pdeathsig: a crashed test or demo must not leave nginx behind.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if n.opts.CgroupFD > 0 {
		cmd.SysProcAttr.UseCgroupFD = true
		cmd.SysProcAttr.CgroupFD = n.opts.CgroupFD
	}
	// Pdeathsig follows the thread that forked, so keep it alive.
	runtime.LockOSThread()
	err := cmd.Start()
	runtime.UnlockOSThread()
	if err != nil {
		return fmt.Errorf("start nginx: %w", err)
	}
	n.cmd = cmd
	n.exited = make(chan struct{})
	go func(exited chan struct{}) { cmd.Wait(); close(exited) }(n.exited)
	deadline := time.Now().Add(10 * time.Second)
	for {
		select {
		case <-n.exited:
			return fmt.Errorf("nginx exited at start:\n%s", n.ErrorLog())
		default:
		}
		c, err := net.DialTimeout("tcp", n.Addr, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			n.Stop()
			return fmt.Errorf("nginx did not listen on %s: %w\n%s", n.Addr, err, n.ErrorLog())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Stop shuts nginx down fast (SIGTERM) and waits for it; SIGKILL to the
// whole process group after 10 s.
func (n *Nginx) Stop() {
	if n.cmd == nil {
		return
	}
	n.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-n.exited:
	case <-time.After(10 * time.Second):
		syscall.Kill(-n.cmd.Process.Pid, syscall.SIGKILL)
		<-n.exited
	}
	n.cmd = nil
}

// Pid is the master's process id, or 0 when stopped.
func (n *Nginx) Pid() int {
	if n.cmd == nil {
		return 0
	}
	return n.cmd.Process.Pid
}

// URL is http://addr + path.
func (n *Nginx) URL(path string) string { return "http://" + n.Addr + path }

// PublisherURL is the URL of path on the publisher server, in the spelling
// the relay's [push] url takes: http://unix:/path:/uri for a Unix socket
// (nginx's proxy_pass spelling).
func (n *Nginx) PublisherURL(path string) string {
	if sock, ok := strings.CutPrefix(n.PubAddr, "unix:"); ok {
		return "http://unix:" + sock + ":" + path
	}
	return "http://" + n.PubAddr + path
}

// PublishURL is the relay's [push] url for this instance.
func (n *Nginx) PublishURL() string { return n.PublisherURL("/pub?id={channel}") }

// publisherClient talks to the publisher server, whichever kind its
// address is: the URL's host is ignored.
func (n *Nginx) publisherClient() *http.Client {
	network, addr := "tcp", n.PubAddr
	if sock, ok := strings.CutPrefix(n.PubAddr, "unix:"); ok {
		network, addr = "unix", sock
	}
	return &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, addr)
		},
	}}
}

// publisherSnippet writes a copy of the module's http-level snippet into
// dir with the publisher server's listen line replaced by addrs, and
// returns its path. The snippet must have exactly one listen line: it is
// the publisher server's, and if that changes this must too.
func publisherSnippet(m Module, dir string, addrs []string, accessLog bool) (string, error) {
	b, err := os.ReadFile(m.snippet("-http"))
	if err != nil {
		return "", err
	}
	if n := len(listenRE.FindAll(b, -1)); n != 1 {
		return "", fmt.Errorf("%s: %d listen lines, want the publisher server's one", m.snippet("-http"), n)
	}
	var listen strings.Builder
	for i, a := range addrs {
		if i > 0 {
			listen.WriteString("\n")
		}
		fmt.Fprintf(&listen, "    listen %s;", a)
	}
	out := listenRE.ReplaceAllLiteral(b, []byte(listen.String()))
	// The publisher server's access log, which the shipped snippet turns
	// off: a test can then tell which instance answered a publish, and
	// when (PublisherLog).
	if accessLog {
		if n := bytes.Count(out, []byte("access_log off;")); n != 1 {
			return "", fmt.Errorf("%s: %d access_log lines, want the publisher server's one", m.snippet("-http"), n)
		}
		out = bytes.Replace(out, []byte("access_log off;"),
			[]byte("access_log "+filepath.Join(dir, publisherLog)+" pushrelay_test;"), 1)
		out = append([]byte("log_format pushrelay_test '$msec $status $arg_id $request_body';\n"), out...)
	}
	path := filepath.Join(dir, filepath.Base(m.snippet("-http")))
	return path, os.WriteFile(path, out, 0o644)
}

// publisherLog is the publisher server's access log, in the prefix.
const publisherLog = "publisher-access.log"

// PublisherLog returns the publisher server's access log so far: one line
// per publish, "<unix time> <status> <channel> <body>".
func (n *Nginx) PublisherLog() string {
	b, _ := os.ReadFile(filepath.Join(n.Prefix, publisherLog))
	return string(b)
}

var listenRE = regexp.MustCompile(`(?m)^[ \t]*listen[ \t]+[^;\n]*;`)

// ErrorLog returns nginx's error log so far.
func (n *Nginx) ErrorLog() string {
	b, _ := os.ReadFile(filepath.Join(n.Prefix, "error.log"))
	return string(b)
}

// Publish posts body to channel straight to Nginx, bypassing the relay.
func (n *Nginx) Publish(channel, body string) error {
	if n.PubAddr == "" {
		return fmt.Errorf("publish to %s: this instance runs no publisher server", channel)
	}
	c := n.publisherClient()
	defer c.CloseIdleConnections()
	// Not escaped: Nchan does not decode the id (Push Stream does), and the
	// relay sends contract channel names as they are.
	resp, err := c.Post("http://publisher/pub?id="+channel, "text/plain", strings.NewReader(body))
	if err != nil {
		return err
	}
	resp.Body.Close()
	if !n.Module.Accepted(resp.StatusCode) {
		return fmt.Errorf("publish to %s: status %d", channel, resp.StatusCode)
	}
	return nil
}

// FreePort returns a loopback TCP port nobody listens on right now.
func FreePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

var errStopped = errors.New("stopped")
