package integration

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pushrelay/pushrelay/integration/stack"
)

// topPipeline is one frontend with traffic flowing: Nginx + Nchan, a relay
// with its probes on Nginx's port (root only), EventSource subscribers,
// and a web tier publishing until the test ends, so that every rate top
// shows has something to count.
func topPipeline(t *testing.T, host string) *pipeline {
	t.Helper()
	nginx := startNginxModule(t, stack.Nchan)
	o := RelayOptions{}
	if os.Getuid() == 0 {
		o.Probes = "enabled = true\nports = [" + strconv.Itoa(nginx.Port) + "]\ninterval = \"200ms\""
	}
	p := &pipeline{host: host, nginx: nginx, broker: newBroker(t, "pushrelay."+host)}
	o.Host, o.Exchange, o.Publish, o.Dialect = host, p.broker.Exchange, nginx.PublishURL(), stack.Nchan.Dialect()
	p.relay = startRelay(t, o)
	chans := channels("top", 4)
	subscribeAll(t, nginx, chans, EventSource)

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	t.Cleanup(func() { cancel(); <-done })
	go func() {
		defer close(done)
		for seq := 1; ctx.Err() == nil; seq++ {
			if err := p.broker.Publish(seqMsgs(chans, seq)...); err != nil {
				t.Errorf("publish: %v", err)
				return
			}
			select {
			case <-ctx.Done():
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()
	waitFor(t, "messages published by the relay", 10*time.Second, func() bool {
		return p.relay.Metric("pushrelay_messages_published_total") >= 40
	})
	return p
}

// `pushrelay top ADDR` in a real terminal (tmux): the row shows the host
// with messages flowing in and out, the footer says what is worst, and q
// quits.
func TestTopInTmux(t *testing.T) {
	tmux, err := exec.LookPath("tmux")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("tmux is missing (scripts/deps.sh installs it)")
		}
		t.Skip("tmux is missing: run `make deps`")
	}
	p := topPipeline(t, "it-top-tmux")

	// A server of our own, on a socket in the test's directory: the
	// user's tmux sessions are neither seen nor touched.
	sock := filepath.Join(t.TempDir(), "tmux.sock")
	run := func(args ...string) string {
		t.Helper()
		cmd := exec.Command(tmux, append([]string{"-S", sock, "-f", "/dev/null"}, args...)...)
		cmd.Env = append(os.Environ(), "TMUX=", "TERM=xterm-256color")
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("tmux %v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	// The shell line after top tells that top exited, and how.
	shell := fmt.Sprintf("%s top -interval 500ms %s; echo top-exited-$?; sleep 60", relayBin, p.relay.MetricsAddr)
	run("new-session", "-d", "-x", "160", "-y", "40", "-s", "top", shell)
	t.Cleanup(func() { exec.Command(tmux, "-S", sock, "kill-server").Run() })
	capture := func() string { return run("capture-pane", "-p", "-t", "top") }

	var screen, row string
	deadline := time.Now().Add(15 * time.Second)
	for {
		screen = capture()
		// The row is named by the relay's host label, not the address
		// top was given (issue 19).
		row = topLine(screen, p.host+" ")
		if f := strings.Fields(row); len(f) > 2 && topRateShown(f[1]) && topRateShown(f[2]) && strings.Contains(screen, "\nworst: ") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no row for %s with messages in and out, or no footer, after 15s:\n%s", p.host, screen)
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("screen:\n%s", strings.TrimRight(screen, "\n"))
	if !strings.Contains(screen, "pushrelay top - 1 host - every 500ms") || !strings.Contains(screen, "q: quit") {
		t.Errorf("no title line:\n%s", screen)
	}
	f := strings.Fields(row)
	// HOST IN/s OUT/s p50 p99 INFLT OLDEST DEAD/s SHARDS DRAIN ACC/s ESTAB PKTS/s PUBLISHER AMQP CONFIG
	if len(f) != 16 {
		t.Fatalf("row has %d fields, want 16: %q", len(f), row)
	}
	if f[3] == "-" || f[8] != "1024" || f[13] != "ok" || f[14] != "up" || f[15] != "applied" {
		t.Errorf("row %q: want a lag, 1024 shards, publisher ok, amqp up, config applied", row)
	}
	if os.Getuid() == 0 && f[11] == "-" {
		t.Errorf("row %q: the probes run, yet no established connections", row)
	}
	if !strings.Contains(screen, "worst: nothing, 1 host ok") {
		t.Errorf("footer of a healthy relay:\n%s", screen)
	}
	for _, l := range strings.Split(screen, "\n") {
		if len([]rune(l)) > 160 {
			t.Errorf("a line wider than the terminal: %q", l)
		}
	}

	// The live view follows an outage: Nginx stopped, the footer names the
	// publisher; Nginx back, the footer clears.
	p.nginx.Stop()
	waitFor(t, "the footer to name the unreachable publisher", 15*time.Second, func() bool {
		screen = capture()
		return strings.Contains(screen, "\nworst: "+p.host+": publisher unreachable")
	})
	t.Logf("screen with Nginx stopped:\n%s", strings.TrimRight(screen, "\n"))
	p.nginx.Start()
	waitFor(t, "the footer to clear once Nginx is back", 20*time.Second, func() bool {
		return strings.Contains(capture(), "worst: nothing, 1 host ok")
	})

	run("send-keys", "-t", "top", "q")
	waitFor(t, "top to exit on q", 5*time.Second, func() bool { return strings.Contains(capture(), "top-exited-0") })
	if s := capture(); strings.Contains(s, "worst:") {
		t.Errorf("top's screen left behind after q (the alternate screen was not left):\n%s", s)
	}

	// Ctrl-C quits as cleanly: top keeps the terminal's ISIG, so it is a
	// SIGINT, and top exits 0 after restoring the screen.
	run("new-window", "-t", "top", "-n", "ctrlc", shell)
	waitFor(t, "top to draw in the second window", 10*time.Second, func() bool {
		return strings.Contains(run("capture-pane", "-p", "-t", "top:ctrlc"), "\nworst: ")
	})
	run("send-keys", "-t", "top:ctrlc", "C-c")
	waitFor(t, "top to exit on Ctrl-C", 5*time.Second, func() bool {
		return strings.Contains(run("capture-pane", "-p", "-t", "top:ctrlc"), "top-exited-0")
	})
}

// `pushrelay top -once` prints one snapshot, with rates, and exits 0; a
// relay that cannot be scraped is named in the footer and makes it exit 1.
func TestTopOnce(t *testing.T) {
	p := topPipeline(t, "it-top-once")
	out, err := exec.Command(relayBin, "top", "-once", "-interval", "500ms", "fe1="+p.relay.MetricsAddr).CombinedOutput()
	text := string(out)
	if err != nil {
		t.Fatalf("top -once: %v\n%s", err, text)
	}
	t.Logf("top -once:\n%s", text)
	f := strings.Fields(topLine(text, "fe1 "))
	if len(f) != 16 || !topRateShown(f[1]) || !topRateShown(f[2]) {
		t.Errorf("no row for fe1 with messages in and out:\n%s", text)
	}
	if strings.Contains(text, "\x1b") {
		t.Errorf("escape sequences in -once output: %q", text)
	}
	if !strings.Contains(text, "\nworst: nothing, 1 host ok\n") {
		t.Errorf("footer:\n%s", text)
	}

	dead, err := stack.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(relayBin, "top", "-once", "-interval", "300ms", "fe1="+p.relay.MetricsAddr, fmt.Sprintf("fe5=127.0.0.1:%d", dead))
	out, err = cmd.CombinedOutput()
	if code := cmd.ProcessState.ExitCode(); code != 1 {
		t.Errorf("exit %d (%v) with fe5 down, want 1", code, err)
	}
	if !strings.Contains(string(out), "\nworst: fe5: scrape failed: connection refused\n") {
		t.Errorf("footer does not name fe5:\n%s", out)
	}
}

// topRateShown is a rate cell that shows traffic: not "-", not "0".
func topRateShown(cell string) bool { return cell != "-" && cell != "0" && cell != "0.0" }

func topLine(text, prefix string) string {
	for _, l := range strings.Split(text, "\n") {
		if strings.HasPrefix(l, prefix) {
			return l
		}
	}
	return ""
}
