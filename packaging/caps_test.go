package packaging

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"
)

var probeModeRE = regexp.MustCompile(`pushrelay_probe_mode\{probe="(conn|packets)",mode="([a-z_]+)"\} 1`)

// probeModes runs `pushrelay probes` as an unprivileged uid holding exactly
// caps (ambient, inheritable and bounding, as the unit gives them) and
// returns the mode each probe attached in.
func probeModes(t *testing.T, caps []string) map[string]string {
	t.Helper()
	setpriv := needTool(t, "setpriv", "util-linux")
	set := "-all"
	for _, c := range caps {
		set += ",+" + strings.ToLower(strings.TrimPrefix(c, "CAP_"))
	}
	// nobody: an existing unprivileged uid, so no user is created on the host.
	out, err := run(t, time.Minute, nil, setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
		"--inh-caps="+set, "--ambient-caps="+set, "--bounding-set="+set,
		relayBinary(t), "probes", "-for", "1s")
	if err != nil {
		t.Fatalf("pushrelay probes with %v: %v\n%s", caps, err, out)
	}
	modes := map[string]string{}
	for _, m := range probeModeRE.FindAllStringSubmatch(out, -1) {
		modes[m[1]] = m[2]
	}
	if len(modes) != 2 {
		t.Fatalf("no probe modes in:\n%s", out)
	}
	return modes
}

// The unit's capabilities are enough for the eBPF probes as a non-root
// user: connections from tp_btf/raw_tp (not the /proc fallback) and
// packets from a cgroup or tc hook. (The unit's seccomp filter cannot be
// tried here: it needs systemd as PID 1.)
func TestUnitCapabilitiesAreEnoughForTheProbes(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to hand capabilities to another uid")
	}
	caps := unitValues(readFile(t, "packaging/pushrelay.service"), "AmbientCapabilities")
	modes := probeModes(t, caps)
	t.Logf("with %v: conn=%s packets=%s", caps, modes["conn"], modes["packets"])
	if m := modes["conn"]; m != "tp_btf" && m != "raw_tp" {
		t.Errorf("conn probe in mode %s with the unit's capabilities", m)
	}
	if m := modes["packets"]; m == "none" {
		t.Error("no packet probe with the unit's capabilities")
	}
	// And each one is needed: without CAP_PERFMON the tracing probe falls
	// back, which shows this check can tell.
	var fewer []string
	for _, c := range caps {
		if c != "CAP_PERFMON" {
			fewer = append(fewer, c)
		}
	}
	if m := probeModes(t, fewer)["conn"]; m == "tp_btf" || m == "raw_tp" {
		t.Errorf("conn probe in mode %s without CAP_PERFMON: the check above proves nothing", m)
	}
}

// allowedSyscalls expands the unit's SystemCallFilter= allow list with
// systemd-analyze's own group definitions.
func allowedSyscalls(t *testing.T, filter []string) map[string]bool {
	t.Helper()
	sa := needTool(t, "systemd-analyze", "systemd")
	out := mustRun(t, time.Minute, nil, sa, "syscall-filter", "--no-pager")
	groups := map[string][]string{}
	var current string
	for _, line := range strings.Split(out, "\n") {
		trimmed := strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(line, "@"):
			current = trimmed
		case trimmed == "" || strings.HasPrefix(trimmed, "#"):
		case current != "":
			groups[current] = append(groups[current], trimmed)
		}
	}
	allowed := map[string]bool{}
	var add func(string)
	add = func(name string) {
		if !strings.HasPrefix(name, "@") {
			allowed[name] = true
			return
		}
		members, ok := groups[name]
		if !ok {
			t.Fatalf("systemd-analyze knows no group %s", name)
		}
		for _, m := range members {
			add(m)
		}
	}
	for _, f := range filter {
		add(f)
	}
	return allowed
}

var straceCallRE = regexp.MustCompile(`^\d+\s+([a-z0-9_]+)\(`)

// Every system call `pushrelay probes` makes is in the unit's
// SystemCallFilter, so the probes are not refused by seccomp under systemd.
func TestProbesStayInsideTheSyscallFilter(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to hand capabilities to another uid")
	}
	strace, err := exec.LookPath("strace")
	if err != nil {
		t.Skip("strace missing (make deb-deps installs it)")
	}
	setpriv := needTool(t, "setpriv", "util-linux")
	unit := readFile(t, "packaging/pushrelay.service")
	allowed := allowedSyscalls(t, unitValues(unit, "SystemCallFilter"))
	if !allowed["read"] || allowed["reboot"] {
		t.Fatalf("expanded filter looks wrong (%d calls)", len(allowed))
	}
	set := "-all"
	for _, c := range unitValues(unit, "AmbientCapabilities") {
		set += ",+" + strings.ToLower(strings.TrimPrefix(c, "CAP_"))
	}
	// strace writes the trace as the unprivileged uid it runs under, which
	// cannot enter t.TempDir()'s 0700 parent.
	dir, err := os.MkdirTemp("", "pushrelay-strace-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	trace := filepath.Join(dir, "strace.out")
	if err := os.WriteFile(trace, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(trace, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	out, err := run(t, time.Minute, nil, setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
		"--inh-caps="+set, "--ambient-caps="+set, "--bounding-set="+set,
		strace, "-f", "-qq", "-o", trace, relayBinary(t), "probes", "-for", "1s")
	if err != nil {
		t.Fatalf("strace pushrelay probes: %v\n%s", err, out)
	}
	b, err := os.ReadFile(trace)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for _, line := range strings.Split(string(b), "\n") {
		if m := straceCallRE.FindStringSubmatch(line); m != nil {
			seen[m[1]] = true
		}
	}
	if !seen["bpf"] {
		t.Fatalf("the trace shows no bpf() call: not a probe run\n%.2000s", b)
	}
	var outside []string
	for call := range seen {
		if !allowed[call] {
			outside = append(outside, call)
		}
	}
	slices.Sort(outside)
	t.Logf("%d distinct system calls, all in the filter except: %v", len(seen), outside)
	if len(outside) > 0 {
		t.Errorf("system calls outside SystemCallFilter (EPERM under systemd): %v", outside)
	}
}

// ProtectControlGroups= mounts the cgroup tree read-only: the packet probe
// must still attach to a cgroup there. Reproduced with a private mount
// namespace in which the cgroup2 mount is read-only, so the host's mount
// stays as it is; the probe attaches to the cgroup2 root for one second.
func TestPacketProbeAttachesUnderReadOnlyCgroupfs(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for a mount namespace")
	}
	unshare := needTool(t, "unshare", "util-linux")
	mounts, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		t.Fatal(err)
	}
	var cgroup2 string
	for _, line := range strings.Split(string(mounts), "\n") {
		if f := strings.Fields(line); len(f) > 2 && f[2] == "cgroup2" {
			cgroup2 = f[1]
			break
		}
	}
	if cgroup2 == "" {
		t.Skip("no cgroup v2 mount on this host")
	}
	dir, err := os.MkdirTemp("", "pushrelay-cgroup-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(dir, "probes.toml")
	if err := os.WriteFile(conf, []byte("[probes]\ncgroup = \""+cgroup2+"\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	set := "-all"
	for _, c := range unitValues(readFile(t, "packaging/pushrelay.service"), "AmbientCapabilities") {
		set += ",+" + strings.ToLower(strings.TrimPrefix(c, "CAP_"))
	}
	script := `set -e
mount -o remount,bind,ro "$1"
if touch "$1/pushrelay-probe-test" 2>/dev/null; then echo "cgroupfs still writable" >&2; exit 1; fi
exec setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps="$2" --ambient-caps="$2" --bounding-set="$2" "$3" probes -config "$4" -for 1s`
	out := mustRun(t, time.Minute, nil, unshare, "--mount", "--propagation", "private",
		"sh", "-c", script, "sh", cgroup2, set, relayBinary(t), conf)
	modes := map[string]string{}
	for _, m := range probeModeRE.FindAllStringSubmatch(out, -1) {
		modes[m[1]] = m[2]
	}
	if modes["packets"] != "cgroup_skb" {
		t.Fatalf("packet probe mode %q on read-only %s, want cgroup_skb:\n%s", modes["packets"], cgroup2, out)
	}
}
