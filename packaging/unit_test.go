package packaging

import (
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

const unitPath = "/lib/systemd/system/pushrelay.service"

// unitRoot lays out a root directory holding the host's unit library, the
// package's unit and the programs it runs, so `systemd-analyze --root`
// checks the unit as installed without touching the host's /lib/systemd.
func unitRoot(t *testing.T, unit string) string {
	t.Helper()
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "lib/systemd"), 0o755); err != nil {
		t.Fatal(err)
	}
	mustRun(t, time.Minute, nil, "cp", "-a", "/lib/systemd/system", filepath.Join(root, "lib/systemd/"))
	if err := os.WriteFile(filepath.Join(root, unitPath), []byte(unit), 0o644); err != nil {
		t.Fatal(err)
	}
	copyFile(t, relayBinary(t), filepath.Join(root, "usr/bin/pushrelay"), 0o755)
	copyFile(t, "/bin/kill", filepath.Join(root, "bin/kill"), 0o755)
	return root
}

func verifyUnit(t *testing.T, unit string) (string, error) {
	t.Helper()
	sa := needTool(t, "systemd-analyze", "systemd")
	root := unitRoot(t, unit)
	return run(t, time.Minute, nil, sa, "verify", "--man=no", "--root="+root, unitPath)
}

func TestUnitVerifies(t *testing.T) {
	out, err := verifyUnit(t, readFile(t, "packaging/pushrelay.service"))
	if err != nil || strings.TrimSpace(out) != "" {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
}

// The check above is only worth something if verify complains about a
// broken unit in this setup.
func TestUnitVerifyCatchesMistakes(t *testing.T) {
	unit := readFile(t, "packaging/pushrelay.service")
	for name, broken := range map[string]string{
		"misspelt key":    strings.Replace(unit, "ProtectSystem=strict", "ProtectSytem=strict", 1),
		"missing program": strings.Replace(unit, "ExecStart=/usr/bin/pushrelay", "ExecStart=/usr/bin/pushrelay-missing", 1),
	} {
		out, err := verifyUnit(t, broken)
		if err == nil && strings.TrimSpace(out) == "" {
			t.Errorf("%s: systemd-analyze verify reported nothing", name)
		}
	}
}

var exposureRE = regexp.MustCompile(`Overall exposure level for pushrelay\.service: ([0-9.]+)`)

func TestUnitSecurityExposure(t *testing.T) {
	sa := needTool(t, "systemd-analyze", "systemd")
	root := unitRoot(t, readFile(t, "packaging/pushrelay.service"))
	out := mustRun(t, time.Minute, nil, sa, "security", "--offline=true", "--no-pager", "--root="+root, unitPath)
	m := exposureRE.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no exposure score in:\n%s", out)
	}
	score, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("systemd-analyze security --offline=true: exposure %.1f (limit 3.0)", score)
	if score > 3.0 {
		t.Errorf("exposure %.1f > 3.0; the items that cost most:\n%s", score, out)
	}
}

// unitValues returns every value of key in the unit, split on spaces.
func unitValues(unit, key string) []string {
	var vals []string
	for _, line := range strings.Split(unit, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), key+"="); ok {
			vals = append(vals, strings.Fields(v)...)
		}
	}
	return vals
}

func TestUnitPrivileges(t *testing.T) {
	unit := readFile(t, "packaging/pushrelay.service")
	probeCaps := []string{"CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"}
	for _, key := range []string{"AmbientCapabilities", "CapabilityBoundingSet"} {
		got := slices.Sorted(slices.Values(unitValues(unit, key)))
		if !slices.Equal(got, probeCaps) {
			t.Errorf("%s = %v, want exactly %v", key, got, probeCaps)
		}
	}
	for key, want := range map[string]string{
		"User": "pushrelay", "Type": "notify", "NoNewPrivileges": "yes",
		"ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
		"ProtectKernelTunables": "yes", "ProtectControlGroups": "yes", "Restart": "on-failure",
	} {
		if got := strings.Join(unitValues(unit, key), " "); got != want {
			t.Errorf("%s = %q, want %q", key, got, want)
		}
	}
	families := slices.Sorted(slices.Values(unitValues(unit, "RestrictAddressFamilies")))
	if want := []string{"AF_INET", "AF_INET6", "AF_NETLINK", "AF_UNIX"}; !slices.Equal(families, want) {
		t.Errorf("RestrictAddressFamilies = %v, want %v", families, want)
	}
	// bpf is in @privileged and perf_event_open in @debug, neither in
	// @system-service: without them the probes get EPERM.
	filter := unitValues(unit, "SystemCallFilter")
	for _, want := range []string{"@system-service", "bpf", "perf_event_open"} {
		if !slices.Contains(filter, want) {
			t.Errorf("SystemCallFilter %v lacks %s", filter, want)
		}
	}
	if len(unitValues(unit, "LimitNOFILE")) != 1 {
		t.Error("LimitNOFILE not set")
	}
	reload := strings.Join(unitValues(unit, "ExecReload"), " ")
	if !strings.Contains(reload, "-HUP $MAINPID") {
		t.Errorf("ExecReload %q does not send SIGHUP", reload)
	}
	start := strings.Join(unitValues(unit, "ExecStart"), " ")
	if start != "/usr/bin/pushrelay run -config /etc/pushrelay/pushrelay.toml" {
		t.Errorf("ExecStart %q does not run the packaged binary on the packaged config", start)
	}
}
