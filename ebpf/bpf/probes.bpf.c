// SPDX-License-Identifier: (GPL-2.0-only OR MIT)
/*
 * pushrelay socket probes: TCP connection lifecycle and packet/byte counts
 * for the local ports Nginx serves.
 *
 * One connection program is loaded, the first of tp_btf, raw_tp, tracepoint
 * this kernel accepts; one pair of packet programs, cgroup_skb on Nginx's
 * cgroup or else tcx on the interfaces. All of them count into the same
 * per-CPU slots, so userspace reads one layout whatever was attached.
 */
#include "probes.h"
#include "bpf_helpers.h"
#include "bpf_core_read.h"
#include "bpf_endian.h"

/* bpf_probe_read_kernel is GPL-only. */
char LICENSE[] SEC("license") = "Dual MIT/GPL";

#define MAX_PORTS 64

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

/* Tracepoints fire for every network namespace; 0 counts them all. */
const volatile __u32 netns_ino = 0;

static __always_inline struct counters *slot_of(__u16 port)
{
	__u32 *slot = bpf_map_lookup_elem(&ports, &port);

	if (!slot)
		return 0;
	return bpf_map_lookup_elem(&stats, slot);
}

static __always_inline void count_state(__u16 lport, int old, int new)
{
	struct counters *c = slot_of(lport);

	if (!c)
		return;
	if (new == TCP_ESTABLISHED) {
		c->est_up++;
		if (old == TCP_SYN_RECV)
			c->accepted++;
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
	count_state(local_port(sk), old, new);
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
	count_state(local_port(sk), old, new);
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
	count_state(ctx->sport, ctx->oldstate, ctx->newstate);
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
