package packaging

import (
	"os"
	"regexp"
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
