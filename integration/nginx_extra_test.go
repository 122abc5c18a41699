package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/pushrelay/pushrelay/integration/stack"
)

// startNginxExtra is startNginxModule with extra directives: http at
// http{} level and server inside server{}, after the module's own snippets,
// so a test can add a location that misbehaves on purpose beside the
// shipped ones.
func startNginxExtra(t testing.TB, m stack.Module, http, server string) *Nginx {
	t.Helper()
	snippet := func(suffix string) string {
		return filepath.Join(stack.RepoRoot(), "nginx", "pushrelay-"+string(m)+suffix+".conf")
	}
	return startNginxWith(t, stack.NginxOptions{
		Module: m,
		HTTP:   "include " + snippet("-http") + ";\n" + http,
		Server: "include " + snippet("") + ";\n" + server,
	})
}

// pipelineOn is one frontend on module m whose relay publishes to
// publishPath (a location of n) instead of the shipped /pub.
func pipelineOn(t *testing.T, m stack.Module, n *Nginx, host, publishPath string, o RelayOptions) *pipeline {
	t.Helper()
	if publishPath == "/pub" { // the shipped publisher, in a server of its own
		return pipelineTo(t, m, n, host, n.PublishURL(), o)
	}
	return pipelineTo(t, m, n, host, n.URL(publishPath+"?id={channel}"), o)
}

// pipelineTo is one frontend on module m, Nginx n, whose relay publishes
// to the URL template publish.
func pipelineTo(t *testing.T, m stack.Module, n *Nginx, host, publish string, o RelayOptions) *pipeline {
	t.Helper()
	p := &pipeline{host: host, nginx: n}
	p.broker = newBroker(t, "pushrelay."+host)
	o.Host, o.Exchange, o.Publish, o.Dialect = host, p.broker.Exchange, publish, m.Dialect()
	p.relay = startRelay(t, o)
	return p
}

// uniqueHost makes a relay host name, and so its queue pushrelay.<host>,
// private to this test process: two runs of the same test at once (two
// people on one broker) would otherwise consume each other's queue.
func uniqueHost(name string) string { return fmt.Sprintf("%s-%d", name, os.Getpid()) }
