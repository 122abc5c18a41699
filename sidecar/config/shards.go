package config

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/pelletier/go-toml/v2"

	"github.com/pushrelay/pushrelay/sidecar/shard"
)

// ShardMap builds the shard map of [shards] and checks that this host is in
// it. Three forms are accepted:
//
//   - shards.map, host → ranges: the form for several frontends. Every
//     frontend carries the same map; host picks its entry.
//   - shards.owned alone: shorthand for a map with this host as the only
//     owner, so it must list every shard. It exists so that a one-frontend
//     config from before the map keeps working; it cannot express a split.
//   - neither: this host owns every shard, so one frontend needs no map.
//
// Setting both map and owned is refused: which one wins would be a guess.
func (c *Config) ShardMap() (*shard.Map, error) {
	m, err := c.shardMap()
	if err != nil {
		return nil, err
	}
	if !m.Has(c.Host) {
		return nil, fmt.Errorf("key \"host\": %q is not in shards.map (hosts: %s); set host to this frontend's entry",
			c.Host, strings.Join(m.Hosts(), ", "))
	}
	return m, nil
}

// shardMap builds the map without looking at host, for the commands that
// read a frontend's config elsewhere (the web tier, an operator's machine).
func (c *Config) shardMap() (*shard.Map, error) {
	count := c.Shards.Count
	switch {
	case len(c.Shards.Map) > 0 && len(c.Shards.Owned) > 0:
		return nil, errors.New(`key "shards.owned": set shards.map or shards.owned, not both`)
	case len(c.Shards.Map) > 0:
		m, err := shard.ParseMap(count, c.Shards.Map)
		if err != nil {
			return nil, prefixEach(`key "shards.map": `, err)
		}
		return m, nil
	case len(c.Shards.Owned) > 0:
		m, err := shard.ParseMap(count, map[string][]string{c.Host: c.Shards.Owned})
		if err != nil {
			return nil, prefixEach(`key "shards.owned" (shorthand for a map where this host owns every shard; use shards.map to split shards): `, err)
		}
		return m, nil
	default:
		return shard.ParseMap(count, map[string][]string{c.Host: {fmt.Sprintf("0-%d", count-1)}})
	}
}

// checkShards is Validate's view of ShardMap: a bad shards.count or an empty
// host is already reported under its own key, so it is not reported again.
func (c *Config) checkShards() error {
	if c.Shards.Count < 1 || c.Shards.Count > shard.MaxCount || c.Host == "" {
		return nil
	}
	_, err := c.ShardMap()
	return err
}

// prefixEach prefixes every error of an errors.Join, so each line of the
// message names the key, and errors.As still reaches the shard errors.
func prefixEach(prefix string, err error) error {
	j, ok := err.(interface{ Unwrap() []error })
	if !ok {
		return fmt.Errorf("%s%w", prefix, err)
	}
	var errs []error
	for _, e := range j.Unwrap() {
		errs = append(errs, fmt.Errorf("%s%w", prefix, e))
	}
	return errors.Join(errs...)
}

// LoadShardMap reads only what the shard map needs from the config at path:
// the file must decode, and [shards] must be valid, but host need not be in
// the map and the other sections are not checked. The shard and plan commands
// use it, since they run on machines that are not frontends.
func LoadShardMap(path string) (*shard.Map, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	c := Default()
	if err := toml.NewDecoder(bytes.NewReader(data)).DisallowUnknownFields().Decode(&c); err != nil {
		return nil, fmt.Errorf("%s: %w", path, describeDecodeError(err))
	}
	if c.Shards.Count < 1 || c.Shards.Count > shard.MaxCount {
		return nil, fmt.Errorf("%s: key \"shards.count\": must be 1..%d, got %d", path, shard.MaxCount, c.Shards.Count)
	}
	m, err := c.shardMap()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return m, nil
}
