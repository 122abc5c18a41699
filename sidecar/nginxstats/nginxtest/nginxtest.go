// Package nginxtest starts a real Nginx for tests: its own prefix directory,
// a generated nginx.conf, one master and worker as child processes of the
// test, listening on 127.0.0.1, stopped at the end of the test.
package nginxtest

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// NchanModule is where Debian's libnginx-mod-nchan installs the module.
const NchanModule = "/usr/lib/nginx/modules/ngx_nchan_module.so"

// Options shape the generated config.
type Options struct {
	Modules []string // load_module paths
	HTTP    string   // extra directives at http{} level
	Server  string   // directives inside the server{} block
	// Port to listen on; 0 picks a free one.
	Port uint16
	// CgroupFD, if positive, starts the master directly in that cgroup v2
	// directory (CLONE_INTO_CGROUP), so its workers are born there too.
	CgroupFD int
}

// Nginx is a running instance.
type Nginx struct {
	Addr   string // 127.0.0.1:port
	Port   uint16
	Prefix string
	cmd    *exec.Cmd
	once   sync.Once
}

// Start runs nginx, waits until it accepts connections, and stops it with
// t.Cleanup. It skips the test when nginx is not installed.
func Start(t testing.TB, opts Options) *Nginx {
	t.Helper()
	bin, err := exec.LookPath("nginx")
	if err != nil {
		if _, serr := os.Stat("/usr/sbin/nginx"); serr != nil {
			t.Skip("nginx is not installed (scripts/deps.sh installs it)")
		}
		bin = "/usr/sbin/nginx"
	}
	prefix := t.TempDir()
	port := opts.Port
	if port == 0 {
		port = FreePort(t)
	}
	n := &Nginx{Addr: fmt.Sprintf("127.0.0.1:%d", port), Port: port, Prefix: prefix}
	var conf strings.Builder
	for _, m := range opts.Modules {
		fmt.Fprintf(&conf, "load_module %s;\n", m)
	}
	user := ""
	if os.Getuid() == 0 {
		// Workers as root can read the test's 0700 temp dirs.
		user = "user root;"
	}
	fmt.Fprintf(&conf, `%s
daemon off;
master_process on;
worker_processes 1;
pid %[2]s/nginx.pid;
error_log %[2]s/error.log notice;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path %[2]s/body;
    proxy_temp_path %[2]s/proxy;
    fastcgi_temp_path %[2]s/fastcgi;
    uwsgi_temp_path %[2]s/uwsgi;
    scgi_temp_path %[2]s/scgi;
    keepalive_requests 100000;
    keepalive_timeout 120s;
    %[3]s
    server {
        listen %[4]s;
        %[5]s
    }
}
`, user, prefix, opts.HTTP, n.Addr, opts.Server)
	confPath := filepath.Join(prefix, "nginx.conf")
	if err := os.WriteFile(confPath, []byte(conf.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-p", prefix, "-c", confPath, "-e", filepath.Join(prefix, "error.log"))
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if opts.CgroupFD > 0 {
		cmd.SysProcAttr.UseCgroupFD = true
		cmd.SysProcAttr.CgroupFD = opts.CgroupFD
	}
	// Pdeathsig follows the thread that forked, so keep it alive.
	runtime.LockOSThread()
	err = cmd.Start()
	runtime.UnlockOSThread()
	if err != nil {
		t.Fatalf("start nginx: %v", err)
	}
	n.cmd = cmd
	t.Cleanup(n.Stop)
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", n.Addr, time.Second)
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(filepath.Join(prefix, "error.log"))
			t.Fatalf("nginx did not listen on %s: %v\n%s", n.Addr, err, log)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return n
}

// Stop asks for a fast shutdown and waits for the master, which waits for
// its workers; SIGKILL after 10 s. Later calls do nothing.
func (n *Nginx) Stop() {
	n.once.Do(func() {
		n.cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { n.cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			n.cmd.Process.Kill()
			<-done
		}
	})
}

// ErrorLog returns nginx's error log so far.
func (n *Nginx) ErrorLog() string {
	b, _ := os.ReadFile(filepath.Join(n.Prefix, "error.log"))
	return string(b)
}

// FreePort returns a TCP port free on 127.0.0.1 right now.
func FreePort(t testing.TB) uint16 {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return uint16(l.Addr().(*net.TCPAddr).Port)
}
