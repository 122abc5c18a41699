// Package nginxtest starts a real Nginx for tests, through integration/stack
// (the one place that knows how): its own prefix directory, one worker,
// listening on 127.0.0.1, stopped at the end of the test.
package nginxtest

import (
	"fmt"
	"net"
	"os/exec"
	"strconv"
	"testing"

	"github.com/pushrelay/pushrelay/integration/stack"
)

// NchanModule is where Debian's libnginx-mod-nchan installs the module.
const NchanModule = stack.NchanModule

// Options shape the generated config.
type Options struct {
	Modules []string // load_module paths; none by default
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
	*stack.Nginx
	Port uint16
}

// Start runs nginx, waits until it accepts connections, and stops it with
// t.Cleanup. It skips the test when nginx is not installed.
func Start(t testing.TB, opts Options) *Nginx {
	t.Helper()
	if _, err := exec.LookPath("nginx"); err != nil {
		t.Skip("nginx is not installed (scripts/deps.sh installs it)")
	}
	port := opts.Port
	if port == 0 {
		port = FreePort(t)
	}
	modules := opts.Modules
	if modules == nil {
		modules = []string{} // stack's nil means Nchan
	}
	server := opts.Server
	if server == "" {
		server = "location / { return 204; }"
	}
	n, err := stack.StartNginx(stack.NginxOptions{
		Dir:      t.TempDir(),
		Listen:   "127.0.0.1:" + strconv.Itoa(int(port)),
		Workers:  1,
		Modules:  modules,
		HTTP:     "keepalive_requests 100000;\nkeepalive_timeout 120s;\n" + opts.HTTP,
		Server:   server,
		CgroupFD: opts.CgroupFD,
	})
	if err != nil {
		t.Fatal(fmt.Errorf("nginx: %w", err))
	}
	t.Cleanup(n.Stop)
	return &Nginx{Nginx: n, Port: port}
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
