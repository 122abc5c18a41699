package integration

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pushrelay/pushrelay/integration/stack"
)

// Issue 4: with no capabilities at all the probes fall back to /proc, the
// mode metric says so, and the relay still relays.
func TestRelayRelaysWithoutPrivileges(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to drop privileges with setpriv")
	}
	if _, err := exec.LookPath("setpriv"); err != nil {
		t.Skip("setpriv (util-linux) not installed")
	}
	eachModule(t, testRelayWithoutPrivileges)
}

func testRelayWithoutPrivileges(t *testing.T, m stack.Module) {
	ngx := startNginxModule(t, m)
	b := newBroker(t, "pushrelay.it-noprivs")

	// The relay runs as nobody, so its config must be readable by all.
	dir, err := os.MkdirTemp("", "pushrelay-noprivs")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	// So must the binary: a checkout under /root is out of nobody's reach.
	bin, err := os.ReadFile(relayBin)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "pushrelay"), bin, 0o755); err != nil {
		t.Fatal(err)
	}
	r, err := stack.NewRelay(filepath.Join(dir, "pushrelay"), dir, stack.RelayConfig{
		Host: "it-noprivs", AMQPURL: amqpURL, Exchange: b.Exchange, Publish: ngx.PublishURL(), Dialect: m.Dialect(),
		Probes: "enabled = true\nports = [" + strconv.Itoa(ngx.Port) + "]",
	})
	if err != nil {
		t.Fatal(err)
	}
	r.Wrapper = []string{"setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
		"--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--no-new-privs"}
	if err := r.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		r.Stop()
		if t.Failed() {
			t.Logf("relay log:\n%s", r.Log())
		}
	})

	if got := r.Metric(`pushrelay_probe_mode{probe="conn",mode="proc"}`); got != 1 {
		t.Errorf(`pushrelay_probe_mode{probe="conn",mode="proc"} = %v, want 1`, got)
	}
	if !strings.Contains(r.Log(), "probes") {
		t.Errorf("the log does not say why the probes fell back:\n%s", r.Log())
	}
	subs := subscribeAll(t, ngx, channels("noprivs", 5), EventSource)
	for seq := 1; seq <= 20; seq++ {
		b.MustPublish(seqMsgs(channels("noprivs", 5), seq)...)
	}
	waitAll(t, subs, 20, 30*time.Second)
}
