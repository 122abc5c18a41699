package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/pushrelay/pushrelay/sidecar/config"
	"github.com/pushrelay/pushrelay/sidecar/producer"
)

// runPublish is `pushrelay publish -config FILE -channel C [-type T] [-id ID]
// < body`: one message, published the way the web tier does it, through the
// producer package. It is for operators testing a path end to end, so it
// reads a frontend's config for the broker, exchange, count and max body.
func runPublish(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("publish", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("config", "/etc/pushrelay/pushrelay.toml", "config file (amqp, shards.count, push.max_body)")
	channel := fs.String("channel", "", "channel id (required)")
	typ := fs.String("type", "", "event type (AMQP type)")
	id := fs.String("id", "", "event id (AMQP message_id)")
	contentType := fs.String("content-type", "", "content type of the body")
	timeout := fs.Duration("timeout", 10*time.Second, "give up when the broker has not confirmed by then")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: pushrelay publish [-config FILE] -channel C [-type T] [-id ID] [-content-type CT] < body")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *channel == "" || fs.NArg() > 0 {
		fs.Usage()
		return 2
	}
	cfg, err := config.Load(*path)
	if err != nil {
		fmt.Fprintln(stderr, "pushrelay publish:", err)
		return 1
	}
	// Read one byte past the limit so an oversized body is refused rather
	// than cut.
	body, err := io.ReadAll(io.LimitReader(stdin, int64(cfg.Push.MaxBody)+1))
	if err != nil {
		fmt.Fprintln(stderr, "pushrelay publish: read body:", err)
		return 1
	}
	urls, err := cfg.AMQPURLs()
	if err != nil {
		fmt.Fprintln(stderr, "pushrelay publish:", err)
		return 1
	}
	p, err := producer.DialAny(urls, cfg.AMQP.Exchange, cfg.Shards.Count, producer.WithMaxBody(cfg.Push.MaxBody))
	if err != nil {
		fmt.Fprintf(stderr, "pushrelay publish: %s: %v\n", config.RedactAll(urls), err)
		return 1
	}
	defer p.Close()

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	m := producer.Message{Channel: *channel, Body: body, Type: *typ, ID: *id, ContentType: *contentType}
	if err := p.Publish(ctx, m); err != nil {
		fmt.Fprintln(stderr, "pushrelay publish:", err)
		return 1
	}
	fmt.Fprintf(stdout, "published %d bytes to %s: exchange %s, shard %d\n", len(body), *channel, cfg.AMQP.Exchange, producer.Shard(*channel, cfg.Shards.Count))
	return 0
}
