package integration

import (
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/pushrelay/pushrelay/integration/stack"
)

// A RabbitMQ cluster of its own for issue 10's tests: three nodes on this
// machine beside its broker (rabbit@localhost, which stays untouched).
// They share the rabbitmq user's Erlang cookie, which `runuser -u rabbitmq`
// gives them through its HOME; each has its own name, AMQP and
// distribution ports, and data under a directory removed at cleanup.

const rabbitLib = "/usr/lib/rabbitmq/bin/" // the scripts themselves, not Debian's su wrappers

// rabbitNode is one node of the test cluster.
type rabbitNode struct {
	Name     string // e.g. prt1x1234@localhost
	Port     int    // AMQP
	DistPort int
	dir      string
	env      []string
	ctlEnv   []string // for the CLI tools: the same net_ticktime as the node
	pidFile  string
	// stopped is set by Stop and cleared by Cont, Kill and destroy: a
	// stopped node must never outlive the subtest that stopped it.
	stopped atomic.Bool
}

// URL is the node's AMQP URL. guest may log in: every client is on loopback.
func (n *rabbitNode) URL() string { return fmt.Sprintf("amqp://guest:guest@127.0.0.1:%d/", n.Port) }

type rabbitCluster struct {
	t     testing.TB
	dir   string
	Nodes []*rabbitNode
}

// on returns the cluster with its failures reported to t: a subtest's
// Fatal must end the subtest, not the test that started the cluster.
func (c *rabbitCluster) on(t testing.TB) *rabbitCluster {
	cc := *c
	cc.t = t
	return &cc
}

// rabbitUnavailable says why no cluster can start here, or "".
func rabbitUnavailable() string {
	if _, err := os.Stat(rabbitLib + "rabbitmq-server"); err != nil {
		return "rabbitmq-server is not installed (run `make deps`)"
	}
	if _, err := exec.LookPath("runuser"); err != nil {
		return "runuser is not installed"
	}
	if os.Geteuid() != 0 {
		return "a cluster of its own needs root (to run the nodes as rabbitmq)"
	}
	return ""
}

// clusterOptions shape every node of a test cluster.
type clusterOptions struct {
	// NetTicktime is the nodes' Erlang net_ticktime in seconds (0: the
	// default, 60): how long a hung member stays a member before the
	// others declare it down. It reaches every node through
	// RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel net_ticktime N", and the
	// CLI tools through RABBITMQ_CTL_ERL_ARGS (a peer whose ticks come
	// every 15 s would otherwise be dropped during a long rabbitmqctl wait).
	// startCluster checks every node runs with it.
	NetTicktime int
	// PartitionHandling is the nodes' cluster_partition_handling ("":
	// RabbitMQ's default, ignore). A member that hung longer than
	// net_ticktime wakes up to find itself declared down: under ignore
	// the cluster stays split until an operator restarts it; under
	// pause_minority the woken minority pauses itself and rejoins.
	PartitionHandling string
}

// startCluster starts n nodes, joins them to the first and waits until
// every one runs. Cleanup kills them and removes their data, pass or fail.
func startCluster(t *testing.T, n int, o clusterOptions) *rabbitCluster {
	t.Helper()
	if why := rabbitUnavailable(); why != "" {
		if os.Getenv("CI") != "" {
			t.Fatal(why)
		}
		t.Skip(why)
	}
	u, err := user.Lookup("rabbitmq")
	if err != nil {
		t.Fatal(err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	// Not t.TempDir(): that is root's, mode 0700, and the nodes run as
	// rabbitmq.
	dir, err := os.MkdirTemp("", "pushrelay-cluster")
	if err != nil {
		t.Fatal(err)
	}
	c := &rabbitCluster{t: t, dir: dir}
	t.Cleanup(c.destroy)
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(dir, uid, gid); err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= n; i++ {
		// The pid in the name: two runs at once must not share an epmd name.
		node := &rabbitNode{Name: fmt.Sprintf("prt%dx%d@localhost", i, os.Getpid())}
		if node.Port, err = stack.FreePort(); err != nil {
			t.Fatal(err)
		}
		if node.DistPort, err = stack.FreePort(); err != nil {
			t.Fatal(err)
		}
		node.dir = filepath.Join(dir, strings.Split(node.Name, "@")[0])
		if err := os.Mkdir(node.dir, 0o755); err != nil {
			t.Fatal(err)
		}
		os.Chown(node.dir, uid, gid)
		node.pidFile = filepath.Join(node.dir, "beam.pid")
		node.env = []string{
			"RABBITMQ_NODENAME=" + node.Name,
			"RABBITMQ_NODE_IP_ADDRESS=127.0.0.1",
			"RABBITMQ_NODE_PORT=" + strconv.Itoa(node.Port),
			"RABBITMQ_DIST_PORT=" + strconv.Itoa(node.DistPort),
			"RABBITMQ_MNESIA_BASE=" + filepath.Join(node.dir, "mnesia"),
			"RABBITMQ_LOG_BASE=" + filepath.Join(node.dir, "log"),
			"RABBITMQ_PID_FILE=" + node.pidFile,
			// No file behind these: the machine's rabbitmq.conf pins
			// its listener to 5672, which the node must not take.
			"RABBITMQ_CONFIG_FILE=" + filepath.Join(node.dir, "none.conf"),
			"RABBITMQ_ADVANCED_CONFIG_FILE=" + filepath.Join(node.dir, "none.config"),
			"RABBITMQ_ENABLED_PLUGINS_FILE=" + filepath.Join(node.dir, "enabled_plugins"),
		}
		if o.NetTicktime > 0 {
			args := fmt.Sprintf("-kernel net_ticktime %d", o.NetTicktime)
			node.ctlEnv = []string{"RABBITMQ_CTL_ERL_ARGS=" + args}
			if o.PartitionHandling != "" {
				args += " -rabbit cluster_partition_handling " + o.PartitionHandling
			}
			node.env = append(node.env, "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="+args)
		}
		c.Nodes = append(c.Nodes, node)
	}
	began := time.Now()
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i, node := range c.Nodes {
		wg.Add(1)
		go func() { defer wg.Done(); errs[i] = c.launch(node) }()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	first := c.Nodes[0].Name
	for _, node := range c.Nodes[1:] {
		c.ctl(node, "stop_app")
		c.ctl(node, "join_cluster", first)
		c.ctl(node, "start_app")
	}
	for _, node := range c.Nodes {
		c.ctl(node, "await_startup")
	}
	if o.NetTicktime > 0 {
		for _, node := range c.Nodes {
			if got := c.netTicktime(node); got != o.NetTicktime {
				t.Fatalf("%s runs with net_ticktime %d, want %d", node.Name, got, o.NetTicktime)
			}
		}
	}
	t.Logf("cluster of %d nodes up and joined in %v (net_ticktime %d s)", n, time.Since(began).Round(100*time.Millisecond), c.netTicktime(c.Nodes[0]))
	return c
}

// netTicktime is node's net_ticktime as the node itself reports it, in
// seconds; 0 if it does not answer.
func (c *rabbitCluster) netTicktime(n *rabbitNode) int {
	out, err := c.ctlErr(n, 30*time.Second, "eval", "net_kernel:get_net_ticktime().")
	if err != nil {
		return 0
	}
	v, _ := strconv.Atoi(strings.TrimSpace(out))
	return v
}

// launch starts a node detached and waits until its app runs.
func (c *rabbitCluster) launch(n *rabbitNode) error {
	os.Remove(n.pidFile)
	cmd := exec.Command("runuser", "-u", "rabbitmq", "--", rabbitLib+"rabbitmq-server", "-detached")
	cmd.Env = append(os.Environ(), n.env...)
	cmd.Dir = n.dir
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("start %s: %v\n%s", n.Name, err, out)
	}
	// wait reads the pid file as it appears, then waits for the app.
	if out, err := c.ctlErr(n, 90*time.Second, "wait", "--timeout", "90", n.pidFile); err != nil {
		return fmt.Errorf("%s did not start: %v\n%s\n%s", n.Name, err, out, c.nodeLog(n))
	}
	return nil
}

// ctl runs rabbitmqctl against node, as rabbitmq (its HOME has the cookie).
func (c *rabbitCluster) ctl(n *rabbitNode, args ...string) string {
	c.t.Helper()
	out, err := c.ctlErr(n, 60*time.Second, args...)
	if err != nil {
		c.t.Fatalf("rabbitmqctl -n %s %v: %v\n%s", n.Name, args, err, out)
	}
	return out
}

func (c *rabbitCluster) ctlErr(n *rabbitNode, timeout time.Duration, args ...string) (string, error) {
	return rabbitCLI(n, timeout, "rabbitmqctl", args...)
}

// queues runs rabbitmq-queues against node.
func (c *rabbitCluster) queues(n *rabbitNode, args ...string) string {
	c.t.Helper()
	out, err := rabbitCLI(n, 60*time.Second, "rabbitmq-queues", args...)
	if err != nil {
		c.t.Fatalf("rabbitmq-queues -n %s %v: %v\n%s", n.Name, args, err, out)
	}
	return out
}

func rabbitCLI(n *rabbitNode, timeout time.Duration, tool string, args ...string) (string, error) {
	cmd := exec.Command("timeout", append([]string{strconv.Itoa(int(timeout.Seconds())), "runuser", "-u", "rabbitmq", "--",
		rabbitLib + tool, "-q", "-n", n.Name}, args...)...)
	cmd.Dir = "/var/lib/rabbitmq"
	cmd.Env = append(os.Environ(), n.ctlEnv...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// pid is the node's beam process, from its pid file; 0 if it has none.
func (n *rabbitNode) pid() int {
	b, err := os.ReadFile(n.pidFile)
	if err != nil {
		return 0
	}
	p, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return p
}

// Kill sends SIGKILL to the node's beam, as the OOM killer or a power
// cut would, and waits until it is gone. Should the test end before
// Restart, its cleanup starts the node again: the cluster serves the next
// subtests with all its members.
func (c *rabbitCluster) Kill(n *rabbitNode) {
	c.t.Helper()
	pid := n.pid()
	if pid == 0 {
		c.t.Fatalf("%s has no pid file", n.Name)
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		c.t.Fatalf("kill %s (pid %d): %v", n.Name, pid, err)
	}
	n.stopped.Store(false)
	c.t.Cleanup(func() {
		if n.pid() == 0 {
			if err := c.launch(n); err != nil {
				c.t.Errorf("start %s again after the test: %v", n.Name, err)
			}
		}
	})
	waitFor(c.t, n.Name+" gone", 10*time.Second, func() bool { return syscall.Kill(pid, 0) != nil })
	os.Remove(n.pidFile) // its pid may go to another process now
}

// Stop freezes the node's beam with SIGSTOP, as a GC pause, a disk stall
// or a frozen VM would: its sockets stay open and nothing answers. The
// subtest's cleanup sends SIGCONT if Cont has not, pass or fail (destroy
// does too), so a frozen node never outlives the subtest.
func (c *rabbitCluster) Stop(n *rabbitNode) {
	c.t.Helper()
	pid := n.pid()
	if pid == 0 {
		c.t.Fatalf("%s has no pid file", n.Name)
	}
	n.stopped.Store(true)
	c.t.Cleanup(func() {
		if n.stopped.Load() {
			c.Cont(n)
		}
	})
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		c.t.Fatalf("stop %s (pid %d): %v", n.Name, pid, err)
	}
}

// Cont resumes a node frozen by Stop.
func (c *rabbitCluster) Cont(n *rabbitNode) {
	c.t.Helper()
	if pid := n.pid(); pid > 0 {
		if err := syscall.Kill(pid, syscall.SIGCONT); err != nil {
			c.t.Errorf("resume %s (pid %d): %v", n.Name, pid, err)
		}
	}
	n.stopped.Store(false)
}

// partitions is what node n reports as partitioned from it ("[]" when
// none), or the error.
func (c *rabbitCluster) partitions(n *rabbitNode) string {
	out, err := c.ctlErr(n, 30*time.Second, "eval", "rabbit_node_monitor:partitions().")
	if err != nil {
		return fmt.Sprintf("%v: %s", err, out)
	}
	return strings.TrimSpace(out)
}

// Heal makes a node that was frozen a full member again. A hang longer
// than net_ticktime makes the others declare it down, and on waking it
// finds a partitioned cluster; RabbitMQ's default partition handling
// (ignore) leaves it so, and the next subtests would run on a split
// cluster. A partitioned node is restarted, as an operator would.
func (c *rabbitCluster) Heal(n *rabbitNode) {
	c.t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		parts := ""
		for _, m := range c.Nodes {
			if p := c.partitions(m); p != "[]" {
				parts += fmt.Sprintf(" %s: %s;", m.Name, p)
			}
		}
		if parts == "" {
			return
		}
		if time.Now().After(deadline) {
			c.t.Logf("partitions after the hang:%s restarting %s", parts, n.Name)
			c.Kill(n)
			c.Restart(n)
			return
		}
		time.Sleep(time.Second)
	}
}

// waitNotQuorumCritical waits until stopping n would leave every quorum
// queue a majority: a member restarted moments ago may still be catching
// up, and a second kill then would cost the queue its quorum, a fault
// the tests do not mean to inject.
func (c *rabbitCluster) waitNotQuorumCritical(n *rabbitNode, timeout time.Duration) {
	c.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		out, err := rabbitCLI(n, 30*time.Second, "rabbitmq-queues", "check_if_node_is_quorum_critical")
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("%s is still quorum-critical after %v: %s", n.Name, timeout, out)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// Restart starts a killed node again with the same environment; it
// rejoins the cluster on its own.
func (c *rabbitCluster) Restart(n *rabbitNode) {
	c.t.Helper()
	if err := c.launch(n); err != nil {
		c.t.Fatal(err)
	}
}

// Node returns the node listening on the AMQP port in url.
func (c *rabbitCluster) Node(url string) *rabbitNode {
	for _, n := range c.Nodes {
		if strings.Contains(url, ":"+strconv.Itoa(n.Port)+"/") {
			return n
		}
	}
	return nil
}

// ByName returns the node called name.
func (c *rabbitCluster) ByName(name string) *rabbitNode {
	for _, n := range c.Nodes {
		if n.Name == name {
			return n
		}
	}
	return nil
}

// URLs are every node's AMQP URL, comma-separated, as RelayConfig takes them.
func (c *rabbitCluster) URLs() string {
	var urls []string
	for _, n := range c.Nodes {
		urls = append(urls, n.URL())
	}
	return strings.Join(urls, ",")
}

var leaderLine = regexp.MustCompile(`(?m)^(\S+)\s+(\S+@\S+)\s*$`)

// Leader is the node that leads quorum queue q.
func (c *rabbitCluster) Leader(q string) *rabbitNode {
	c.t.Helper()
	for _, n := range c.Nodes {
		out, err := c.ctlErr(n, 30*time.Second, "list_queues", "name", "leader")
		if err != nil {
			continue // that node may be the one down
		}
		for _, m := range leaderLine.FindAllStringSubmatch(out, -1) {
			if m[1] == q {
				return c.ByName(m[2])
			}
		}
	}
	c.t.Fatalf("no node names a leader for %s", q)
	return nil
}

func (c *rabbitCluster) nodeLog(n *rabbitNode) string {
	b, _ := os.ReadFile(filepath.Join(n.dir, "log", n.Name+".log"))
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return string(b)
}

// nodeErrors are the last lines of the node's log that report an error or
// a crashed process: the broker's side of a failure, before the log goes.
func (c *rabbitCluster) nodeErrors(n *rabbitNode) string {
	b, _ := os.ReadFile(filepath.Join(n.dir, "log", n.Name+".log"))
	var keep []string
	in := false // inside a kept report: its continuation lines are indented
	for _, line := range strings.Split(string(b), "\n") {
		l := strings.ToLower(line)
		switch {
		case strings.Contains(l, "[error]") || strings.Contains(l, "crash"):
			in = true
		case !strings.HasPrefix(line, " "):
			in = false
		}
		if in {
			keep = append(keep, line)
		}
	}
	if len(keep) > 60 {
		keep = keep[len(keep)-60:]
	}
	return strings.Join(keep, "\n")
}

// destroy kills every node and removes the data; it never names the
// machine's node, only the pids from this cluster's pid files.
func (c *rabbitCluster) destroy() {
	if c.t.Failed() {
		for _, n := range c.Nodes {
			c.t.Logf("%s log, errors and crashes:\n%s", n.Name, c.nodeErrors(n))
		}
	}
	for _, n := range c.Nodes {
		if pid := n.pid(); pid > 0 {
			syscall.Kill(pid, syscall.SIGCONT) // a stopped node dies of SIGKILL too, but leave none frozen
			n.stopped.Store(false)
			syscall.Kill(pid, syscall.SIGKILL)
			deadline := time.Now().Add(10 * time.Second)
			for syscall.Kill(pid, 0) == nil && time.Now().Before(deadline) {
				time.Sleep(20 * time.Millisecond)
			}
		}
	}
	if err := os.RemoveAll(c.dir); err != nil {
		c.t.Errorf("remove the cluster's data: %v", err)
	}
}
