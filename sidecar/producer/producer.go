// Package producer publishes push messages to RabbitMQ the way the pushrelay
// frontends expect them (README.md, "Shards and the producer side"). It is
// meant to be imported by the Go services of the web tier; the pushrelay
// publish command uses it too.
//
// The Publisher declares nothing: the exchange belongs to the relays'
// deployment, and a producer that declared it with other arguments would
// break the relays' declaration (or the other way round).
package producer

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	neturl "net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/pushrelay/pushrelay/sidecar/shard"
)

// DefaultMaxBody is the relays' default push.max_body. Larger bodies are
// dead-lettered by the relay, so the Publisher refuses them.
const DefaultMaxBody = 32 * 1024

// ErrInvalid wraps every refusal of a message before it reaches the broker:
// retrying such a message cannot succeed.
var ErrInvalid = errors.New("invalid message")

// ErrUnroutable: no queue is bound to the message's shard, so the broker
// returned it. No frontend owns the shard (a shard map with a gap, a
// frontend whose bindings are gone): the message reached nobody. Retry
// later, alert, or send such messages to an alternate exchange by policy.
var ErrUnroutable = errors.New("no frontend's queue is bound to the shard")

// returnsBuffer holds broker returns until a publisher reads them after its
// confirm. amqp091-go delivers them synchronously: a full buffer would stall
// the connection, so it must exceed the publishes in flight at once.
const returnsBuffer = 4096

// publishIDHeader tells a returned message's publisher from the others on
// the same channel.
const publishIDHeader = "x-pushrelay-publish-id"

// Shard returns the shard of channel among count shards: FNV-1a-32 of its
// UTF-8 bytes modulo count. The routing key is its decimal form.
func Shard(channel string, count int) int { return shard.Of(channel, count) }

// Message is one push to the browsers subscribed to Channel.
type Message struct {
	Channel     string
	Body        []byte
	Type        string // AMQP type; the browser sees it as the event type
	ID          string // AMQP message_id; the browser sees it as the event id
	ContentType string
}

// DefaultDialTimeout bounds each node's attempt in Dial and DialAny: the TCP
// connect, then the TLS and AMQP handshakes. A hung node (a stopped broker
// whose kernel still accepts connections) would otherwise hold each attempt
// for amqp091-go's 30 s before the next node is tried.
const DefaultDialTimeout = 5 * time.Second

// Option changes a Publisher's defaults.
type Option func(*Publisher)

// WithMaxBody sets the largest body Publish accepts; match the relays'
// push.max_body.
func WithMaxBody(n int) Option { return func(p *Publisher) { p.maxBody = n } }

// WithDialTimeout sets how long Dial and DialAny give each node to connect
// and finish the handshakes (DefaultDialTimeout). New, which is handed a
// connection, ignores it.
func WithDialTimeout(d time.Duration) Option { return func(p *Publisher) { p.dialTimeout = d } }

// Publisher publishes Messages on one AMQP channel in confirm mode. It is
// safe for concurrent use. After a channel error (for example a missing
// exchange) the next Publish opens a new channel; a closed connection is not
// redialled, because the caller owns it (except with Dial, where Close ends
// it).
type Publisher struct {
	conn     *amqp.Connection
	ownsConn bool
	exchange string
	count    int
	maxBody  int
	// dialTimeout is only read by DialAny, before the Publisher exists.
	dialTimeout time.Duration

	mu     sync.Mutex // guards sess and closed
	sess   *session
	closed bool
	nextID atomic.Uint64
}

// session is one AMQP channel and the reason it closed, once known.
type session struct {
	ch       *amqp.Channel
	closes   chan *amqp.Error
	reason   error // set under Publisher.mu
	returns  chan amqp.Return
	returned map[uint64]bool // publish ids returned, not yet asked for; under Publisher.mu
}

// New returns a Publisher on conn for exchange, routing among count shards.
// It opens its AMQP channel at once so that a broker refusal shows here.
func New(conn *amqp.Connection, exchange string, count int, opts ...Option) (*Publisher, error) {
	if conn == nil {
		return nil, errors.New("producer: nil connection")
	}
	if exchange == "" {
		// The default exchange routes by queue name, not by shard.
		return nil, errors.New("producer: exchange must not be empty")
	}
	if count < 1 || count > shard.MaxCount {
		return nil, fmt.Errorf("producer: shard count must be 1..%d, got %d", shard.MaxCount, count)
	}
	p := &Publisher{conn: conn, exchange: exchange, count: count, maxBody: DefaultMaxBody}
	for _, o := range opts {
		o(p)
	}
	if p.maxBody < 1 {
		return nil, fmt.Errorf("producer: max body must be positive, got %d", p.maxBody)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, err := p.sessionLocked(); err != nil {
		return nil, err
	}
	return p, nil
}

// Dial connects to url and returns a Publisher that owns the connection.
// url may name several nodes of a cluster, comma-separated; DialAny says
// how they are tried, and for how long.
func Dial(url, exchange string, count int, opts ...Option) (*Publisher, error) {
	return DialAny(strings.Split(url, ","), exchange, count, opts...)
}

// DialAny connects to the first of urls that answers, starting from a
// random one so that many producers spread over a cluster's nodes, and
// returns a Publisher that owns the connection. Each node gets
// DefaultDialTimeout (WithDialTimeout changes it) to connect and answer the
// handshakes, so a hung node costs that long, not 30 s; a URL's own
// connection_timeout (milliseconds) wins for its node. It does not redial:
// after a node's loss, Dial again.
func DialAny(urls []string, exchange string, count int, opts ...Option) (*Publisher, error) {
	if len(urls) == 0 {
		return nil, errors.New("producer: no AMQP URL")
	}
	defaults := Publisher{dialTimeout: DefaultDialTimeout}
	for _, o := range opts {
		o(&defaults)
	}
	timeout := defaults.dialTimeout
	if timeout <= 0 {
		return nil, fmt.Errorf("producer: dial timeout must be positive, got %v", timeout)
	}
	first := rand.N(len(urls))
	var errs []error
	for i := range urls {
		url := strings.TrimSpace(urls[(first+i)%len(urls)])
		// amqp091-go reads the URL's connection_timeout only in the dialer
		// this one replaces: keep it winning for its node, as before.
		nodeTimeout := timeout
		if uri, err := amqp.ParseURI(url); err == nil && uri.ConnectionTimeout > 0 {
			nodeTimeout = time.Duration(uri.ConnectionTimeout) * time.Millisecond
		}
		conn, err := amqp.DialConfig(url, amqp.Config{
			Heartbeat:  10 * time.Second,
			Properties: amqp.Table{"connection_name": "pushrelay producer"},
			Dial: func(network, addr string) (net.Conn, error) {
				c, err := net.DialTimeout(network, addr, nodeTimeout)
				if err != nil {
					return nil, err
				}
				// Bounds the TLS and AMQP handshakes, which a hung node
				// never answers; amqp091-go clears it once connected.
				if err := c.SetDeadline(time.Now().Add(nodeTimeout)); err != nil {
					_ = c.Close()
					return nil, err
				}
				return c, nil
			},
		})
		if err != nil {
			var ue *neturl.Error
			if errors.As(err, &ue) { // it quotes the URL, password and all
				err = errors.New("the URL does not parse (not shown: it holds the password)")
			}
			errs = append(errs, fmt.Errorf("node %d: %w", (first+i)%len(urls)+1, err))
			continue
		}
		p, err := New(conn, exchange, count, opts...)
		if err != nil {
			_ = conn.Close()
			return nil, err
		}
		p.ownsConn = true
		return p, nil
	}
	return nil, fmt.Errorf("producer: dial: %w", errors.Join(errs...))
}

// Publish sends m to the shard of its channel and returns once the broker
// has confirmed it. With mandatory unset, a shard no queue is bound to drops
// the message and the broker still confirms it: the frontends own that
// binding. An error wrapping ErrInvalid means m was refused before sending;
// any other error leaves the outcome unknown, and retrying may deliver twice,
// which the relay's at-least-once contract allows.
func (p *Publisher) Publish(ctx context.Context, m Message) error {
	if err := m.validate(p.maxBody); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	key := strconv.Itoa(Shard(m.Channel, p.count))

	p.mu.Lock()
	s, err := p.sessionLocked()
	p.mu.Unlock()
	if err != nil {
		return err
	}
	id := p.nextID.Add(1)
	// mandatory: a shard no queue is bound to comes back (ErrUnroutable)
	// instead of being confirmed and dropped.
	dc, err := s.ch.PublishWithDeferredConfirmWithContext(ctx, p.exchange, key, true, false, amqp.Publishing{
		Headers: amqp.Table{
			"channel":       m.Channel,
			"published_at":  time.Now().UnixMicro(),
			publishIDHeader: int64(id),
		},
		ContentType:  m.ContentType,
		DeliveryMode: amqp.Persistent,
		MessageId:    m.ID,
		Type:         m.Type,
		Body:         m.Body,
	})
	if err != nil {
		return fmt.Errorf("producer: publish to exchange %q, key %s: %w", p.exchange, key, err)
	}
	acked, err := dc.WaitContext(ctx)
	if err != nil {
		return fmt.Errorf("producer: waiting for the broker's confirm: %w", err)
	}
	if !acked {
		p.mu.Lock()
		reason := p.reasonLocked(s)
		p.mu.Unlock()
		if reason != nil {
			return fmt.Errorf("producer: publish to exchange %q, key %s: %w", p.exchange, key, reason)
		}
		return fmt.Errorf("producer: broker refused the message (nack) for exchange %q, key %s", p.exchange, key)
	}
	p.mu.Lock()
	returned := p.wasReturnedLocked(s, id)
	p.mu.Unlock()
	if returned {
		return fmt.Errorf("producer: exchange %q, key %s (channel %q): %w", p.exchange, key, m.Channel, ErrUnroutable)
	}
	return nil
}

// sessionLocked returns the open session, opening a new AMQP channel when the
// last one was closed by the broker.
func (p *Publisher) sessionLocked() (*session, error) {
	if p.closed {
		return nil, errors.New("producer: publisher is closed")
	}
	if p.sess != nil && !p.sess.ch.IsClosed() {
		return p.sess, nil
	}
	if p.conn.IsClosed() {
		return nil, errors.New("producer: AMQP connection is closed")
	}
	ch, err := p.conn.Channel()
	if err != nil {
		return nil, fmt.Errorf("producer: open channel: %w", err)
	}
	if err := ch.Confirm(false); err != nil {
		_ = ch.Close()
		return nil, fmt.Errorf("producer: enable publisher confirms: %w", err)
	}
	// One close at most per channel, so a buffer of one never blocks the
	// library's shutdown path.
	p.sess = &session{ch: ch, closes: ch.NotifyClose(make(chan *amqp.Error, 1)),
		returns: ch.NotifyReturn(make(chan amqp.Return, returnsBuffer)), returned: map[uint64]bool{}}
	return p.sess, nil
}

// wasReturnedLocked reports whether the broker returned publish id. The
// broker sends basic.return before the confirm of the same message, and
// amqp091-go hands both over in that order, so once the confirm is in, a
// return for it is in s.returns (or, read by another publisher, in
// s.returned).
func (p *Publisher) wasReturnedLocked(s *session, id uint64) bool {
	for {
		select {
		case r := <-s.returns:
			if rid, ok := r.Headers[publishIDHeader].(int64); ok {
				s.returned[uint64(rid)] = true
			}
			continue
		default:
		}
		break
	}
	if s.returned[id] {
		delete(s.returned, id)
		return true
	}
	return false
}

// reasonLocked returns why s's channel closed, if it did. The library queues
// the close reason before it nacks the pending confirms, so after a nack the
// reason is already waiting.
func (p *Publisher) reasonLocked(s *session) error {
	if s.reason == nil {
		select {
		case e, ok := <-s.closes:
			if ok && e != nil {
				s.reason = e
			}
		default:
		}
	}
	return s.reason
}

// Close closes the Publisher's AMQP channel, and the connection if Dial
// opened it.
func (p *Publisher) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	var errs []error
	if p.sess != nil && !p.sess.ch.IsClosed() && !p.conn.IsClosed() {
		if err := p.sess.ch.Close(); err != nil {
			errs = append(errs, fmt.Errorf("producer: close channel: %w", err))
		}
	}
	p.sess = nil
	p.closed = true
	if p.ownsConn && !p.conn.IsClosed() {
		if err := p.conn.Close(); err != nil {
			errs = append(errs, fmt.Errorf("producer: close connection: %w", err))
		}
	}
	return errors.Join(errs...)
}
