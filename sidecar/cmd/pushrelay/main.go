// Command pushrelay relays a frontend's sharded RabbitMQ queue to its local
// Push Stream (or Nchan) publisher. This file only parses the command line
// and hands over to the packages that do the work.
package main

import (
	"fmt"
	"io"
	"os"

	"github.com/pushrelay/pushrelay/sidecar/config"
	"github.com/pushrelay/pushrelay/sidecar/version"
)

const usage = `usage: pushrelay <command> [arguments]

commands:
  run -config FILE                 relay this host's queue to the local publisher
  check-config FILE                validate a config file and its AMQP URLs (exit 0, or 1 with the error)
  probes [-config FILE] [-for 5s]  count this host's Nginx connections/packets with eBPF and print /metrics
  shard [-config FILE] CHANNEL...  print "channel shard owner" for each channel
  plan -hosts fe1,fe2,... [-from FILE] [-count N]
                                   print a balanced [shards.map]; with -from, the one moving the fewest shards
  publish [-config FILE] -channel C [-type T] [-id ID] [-content-type CT] < body
                                   publish one message as the web tier does
  top [-interval 1s] [-once] [[NAME=]ADDR...]
                                   live view of relays' /metrics, one row per host (default 127.0.0.1:9470)
  version                          print the version
`

func main() {
	os.Exit(dispatch(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}

func dispatch(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	switch cmd, rest := args[0], args[1:]; cmd {
	case "run":
		return runRelay(rest, stderr)
	case "check-config":
		return checkConfig(rest, stdout, stderr)
	case "probes":
		return runProbes(rest, stdout, stderr)
	case "shard":
		return runShard(rest, stdout, stderr)
	case "plan":
		return runPlan(rest, stdout, stderr)
	case "publish":
		return runPublish(rest, stdin, stdout, stderr)
	case "top":
		return runTop(rest, stdin, stdout, stderr)
	case "version", "-version", "--version":
		fmt.Fprintln(stdout, "pushrelay", version.Version)
		return 0
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "pushrelay: unknown command %q\n\n%s", cmd, usage)
		return 2
	}
}

func checkConfig(args []string, stdout, stderr io.Writer) int {
	if len(args) != 1 {
		fmt.Fprintln(stderr, "usage: pushrelay check-config FILE")
		return 2
	}
	cfg, err := config.Load(args[0])
	if err != nil {
		fmt.Fprintln(stderr, "pushrelay: invalid config:", err)
		return 1
	}
	// The relay reads amqp.url_file and $PUSHRELAY_AMQP_URL only when it
	// connects; systemd runs check-config before a start or a reload, so a
	// file the relay could not use must fail here, not after the reload.
	if err := cfg.CheckAMQPURLs(); err != nil {
		fmt.Fprintln(stderr, "pushrelay: invalid AMQP URL:", err)
		return 1
	}
	fmt.Fprintln(stdout, args[0]+": ok")
	return 0
}
