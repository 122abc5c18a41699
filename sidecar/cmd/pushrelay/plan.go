package main

import (
	"flag"
	"fmt"
	"io"
	"slices"
	"strings"

	"github.com/pushrelay/pushrelay/sidecar/config"
	"github.com/pushrelay/pushrelay/sidecar/shard"
)

// runPlan is `pushrelay plan -hosts fe1,fe2,... [-from FILE] [-count N]`. It
// prints a balanced [shards.map] table ready to paste into pushrelay.toml;
// with -from, the one that moves the fewest shards away from FILE's map, and
// as its last line "# moved: N". Everything else it prints is a TOML
// comment, so the whole output can be pasted.
func runPlan(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("plan", flag.ContinueOnError)
	fs.SetOutput(stderr)
	hostList := fs.String("hosts", "", "comma-separated frontends of the new map, e.g. fe1,fe2,fe3")
	from := fs.String("from", "", "current config; the plan moves the fewest shards from its map")
	count := fs.Int("count", 0, fmt.Sprintf("shard count (default: that of -from, else %d)", shard.DefaultCount))
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: pushrelay plan -hosts fe1,fe2,... [-from FILE] [-count N]")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return 2
	}
	hosts, err := parseHosts(*hostList)
	if err == nil && fs.NArg() > 0 {
		err = fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if err != nil {
		fmt.Fprintln(stderr, "pushrelay plan:", err)
		fs.Usage()
		return 2
	}

	var cur *shard.Map
	if *from != "" {
		if cur, err = config.LoadShardMap(*from); err != nil {
			fmt.Fprintln(stderr, "pushrelay plan:", err)
			return 1
		}
		if *count != 0 && *count != cur.Count() {
			// A new count renumbers every shard: all channels change
			// queue at once, which is a migration, not a rebalance.
			fmt.Fprintf(stderr, "pushrelay plan: -count %d differs from shards.count %d in %s; changing the count moves every channel and is not a rebalance\n", *count, cur.Count(), *from)
			return 1
		}
		*count = cur.Count()
	}
	if *count == 0 {
		*count = shard.DefaultCount
	}
	if *count < 1 || *count > shard.MaxCount {
		fmt.Fprintf(stderr, "pushrelay plan: -count must be 1..%d, got %d\n", shard.MaxCount, *count)
		return 2
	}

	next, moved := shard.Plan(hosts, *count, cur)
	q := *count / len(hosts)
	each := fmt.Sprint(q)
	if *count%len(hosts) != 0 {
		each = fmt.Sprintf("%d or %d", q, q+1)
	}
	fmt.Fprintf(stdout, "# pushrelay plan: %d hosts, %d shards, %s each\n", len(hosts), *count, each)
	if cur != nil {
		fmt.Fprintf(stdout, "# from %s (shards owned: before -> after):\n", *from)
		for _, h := range next.Hosts() {
			before, after := len(cur.Owned(h)), len(next.Owned(h))
			note := ""
			if !slices.Contains(hosts, h) {
				note = "  (removed: keep this entry until its relay has drained and stopped)"
			}
			fmt.Fprintf(stdout, "#   %-12s %5d -> %5d%s\n", h, before, after, note)
		}
	}
	fmt.Fprint(stdout, next.TOML())
	if cur != nil {
		fmt.Fprintf(stdout, "# moved: %d\n", moved)
	}
	return 0
}

func parseHosts(list string) ([]string, error) {
	if strings.TrimSpace(list) == "" {
		return nil, fmt.Errorf("-hosts is required")
	}
	var hosts []string
	for _, h := range strings.Split(list, ",") {
		h = strings.TrimSpace(h)
		switch {
		case h == "":
			return nil, fmt.Errorf("-hosts %q has an empty name", list)
		case slices.Contains(hosts, h):
			return nil, fmt.Errorf("-hosts names %q twice", h)
		}
		hosts = append(hosts, h)
	}
	return hosts, nil
}
