// SPDX-License-Identifier: (GPL-2.0-only OR MIT)
/*
 * pushrelay socket probes: TCP connection lifecycle and packet/byte counts
 * for the local ports Nginx serves.
 *
 * One connection program is loaded, the first of tp_btf, raw_tp, tracepoint
 * this kernel accepts; the same for the three TCP event programs (resets
 * sent and received, retransmits); one pair of packet programs, cgroup_skb
 * on Nginx's cgroup or else tcx on the interfaces. All of them count into
 * the same per-CPU slots, so userspace reads one layout whatever was
 * attached.
 */
#include "probes.h"
#include "bpf_helpers.h"
#include "bpf_core_read.h"
#include "bpf_endian.h"

/* bpf_probe_read_kernel is GPL-only. */
char LICENSE[] SEC("license") = "Dual MIT/GPL";

#define MAX_PORTS 64
#define LIFETIME_BUCKETS 16

/* One slot per watched port, summed over CPUs by userspace. The counters
 * only grow, so a reader's deltas are never negative. */
struct counters {
	__u64 accepted;   /* SYN_RECV -> ESTABLISHED */
	__u64 closed;     /* -> CLOSE, not from LISTEN or SYN_SENT */
	__u64 est_up;     /* -> ESTABLISHED */
	__u64 est_down;   /* ESTABLISHED -> */
	__u64 rx_packets; /* segments to the port (GSO/GRO counted per segment) */
	__u64 rx_bytes;   /* IP bytes of those segments */
	__u64 rx_payload; /* TCP payload bytes of those segments */
	__u64 tx_packets;
	__u64 tx_bytes;
	__u64 tx_payload;
	__u64 rst_sent;     /* RSTs sent from the port, aborts and refusals */
	__u64 rst_received; /* RSTs that reset a socket of the port */
	__u64 retrans_segs; /* segments retransmitted from the port */
	__u64 lifetime_ns;  /* sum of the lifetimes observed below */
	/* Accepted connections by lifetime at CLOSE, per bucket (not
	 * cumulative); the bounds are lifetime_bound_ms, the last is +Inf. */
	__u64 lifetime[LIFETIME_BUCKETS];
};

/* Host-order port -> slot. A hash, so userspace can change the watched
 * ports at runtime without reloading anything. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_PORTS);
	__type(key, __u16);
	__type(value, __u32);
} ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_PORTS);
	__type(key, __u32);
	__type(value, struct counters);
} stats SEC(".maps");

/* Socket address -> ktime when an accepted connection of a watched port
 * became ESTABLISHED. Not preallocated: it costs memory only for the
 * connections open now (about 64 bytes each), and 2M leaves room for a
 * 1M-connection frontend; a connection that finds it full is not observed.
 * A plain hash rather than sk_storage: that needs a BTF socket pointer,
 * which raw_tp and the classic tracepoint do not have, and it costs more
 * per socket. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1 << 21);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, __u64);
} est_at SEC(".maps");

/* Tracepoints fire for every network namespace; 0 counts them all. */
const volatile __u32 netns_ino = 0;

static __always_inline struct counters *slot_of(__u16 port)
{
	__u32 *slot = bpf_map_lookup_elem(&ports, &port);

	if (!slot)
		return 0;
	return bpf_map_lookup_elem(&stats, slot);
}

/* Upper bounds of the lifetime buckets; metrics.go's lifetimeBounds says
 * the same in seconds. */
static const __u32 lifetime_bound_ms[LIFETIME_BUCKETS - 1] = {
	10, 100, 500, 1000, 5000, 10000, 30000, 60000, 300000, 600000,
	1800000, 3600000, 7200000, 21600000, 86400000,
};

/* Observes the lifetime of a closing socket that was accepted while its
 * port was watched. The entry goes whether or not the port still is, so
 * that unwatching a port leaves nothing behind. */
static __always_inline void observe_lifetime(struct counters *c, __u64 key)
{
	__u64 *at, ns;
	__u32 i, b = LIFETIME_BUCKETS - 1;

	if (!c) {
		bpf_map_delete_elem(&est_at, &key);
		return;
	}
	at = bpf_map_lookup_elem(&est_at, &key);
	if (!at)
		return; /* established before the probes started, or map full */
	ns = bpf_ktime_get_ns() - *at;
	bpf_map_delete_elem(&est_at, &key);
#pragma unroll
	for (i = 0; i < LIFETIME_BUCKETS - 1; i++) {
		if (ns <= (__u64)lifetime_bound_ms[i] * 1000000) {
			b = i;
			break;
		}
	}
	c->lifetime[b]++;
	c->lifetime_ns += ns;
}

static __always_inline void count_state(const void *sk, __u16 lport, int old, int new)
{
	struct counters *c = slot_of(lport);
	__u64 key = (__u64)sk;

	if (new == TCP_CLOSE && old != TCP_LISTEN && old != TCP_SYN_SENT)
		observe_lifetime(c, key);
	if (!c)
		return;
	if (new == TCP_ESTABLISHED) {
		c->est_up++;
		if (old == TCP_SYN_RECV) {
			__u64 now = bpf_ktime_get_ns();

			c->accepted++;
			bpf_map_update_elem(&est_at, &key, &now, BPF_ANY);
		}
	}
	if (old == TCP_ESTABLISHED)
		c->est_down++;
	if (new == TCP_CLOSE && old != TCP_LISTEN && old != TCP_SYN_SENT)
		c->closed++;
}

/* The local port comes from inet_sport: at ->CLOSE the socket has already
 * left the bind hash and skc_num reads 0. */
static __always_inline __u16 local_port(const struct sock *sk)
{
	const struct inet_sock *inet = (const void *)sk;
	__be16 sport = 0;

	bpf_probe_read_kernel(&sport, sizeof(sport), &inet->inet_sport);
	return bpf_ntohs(sport);
}

SEC("tp_btf/inet_sock_set_state")
int conn_tp_btf(__u64 *ctx)
{
	const struct sock *sk = (const void *)ctx[0];
	int old = (int)ctx[1], new = (int)ctx[2];

	/* sk is a BTF pointer here: plain loads, no probe-read helpers. */
	if (sk->sk_protocol != IPPROTO_TCP)
		return 0;
	if (netns_ino && sk->__sk_common.skc_net.net->ns.inum != netns_ino)
		return 0;
	count_state(sk, local_port(sk), old, new);
	return 0;
}

SEC("raw_tp/inet_sock_set_state")
int conn_raw_tp(__u64 *ctx)
{
	const struct sock *sk = (const void *)ctx[0];
	int old = (int)ctx[1], new = (int)ctx[2];

	if (BPF_CORE_READ(sk, sk_protocol) != IPPROTO_TCP)
		return 0;
	if (netns_ino && BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum) != netns_ino)
		return 0;
	count_state(sk, local_port(sk), old, new);
	return 0;
}

SEC("tracepoint/sock/inet_sock_set_state")
int conn_tracepoint(struct trace_event_raw_inet_sock_set_state *ctx)
{
	const struct sock *sk = ctx->skaddr;

	if (ctx->protocol != IPPROTO_TCP)
		return 0;
	if (netns_ino && BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum) != netns_ino)
		return 0;
	/* The event's sport is already host order, taken from inet_sport. */
	count_state(sk, ctx->sport, ctx->oldstate, ctx->newstate);
	return 0;
}

/* TCP events: resets and retransmits. Each kind has the same three
 * flavours as the connection program, loaded in the same order. */

static __always_inline int netns_ok(const struct sock *sk)
{
	return !netns_ino || BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum) == netns_ino;
}

static __always_inline void count_reset(__u16 lport, int sent)
{
	struct counters *c = slot_of(lport);

	if (!c)
		return;
	if (sent)
		c->rst_sent++;
	else
		c->rst_received++;
}

/* A reset sent by a full socket (an abort, e.g. close with SO_LINGER 0)
 * belongs to its local port. One answering a segment that found no socket
 * (a closed port), a TIME_WAIT or a request socket belongs to the segment's
 * destination port, and its netns is the receiving device's: the same
 * choice the tracepoint's own record makes. */
static __always_inline void count_reset_sent(const struct sock *sk, const struct sk_buff *skb)
{
	unsigned char *th;
	__be16 dport = 0;

	if (sk) {
		int state = BPF_CORE_READ(sk, __sk_common.skc_state);

		if (state != TCP_TIME_WAIT && state != TCP_NEW_SYN_RECV) {
			if (netns_ok(sk))
				count_reset(local_port(sk), 1);
			return;
		}
	}
	if (!skb)
		return;
	if (netns_ino && BPF_CORE_READ(skb, dev, nd_net.net, ns.inum) != netns_ino)
		return;
	th = BPF_CORE_READ(skb, data);
	bpf_probe_read_kernel(&dport, sizeof(dport), th + 2);
	count_reset(bpf_ntohs(dport), 1);
}

/* RetransSegs counts a retransmitted skb as the segments it stands for, and
 * so do we. */
static __always_inline void count_retransmit(__u16 lport, const struct sk_buff *skb)
{
	struct counters *c = slot_of(lport);
	const struct tcp_skb_cb *cb;
	__u16 segs = 0;

	if (!c)
		return;
	cb = (const void *)__builtin_preserve_access_index(&skb->cb);
	bpf_core_read(&segs, sizeof(segs), &cb->tcp_gso_segs);
	c->retrans_segs += segs ? segs : 1;
}

SEC("tp_btf/tcp_send_reset")
int rst_sent_tp_btf(__u64 *ctx)
{
	count_reset_sent((const void *)ctx[0], (const void *)ctx[1]);
	return 0;
}

SEC("raw_tp/tcp_send_reset")
int rst_sent_raw_tp(__u64 *ctx)
{
	count_reset_sent((const void *)ctx[0], (const void *)ctx[1]);
	return 0;
}

SEC("tracepoint/tcp/tcp_send_reset")
int rst_sent_tracepoint(struct trace_event_raw_tcp_send_reset *ctx)
{
	const struct sock *sk = ctx->skaddr;
	const struct sk_buff *skb = ctx->skbaddr;
	__be16 port = 0;

	if (netns_ino) {
		__u32 ino = 0;

		if (sk)
			ino = BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
		else if (skb)
			ino = BPF_CORE_READ(skb, dev, nd_net.net, ns.inum);
		if (ino != netns_ino)
			return 0;
	}
	bpf_probe_read_kernel(&port, sizeof(port), &ctx->saddr[2]);
	count_reset(bpf_ntohs(port), 1);
	return 0;
}

SEC("tp_btf/tcp_receive_reset")
int rst_recv_tp_btf(__u64 *ctx)
{
	const struct sock *sk = (const void *)ctx[0];

	if (netns_ino && sk->__sk_common.skc_net.net->ns.inum != netns_ino)
		return 0;
	count_reset(local_port(sk), 0);
	return 0;
}

SEC("raw_tp/tcp_receive_reset")
int rst_recv_raw_tp(__u64 *ctx)
{
	const struct sock *sk = (const void *)ctx[0];

	if (!netns_ok(sk))
		return 0;
	count_reset(local_port(sk), 0);
	return 0;
}

SEC("tracepoint/tcp/tcp_receive_reset")
int rst_recv_tracepoint(struct trace_event_raw_tcp_event_sk *ctx)
{
	if (!netns_ok(ctx->skaddr))
		return 0;
	count_reset(ctx->sport, 0);
	return 0;
}

/* Kernels whose tracepoint has err also trace attempts that failed, which
 * are not retransmissions; older ones trace successful attempts only, and
 * have no third argument to read. */
static __always_inline int retransmit_failed(__u64 *ctx)
{
	if (!bpf_core_field_exists(struct trace_event_raw_tcp_retransmit_skb, err))
		return 0;
	return (int)ctx[2] != 0;
}

SEC("tp_btf/tcp_retransmit_skb")
int retrans_tp_btf(__u64 *ctx)
{
	const struct sock *sk = (const void *)ctx[0];

	if (netns_ino && sk->__sk_common.skc_net.net->ns.inum != netns_ino)
		return 0;
	if (retransmit_failed(ctx))
		return 0;
	count_retransmit(local_port(sk), (const void *)ctx[1]);
	return 0;
}

SEC("raw_tp/tcp_retransmit_skb")
int retrans_raw_tp(__u64 *ctx)
{
	const struct sock *sk = (const void *)ctx[0];

	if (!netns_ok(sk))
		return 0;
	if (retransmit_failed(ctx))
		return 0;
	count_retransmit(local_port(sk), (const void *)ctx[1]);
	return 0;
}

SEC("tracepoint/tcp/tcp_retransmit_skb")
int retrans_tracepoint(struct trace_event_raw_tcp_retransmit_skb *ctx)
{
	if (!netns_ok(ctx->skaddr))
		return 0;
	if (ctx->err != 0)
		return 0;
	count_retransmit(ctx->sport, ctx->skbaddr);
	return 0;
}

struct tcp_ports {
	__be16 source;
	__be16 dest;
	__u32 seq;
	__u32 ack_seq;
	__u8 res_doff; /* doff in the high nibble */
};

/* Finds the TCP ports and the IP+TCP header length of a packet whose IP
 * header starts at off. Returns 0 for anything that is not the first
 * fragment of a TCP segment. IPv6 extension headers are not walked: Nginx's
 * TCP traffic does not carry them. */
static __always_inline int parse_tcp(struct __sk_buff *skb, __u32 off,
				     __u16 *sport, __u16 *dport, __u32 *hdrlen)
{
	struct tcp_ports tcp;
	__u32 l3len;
	__u8 b[20];

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		if (bpf_skb_load_bytes(skb, off, b, 20) < 0)
			return 0;
		if (b[9] != IPPROTO_TCP)
			return 0;
		if (((b[6] & 0x1f) | b[7]) != 0) /* fragment offset */
			return 0;
		l3len = (b[0] & 0x0f) * 4;
		if (l3len < 20)
			return 0;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		if (bpf_skb_load_bytes(skb, off + 6, b, 1) < 0)
			return 0;
		if (b[0] != IPPROTO_TCP)
			return 0;
		l3len = 40;
	} else {
		return 0;
	}
	if (bpf_skb_load_bytes(skb, off + l3len, &tcp, sizeof(tcp)) < 0)
		return 0;
	*sport = bpf_ntohs(tcp.source);
	*dport = bpf_ntohs(tcp.dest);
	*hdrlen = l3len + (tcp.res_doff >> 4) * 4;
	return 1;
}

/* Counts one skb. A GSO/GRO skb stands for gso_segs segments on the wire,
 * each with its own headers, which skb->len counts only once. */
static __always_inline void count_packet(struct __sk_buff *skb, __u32 off, int ingress)
{
	__u16 sport, dport;
	__u32 hdrlen, l3len, segs;
	struct counters *c;

	if (!parse_tcp(skb, off, &sport, &dport, &hdrlen))
		return;
	c = slot_of(ingress ? dport : sport);
	if (!c)
		return;
	l3len = skb->len - off;
	segs = skb->gso_segs;
	if (segs == 0)
		segs = 1;
	if (l3len < hdrlen)
		return;
	if (ingress) {
		c->rx_packets += segs;
		c->rx_bytes += l3len + (__u64)(segs - 1) * hdrlen;
		c->rx_payload += l3len - hdrlen;
	} else {
		c->tx_packets += segs;
		c->tx_bytes += l3len + (__u64)(segs - 1) * hdrlen;
		c->tx_payload += l3len - hdrlen;
	}
}

/* cgroup_skb sees the packets of Nginx's sockets only, starting at the IP
 * header, on any interface. Returning 1 lets every packet through. */
SEC("cgroup_skb/ingress")
int pkt_cg_ingress(struct __sk_buff *skb)
{
	count_packet(skb, 0, 1);
	return 1;
}

SEC("cgroup_skb/egress")
int pkt_cg_egress(struct __sk_buff *skb)
{
	count_packet(skb, 0, 0);
	return 1;
}

/* tcx sees every packet of one interface, starting at the Ethernet header.
 * TCX_NEXT (-1) hands the packet on unchanged. */
SEC("tcx/ingress")
int pkt_tcx_ingress(struct __sk_buff *skb)
{
	count_packet(skb, ETH_HLEN, 1);
	return -1;
}

SEC("tcx/egress")
int pkt_tcx_egress(struct __sk_buff *skb)
{
	count_packet(skb, ETH_HLEN, 0);
	return -1;
}
