package main

import (
	"flag"
	"fmt"
	"io"

	"github.com/pushrelay/pushrelay/sidecar/config"
	"github.com/pushrelay/pushrelay/sidecar/producer"
	"github.com/pushrelay/pushrelay/sidecar/shard"
)

// runShard is `pushrelay shard [-config FILE] CHANNEL...`: one line
// "channel shard owner" per valid channel, so that an operator or the web
// tier sees where a channel lives. It reads only the config's shard map, so
// it works on any machine holding a copy of a frontend's config.
func runShard(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("shard", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("config", "/etc/pushrelay/pushrelay.toml", "config file whose [shards] is used")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: pushrelay shard [-config FILE] CHANNEL...")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() == 0 {
		fs.Usage()
		return 2
	}
	m, err := config.LoadShardMap(*path)
	if err != nil {
		fmt.Fprintln(stderr, "pushrelay shard:", err)
		return 1
	}
	rc := 0
	for _, ch := range fs.Args() {
		// The relay dead-letters an invalid channel, so it has no owner
		// worth printing; saying why is more useful.
		if err := producer.ValidChannel(ch); err != nil {
			fmt.Fprintln(stderr, "pushrelay shard:", err)
			rc = 1
			continue
		}
		s := shard.Of(ch, m.Count())
		fmt.Fprintf(stdout, "%s %d %s\n", ch, s, m.Owner(s))
	}
	return rc
}
