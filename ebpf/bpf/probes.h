/* SPDX-License-Identifier: (GPL-2.0-only OR MIT) */
/*
 * The few kernel types the probes touch, written by hand instead of a
 * multi-megabyte vmlinux.h: the structs carry preserve_access_index, so
 * every field offset is relocated (CO-RE) against the running kernel's BTF,
 * and field order or padding here need not match the kernel. Nothing in this
 * file is architecture-specific, which is why the same source builds for
 * amd64 and arm64.
 */
#ifndef PUSHRELAY_PROBES_H
#define PUSHRELAY_PROBES_H

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef signed char __s8;
typedef short __s16;
typedef int __s32;
typedef long long __s64;
typedef __u16 __be16;
typedef __u32 __be32;
typedef __u32 __wsum;

/* UAPI constants and the skb context, copied from linux/bpf.h (stable ABI). */
enum {
	BPF_MAP_TYPE_HASH = 1,
	BPF_MAP_TYPE_PERCPU_ARRAY = 6,
};

#define BPF_ANY 0
#define BPF_F_NO_PREALLOC 1

#define __bpf_md_ptr(type, name) \
	union {                  \
		type name;       \
		__u64 : 64;      \
	} __attribute__((aligned(8)))

struct __sk_buff {
	__u32 len;
	__u32 pkt_type;
	__u32 mark;
	__u32 queue_mapping;
	__u32 protocol;
	__u32 vlan_present;
	__u32 vlan_tci;
	__u32 vlan_proto;
	__u32 priority;
	__u32 ingress_ifindex;
	__u32 ifindex;
	__u32 tc_index;
	__u32 cb[5];
	__u32 hash;
	__u32 tc_classid;
	__u32 data;
	__u32 data_end;
	__u32 napi_id;
	__u32 family;
	__u32 remote_ip4;
	__u32 local_ip4;
	__u32 remote_ip6[4];
	__u32 local_ip6[4];
	__u32 remote_port;
	__u32 local_port;
	__u32 data_meta;
	__bpf_md_ptr(struct bpf_flow_keys *, flow_keys);
	__u64 tstamp;
	__u32 wire_len;
	__u32 gso_segs;
	__bpf_md_ptr(struct bpf_sock *, sk);
	__u32 gso_size;
	__u8 tstamp_type;
	__u32 : 24;
	__u64 hwtstamp;
};

/* include/net/tcp_states.h */
enum {
	TCP_ESTABLISHED = 1,
	TCP_SYN_SENT = 2,
	TCP_SYN_RECV = 3,
	TCP_TIME_WAIT = 6,
	TCP_CLOSE = 7,
	TCP_LISTEN = 10,
	TCP_NEW_SYN_RECV = 12,
};

#define IPPROTO_TCP 6
#define ETH_HLEN 14
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD

/* Kernel structs, relocated by field name. Anonymous unions in the kernel
 * are flattened here: CO-RE looks a field up through them. */
struct ns_common {
	unsigned int inum;
} __attribute__((preserve_access_index));

struct net {
	struct ns_common ns;
} __attribute__((preserve_access_index));

typedef struct {
	struct net *net;
} possible_net_t;

struct sock_common {
	possible_net_t skc_net;
	unsigned char skc_state;
} __attribute__((preserve_access_index));

struct sock {
	struct sock_common __sk_common;
	__u16 sk_protocol;
} __attribute__((preserve_access_index));

struct inet_sock {
	__be16 inet_sport;
} __attribute__((preserve_access_index));

struct net_device {
	possible_net_t nd_net;
} __attribute__((preserve_access_index));

/* skb->data points at the TCP header where the kernel sends a reset for a
 * received segment; cb holds struct tcp_skb_cb while TCP owns the skb. */
struct sk_buff {
	struct net_device *dev;
	char cb[48];
	unsigned char *data;
} __attribute__((preserve_access_index));

struct tcp_skb_cb {
	__u16 tcp_gso_segs; /* segments the skb stands for (tcp_skb_pcount) */
} __attribute__((preserve_access_index));

struct trace_entry {
	unsigned short type;
	unsigned char flags;
	unsigned char preempt_count;
	int pid;
};

struct trace_event_raw_inet_sock_set_state {
	struct trace_entry ent;
	const void *skaddr;
	int oldstate;
	int newstate;
	__u16 sport;
	__u16 dport;
	__u16 family;
	__u16 protocol;
} __attribute__((preserve_access_index));

/* The classic tcp tracepoints' records, as of Linux 6.10+ (reset reason,
 * retransmit err). saddr is a struct sockaddr_in/in6 whose port (bytes 2-3,
 * network order) is the local one, also when the reset answers a segment
 * that found no socket. */
struct trace_event_raw_tcp_send_reset {
	struct trace_entry ent;
	const void *skbaddr;
	const void *skaddr;
	int state;
	__u8 saddr[28];
} __attribute__((preserve_access_index));

struct trace_event_raw_tcp_event_sk {
	struct trace_entry ent;
	const void *skaddr;
	__u16 sport;
} __attribute__((preserve_access_index));

struct trace_event_raw_tcp_retransmit_skb {
	struct trace_entry ent;
	const void *skbaddr;
	const void *skaddr;
	__u16 sport;
	int err;
} __attribute__((preserve_access_index));

#endif
