package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/pushrelay/pushrelay/integration/stack"
)

// The failover part (issue 16) prints what a broker fault costs on a
// three-node cluster of RabbitMQ nodes the test starts on this machine:
// the time the browsers got nothing, the relay's time without consuming,
// and lost, reordered and duplicated messages, for a node killed, a leader
// killed and a node hung. The cluster, its faults and the counting at
// real subscribers are TestCluster's (integration/cluster_test.go), so the
// bench runs it and collects the figures it logs; its pass or fail is
// printed beside them, not acted on.

// failoverLine is one figure line of TestCluster's summary.
var failoverLine = regexp.MustCompile(`cluster_test\.go:\d+: (\w+ on \w+: run \d+: .*)$`)

func failoverPart(ctx context.Context, o options) (string, error) {
	progress("(failover) go test -run TestCluster ./integration/ (a 3-node cluster of its own; about 10 minutes)")
	cmd := exec.CommandContext(ctx, "go", "test", "-count=1", "-run", "^TestCluster$", "-v", "-timeout", "30m", "./integration/")
	cmd.Dir = stack.RepoRoot()
	bin, err := filepath.Abs(o.bin)
	if err != nil {
		return "", err
	}
	cmd.Env = append(os.Environ(), "PUSHRELAY_BIN="+bin)
	out, err := cmd.CombinedOutput()
	verdict := "passed"
	if err != nil {
		verdict = fmt.Sprintf("FAILED (%v); its log says why", err)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "(failover) TestCluster, three RabbitMQ nodes on this machine (net_ticktime 5 s, pause_minority), quorum queue, prefetch 2048, 2,000 msg/s over 100 channels; the test %s:\n\n", verdict)
	seen := map[string]bool{}
	for _, line := range strings.Split(string(out), "\n") {
		m := failoverLine.FindStringSubmatch(strings.TrimSpace(line))
		if m == nil || seen[m[1]] {
			continue
		}
		seen[m[1]] = true
		fmt.Fprintf(&b, "- %s\n", m[1])
	}
	if len(seen) == 0 {
		fmt.Fprintf(&b, "- no figures: the test printed none\n%s\n", tail(string(out), 30))
	}
	return b.String() + "\n", nil
}

// tail is the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}
